"""The parameter contract of routed modules: one answer for every backend (local, Transformer Engine).

Which parameter is text or image, which base tensor it loads from, how it is TP-sharded and under which key it is
checkpointed is decided here, never per backend:

* **Names.** A routed module registers, as its own direct parameters, ``weight`` (and ``bias``) for text and
  ``image_weight`` (and ``image_bias``) for image; a shared module (a slot that ``model.separation`` leaves
  unseparated) registers the text names only, and both modalities use them. Text names are megatron's dense names, so a dense megatron
  checkpoint's ``weight`` is the text weight as it is; an image name is its text name with ``image_`` in front
  (:func:`image_twin_name` / :func:`text_twin_name`). Base loading, freezing, twin initialisation and the
  trainable set (``lmfusion/model/weights.py``) read these names and nothing else.
* **TP sharding.** Weights carry megatron's ``tensor_model_parallel``, ``partition_dim`` (0 column, 1 row) and
  ``partition_stride`` (2 for the fused SwiGLU fc1: each rank holds ``[gate_r; up_r]``); the twin carries the
  same as its text weight. Base loading slices the full tensor by exactly these attributes.
* **Checkpoint keys.** ``sharded_state_dict`` holds ``prefix + name`` for each of the parameters above, each a
  megatron ``ShardedTensor`` split along ``partition_dim`` over TP (row biases replicated), and nothing else: no
  backend-internal names, no per-GEMM extra state.

:func:`check_routed_linear` verifies a built routed linear against the contract; the tests run it on every backend.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint
from megatron.core.utils import get_pg_rank, get_pg_size

__all__ = ["TEXT_PARAM_NAMES", "IMAGE_PARAM_NAMES", "image_twin_name", "text_twin_name", "is_image_param_name",
           "mark_partitioned", "routed_linear_sharded_state_dict", "check_routed_linear"]

TEXT_PARAM_NAMES = ("weight", "bias")
IMAGE_PREFIX = "image_"
IMAGE_PARAM_NAMES = tuple(IMAGE_PREFIX + n for n in TEXT_PARAM_NAMES)


def image_twin_name(name: str) -> str:
    """``...weight`` -> ``...image_weight`` (the last component of a dotted name)."""
    head, _, leaf = name.rpartition(".")
    if leaf not in TEXT_PARAM_NAMES:
        raise ValueError(f"{name!r} is not a routed text parameter (expected one ending in {TEXT_PARAM_NAMES})")
    return f"{head}.{IMAGE_PREFIX}{leaf}" if head else IMAGE_PREFIX + leaf


def text_twin_name(name: str) -> str:
    """``...image_weight`` -> ``...weight``."""
    head, _, leaf = name.rpartition(".")
    if leaf not in IMAGE_PARAM_NAMES:
        raise ValueError(f"{name!r} is not a routed image parameter (expected one ending in {IMAGE_PARAM_NAMES})")
    leaf = leaf[len(IMAGE_PREFIX):]
    return f"{head}.{leaf}" if head else leaf


def is_image_param_name(name: str) -> bool:
    """Is a (dotted) parameter name an image twin of a routed module?"""
    return name.rpartition(".")[2] in IMAGE_PARAM_NAMES


def mark_partitioned(param: torch.Tensor, partition_dim: int, stride: int) -> None:
    """Set megatron's TP attributes, overwriting what an initialiser or a backend put there (TE tags its weights
    with stride 1 and, with ``parallel_mode=None``, partition dim 0 whatever the layer is)."""
    param.tensor_model_parallel = True
    param.partition_dim = partition_dim
    param.partition_stride = stride


def _axes(partition_dim: int) -> dict[str, int]:
    """TP axis per checkpointed name: column layers split weights and biases on dim 0; row layers split weights on
    dim 1 and replicate biases (as megatron's dense layers)."""
    names = ("weight", "image_weight") + (("bias", "image_bias") if partition_dim == 0 else ())
    return {n: partition_dim if "weight" in n else 0 for n in names}


def routed_linear_sharded_state_dict(module: torch.nn.Module, partition_dim: int, prefix: str = "",
                                     sharded_offsets: tuple = (), metadata=None, tp_group=None):
    """The contract's checkpoint entries of a routed linear: its direct parameters only, TP-split per :func:`_axes`."""
    state_dict = {name: p for name, p in module.named_parameters(recurse=False)}
    return make_sharded_tensors_for_checkpoint(state_dict, prefix, _axes(partition_dim), sharded_offsets,
                                               tp_group=tp_group, dp_cp_group=(metadata or {}).get("dp_cp_group"))


def check_routed_linear(layer: torch.nn.Module, *, partition_dim: int, stride: int = 1, bias: bool = False,
                        tp_group=None, routed: bool = True) -> None:
    """Raise AssertionError listing every way ``layer`` breaks the contract (names, shapes, TP attributes,
    checkpoint keys and shards); ``tp_group`` is the group it was built with (None: the layer's ``tp_group``).
    ``routed=False``: a shared (dense) layer of an unseparated slot, which holds the text names only."""
    tp_group = tp_group if tp_group is not None else getattr(layer, "tp_group", None)
    tp_rank, tp_size = get_pg_rank(tp_group), get_pg_size(tp_group)
    problems = []
    want = {"weight"} | ({"bias"} if bias else set())
    if routed:
        want |= {image_twin_name(n) for n in want}
    names = {n for n, _ in layer.named_parameters()}  # recursive: nothing may hide under another name
    if names != want:
        problems.append(f"parameters {sorted(names)}, expected {sorted(want)}")
    params = dict(layer.named_parameters())
    for text in sorted(want & set(params) & set(TEXT_PARAM_NAMES)):
        twin = image_twin_name(text)
        if twin in params and (params[twin].shape != params[text].shape or params[twin].dtype != params[text].dtype):
            problems.append(f"{twin} {tuple(params[twin].shape)} {params[twin].dtype} differs from {text} "
                            f"{tuple(params[text].shape)} {params[text].dtype}")
    for name in sorted(want & set(params)):
        p = params[name]
        is_weight = name.endswith("weight")
        sharded = is_weight or partition_dim == 0
        expect = (True, partition_dim if is_weight else 0, stride) if sharded else None
        got = (getattr(p, "tensor_model_parallel", None), getattr(p, "partition_dim", None),
               getattr(p, "partition_stride", None))
        if expect is not None and got != expect:
            problems.append(f"{name}: TP attributes (tensor_model_parallel, partition_dim, partition_stride) = "
                            f"{got}, expected {expect}")
        if expect is None and getattr(p, "tensor_model_parallel", False):
            problems.append(f"{name}: a row layer's bias is replicated, but it is tagged tensor_model_parallel")
    sharded_sd = layer.sharded_state_dict(prefix="p.")
    keys = set(sharded_sd)
    if keys != {f"p.{n}" for n in want}:
        problems.append(f"sharded_state_dict keys {sorted(keys)}, expected {sorted('p.' + n for n in want)}")
    for key, sh in sorted(sharded_sd.items()):
        name = key[2:]
        if name not in params or not hasattr(sh, "global_shape"):
            continue
        local = params[name]
        axis = _axes(partition_dim).get(name)
        full = list(local.shape)
        offset = [0] * local.dim()
        if axis is not None:
            full[axis] *= tp_size
            offset[axis] = tp_rank * local.shape[axis]
        if tuple(sh.global_shape) != tuple(full) or tuple(sh.global_offset) != tuple(offset) or sh.data is not local:
            problems.append(f"{key}: ShardedTensor global shape {tuple(sh.global_shape)} offset "
                            f"{tuple(sh.global_offset)}, expected {tuple(full)} at {tuple(offset)} over the "
                            f"parameter itself")
    if problems:
        raise AssertionError(f"{type(layer).__name__} breaks the routed-parameter contract: " + "; ".join(problems))
