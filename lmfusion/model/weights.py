"""Which parameters train, how image twins start, and loading a converted base checkpoint into any TP/PP layout.

* **Trainable = image set**: every routed module's ``image_weight``/``image_bias`` and the image encoder/decoder.
  Everything else (embedding, text norms/QKV/O/FFN, final text norm, LM head) is text and frozen with
  ``requires_grad=False`` before DDP and the optimizer are built: no grad buffer, no optimizer state, no
  weight-gradient GEMM, no data-parallel reduction.
* **Image twins start as copies** of their text weights; the U-Net blocks keep their random initialisation.
* **Base loading** reads full (TP=1) tensors by megatron name and slices this rank's shard using the tensor-parallel
  attributes megatron puts on each parameter (``partition_dim``, ``partition_stride``: the fused SwiGLU fc1 is
  stride 2, i.e. each rank holds [gate_r; up_r]); the vocabulary is zero-padded to the padded size first.
  Pipeline stages map local layer ``i`` to global layer ``offset + i``.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Protocol

import torch
from megatron.core import parallel_state

__all__ = ["is_image_param", "trainable_parameter_names", "freeze_text", "init_image_twins_from_text",
           "load_base_weights", "BaseTensors"]

_IMAGE_SUFFIXES = (".image_weight", ".image_bias")
_IMAGE_PREFIXES = ("image_encoder.", "image_decoder.")


def is_image_param(name: str) -> bool:
    return name.endswith(_IMAGE_SUFFIXES) or name.startswith(_IMAGE_PREFIXES)


def trainable_parameter_names(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def freeze_text(model: torch.nn.Module) -> list[str]:
    """``requires_grad`` = is_image_param(name); returns the trainable names."""
    for name, param in model.named_parameters():
        param.requires_grad_(is_image_param(name))
    return trainable_parameter_names(model)


@torch.no_grad()
def init_image_twins_from_text(model: torch.nn.Module) -> int:
    """Copy every text weight into its image twin (same shard, same shape); returns how many were copied."""
    params = dict(model.named_parameters())
    copied = 0
    for name, param in params.items():
        if name.endswith(_IMAGE_SUFFIXES):
            text_name = name.replace(".image_weight", ".weight").replace(".image_bias", ".bias")
            param.copy_(params[text_name])
            copied += 1
    return copied


class BaseTensors(Protocol):
    """Read access to a converted base checkpoint (full TP=1 tensors by megatron name)."""

    def keys(self) -> Iterable[str]: ...

    def get(self, name: str) -> torch.Tensor: ...


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")


def _base_name(local: str, layer_offset: int, tied: bool) -> str:
    m = _LAYER.match(local)
    if m:
        return f"decoder.layers.{int(m.group(1)) + layer_offset}.{m.group(2)}"
    if local == "output_layer.weight" and tied:
        return "embedding.word_embeddings.weight"
    return local


def _shard(full: torch.Tensor, param: torch.Tensor, rank: int, world: int, name: str) -> torch.Tensor:
    if not getattr(param, "tensor_model_parallel", False) or world == 1:
        return full
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    chunks = full.chunk(world * stride, dim=dim)  # stride 2: [part_0..part_{w-1}] for gate, then for up
    return torch.cat([chunks[s * world + rank] for s in range(stride)], dim=dim)


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
            raise ValueError(f"base checkpoint has no tensor {key!r} (needed for parameter {name!r})")
        full = base.get(key)
        if key.endswith("word_embeddings.weight") or key == "output_layer.weight":
            padded = param.shape[0] * (tp_size if getattr(param, "tensor_model_parallel", False) else 1)
            if full.shape[0] != vocab_size or full.shape[1:] != param.shape[1:]:
                raise ValueError(f"{key}: shape {tuple(full.shape)} does not match the model's "
                                 f"({vocab_size}, {param.shape[1]})")
            full = torch.cat([full, full.new_zeros(padded - vocab_size, *full.shape[1:])]) if padded > vocab_size \
                else full
        local = _shard(full, param, tp_rank, tp_size, key)
        if local.shape != param.shape:
            raise ValueError(f"{key}: base shard shape {tuple(local.shape)} != model parameter shape "
                             f"{tuple(param.shape)} (full {tuple(full.shape)}, tp {tp_rank}/{tp_size})")
        param.copy_(local)
        loaded.append(name)
    return loaded
