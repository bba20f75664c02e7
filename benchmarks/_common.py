"""Shared benchmark helpers: a one-rank process group and interleaved, median-of-N timing."""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable, Optional


def init_single_rank() -> None:
    """One-rank gloo group + megatron model-parallel state (TP=PP=1), for layers that need parallel_state."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        dist.init_process_group("gloo", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)


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
