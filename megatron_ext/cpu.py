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
* **torch.cuda calls.** ``current_device`` answers ``torch.device("cpu")``, not 0: torch function modes are not
  active inside autograd backward functions, where megatron allocates with ``device=torch.cuda.current_device()``
  too (mappings.py, layers.py, random.py's ``gather_split_1d_tensor``). ``synchronize``/``empty_cache``/
  ``set_device`` are no-ops, streams and events are torch.cpu's (which are no-op stand-ins on CPU).
* **RNG.** On CPU the compute device's generator *is* the CPU generator, so ``torch.cuda.manual_seed`` /
  ``get_rng_state`` / ``set_rng_state`` act on it: ``model_parallel_cuda_manual_seed(seed)`` then seeds the default
  (data-parallel) stream with ``seed`` as on GPU (random.py:422). megatron's own ``_set_cuda_rng_state``
  (random.py:72) silently does nothing on a CPU build, and ``torch.cuda.get_rng_state`` raises "Torch not
  compiled with CUDA", which broke ``tensor_parallel.checkpoint`` (random.py:447); both now use the CPU generator.
  megatron's ``CudaRNGStatesTracker`` saves and restores CUDA generator states; :class:`CpuRNGStatesTracker` keeps
  the named states as CPU generator states, forked the same way. Dropout inside ``get_cuda_rng_tracker().fork()``
  is then reproducible and activation recompute with dropout is bit-exact.
* **Batched p2p on gloo (pipeline schedules).** ``_batched_p2p_ops`` (p2p_communication.py:16) posts
  ``send_prev, recv_prev, send_next, recv_next``. gloo pairs point-to-point messages between two ranks in posting
  order; with pipeline size 2 the previous and the next stage are the same peer, so when one batch holds both
  directions (the interleaved schedule's steady state, ``batch_p2p_comm=True``, the default) a stage's
  ``send_prev`` (a gradient) lands in the peer's ``recv_prev`` (an activation) of the same shape: wrong losses and
  gradients, no error. CPU mode replaces it with the same ops posted in data-flow order (forward-flowing
  ``send_next``/``recv_prev`` first, then ``send_prev``/``recv_next``), which pairs correctly on any peer layout.
  ``batch_p2p_comm=False`` (``_p2p_ops``) was always right. The variable-shape handshake
  (``variable_seq_lengths=True``, p2p_communication.py:214) has the same ordering and is not patched:
  :func:`check_config` refuses it with an interleaved schedule at pipeline size 2.
* **Distributed optimizer checkpoints with torch AdamW** (:mod:`megatron_ext.torch_adam`, not CPU-specific: the
  trainer installs the same fixes on a GPU without apex/TE). Without apex/TE (always, on CPU) megatron falls back to
  torch AdamW, whose per-param ``step`` tensor the DistributedOptimizer checkpoint code gets wrong in three places;
  CPU mode wraps the three methods so the standard save/load flow resumes bit-identically:
  ``state_dict()`` of a fresh optimizer (which ``sharded_state_dict(..., is_loading=True)`` calls) asserts one common
  step (distrib_optimizer.py:642): the state is created first (zeros and step 0, what AdamW's lazy init would
  create). ``load_state_dict`` gives all params one shared ``step`` tensor (distrib_optimizer.py:825) that AdamW
  advances once per param, so the resumed run silently drifts: each param gets its own copy afterwards
  (:func:`split_shared_adam_steps`). Loading ``fully_reshardable`` param state copies every optimizer-state key,
  ``step`` included, from a checkpoint entry that has none (KeyError, distrib_optimizer.py:940): ``step`` is
  left as loaded from the param groups.
  Pass ``metadata={"distrib_optim_sharding_type": "fully_reshardable"}``: the default sharding type fails at save
  ("flattened_range is not supported", mapping.py:134), and ``sharding_type=`` without ``metadata`` fails in
  ``sharded_param_state_fully_reshardable`` (``None.get``, distrib_optimizer.py:1443).

What is *not* done here: CUDA-only fusions (``masked_softmax_fusion`` in bf16, ``apply_rope_fusion``,
``gradient_accumulation_fusion``, ``persist_layer_norm``) must simply be off in the config (see
:func:`check_config`).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from megatron_ext import torch_adam
from megatron_ext.torch_adam import init_adam_state_for_load, split_shared_adam_steps, torch_optimizers

__all__ = [
    "enable",
    "disable",
    "is_enabled",
    "CpuRNGStatesTracker",
    "check_config",
    "init_adam_state_for_load",
    "fuse_adam",
    "split_shared_adam_steps",
    "torch_optimizers",
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
            if len(args) > 1 and not isinstance(args[1], (torch.Tensor, torch.dtype)) and _is_cuda_device(args[1]):
                args = (args[0], _CPU, *args[2:])
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": _CPU}
        return func(*args, **kwargs)


class CpuRNGStatesTracker:
    """Drop-in for megatron's ``CudaRNGStatesTracker`` that keeps named CPU generator states.

    Same contract: ``add(name, seed)`` creates a state without disturbing the default one; ``fork(name)`` swaps it
    in, runs the block, stores the advanced state and restores the state it found (forks nest).
    """

    # Read by megatron's cuda-graph and TE code paths (random.py:448, cuda_graphs.py:1409).
    use_cudagraphable_rng = False
    is_inference_rng_tracker = False

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


def _cpu_get_rng_state(device: Any = "cuda", *args, **kwargs) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: Any = "cuda", *args, **kwargs) -> None:
    torch.set_rng_state(new_state)


class _CpuStream(torch.cpu.Stream):
    """torch.cuda.Stream(device=...) / (priority=...): the CPU stand-in takes neither device nor stream pointers.
    A class, not a function: libraries annotate with ``torch.cuda.Stream | None`` at import time."""

    def __init__(self, *args, **kwargs):
        super().__init__()


def _gloo_batched_p2p_ops(
    *, tensor_send_prev, tensor_recv_prev, tensor_send_next, tensor_recv_next, group, prev_pipeline_rank,
    next_pipeline_rank,
):
    """megatron's ``_batched_p2p_ops`` with the ops posted in data-flow order (see the module docstring).

    A stage's ``send_next`` pairs with its successor's ``recv_prev`` and its ``send_prev`` with its predecessor's
    ``recv_next``; posting forward-flowing ops first and backward-flowing ops second on every rank keeps those
    pairs in the same relative order on both ends, even when predecessor and successor are one rank.
    """
    ops = []
    isend, irecv, P2POp = torch.distributed.isend, torch.distributed.irecv, torch.distributed.P2POp
    if tensor_send_next is not None:
        ops.append(P2POp(isend, tensor_send_next, next_pipeline_rank, group))
    if tensor_recv_prev is not None:
        ops.append(P2POp(irecv, tensor_recv_prev, prev_pipeline_rank, group))
    if tensor_send_prev is not None:
        ops.append(P2POp(isend, tensor_send_prev, prev_pipeline_rank, group))
    if tensor_recv_next is not None:
        ops.append(P2POp(irecv, tensor_recv_next, next_pipeline_rank, group))
    return torch.distributed.batch_isend_irecv(ops) if ops else []


def _original(obj: Any, name: str) -> Any:
    """What :func:`enable` replaced ``obj.name`` with (tests use it to show a patch is still needed)."""
    return _STATE["saved"][(obj, name)]


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
    import torch.cuda.random as cuda_random
    from megatron.core.pipeline_parallel import p2p_communication
    from megatron.core.tensor_parallel import random as mrandom

    cuda = torch.cuda
    # A device object, not 0: megatron's autograd backward functions allocate with it, and torch function
    # modes are not active inside the autograd engine's backward calls.
    _patch(cuda, "current_device", lambda: _CPU)
    _patch(cuda, "device_count", lambda: 0)
    _patch(cuda, "set_device", lambda *a, **k: None)
    _patch(cuda, "synchronize", lambda *a, **k: None)
    _patch(cuda, "empty_cache", lambda *a, **k: None)
    _patch(cuda, "Stream", _CpuStream)
    _patch(cuda, "Event", torch.cpu.Event)
    _patch(cuda, "stream", torch.cpu.stream)
    _patch(cuda, "current_stream", torch.cpu.current_stream)
    _patch(cuda, "default_stream", torch.cpu.current_stream)
    # The compute device's generator is the CPU generator (see the module docstring).
    _patch(cuda, "manual_seed", torch.manual_seed)
    for module in (cuda, cuda_random):
        _patch(module, "get_rng_state", _cpu_get_rng_state)
        _patch(module, "set_rng_state", _cpu_set_rng_state)
    _patch(mrandom, "_set_cuda_rng_state", _cpu_set_rng_state)

    tracker = CpuRNGStatesTracker()
    _patch(mrandom, "_CUDA_RNG_STATE_TRACKER", tracker)
    _patch(mrandom, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", True)
    _patch(mrandom, "initialize_rng_tracker", lambda *a, **k: None)

    _patch(p2p_communication, "_batched_p2p_ops", _gloo_batched_p2p_ops)

    # Without apex/TE (always, on CPU): the torch-AdamW checkpoint fixes, which the trainer installs on any device.
    for obj, name, value in torch_adam.patches():
        _patch(obj, name, value)

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
    """Raise if a megatron TransformerConfig / ModelParallelConfig asks for something CPU mode cannot do right.

    CUDA-only fusions have no CPU implementation; the variable-shape p2p handshake pairs messages wrongly on gloo
    with an interleaved schedule at pipeline size 2 (module docstring).
    """
    problems = []
    on = [name for name in _CUDA_ONLY_FUSIONS if getattr(config, name, False)]
    if on:
        problems.append(f"{', '.join(on)} must be False on CPU (CUDA-only fusions)")
    vpp = getattr(config, "virtual_pipeline_model_parallel_size", None) or 1
    pp = getattr(config, "pipeline_model_parallel_size", 1) or 1
    if vpp > 1 and pp == 2 and getattr(config, "variable_seq_lengths", False):
        problems.append(
            "variable_seq_lengths=True with an interleaved pipeline at pipeline_model_parallel_size=2 pairs gloo "
            "p2p shape messages in the wrong order (p2p_communication.py:214); use fixed sequence lengths"
        )
    if problems:
        raise ValueError("TransformerConfig: " + "; ".join(problems))


def fuse_adam(optimizer: Any) -> int:
    """Switch the torch Adam/AdamW under a (megatron-wrapped) optimizer to torch's fused CPU kernel; returns how
    many param groups were switched.

    Without apex/TE megatron builds ``torch.optim.AdamW`` with default arguments (optimizer/__init__.py), which on
    CPU runs the per-tensor loop, several times slower than the fused kernel (docs/performance.md, "AdamW on CPU").
    The fused kernel
    computes AdamW's update in fp32 in one pass per tensor (rounding differs from the loop's by ~1e-8); torch reads
    ``fused`` from the param group at every ``step``. Groups with a param that is not a floating CPU tensor are left
    as they are.
    """
    switched = 0
    for inner in torch_optimizers(optimizer):
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in inner.param_groups:
            if group.get("fused") or group.get("differentiable") or group.get("capturable"):
                continue
            if all(p.device.type == "cpu" and p.is_floating_point() for p in group["params"]):
                group["fused"], group["foreach"] = True, False
                switched += 1
    return switched

