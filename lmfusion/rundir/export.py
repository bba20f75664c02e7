"""The export, the shareable form of a training checkpoint (safetensors + JSON, nothing to unpickle): its format and
its loader. ``lmfusion export-ckpt`` writes it (:func:`lmfusion.inference.export.export_checkpoint`, which loads the
iteration as inference does).

    OUT/lmfusion_export.json   the record: format, iteration, model config, VAE block, diffusion objective
                               (null: epsilon), EMA set (null: none), base ("base"), its conversion.json sha256 and
                               its other files' ("base_files"), the integrity manifest's sha256 (written last)
    OUT/image.safetensors      the trained image set, whole tensors under their sharded-checkpoint keys (layer index
                               as the first axis of per-layer tensors, as megatron's dist_checkpointing keys them),
                               so any TP/PP size slices its part
    OUT/ema.safetensors        runs with train.ema: the average of the image set, same keys (the record's "ema")
    OUT/base/                  a copy of the frozen base (safetensors, JSON, tokenizer files)
    OUT/integrity.json         sha256 + size of every other file

Loading (:func:`load_export`) reads only JSON and safetensors: generation, captioning, chat and evaluation accept an
export from anyone. A training directory (megatron/torch distributed checkpoint, DeepSpeed files) is for the user's
own runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lmfusion.errors import UserError
from lmfusion.rundir.layout import read_record
from lmfusion.rundir.trust import CheckpointLoadError

__all__ = ["EXPORT_JSON", "IMAGE_SET", "EMA_SET", "EXPORT_FORMAT", "EXPORT_VERSION", "is_export", "image_set_tensors",
           "load_export", "sharded_tensors", "shard_index"]

EXPORT_JSON = "lmfusion_export.json"
IMAGE_SET = "image.safetensors"
EMA_SET = "ema.safetensors"
EXPORT_FORMAT, EXPORT_VERSION = "lmfusion-export", 1


def is_export(path: Path) -> bool:
    return (Path(path) / EXPORT_JSON).is_file()


def sharded_tensors(model: torch.nn.Module) -> list:
    """The model's image set as ShardedTensors whose ``data`` are views of its parameters (factories, e.g. the fused
    SwiGLU [gate; up] weight, built into their parts)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    out = []

    def add(key: str, sh) -> None:
        if isinstance(sh, ShardedTensorFactory):
            built = sh.build()
            for part in (built.values() if isinstance(built, dict) else built):
                add(key, part)
        elif isinstance(sh, ShardedTensor):
            if sh.flattened_range is not None:
                raise ValueError(f"{sh.key}: flattened sharded tensors cannot be exported")
            out.append(sh)
        elif not key.endswith("_extra_state"):  # TE's FP8 scaling state: not weights
            raise ValueError(f"{key}: a {type(sh).__name__} in the image set, expected tensors only")

    for key, sh in model.sharded_state_dict().items():
        add(key, sh)
    return out


def shard_index(sh) -> tuple:
    """Where a local shard sits in its global tensor (prepended axes, e.g. the layer index, are integers)."""
    pre = sh.prepend_axis_num
    return tuple(sh.global_offset[:pre]) + tuple(slice(o, o + n) for o, n in zip(sh.global_offset[pre:],
                                                                                   sh.local_shape))


def image_set_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The image set as whole tensors keyed like the distributed checkpoint (a model built at TP = PP = 1)."""
    out: dict[str, torch.Tensor] = {}
    for sh in sharded_tensors(model):
        full = out.setdefault(sh.key, torch.zeros(sh.global_shape, dtype=sh.data.dtype))
        full[shard_index(sh)] = sh.data.detach().cpu()
    return {k: v.contiguous() for k, v in sorted(out.items())}


def load_export(model: torch.nn.Module, export_dir: Path, name: str = IMAGE_SET) -> None:
    """Copy this rank's part of every image tensor from ``name`` (``image.safetensors``, or ``ema.safetensors``: the
    average) into ``model`` (any TP/PP size)."""
    from safetensors import safe_open

    if name not in (IMAGE_SET, EMA_SET):
        raise ValueError(f"{name!r}: expected {IMAGE_SET} or {EMA_SET}")
    path = Path(export_dir) / name
    shards = sharded_tensors(model)
    with safe_open(str(path), framework="pt") as f:
        have = set(f.keys())
        wanted = {sh.key for sh in shards}
        if wanted - have:
            raise CheckpointLoadError(f"{path}: tensors {sorted(wanted - have)[:3]} expected, found missing")
        with torch.no_grad():
            for sh in shards:
                full = f.get_tensor(sh.key)
                if tuple(full.shape) != tuple(sh.global_shape):
                    raise CheckpointLoadError(f"{path}: tensor {sh.key!r} has shape {tuple(full.shape)}, expected "
                                              f"{tuple(sh.global_shape)}")
                sh.data.copy_(full[shard_index(sh)])


def read_export(export_dir: Path) -> dict[str, Any]:
    record = read_record(export_dir, EXPORT_JSON)
    if record.get("format") != EXPORT_FORMAT or record.get("version") != EXPORT_VERSION:
        raise UserError(f"{Path(export_dir) / EXPORT_JSON}: expected format {EXPORT_FORMAT} v{EXPORT_VERSION}, "
                        f"found {record.get('format')!r} v{record.get('version')!r}")
    return record
