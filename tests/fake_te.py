"""A CPU stand-in for the parts of ``transformer_engine.pytorch`` that ``megatron_ext.te_linear`` calls, so our TE
wrappers run in CPU tests. ``install(monkeypatch)`` puts it in place of ``megatron_ext.te_linear.te``.

It copies TE 2.9's behaviour wherever our code depends on it (transformer_engine/pytorch/module/linear.py, base.py,
distributed.py):

* ``Linear(in_features, out_features, *, bias, params_dtype, parallel_mode, device, init_method,
  get_rng_state_tracker, ...)``: parameters ``weight`` (out, in) and ``bias`` registered on the module itself and
  allocated on ``device`` (so a CUDA device fails on a CPU machine, as the real one); ``init_method(weight)`` under
  ``get_rng_state_tracker().fork()``, bias zero; ``bias=False`` leaves an empty plain tensor attribute ``bias``.
  Weights are tagged ``tensor_model_parallel=True``, ``partition_dim`` 1 for ``parallel_mode='row'`` else 0 and
  ``partition_stride`` 1, asserting first that no TP attribute is set (TE's ``set_tensor_model_parallel_attributes``).
  ``forward`` finds its device through ``list(self.named_parameters())[0]`` and, outside autocast, asserts every
  parameter's dtype equals the input's (``set_activation_dtype``). Unknown keyword arguments raise TypeError.
* ``fp8_autocast(enabled=...)``: a global FP8 flag; every ``Linear`` call records it in ``Linear.fp8_log`` (the
  stand-in computes in full precision: what tests check is whether FP8 was *active*).
* ``distributed.checkpoint(function, *args, use_reentrant=True, get_rng_state_tracker=None)``: as TE, a module
  argument without TE modules among its ``modules()`` falls back to torch's checkpoint; otherwise the recompute
  re-enters the forward's ``fp8_autocast`` state. Calls are counted in ``distributed.calls``.
"""

from __future__ import annotations

import contextlib
import types

import torch
import torch.nn.functional as F

_TP_ATTRIBUTES = ("tensor_model_parallel", "partition_dim", "partition_stride")


class _FP8State:
    enabled = False


@contextlib.contextmanager
def fp8_autocast(enabled: bool = True, fp8_recipe=None, **unused):
    previous = _FP8State.enabled
    _FP8State.enabled = enabled
    try:
        yield
    finally:
        _FP8State.enabled = previous


class Linear(torch.nn.Module):
    fp8_log: list[bool] = []
    """FP8 flag at every call of any Linear (forward and recompute), in call order; reset by :func:`install`."""

    def __init__(self, in_features: int, out_features: int, sequence_parallel: bool = False,
                 fuse_wgrad_accumulation: bool = False, tp_group=None, tp_size: int = 1, get_rng_state_tracker=None,
                 rng_tracker_name=None, init_method=None, bias: bool = True, return_bias: bool = False,
                 params_dtype=None, parallel_mode=None, parameters_split=None, device="cuda", name=None):
        super().__init__()
        if parallel_mode not in (None, "column", "row"):
            raise ValueError(f"parallel_mode {parallel_mode!r}")
        dtype = params_dtype or torch.get_default_dtype()
        self.parallel_mode, self.use_bias = parallel_mode, bias
        self.weight = torch.nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        if bias:
            self.bias = torch.nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
        else:
            self.bias = torch.Tensor().to(dtype=dtype, device=device)
        init = init_method or (lambda w: torch.nn.init.normal_(w, std=0.023))
        fork = get_rng_state_tracker().fork() if get_rng_state_tracker is not None else contextlib.nullcontext()
        with torch.no_grad(), fork:
            init(self.weight)
        if bias:
            with torch.no_grad():
                self.bias.zero_()
        for attribute in _TP_ATTRIBUTES:
            assert not hasattr(self.weight, attribute)
        self.weight.tensor_model_parallel = True
        self.weight.partition_dim = 1 if parallel_mode == "row" else 0
        self.weight.partition_stride = 1

    def forward(self, inp: torch.Tensor, is_first_microbatch=None) -> torch.Tensor:
        device = getattr(self, list(self.named_parameters())[0][0]).device
        if inp.device != device:
            raise RuntimeError(f"input on {inp.device}, parameters on {device}")
        if not torch.is_autocast_enabled():
            for name, param in self.named_parameters():
                assert param.dtype == inp.dtype, f"input dtype {inp.dtype} and {name!r} dtype {param.dtype}"
        Linear.fp8_log.append(_FP8State.enabled)
        return F.linear(inp, self.weight, self.bias if self.use_bias else None)


def _checkpoint(function, *args, use_reentrant: bool = True, get_rng_state_tracker=None, **kwargs):
    _distributed.calls += 1
    if isinstance(function, torch.nn.Module) and not any(isinstance(m, Linear) for m in function.modules()):
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=use_reentrant, **kwargs)
    fp8 = _FP8State.enabled

    def contexts():
        return contextlib.nullcontext(), fp8_autocast(enabled=fp8)

    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, context_fn=contexts, **kwargs)


_distributed = types.SimpleNamespace(checkpoint=_checkpoint, calls=0)

pytorch = types.SimpleNamespace(Linear=Linear, fp8_autocast=fp8_autocast, distributed=_distributed)
"""The stand-in of ``transformer_engine.pytorch``."""


def install(monkeypatch) -> types.SimpleNamespace:
    """Make ``megatron_ext.te_linear`` build on the stand-in for the rest of the test; returns it."""
    from megatron_ext import te_linear

    monkeypatch.setattr(te_linear, "te", pytorch)
    monkeypatch.setattr(te_linear, "HAVE_TE", True)
    monkeypatch.setattr(Linear, "fp8_log", [])
    monkeypatch.setattr(_distributed, "calls", 0)
    return pytorch
