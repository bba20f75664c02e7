"""Modality-routed column- and row-parallel linear layers on megatron-core.

Each layer holds one weight per modality (``weight`` for text, ``image_weight`` for image), each TP-sharded exactly
like megatron's dense layer, so a dense megatron checkpoint's ``weight`` is the text weight unchanged: the parameter
contract of :mod:`megatron_ext.contract`, which the Transformer Engine variant follows too. Tokens are
routed by a :class:`~megatron_ext.routing.RoutingPlan`: one dense GEMM per modality on a contiguous slice.

Communication is that of one dense megatron linear, never one collective per modality (with sequence parallelism
each rank holds different numbers of text and image tokens, so per-modality collectives could not even match up):

* column, SP:   fwd all-gather(x);  bwd all-gather(x) again for the weight gradient (only if some weight trains;
                 megatron saves the local shard, not the gathered input) + reduce-scatter(dx)
* column, TP:   fwd nothing;        bwd all-reduce(dx)
* row:          fwd reduce-scatter (SP) or all-reduce (TP) of the summed per-modality outputs; bwd all-gather or
                 nothing — megatron's own mapping functions.

A frozen modality (``requires_grad=False``) runs no weight-gradient GEMM and never gets a ``.grad``. A trainable
modality with no tokens in the micro-batch gets no gradient either (``None``, as an unused parameter): megatron's
DDP hook then adds nothing to its ``main_grad``, which is what a zero gradient would do, without allocating a
weight-sized tensor of zeros (470 MB for one 8B fc1 in fp32).

Between a column and a row layer the activations may stay grouped (``keep_grouped=True`` /
``input_grouped=True``): an MLP then permutes once on the way in and once on the way out.

A slot both modalities share (``model.separation`` shallow / none) is filled with :class:`SharedColumnParallelLinear`
/ :class:`SharedRowParallelLinear`: megatron's own dense layers (their communication, their frozen-weight path) with
the routed layers' call signature, the plan ignored, and the contract's text names and checkpoint keys (``weight``,
``bias``; no twin).

The Transformer Engine variant lives in :mod:`megatron_ext.te_linear`.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    _initialize_affine_weight_cpu,
    _initialize_affine_weight_gpu,
    copy_tensor_model_parallel_attributes,
    set_tensor_model_parallel_attributes,
)
from megatron.core.tensor_parallel.mappings import (
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from megatron.core.utils import get_pg_rank, get_pg_size
from torch.nn import Parameter

from megatron_ext.contract import image_twin_name, routed_linear_sharded_state_dict
from megatron_ext.routing import IMAGE, TEXT, RoutingPlan

__all__ = ["ModalityColumnParallelLinear", "ModalityRowParallelLinear", "SharedColumnParallelLinear",
           "SharedRowParallelLinear", "routed_linear", "tag_partitioned"]


def _all_gather_first_dim(x: torch.Tensor, group, async_op: bool = False):
    out = torch.empty((x.shape[0] * get_pg_size(group), *x.shape[1:]), dtype=x.dtype, device=x.device)
    handle = dist.all_gather_into_tensor(out, x.contiguous(), group=group, async_op=async_op)
    return out, handle


class _RoutedLinear(torch.autograd.Function):
    """y = x W_m^T + b_m for each token of modality m, with megatron's column-parallel input communication.

    Args (forward): x (tokens, in) local tokens; plan; group (TP); sequence_parallel (all-gather x first);
    allreduce_dgrad (all-reduce dx over TP in backward); input_grouped / keep_grouped (x is / y stays in the
    plan's grouped layout); then the per-modality weights and biases (bias may be None).
    """

    @staticmethod
    def forward(ctx, x, plan: RoutingPlan, group, sequence_parallel: bool, allreduce_dgrad: bool,
                input_grouped: bool, keep_grouped: bool, w_text, w_image, b_text, b_image):
        weights, biases = (w_text, w_image), (b_text, b_image)
        if sequence_parallel and input_grouped:
            raise ValueError("a sequence-parallel gather needs the input in token order, not grouped")
        total = _all_gather_first_dim(x, group)[0] if sequence_parallel else x  # (n, in)
        xg = total if input_grouped else plan.group(total)  # (rows, in)
        out_features = w_text.shape[0]
        yg = xg.new_empty((xg.shape[0], out_features))  # (rows, out); every row lies in some group's slice
        for m, rows in plan.group_slices():
            torch.matmul(xg[rows], weights[m].t(), out=yg[rows])
            if biases[m] is not None:
                yg[rows] += biases[m]
        y = yg if keep_grouped else plan.ungroup(yg)

        ctx.wgrad = tuple(w.requires_grad for w in weights)
        ctx.bgrad = tuple(b is not None and b.requires_grad for b in biases)
        ctx.has_bias = tuple(b is not None for b in biases)
        ctx.plan, ctx.group = plan, group
        ctx.sequence_parallel, ctx.allreduce_dgrad = sequence_parallel, allreduce_dgrad
        ctx.input_grouped, ctx.keep_grouped = input_grouped, keep_grouped
        # Save the local input (not the gathered or grouped copy), as megatron does: the weight gradient
        # re-gathers / re-groups it in backward. Nothing is saved for it when every weight is frozen.
        ctx.save_for_backward(x if any(ctx.wgrad) else None, w_text, w_image)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w_text, w_image = ctx.saved_tensors
        weights = (w_text, w_image)
        plan, group = ctx.plan, ctx.group
        need_wgrad = any(ctx.wgrad)

        handle = None
        if need_wgrad and ctx.sequence_parallel:
            total, handle = _all_gather_first_dim(x, group, async_op=True)  # overlaps the dgrad GEMMs
        if ctx.keep_grouped:
            # Pad rows of a grouped gradient must be zero for the weight gradient; do not trust the caller.
            dyg = dy if plan.pad_rows is None else dy.index_fill(0, plan.pad_rows, 0)
        else:
            dyg = plan.group(dy)  # (rows, out), pad rows zero

        dx = None
        dx_handle = None
        if ctx.needs_input_grad[0]:
            dxg = dyg.new_empty((dyg.shape[0], w_text.shape[1]))  # (rows, in); pad rows get 0 @ W = 0
            if plan.text_no_dgrad:  # text nobody needs a gradient for (RoutingPlan.build): zeros, no GEMM
                start = plan.offsets[TEXT]
                dxg[start:start + plan.text_no_dgrad].zero_()
            for m, rows in plan.dgrad_slices():
                torch.matmul(dyg[rows], weights[m], out=dxg[rows])
            dx_total = dxg if ctx.input_grouped else plan.ungroup(dxg)  # (n, in)
            if ctx.sequence_parallel:
                dx = torch.empty((dx_total.shape[0] // get_pg_size(group), *dx_total.shape[1:]),
                                 dtype=dx_total.dtype, device=dx_total.device)
                dx_handle = dist.reduce_scatter_tensor(dx, dx_total, group=group, async_op=True)
            elif ctx.allreduce_dgrad:
                dx = dx_total
                dx_handle = dist.all_reduce(dx, group=group, async_op=True)
            else:
                dx = dx_total

        grads_w: list[Optional[torch.Tensor]] = [None, None]
        grads_b: list[Optional[torch.Tensor]] = [None, None]
        if need_wgrad or any(ctx.bgrad):
            if need_wgrad:
                if handle is not None:
                    handle.wait()
                elif not ctx.sequence_parallel:
                    total = x
                xg = total if ctx.input_grouped else plan.group(total)
            slices = dict(plan.group_slices())
            for m in (TEXT, IMAGE):
                rows = slices.get(m)
                if rows is None:
                    continue  # no tokens of this modality: no gradient (see module docstring)
                if ctx.wgrad[m]:
                    grads_w[m] = dyg[rows].t() @ xg[rows]
                if ctx.bgrad[m]:
                    grads_b[m] = dyg[rows].sum(0)
        if dx_handle is not None:
            dx_handle.wait()
        return (dx, None, None, None, None, None, None, grads_w[0], grads_w[1], grads_b[0], grads_b[1])


def routed_linear(x: torch.Tensor, plan: RoutingPlan, weights, biases=(None, None), *, group=None,
                  sequence_parallel: bool = False, allreduce_dgrad: bool = False,
                  input_grouped: bool = False, keep_grouped: bool = False) -> torch.Tensor:
    """Functional routed linear on a flat (tokens, in) input; see :class:`_RoutedLinear`."""
    return _RoutedLinear.apply(x, plan, group, sequence_parallel, allreduce_dgrad, input_grouped, keep_grouped,
                               weights[0], weights[1], biases[0], biases[1])


def tag_partitioned(weight: torch.Tensor, dim: int, stride: int) -> None:
    """megatron tags TP-sharded weights only inside its initialisers; with ``perform_initialization=False``
    (weights loaded later) they would stay untagged and DDP / grad-norm would treat them as duplicates."""
    if not hasattr(weight, "tensor_model_parallel"):
        set_tensor_model_parallel_attributes(weight, True, dim, stride)


def _make_image_twin(layer: torch.nn.Module, name: str, like: torch.Tensor, config: ModelParallelConfig,
                     init: Optional[Callable[[], None]]) -> Parameter:
    """A parameter shaped, typed and TP-tagged like ``like`` (the text tensor), registered as ``name``."""
    param = Parameter(torch.empty_like(like))
    layer.register_parameter(name, param)
    if init is not None and config.perform_initialization:
        init()  # megatron's initialisers set the tensor-parallel attributes themselves
    else:
        copy_tensor_model_parallel_attributes(param, like)
        if config.perform_initialization:
            with torch.no_grad():
                param.zero_()  # biases start at zero, as megatron's
    for attr in ("allreduce", "sequence_parallel"):
        if hasattr(like, attr):
            setattr(param, attr, getattr(like, attr))
    return param


def _add_image_twins(layer, config: ModelParallelConfig, init_method: Callable, partition_dim: int,
                     per_partition: int, stride: int) -> None:
    """Register ``image_weight`` (and ``image_bias``) beside megatron's text ``weight``/``bias``, sharded and
    initialised as megatron shards and initialises the text weight (``partition_dim`` 0: column, 1: row)."""
    rank, world = get_pg_rank(layer.tp_group), get_pg_size(layer.tp_group)

    def init_weight():
        if config.use_cpu_initialization:
            _initialize_affine_weight_cpu(layer.image_weight, layer.output_size, layer.input_size, per_partition,
                                          partition_dim, init_method, stride=stride,
                                          params_dtype=config.params_dtype, rank=rank, world_size=world)
        else:
            _initialize_affine_weight_gpu(layer.image_weight, init_method, partition_dim=partition_dim,
                                          stride=stride)

    tag_partitioned(layer.weight, partition_dim, stride)
    _make_image_twin(layer, image_twin_name("weight"), layer.weight, config, init_weight)
    if layer.bias is not None:
        _make_image_twin(layer, image_twin_name("bias"), layer.bias, config, None)
    else:
        layer.register_parameter(image_twin_name("bias"), None)


def _check_divisible(size: int, tp: int, what: str) -> None:
    if size % tp:
        raise ValueError(f"{what} {size} is not divisible by tensor-parallel size {tp}")


class ModalityColumnParallelLinear(ColumnParallelLinear):
    """Column-parallel linear with a text and an image weight; ``forward(x, plan)``.

    Input (s, b, h) — (s/tp, b, h) with sequence parallelism — output (s, b, out/tp), or (s, b, out) with
    ``gather_output``, or the flat grouped (rows, out/tp) with ``keep_grouped=True``.
    """

    def __init__(self, input_size: int, output_size: int, *, config: ModelParallelConfig, init_method: Callable,
                 bias: bool = True, gather_output: bool = False, stride: int = 1, skip_bias_add: bool = False,
                 is_expert: bool = False, tp_comm_buffer_name: Optional[str] = None, tp_group=None, **unused):
        tp = get_pg_size(tp_group or parallel_state.get_tensor_model_parallel_group())
        _check_divisible(output_size, tp, "ModalityColumnParallelLinear output_size")
        if skip_bias_add and bias:
            raise ValueError("ModalityColumnParallelLinear: skip_bias_add is not supported with per-modality bias")
        super().__init__(input_size, output_size, config=config, init_method=init_method, bias=bias,
                         gather_output=gather_output, stride=stride, skip_bias_add=skip_bias_add,
                         is_expert=is_expert, tp_comm_buffer_name=tp_comm_buffer_name, tp_group=tp_group)
        _add_image_twins(self, config, init_method, 0, self.output_size_per_partition, stride)

    def forward(self, input_: torch.Tensor, plan: RoutingPlan, keep_grouped: bool = False):
        if input_.dim() != 3 or input_.shape[-1] != self.input_size:
            raise ValueError(f"{type(self).__name__}: expected input (s, b, {self.input_size}), "
                             f"got {tuple(input_.shape)}")
        s_local, b = input_.shape[0], input_.shape[1]
        s = s_local * get_pg_size(self.tp_group) if self.sequence_parallel else s_local
        if plan.num_tokens != s * b:
            raise ValueError(f"{type(self).__name__}: routing plan covers {plan.num_tokens} tokens, "
                             f"input holds {s} x {b}")
        if keep_grouped and self.gather_output:
            raise ValueError("keep_grouped and gather_output cannot be combined")
        y = routed_linear(input_.reshape(s_local * b, -1), plan, (self.weight, self.image_weight),
                          (self.bias, self.image_bias), group=self.tp_group,
                          sequence_parallel=self.sequence_parallel, allreduce_dgrad=self.allreduce_dgrad,
                          keep_grouped=keep_grouped)
        if keep_grouped:
            return y, None
        y = y.view(s, b, -1)  # (s, b, out/tp)
        if self.gather_output:
            y = gather_from_tensor_model_parallel_region(y, group=self.tp_group)
        return y, None

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Both modalities shard along axis 0, biases too (as megatron's dense column layer); the contract's keys."""
        return routed_linear_sharded_state_dict(self, 0, prefix, sharded_offsets, metadata, self.tp_group)


class ModalityRowParallelLinear(RowParallelLinear):
    """Row-parallel linear with a text and an image weight; ``forward(x, plan)``.

    Input (s, b, in/tp) (or the column layer's grouped output with ``input_grouped=True``); output (s, b, out),
    (s/tp, b, out) with sequence parallelism. The per-modality outputs land in one tensor and are reduced once.
    """

    def __init__(self, input_size: int, output_size: int, *, config: ModelParallelConfig, init_method: Callable,
                 bias: bool, input_is_parallel: bool, skip_bias_add: bool, stride: int = 1,
                 is_expert: bool = False, tp_comm_buffer_name: Optional[str] = None, tp_group=None, **unused):
        tp = get_pg_size(tp_group or parallel_state.get_tensor_model_parallel_group())
        _check_divisible(input_size, tp, "ModalityRowParallelLinear input_size")
        if skip_bias_add and bias:
            raise ValueError("ModalityRowParallelLinear: skip_bias_add is not supported with per-modality bias")
        super().__init__(input_size, output_size, config=config, init_method=init_method, bias=bias,
                         input_is_parallel=input_is_parallel, skip_bias_add=skip_bias_add, stride=stride,
                         is_expert=is_expert, tp_comm_buffer_name=tp_comm_buffer_name, tp_group=tp_group)
        _add_image_twins(self, config, init_method, 1, self.input_size_per_partition, stride)

    def forward(self, input_: torch.Tensor, plan: RoutingPlan, input_grouped: bool = False,
                seq_shape: Optional[tuple[int, int]] = None):
        """``seq_shape`` (s, b) is needed only with ``input_grouped`` (the grouped input is flat)."""
        if input_grouped:
            if seq_shape is None:
                seq_shape = plan.seq_shape
            if seq_shape is None:
                raise ValueError("input_grouped needs seq_shape (s, b) or a plan built from (s, b) ids")
            s, b = seq_shape
            x_local = input_
        else:
            if input_.dim() != 3:
                raise ValueError(f"{type(self).__name__}: expected input (s, b, h), got {tuple(input_.shape)}")
            if not self.input_is_parallel:
                input_ = scatter_to_tensor_model_parallel_region(input_, group=self.tp_group)
            s, b = input_.shape[0], input_.shape[1]
            x_local = input_.reshape(s * b, -1)
        if x_local.shape[-1] != self.input_size_per_partition:
            raise ValueError(f"{type(self).__name__}: expected {self.input_size_per_partition} input features per "
                             f"rank, got {x_local.shape[-1]}")
        if plan.num_tokens != s * b:
            raise ValueError(f"{type(self).__name__}: routing plan covers {plan.num_tokens} tokens, "
                             f"input holds {s} x {b}")
        y = routed_linear(x_local, plan, (self.weight, self.image_weight), input_grouped=input_grouped)
        y = y.view(s, b, -1)  # (s, b, out) partial sums over the TP ranks
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_parallel_region(y, group=self.tp_group)  # (s/tp, b, out)
        else:
            y = reduce_from_tensor_model_parallel_region(y, group=self.tp_group)
        if self.bias is not None:
            # Bias after the reduction, per token of the (local) sequence, as megatron adds its bias.
            if self.sequence_parallel:
                ids = plan.local_modality_ids(get_pg_rank(self.tp_group), get_pg_size(self.tp_group))
            else:
                ids = plan.modality_ids
            bias = torch.stack([self.bias, self.image_bias])[ids]  # (tokens, out)
            y = y + bias.view(y.shape)
        return y, None

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Both modalities shard along axis 1; biases are replicated (as megatron's dense row layer)."""
        return routed_linear_sharded_state_dict(self, 1, prefix, sharded_offsets, metadata, self.tp_group)


class SharedColumnParallelLinear(ColumnParallelLinear):
    """megatron's dense column-parallel linear with the routed layer's ``forward(x, plan, keep_grouped=False)``:
    one weight for every token (the plan is ignored; ``keep_grouped`` must be False)."""

    def __init__(self, input_size: int, output_size: int, *, config: ModelParallelConfig, init_method: Callable,
                 bias: bool = True, gather_output: bool = False, stride: int = 1, skip_bias_add: bool = False,
                 is_expert: bool = False, tp_comm_buffer_name: Optional[str] = None, tp_group=None, **unused):
        super().__init__(input_size, output_size, config=config, init_method=init_method, bias=bias,
                         gather_output=gather_output, stride=stride, skip_bias_add=skip_bias_add,
                         is_expert=is_expert, tp_comm_buffer_name=tp_comm_buffer_name, tp_group=tp_group)
        tag_partitioned(self.weight, 0, stride)

    def forward(self, input_: torch.Tensor, plan: Optional[RoutingPlan] = None, keep_grouped: bool = False):
        if keep_grouped:
            raise ValueError("SharedColumnParallelLinear: a dense layer has no grouped output")
        return super().forward(input_)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """The contract's keys (weights and biases split on axis 0), without megatron's ``_extra_state``."""
        return routed_linear_sharded_state_dict(self, 0, prefix, sharded_offsets, metadata, self.tp_group)


class SharedRowParallelLinear(RowParallelLinear):
    """megatron's dense row-parallel linear with the routed layer's ``forward(x, plan, input_grouped=False)``."""

    def __init__(self, input_size: int, output_size: int, *, config: ModelParallelConfig, init_method: Callable,
                 bias: bool, input_is_parallel: bool, skip_bias_add: bool, stride: int = 1,
                 is_expert: bool = False, tp_comm_buffer_name: Optional[str] = None, tp_group=None, **unused):
        super().__init__(input_size, output_size, config=config, init_method=init_method, bias=bias,
                         input_is_parallel=input_is_parallel, skip_bias_add=skip_bias_add, stride=stride,
                         is_expert=is_expert, tp_comm_buffer_name=tp_comm_buffer_name, tp_group=tp_group)
        tag_partitioned(self.weight, 1, stride)

    def forward(self, input_: torch.Tensor, plan: Optional[RoutingPlan] = None, input_grouped: bool = False,
                seq_shape: Optional[tuple[int, int]] = None):
        if input_grouped:
            raise ValueError("SharedRowParallelLinear takes token-ordered input")
        return super().forward(input_)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """The contract's keys (weights split on axis 1, biases replicated), without ``_extra_state``."""
        return routed_linear_sharded_state_dict(self, 1, prefix, sharded_offsets, metadata, self.tp_group)
