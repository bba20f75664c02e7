"""The runtime device contract: where a rank computes, which process-group backend goes with it, and whether
megatron-core needs CPU mode there. Every builder (training chunks of both engines, inference, evaluation, benchmarks)
asks here instead of deciding on its own, so a model is never half on the host and half on the GPU.

* CUDA available: ``cuda:<LOCAL_RANK>`` (the launcher's local rank; :func:`select` makes it the current device), NCCL.
* otherwise: ``cpu``, gloo, and :mod:`megatron_ext.cpu` mode (megatron-core's CUDA assumptions handled).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

__all__ = ["Placement", "placement", "runtime_device", "select"]


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
