"""Which parameters train, how image twins start, and loading a converted base checkpoint into any TP/PP layout.

* **Names** are the routed-parameter contract of :mod:`megatron_ext.contract` (``weight``/``bias`` text,
  ``image_weight``/``image_bias`` image, megatron's TP attributes), the same for every linear backend: nothing here
  knows which backend built a layer.
* **Trainable = image set**: every routed module's ``image_weight``/``image_bias`` and the image encoder/decoder.
  Everything else (embedding, text or shared norms/QKV/O/FFN, final norm, LM head) is text and frozen with
  ``requires_grad=False`` before DDP and the optimizer are built: no grad buffer, no optimizer state, no
  weight-gradient GEMM, no data-parallel reduction. With ``optimizer.text_lr_ratio`` > 0 the text set trains too
  (:func:`set_trainable`), at its own learning rate (``lmfusion/training/model_setup.py``).
* **Image twins start as copies** of their text weights; the U-Net blocks keep their random initialisation.
* **Base loading** reads full (TP=1) tensors by megatron name and slices this rank's shard using the tensor-parallel
  attributes megatron puts on each parameter (``partition_dim``, ``partition_stride``: the fused SwiGLU fc1 is
  stride 2, i.e. each rank holds [gate_r; up_r]); the vocabulary is zero-padded to the padded size first.
  Pipeline stages map local layer ``i`` to global layer ``offset + i``.
"""

from __future__ import annotations

import re
from typing import Iterable, Protocol

import torch
from megatron.core import parallel_state

from lmfusion.errors import UserError
from megatron_ext.contract import is_image_param_name, text_twin_name

__all__ = ["is_image_param", "trainable_parameter_names", "freeze_text", "set_trainable", "init_image_twins_from_text",
           "load_base_weights", "BaseTensors", "tp_shard"]

_IMAGE_PREFIXES = ("image_encoder.", "image_decoder.")


def is_image_param(name: str) -> bool:
    """An image twin of a routed module, or a parameter of the image encoder/decoder."""
    return is_image_param_name(name) or name.startswith(_IMAGE_PREFIXES)


def trainable_parameter_names(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def freeze_text(model: torch.nn.Module) -> list[str]:
    """``requires_grad`` = is_image_param(name); returns the trainable names."""
    return set_trainable(model, train_text=False)


def set_trainable(model: torch.nn.Module, train_text: bool) -> list[str]:
    """``requires_grad`` = the image set, plus the text set when ``train_text`` (which the model then checkpoints:
    ``saves_text``); returns the trainable names. A model with a frozen vision path keeps it frozen."""
    vision = getattr(model, "vision", None)
    frozen = {id(p) for p in vision.parameters()} if vision is not None else set()
    for name, param in model.named_parameters():
        param.requires_grad_(id(param) not in frozen and (train_text or is_image_param(name)))
    if hasattr(model, "saves_text"):
        model.saves_text = train_text
    if train_text and hasattr(model, "tie_trained_embedding"):
        model.tie_trained_embedding()
    return trainable_parameter_names(model)


@torch.no_grad()
def init_image_twins_from_text(model: torch.nn.Module) -> int:
    """Copy every text weight into its image twin (same shard, same shape); returns how many were copied."""
    params = dict(model.named_parameters())
    copied = 0
    for name, param in params.items():
        if is_image_param_name(name):
            param.copy_(params[text_twin_name(name)])
            copied += 1
    return copied


class BaseTensors(Protocol):
    """Read access to a converted base checkpoint (full TP=1 tensors by megatron name).

    ``get(name, slices)`` returns ``tensor[slices]``, reading only that part where the store allows it
    (safetensors does: a TP rank of an 8B model reads its shard, not the full tensor)."""

    def keys(self) -> Iterable[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def get(self, name: str, slices=None) -> torch.Tensor: ...


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")


def _base_name(local: str, layer_offset: int, tied: bool) -> str:
    m = _LAYER.match(local)
    if m:
        return f"decoder.layers.{int(m.group(1)) + layer_offset}.{m.group(2)}"
    if local == "output_layer.weight" and tied:
        return "embedding.word_embeddings.weight"
    return local


def _shard_ranges(full_rows: int, param: torch.Tensor, rank: int, world: int) -> list[tuple[int, int]]:
    """Index ranges along the partition dim that make up this rank's shard (stride 2: [gate_r; up_r])."""
    stride = getattr(param, "partition_stride", 1)
    part = full_rows // (world * stride)
    return [((s * world + rank) * part, (s * world + rank + 1) * part) for s in range(stride)]


def tp_shard(full: torch.Tensor, param: torch.Tensor, rank: int, world: int, name: str = "") -> torch.Tensor:
    """This rank's shard of a full tensor, as megatron lays it out (identity for replicated params)."""
    if not getattr(param, "tensor_model_parallel", False) or world == 1:
        return full
    dim = param.partition_dim
    return torch.cat([full.narrow(dim, a, b - a) for a, b in _shard_ranges(full.shape[dim], param, rank, world)],
                     dim=dim)


def _read_shard(base: BaseTensors, key: str, param: torch.Tensor, rank: int, world: int,
                padded_rows: int | None) -> torch.Tensor:
    """Read only this rank's rows/columns of ``key`` (zero rows past the vocabulary when ``padded_rows``)."""
    shape = tuple(base.shape(key))
    if not getattr(param, "tensor_model_parallel", False) or world == 1:
        ranges, dim = [(0, padded_rows or shape[0])], 0
    else:
        dim = param.partition_dim
        ranges = _shard_ranges(padded_rows if dim == 0 and padded_rows else shape[dim], param, rank, world)
    parts = []
    for a, b in ranges:
        stop = min(b, shape[dim]) if padded_rows and dim == 0 else b
        index = [slice(None)] * len(shape)
        index[dim] = slice(a, max(a, stop))
        part = base.get(key, tuple(index)) if stop > a else torch.empty(0, *shape[1:])
        if padded_rows and dim == 0 and b > stop:  # vocabulary padding: zero rows
            part = torch.cat([part.to(param.dtype), torch.zeros(b - max(a, stop), *shape[1:], dtype=param.dtype)])
        parts.append(part.to(param.dtype))
    return torch.cat(parts, dim=dim) if len(parts) > 1 else parts[0]


@torch.no_grad()
def load_base_weights(model: torch.nn.Module, base: BaseTensors, *, vocab_size: int, tied: bool,
                      layer_offset: int = 0, tp_rank: int | None = None, tp_size: int | None = None) -> list[str]:
    """Copy the base (text) weights into ``model``'s local shards; returns the local names loaded.

    Raises ValueError naming the key for a missing tensor and the key and both shapes for a mismatch.
    Image twins are not read (see :func:`init_image_twins_from_text`); image encoder/decoder keep their init.
    """
    if tp_rank is None:
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
    keys = set(base.keys())
    loaded = []
    for name, param in model.named_parameters():
        if is_image_param(name):
            continue
        key = _base_name(name, layer_offset, tied)
        if key not in keys:
            raise UserError(f"base checkpoint has no tensor {key!r} (needed for parameter {name!r})")
        full_shape = tuple(base.shape(key))
        padded_rows = None
        if key.endswith("word_embeddings.weight") or key == "output_layer.weight":
            if full_shape[0] != vocab_size or full_shape[1:] != tuple(param.shape[1:]):
                raise UserError(f"{key}: shape {full_shape} does not match the model's ({vocab_size}, "
                                f"{param.shape[1]})")
            padded_rows = param.shape[0] * (tp_size if getattr(param, "tensor_model_parallel", False) else 1)
        local = _read_shard(base, key, param, tp_rank, tp_size, padded_rows)
        if local.shape != param.shape:
            raise UserError(f"{key}: base shard shape {tuple(local.shape)} != model parameter shape "
                            f"{tuple(param.shape)} (full {full_shape}, tp {tp_rank}/{tp_size})")
        param.copy_(local)
        loaded.append(name)
    return loaded
