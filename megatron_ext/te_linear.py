"""Transformer Engine variant of the routed linears: one ``te.pytorch.Linear`` per modality.

Used when Transformer Engine imports (a CUDA container with ``pip install lmfusion[gpu]``); the local variant in
:mod:`megatron_ext.linear` otherwise. The per-modality TE GEMMs run with ``parallel_mode=None``: the tensor-parallel
communication is ours and happens once per layer (megatron's mapping functions around the routed GEMMs), never
once per modality. Inside ``te.pytorch.fp8_autocast`` each group's token count must be a multiple of 16: build the
plan with ``RoutingPlan.build(ids, pad_multiple=16)`` (see :func:`fp8_pad_multiple`); pad rows are zero, so they
change neither outputs nor weight gradients (nor the FP8 amax, which zeros cannot raise).

Differences from the local variant, by design of TE's modules: under sequence parallelism the gathered input is
kept for the weight gradient (TE's Linear saves what it is given), so the backward has one collective fewer
(no re-gather) and holds the gathered activation instead of the shard. A frozen modality (``requires_grad=False``)
runs no weight-gradient GEMM inside TE.

**Parameter contract** (:mod:`megatron_ext.contract`): the same names as the local layers, ``weight``/``bias``
(text) and ``image_weight``/``image_bias`` (image), registered directly on the routed module with megatron's TP
attributes (``partition_stride`` 2 for the fused SwiGLU fc1), and the same ``sharded_state_dict``. Base loading,
freezing, twin copies and checkpoints therefore never see which backend built a layer. How: each modality's GEMM is
a ``te.pytorch.Linear`` that keeps its parameter in its own ``_parameters`` (TE's forward finds its device through
``list(self.named_parameters())[0]`` and dtype-checks them there), and the routed module registers the *same*
Parameter objects under the contract names. The GEMM modules are held in a tuple, not as submodules: as submodules
each weight would have two names (``text.weight`` and ``weight``), ``state_dict`` would hold both and TE's own
tagging would compete with ours. ``train()``/``eval()`` are forwarded to them and ``_apply`` (``.to``, ``.cuda``,
``.bfloat16``) re-binds them to the routed module's parameters. TE's per-GEMM FP8 scaling state (``_extra_state``)
is not checkpointed (as before this contract): delayed-scaling amax histories restart after a resume.

A slot both modalities share (``model.separation`` shallow / none) gets ``TESharedColumnParallelLinear`` /
``TESharedRowParallelLinear``: the same module with one GEMM (``weight``/``bias`` only, no twin) run on every token
in token order (no grouping; under FP8 the layer's token count s x b must then be a multiple of 16, as for megatron's
own TE layers).

Activation recompute must use :func:`te_checkpoint` (TE's checkpoint re-enters ``fp8_autocast`` on recompute;
torch's does not).

Tests: ``tests/unit/test_te_linear.py`` runs these classes on CPU against a small stand-in of
``transformer_engine.pytorch`` (``tests/fake_te.py``); GPU tests with the real TE are marked ``gpu``.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from megatron.core import parallel_state
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import get_pg_size

from megatron_ext.contract import image_twin_name, mark_partitioned, routed_linear_sharded_state_dict
from megatron_ext.routing import MODALITY_NAMES, RoutingPlan

try:  # optional at import time
    import transformer_engine.pytorch as te

    HAVE_TE = True
except Exception:  # ImportError, or RuntimeError from a TE without its CUDA libraries
    te = None
    HAVE_TE = False

__all__ = ["HAVE_TE", "TEModalityColumnParallelLinear", "TEModalityRowParallelLinear", "TESharedColumnParallelLinear",
           "TESharedRowParallelLinear", "fp8_pad_multiple",
           "require_te", "default_device", "has_te_linears", "te_checkpoint"]

FP8_GEMM_MULTIPLE = 16


def require_te(feature: str) -> None:
    if not HAVE_TE:
        raise RuntimeError(f"{feature} needs Transformer Engine: install it in a CUDA container "
                           f"(pip install 'lmfusion[gpu]'); the local (pure torch) layers are used otherwise")


def fp8_pad_multiple(fp8: bool) -> int:
    """The routing plan's pad multiple: 16 under FP8 (TE's GEMM requirement), 1 otherwise."""
    return FP8_GEMM_MULTIPLE if fp8 else 1


def default_device() -> torch.device:
    """The current CUDA device when CUDA is the runtime's device, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _routed_te_gemms(x: torch.Tensor, plan: RoutingPlan, gemms) -> torch.Tensor:
    """(n, in) token order -> per-modality TE GEMMs on grouped rows -> (n, out) token order (autograd-aware)."""
    xg = x.index_select(0, plan.gather_index)  # (rows, in)
    if plan.pad_rows is not None:
        xg = xg.index_fill(0, plan.pad_rows, 0)
    outs = [gemms[m](xg[rows]) for m, rows in plan.group_slices()]
    yg = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)  # (rows, out)
    return yg.index_select(0, plan.scatter_index)


def _skip_init(weight: torch.Tensor) -> None:
    """Weights loaded later (``perform_initialization=False``): leave them as allocated."""


class _TEModalityLinear(MegatronModule):
    """One ``te.pytorch.Linear`` per modality; the contract's parameters registered here (module docstring)."""

    partition_dim: int
    modalities = len(MODALITY_NAMES)
    """GEMMs (and parameter sets) held: one per modality, or one shared (the ``TEShared*`` classes)."""

    def __init__(self, input_size: int, output_size: int, *, config: ModelParallelConfig, init_method: Callable,
                 bias: bool, stride: int = 1, tp_group=None, device: Optional[torch.device] = None):
        require_te(type(self).__name__)
        super().__init__(config=config)
        self.tp_group = tp_group if tp_group is not None else parallel_state.get_tensor_model_parallel_group()
        tp = get_pg_size(self.tp_group)
        split = output_size if self.partition_dim == 0 else input_size
        if split % (tp * stride):
            raise ValueError(f"{type(self).__name__}: size {split} is not divisible by tensor-parallel size {tp} "
                             f"x stride {stride}")
        self.input_size, self.output_size, self.stride = input_size, output_size, stride
        local_in = input_size if self.partition_dim == 0 else input_size // tp
        local_out = output_size // tp if self.partition_dim == 0 else output_size
        self.sequence_parallel = config.sequence_parallel and tp > 1
        self.device = torch.device(device) if device is not None else default_device()
        tracker = get_cuda_rng_tracker if get_cuda_rng_tracker().is_initialized() else None
        # TE initialises each local shard itself, under megatron's model-parallel RNG (as megatron's TELinear).
        gemms = tuple(te.Linear(local_in, local_out, bias=bias, params_dtype=config.params_dtype, parallel_mode=None,
                                device=self.device, get_rng_state_tracker=tracker,
                                init_method=init_method if config.perform_initialization else _skip_init)
                      for _ in range(self.modalities))
        self._gemms = gemms  # a tuple: not submodules (module docstring)
        self._names = tuple((w, b if bias else None) for w, b in (("weight", "bias"), (image_twin_name("weight"),
                                                                                        image_twin_name("bias")))
                            )[:self.modalities]
        for gemm, (w_name, b_name) in zip(gemms, self._names):
            self.register_parameter(w_name, gemm.weight)
            mark_partitioned(gemm.weight, self.partition_dim, stride)
            gemm.weight.allreduce = True  # as megatron's dense layers (not expert-parallel)
            if b_name is None:
                continue
            self.register_parameter(b_name, gemm.bias)
            if self.partition_dim == 0:
                mark_partitioned(gemm.bias, 0, stride)
            gemm.bias.allreduce = True
        if not bias:
            for _, b_name in (("weight", "bias"), ("image_weight", "image_bias"))[:self.modalities]:
                self.register_parameter(b_name, None)

    def _gemms_on(self, x: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        """(n, in) token order -> (n, out) token order through this module's GEMM(s)."""
        return _routed_te_gemms(x, plan, self._gemms)

    def train(self, mode: bool = True):
        super().train(mode)
        for gemm in self._gemms:
            gemm.train(mode)
        return self

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        # torch converts parameters in place (same objects), unless told to swap or overwrite them: re-bind the
        # GEMMs to whatever this module holds now, so both always share one tensor per weight.
        for gemm, (w_name, b_name) in zip(self._gemms, self._names):
            gemm._parameters["weight"] = self._parameters[w_name]
            if b_name is not None:
                gemm._parameters["bias"] = self._parameters[b_name]
        return self

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """The contract's keys and shards (:mod:`megatron_ext.contract`), as the local layers."""
        return routed_linear_sharded_state_dict(self, self.partition_dim, prefix, sharded_offsets, metadata,
                                                self.tp_group)


class TEModalityColumnParallelLinear(_TEModalityLinear):
    partition_dim = 0

    def __init__(self, input_size, output_size, *, config, init_method, bias=True, gather_output=False, stride=1,
                 tp_group=None, device=None, **unused):
        super().__init__(input_size, output_size, config=config, init_method=init_method, bias=bias, stride=stride,
                         tp_group=tp_group, device=device)
        self.gather_output = gather_output

    def forward(self, input_: torch.Tensor, plan: RoutingPlan, keep_grouped: bool = False):
        if keep_grouped:
            raise ValueError("TEModalityColumnParallelLinear does not keep grouped outputs")
        if self.sequence_parallel:
            total = gather_from_sequence_parallel_region(input_, group=self.tp_group)  # (s, b, h)
        else:
            total = copy_to_tensor_model_parallel_region(input_, group=self.tp_group)
        s, b = total.shape[0], total.shape[1]
        y = self._gemms_on(total.reshape(s * b, -1), plan).view(s, b, -1)
        if self.gather_output:
            y = gather_from_tensor_model_parallel_region(y, group=self.tp_group)
        return y, None


class TEModalityRowParallelLinear(_TEModalityLinear):
    partition_dim = 1

    def __init__(self, input_size, output_size, *, config, init_method, bias, input_is_parallel=True,
                 skip_bias_add=False, stride=1, tp_group=None, device=None, **unused):
        if bias:
            raise ValueError("TEModalityRowParallelLinear: a row bias must be added after the reduction; "
                             "use bias=False (Llama has none) or the local layer")
        super().__init__(input_size, output_size, config=config, init_method=init_method, bias=False, stride=stride,
                         tp_group=tp_group, device=device)
        self.input_is_parallel = input_is_parallel

    def forward(self, input_: torch.Tensor, plan: RoutingPlan, input_grouped: bool = False, seq_shape=None):
        if input_grouped:
            raise ValueError("TEModalityRowParallelLinear takes token-ordered input")
        if not self.input_is_parallel:
            input_ = scatter_to_tensor_model_parallel_region(input_, group=self.tp_group)
        s, b = input_.shape[0], input_.shape[1]
        y = self._gemms_on(input_.reshape(s * b, -1), plan).view(s, b, -1)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(y, group=self.tp_group), None
        return reduce_from_tensor_model_parallel_region(y, group=self.tp_group), None


class _Shared:
    """Mixin: one TE GEMM for every token (the plan is ignored)."""

    modalities = 1

    def _gemms_on(self, x: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        return self._gemms[0](x)


class TESharedColumnParallelLinear(_Shared, TEModalityColumnParallelLinear):
    """Column-parallel TE linear shared by both modalities (``weight``/``bias`` only)."""


class TESharedRowParallelLinear(_Shared, TEModalityRowParallelLinear):
    """Row-parallel TE linear shared by both modalities (``weight`` only)."""


def has_te_linears(module: torch.nn.Module) -> bool:
    """Does ``module`` contain routed TE linears? (TE's own module walk cannot see their GEMMs: module docstring.)"""
    return any(isinstance(m, _TEModalityLinear) for m in module.modules())


def te_checkpoint(function: Callable, *args):
    """Run ``function(*args)`` under TE's activation checkpoint (non-reentrant): on recompute it re-enters the
    forward's ``fp8_autocast`` (recipe and scaling state), which ``torch.utils.checkpoint`` does not.

    ``function`` is handed over wrapped in a plain function: given a module, TE's checkpoint looks for TE modules
    among its submodules, finds none (the GEMMs are not submodules) and falls back to torch's checkpoint."""
    require_te("te_checkpoint")

    def run(*inputs):
        return function(*inputs)

    return te.distributed.checkpoint(run, *args, use_reentrant=False, get_rng_state_tracker=get_cuda_rng_tracker)
