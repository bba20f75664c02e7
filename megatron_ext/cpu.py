"""megatron-core on CPU with gloo: every CUDA assumption megatron-core 0.16.1 makes, handled in one place.

Switched on explicitly with :func:`enable` (tests, laptops); it refuses to run where CUDA is available, so a GPU
job can never pick it up by accident. What it changes, and why (call sites are megatron-core 0.16.1):

* **Device placement.** megatron allocates with ``device=torch.cuda.current_device()`` (mappings.py, p2p buffers,
  the global memory buffer, param_and_grad_buffer.py) and with literal ``device="cuda"`` (every schedule's token
  counter, optimizer.py, clip_grads.py, grad_scaler.py). A :class:`torch.overrides.TorchFunctionMode` rewrites any
  CUDA ``device`` argument of a torch call to ``cpu``, and ``Tensor.cuda()`` to a no-op.
* **Type-name checks.** ``param.type() == 'torch.cuda.FloatTensor'`` (clip_grads.py:167, optimizer.py:690,
  distrib_optimizer.py:420) would reject every CPU tensor: the mode answers ``Tensor.type()`` (no argument) of a
  CPU tensor with its CUDA name, which is what those checks mean ("a float32 tensor on the compute device").
* **torch.cuda calls.** ``current_device`` answers 0 (mapped to cpu by the mode), ``synchronize``/``empty_cache``/
  ``set_device`` are no-ops, streams and events are torch.cpu's (which are no-op stand-ins on CPU).
* **RNG tracker.** megatron's ``CudaRNGStatesTracker`` saves and restores CUDA generator states; on a CPU build
  ``_set_cuda_rng_state`` silently does nothing, so dropout inside ``fork()`` would not be reproducible.
  :class:`CpuRNGStatesTracker` keeps the named states as CPU generator states, forked the same way; activation
  recompute with dropout is then bit-exact.
* **Distributed optimizer step counters.** With the torch AdamW fallback (no apex/TE), ``DistributedOptimizer``
  loads one shared ``step`` tensor for all params (distrib_optimizer.py:825) which foreach-AdamW would advance once
  per param. :func:`split_shared_adam_steps` gives each param its own step tensor after a load; call it after
  ``optimizer.load_state_dict`` / ``load_parameter_state``.

What is *not* done here: CUDA-only fusions (``masked_softmax_fusion`` in bf16, ``apply_rope_fusion``,
``gradient_accumulation_fusion``, ``persist_layer_norm``) must simply be off in the config (see
:func:`check_config`).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = [
    "enable",
    "is_enabled",
    "CpuRNGStatesTracker",
    "check_config",
    "split_shared_adam_steps",
    "init_process_group",
]

_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.int64: "torch.cuda.LongTensor",
    torch.int32: "torch.cuda.IntTensor",
    torch.uint8: "torch.cuda.ByteTensor",
    torch.bool: "torch.cuda.BoolTensor",
}

_CPU = torch.device("cpu")
_STATE: dict[str, Any] = {"enabled": False, "mode": None, "saved": {}}


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.split(":")[0] == "cuda"
    # A bare int is how torch.cuda.current_device() names a device.
    return isinstance(device, int) and not isinstance(device, bool)


class _CpuDeviceMode(TorchFunctionMode):
    """Maps CUDA device arguments to CPU and answers ``Tensor.type()`` with the CUDA name."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            tensor = args[0]
            if tensor.device.type == "cpu" and tensor.dtype in _CUDA_TYPE_NAMES:
                return _CUDA_TYPE_NAMES[tensor.dtype]
        elif func is torch.Tensor.cuda:
            return args[0]
        elif func is torch.Tensor.to:
            # tensor.to("cuda") / tensor.to(device=0) / tensor.to(torch.device("cuda"), dtype)
            if "device" in kwargs and _is_cuda_device(kwargs["device"]):
                kwargs = {**kwargs, "device": _CPU}
            if len(args) > 1 and not isinstance(args[1], (torch.Tensor, torch.dtype)) and _is_cuda_device(args[1]):
                args = (args[0], _CPU, *args[2:])
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": _CPU}
        return func(*args, **kwargs)


class CpuRNGStatesTracker:
    """Drop-in for megatron's ``CudaRNGStatesTracker`` that keeps named CPU generator states.

    Same contract: ``add(name, seed)`` creates a state without disturbing the default one; ``fork(name)`` swaps it
    in, runs the block, stores the advanced state and restores the default state.
    """

    def __init__(self, *args, **kwargs):
        self.reset()

    def is_initialized(self) -> bool:
        return self._is_initialized

    def reset(self) -> None:
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.states_.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = {k: v.clone() for k, v in states.items()}

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        saved = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(saved)

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        saved = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)


def _patch(obj: Any, name: str, value: Any) -> None:
    _STATE["saved"].setdefault((obj, name), getattr(obj, name, None))
    setattr(obj, name, value)


def enable() -> None:
    """Make megatron-core run on CPU in this process. Idempotent; refuses when CUDA is available."""
    if _STATE["enabled"]:
        return
    if torch.cuda.is_available():
        raise RuntimeError(
            "megatron_ext.cpu.enable(): CUDA is available; CPU mode is for machines without a GPU only"
        )
    from megatron.core.tensor_parallel import random as mrandom

    cuda = torch.cuda
    _patch(cuda, "current_device", lambda: 0)
    _patch(cuda, "device_count", lambda: 0)
    _patch(cuda, "set_device", lambda *a, **k: None)
    _patch(cuda, "synchronize", lambda *a, **k: None)
    _patch(cuda, "empty_cache", lambda *a, **k: None)
    _patch(cuda, "Stream", torch.cpu.Stream)
    _patch(cuda, "Event", torch.cpu.Event)
    _patch(cuda, "stream", torch.cpu.stream)
    _patch(cuda, "current_stream", torch.cpu.current_stream)
    _patch(cuda, "default_stream", torch.cpu.current_stream)
    # model_parallel_cuda_manual_seed calls torch.cuda.manual_seed, then seeds the tracker.
    _patch(cuda, "manual_seed", lambda seed: None)

    tracker = CpuRNGStatesTracker()
    _patch(mrandom, "_CUDA_RNG_STATE_TRACKER", tracker)
    _patch(mrandom, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", True)
    _patch(mrandom, "initialize_rng_tracker", lambda *a, **k: None)

    mode = _CpuDeviceMode()
    mode.__enter__()
    _STATE.update(enabled=True, mode=mode)


def disable() -> None:
    """Undo :func:`enable` (tests)."""
    if not _STATE["enabled"]:
        return
    _STATE["mode"].__exit__(None, None, None)
    for (obj, name), value in _STATE["saved"].items():
        setattr(obj, name, value)
    _STATE.update(enabled=False, mode=None, saved={})


def is_enabled() -> bool:
    return _STATE["enabled"]


_CUDA_ONLY_FUSIONS = (
    "gradient_accumulation_fusion",
    "apply_rope_fusion",
    "persist_layer_norm",
    "bias_activation_fusion",
    "bias_dropout_fusion",
    "masked_softmax_fusion",
)


def check_config(config: Any) -> None:
    """Raise if a megatron TransformerConfig asks for a fusion that has no CPU implementation."""
    on = [name for name in _CUDA_ONLY_FUSIONS if getattr(config, name, False)]
    if on:
        raise ValueError(f"TransformerConfig: {', '.join(on)} must be False on CPU (CUDA-only fusions)")


def split_shared_adam_steps(optimizer: Any) -> int:
    """Give every param of a (distributed) torch-Adam optimizer its own ``step`` tensor; returns how many split.

    megatron's DistributedOptimizer restores one shared ``step`` tensor for all params (distrib_optimizer.py:825);
    torch's foreach AdamW increments each param's ``step`` in place, so a shared one advances N times per step
    and the resumed run silently drifts.
    """
    inner = getattr(optimizer, "optimizer", optimizer)
    seen: set[int] = set()
    split = 0
    for state in inner.state.values():
        step = state.get("step")
        if isinstance(step, torch.Tensor):
            if id(step) in seen:
                state["step"] = step.clone()
                split += 1
            seen.add(id(state["step"]))
    return split


def init_process_group(backend: str = "gloo") -> tuple[int, int]:
    """``torch.distributed.init_process_group`` from torchrun's environment; returns (rank, world_size)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()
