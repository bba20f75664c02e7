"""The runtime device contract: where a rank computes, which process-group backend goes with it, and whether
megatron-core needs CPU mode there. Every builder (training chunks of both engines, inference, evaluation, benchmarks)
asks here instead of deciding on its own, so a model is never half on the host and half on the GPU.

* CUDA available: ``cuda:<LOCAL_RANK>`` (the launcher's local rank; :func:`select` makes it the current device), NCCL.
* otherwise: ``cpu``, gloo, and :mod:`megatron_ext.cpu` mode (megatron-core's CUDA assumptions handled).

:func:`init_distributed` is the one place a process group and megatron's parallel state are set up (training,
inference, evaluation, benchmarks): device first, then the process group (``torchrun``'s rendezvous from the
environment, or a one-rank in-process store without a launcher), then the model-parallel state.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["Placement", "placement", "runtime_device", "select", "init_distributed"]


@dataclass(frozen=True)
class Placement:
    device: torch.device
    backend: str  # torch.distributed backend: "nccl" | "gloo"
    cpu_mode: bool  # megatron_ext.cpu.enable() is needed (no CUDA)


def placement(device: torch.device | str | None = None) -> Placement:
    """The placement for ``device`` (default: this rank's CUDA device when CUDA is available, else CPU)."""
    if device is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return Placement(device, "nccl", False)
    if device.type == "cpu":
        return Placement(device, "gloo", True)
    raise ValueError(f"device {str(device)!r}: expected 'cuda', 'cuda:N' or 'cpu'")


def select(device: torch.device | str | None = None) -> Placement:
    """Make ``device`` this process's compute device (``torch.cuda.set_device``; CPU mode on CPU) and return its
    placement. Idempotent."""
    place = placement(device)
    if place.device.type == "cuda":
        torch.cuda.set_device(place.device)
    else:
        from megatron_ext import cpu

        cpu.enable()
    return place


def runtime_device() -> torch.device:
    """The device this process computes on now: the current CUDA device when CUDA is available, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(device: torch.device | str | None = None, *, tensor_model_parallel_size: Optional[int] = None,
                     pipeline_model_parallel_size: int = 1, virtual_pipeline_model_parallel_size: Optional[int] = None,
                     timeout_s: Optional[int] = None, replace_model_parallel: bool = False) -> tuple[Placement, bool]:
    """:func:`select` ``device``, then the process group and megatron's parallel state, each only if not set up yet.

    The process group: under ``torchrun``/``srun`` (``RANK`` in the environment) its rendezvous from the environment;
    otherwise one rank on an in-process store (no port to pick or collide on). ``tensor_model_parallel_size``
    defaults to the whole world (one model sharded over every rank); 1 gives one whole model per rank.
    ``replace_model_parallel``: tear down a parallel state already there and set up this one (a training run's
    layout wins over what an earlier user of the process left). Returns the placement and whether this call
    created the process group (its owner destroys it)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    place = select(device)  # set the CUDA device, or megatron CPU mode on CPU
    owns = not dist.is_initialized()
    if owns:
        kwargs = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
        if "RANK" in os.environ:  # torchrun / srun-exported environment
            dist.init_process_group(place.backend, **kwargs)
        else:
            dist.init_process_group(place.backend, store=dist.HashStore(), rank=0, world_size=1, **kwargs)
    if replace_model_parallel and ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if not ps.model_parallel_is_initialized():
        tp = dist.get_world_size() if tensor_model_parallel_size is None else tensor_model_parallel_size
        ps.initialize_model_parallel(tensor_model_parallel_size=tp,
                                     pipeline_model_parallel_size=pipeline_model_parallel_size,
                                     virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size)
    return place, owns
