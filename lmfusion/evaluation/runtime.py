"""Data-parallel evaluation runtime: every rank holds the whole model (TP=PP=1) and works on its own share of items.

``lmfusion generate`` under ``torchrun`` runs tensor parallel (TP = world size, every rank the same batch). Evaluation
wants the opposite: many independent prompts, so each rank loads the full model and takes items ``rank, rank +
world, ...`` (round-robin: no item is dropped and none runs twice, whatever ``len(items) % world``). Setting up the
parallel state here, before :func:`lmfusion.inference.load.load_for_inference`, makes its ``init_runtime`` a no-op
(both go through :func:`megatron_ext.device.init_distributed`, which sets up only what is not set up yet).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, TypeVar

import torch

from lmfusion.utils import atomic_write_text  # noqa: F401  (re-exported for callers here)

__all__ = ["shard", "init_data_parallel", "rank_world", "barrier", "load_data_parallel", "atomic_write_text"]

T = TypeVar("T")


def shard(items: Sequence[T], rank: int, world: int) -> list[T]:
    """Items ``rank, rank + world, ...``: the union over ranks is every item exactly once."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, {world})")
    return list(items[rank::world])


def init_data_parallel(device: torch.device) -> None:
    """Process group (torchrun's, or a one-rank in-process one) and megatron state with TP=PP=1 on every rank."""
    from megatron_ext.device import init_distributed

    init_distributed(device, tensor_model_parallel_size=1)


def rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def load_data_parallel(ckpt: str | Path, device: Optional[str] = None, dtype: torch.dtype = torch.float32,
                       weights: Optional[str] = None):
    """:func:`load_for_inference` with one full model per rank (see the module docstring)."""
    from lmfusion.inference.load import load_for_inference, resolve_device

    init_data_parallel(resolve_device(device))
    return load_for_inference(ckpt, device=device, dtype=dtype, weights=weights)
