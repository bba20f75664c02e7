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

These classes need a GPU; their tests are marked ``gpu`` and skip without one.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from megatron.core import parallel_state
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel.layers import _initialize_affine_weight_gpu, set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint
from megatron.core.utils import get_pg_size

from megatron_ext.routing import RoutingPlan

try:  # optional at import time
    import transformer_engine.pytorch as te

    HAVE_TE = True
except Exception:  # ImportError, or RuntimeError from a TE without its CUDA libraries
    te = None
    HAVE_TE = False

__all__ = ["HAVE_TE", "TEModalityColumnParallelLinear", "TEModalityRowParallelLinear", "fp8_pad_multiple",
           "require_te"]

FP8_GEMM_MULTIPLE = 16


def require_te(feature: str) -> None:
    if not HAVE_TE:
        raise RuntimeError(f"{feature} needs Transformer Engine: install it in a CUDA container "
                           f"(pip install 'lmfusion[gpu]'); the local (pure torch) layers are used otherwise")


def fp8_pad_multiple(fp8: bool) -> int:
    """The routing plan's pad multiple: 16 under FP8 (TE's GEMM requirement), 1 otherwise."""
    return FP8_GEMM_MULTIPLE if fp8 else 1


def _routed_te_gemms(x: torch.Tensor, plan: RoutingPlan, modules) -> torch.Tensor:
    """(n, in) token order -> per-modality TE GEMMs on grouped rows -> (n, out) token order (autograd-aware)."""
    xg = x.index_select(0, plan.gather_index)  # (rows, in)
    if plan.pad_rows is not None:
        xg = xg.index_fill(0, plan.pad_rows, 0)
    outs = [modules[m](xg[rows]) for m, rows in plan.group_slices()]
    yg = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)  # (rows, out)
    return yg.index_select(0, plan.scatter_index)


class _TEModalityLinear(MegatronModule):
    partition_dim: int

    def __init__(self, input_size: int, output_size: int, *, config: ModelParallelConfig, init_method: Callable,
                 bias: bool, tp_group=None):
        require_te(type(self).__name__)
        super().__init__(config=config)
        self.tp_group = tp_group or parallel_state.get_tensor_model_parallel_group()
        tp = get_pg_size(self.tp_group)
        split = output_size if self.partition_dim == 0 else input_size
        if split % tp:
            raise ValueError(f"{type(self).__name__}: size {split} is not divisible by tensor-parallel size {tp}")
        local_in = input_size if self.partition_dim == 0 else input_size // tp
        local_out = output_size // tp if self.partition_dim == 0 else output_size
        self.sequence_parallel = config.sequence_parallel and tp > 1
        self.text = te.Linear(local_in, local_out, bias=bias, params_dtype=config.params_dtype, parallel_mode=None,
                              device="cuda")
        self.image = te.Linear(local_in, local_out, bias=bias, params_dtype=config.params_dtype,
                               parallel_mode=None, device="cuda")
        for mod in (self.text, self.image):
            set_tensor_model_parallel_attributes(mod.weight, True, self.partition_dim, 1)
            if config.perform_initialization:
                _initialize_affine_weight_gpu(mod.weight, init_method, partition_dim=self.partition_dim)
            if bias:
                if self.partition_dim == 0:
                    set_tensor_model_parallel_attributes(mod.bias, True, 0, 1)
                else:
                    setattr(mod.bias, "sequence_parallel", self.sequence_parallel)
                with torch.no_grad():
                    mod.bias.zero_()

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        state_dict = self.state_dict(prefix="", keep_vars=True)
        axes = {f"{m}.weight": self.partition_dim for m in ("text", "image")}
        if self.partition_dim == 0:
            axes.update({f"{m}.bias": 0 for m in ("text", "image")})
        state_dict = {k: v for k, v in state_dict.items() if not k.endswith("_extra_state")}
        return make_sharded_tensors_for_checkpoint(state_dict, prefix, axes, sharded_offsets,
                                                   tp_group=self.tp_group,
                                                   dp_cp_group=(metadata or {}).get("dp_cp_group"))


class TEModalityColumnParallelLinear(_TEModalityLinear):
    partition_dim = 0

    def __init__(self, input_size, output_size, *, config, init_method, bias=True, gather_output=False,
                 tp_group=None, **unused):
        super().__init__(input_size, output_size, config=config, init_method=init_method, bias=bias,
                         tp_group=tp_group)
        self.gather_output = gather_output

    def forward(self, input_: torch.Tensor, plan: RoutingPlan, keep_grouped: bool = False):
        if keep_grouped:
            raise ValueError("TEModalityColumnParallelLinear does not keep grouped outputs")
        if self.sequence_parallel:
            total = gather_from_sequence_parallel_region(input_, group=self.tp_group)  # (s, b, h)
        else:
            total = copy_to_tensor_model_parallel_region(input_, group=self.tp_group)
        s, b = total.shape[0], total.shape[1]
        y = _routed_te_gemms(total.reshape(s * b, -1), plan, (self.text, self.image)).view(s, b, -1)
        if self.gather_output:
            y = gather_from_tensor_model_parallel_region(y, group=self.tp_group)
        return y, None


class TEModalityRowParallelLinear(_TEModalityLinear):
    partition_dim = 1

    def __init__(self, input_size, output_size, *, config, init_method, bias, input_is_parallel=True,
                 skip_bias_add=False, tp_group=None, **unused):
        if bias:
            raise ValueError("TEModalityRowParallelLinear: a row bias must be added after the reduction; "
                             "use bias=False (Llama has none) or the local layer")
        super().__init__(input_size, output_size, config=config, init_method=init_method, bias=False,
                         tp_group=tp_group)
        self.input_is_parallel = input_is_parallel

    def forward(self, input_: torch.Tensor, plan: RoutingPlan, input_grouped: bool = False, seq_shape=None):
        if input_grouped:
            raise ValueError("TEModalityRowParallelLinear takes token-ordered input")
        if not self.input_is_parallel:
            input_ = scatter_to_tensor_model_parallel_region(input_, group=self.tp_group)
        s, b = input_.shape[0], input_.shape[1]
        y = _routed_te_gemms(input_.reshape(s * b, -1), plan, (self.text, self.image)).view(s, b, -1)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(y, group=self.tp_group), None
        return reduce_from_tensor_model_parallel_region(y, group=self.tp_group), None
