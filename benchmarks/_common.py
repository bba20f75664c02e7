"""Shared benchmark helpers: a one-rank process group and interleaved, median-of-N timing."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Optional


def init_single_rank(device: Optional[str] = None) -> None:
    """One-rank process group + megatron model-parallel state (TP=PP=1), for layers that need parallel_state;
    ``device`` default: this rank's GPU when CUDA is available, else the CPU in megatron CPU mode
    (:func:`megatron_ext.device.init_distributed`)."""
    from megatron_ext.device import init_distributed

    init_distributed(device, tensor_model_parallel_size=1)


def time_interleaved(fns: dict[str, Callable[[], None]], reps: int, warmup: int = 1,
                     sync: Optional[Callable[[], None]] = None) -> dict[str, float]:
    """Median seconds per call of each fn, running them round-robin so drift hits all alike. ``sync`` (e.g.
    ``torch.cuda.synchronize``) is called before and after each timed call: GPU work is asynchronous."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            samples[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}
