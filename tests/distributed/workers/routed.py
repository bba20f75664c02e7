"""Routed column/row parallel linears, routed RMSNorm and the routed MLP vs an unsharded reference.

Every rank builds the same full weights and inputs from one seed; the reference is plain torch on one rank's
full tensors (no megatron); the sharded layers get their TP slices. fp32 throughout; tolerance 1e-5 absolute
(the issue's bound): sharded GEMMs only change summation order, giving ~1e-6 differences at these sizes.
"""

from __future__ import annotations

import contextlib
import itertools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_ext.linear import ModalityColumnParallelLinear, ModalityRowParallelLinear
from megatron_ext.routing import RoutingPlan
from megatron_ext.spec import RoutedMLP, routed_mlp_spec
from megatron.core.transformer.spec_utils import build_module
from tests.distributed.harness import case, worker_main

TOL = 1e-5
S, B, H, F_OUT = 16, 2, 24, 40  # s divisible by 4 (SP at tp=4), dims divisible by 4


def layouts(s: int, b: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Modality ids (s, b): random mixes (incl. image spans), all text, all image, one image token."""
    mixed = (torch.rand(s, b, generator=gen) < 0.5).long()
    span = torch.zeros(s, b, dtype=torch.long)
    span[3:11, 0] = 1
    span[0:5, 1] = 1
    one = torch.zeros(s, b, dtype=torch.long)
    one[s - 1, b - 1] = 1
    return {"mixed": mixed, "spans": span, "all_text": torch.zeros(s, b, dtype=torch.long),
            "all_image": torch.ones(s, b, dtype=torch.long), "one_image_token": one}


def ref_routed(x: torch.Tensor, ids: torch.Tensor, w: tuple, b: tuple) -> torch.Tensor:
    """Independent reference: every token through both weights, select by modality (clear, not fast)."""
    outs = [F.linear(x, w[m], b[m]) for m in range(2)]
    return torch.where(ids.unsqueeze(-1) == 1, outs[1], outs[0])


def cfg(tp: int, sp: bool) -> ModelParallelConfig:
    return ModelParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=sp, use_cpu_initialization=True,
                               params_dtype=torch.float32, perform_initialization=False)


def shard(t: torch.Tensor, dim: int, rank: int, tp: int) -> torch.Tensor:
    return t.chunk(tp, dim=dim)[rank].contiguous()


def assert_close(name: str, got: torch.Tensor | None, want: torch.Tensor, tol: float = TOL) -> None:
    """``got is None`` passes only where the reference is exactly zero: a trainable weight whose modality has no
    token in the micro-batch gets no gradient by design (megatron DDP treats that as zero)."""
    if got is None:
        if want.abs().max().item() != 0.0:
            raise AssertionError(f"{name}: gradient is None, expected a non-zero tensor")
        return
    if got.shape != want.shape:
        raise AssertionError(f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}")
    err = (got - want).abs().max().item() if got.numel() else 0.0
    if err > tol:
        raise AssertionError(f"{name}: max abs diff {err:.3e} > {tol:.0e}")


def pair_parity(tp: int, sp: bool, frozen_text: bool, bias: bool, layout: str, pad_multiple: int) -> None:
    """Column (h -> f) then row (f -> h) vs reference, outputs and all gradients."""
    rank = parallel_state.get_tensor_model_parallel_rank()
    gen = torch.Generator().manual_seed(1234)
    ids = layouts(S, B, gen)[layout]
    x_full = torch.randn(S, B, H, generator=gen)
    w1 = tuple(torch.randn(F_OUT, H, generator=gen) * 0.2 for _ in range(2))
    b1 = tuple(torch.randn(F_OUT, generator=gen) if bias else None for _ in range(2))
    w2 = tuple(torch.randn(H, F_OUT, generator=gen) * 0.2 for _ in range(2))
    b2 = tuple(torch.randn(H, generator=gen) if bias else None for _ in range(2))
    g_full = torch.randn(S, B, H, generator=gen)

    # Reference (no megatron): grads for x and every weight via plain autograd.
    xr = x_full.clone().requires_grad_(True)
    ref_w1 = [w.clone().requires_grad_(not (frozen_text and m == 0)) for m, w in enumerate(w1)]
    ref_w2 = [w.clone().requires_grad_(not (frozen_text and m == 0)) for m, w in enumerate(w2)]
    ref_b1 = [b.clone().requires_grad_(not (frozen_text and m == 0)) if b is not None else None
              for m, b in enumerate(b1)]
    ref_b2 = [b.clone().requires_grad_(not (frozen_text and m == 0)) if b is not None else None
              for m, b in enumerate(b2)]
    hid = ref_routed(xr, ids, ref_w1, ref_b1)
    out_ref = ref_routed(torch.tanh(hid), ids, ref_w2, ref_b2)
    (out_ref * g_full).sum().backward()

    config = cfg(tp, sp)
    col = ModalityColumnParallelLinear(H, F_OUT, config=config, init_method=torch.nn.init.zeros_, bias=bias,
                                       gather_output=False)
    row = ModalityRowParallelLinear(F_OUT, H, config=config, init_method=torch.nn.init.zeros_, bias=bias,
                                    input_is_parallel=True, skip_bias_add=False)
    with torch.no_grad():
        col.weight.copy_(shard(w1[0], 0, rank, tp))
        col.image_weight.copy_(shard(w1[1], 0, rank, tp))
        row.weight.copy_(shard(w2[0], 1, rank, tp))
        row.image_weight.copy_(shard(w2[1], 1, rank, tp))
        if bias:
            col.bias.copy_(shard(b1[0], 0, rank, tp))
            col.image_bias.copy_(shard(b1[1], 0, rank, tp))
            row.bias.copy_(b2[0])
            row.image_bias.copy_(b2[1])
    if frozen_text:
        for p in (col.weight, row.weight, col.bias, row.bias):
            if p is not None:
                p.requires_grad_(False)

    plan = RoutingPlan.build(ids, pad_multiple=pad_multiple)
    x_local = shard(x_full, 0, rank, tp) if sp else x_full.clone()
    x_local.requires_grad_(True)
    hid_local, _ = col(x_local, plan)
    assert_close("column output", hid_local, shard(hid.detach(), 2, rank, tp))
    out, _ = row(torch.tanh(hid_local), plan)
    want_out = shard(out_ref.detach(), 0, rank, tp) if sp else out_ref.detach()
    assert_close("row output", out, want_out)
    g_local = shard(g_full, 0, rank, tp) if sp else g_full
    (out * g_local).sum().backward()

    want_dx = shard(xr.grad, 0, rank, tp) if sp else xr.grad
    assert_close("input grad", x_local.grad, want_dx)
    for name, param, ref, dim in [
        ("col.weight", col.weight, ref_w1[0], 0), ("col.image_weight", col.image_weight, ref_w1[1], 0),
        ("row.weight", row.weight, ref_w2[0], 1), ("row.image_weight", row.image_weight, ref_w2[1], 1),
        ("col.bias", col.bias, ref_b1[0], 0), ("col.image_bias", col.image_bias, ref_b1[1], 0),
        ("row.bias", row.bias, ref_b2[0], None), ("row.image_bias", row.image_bias, ref_b2[1], None),
    ]:
        if param is None:
            continue
        if not ref.requires_grad:
            if param.grad is not None:
                raise AssertionError(f"{name}: frozen but got a gradient")
            continue
        want = ref.grad if ref.grad is not None else torch.zeros_like(ref)
        if dim is not None:
            want = shard(want, dim, rank, tp)
        got = param.grad
        if dim is None and sp and got is not None:
            # Row bias under SP: each rank holds the gradient of its sequence shard; megatron's
            # finalize_model_grads all-reduces params tagged sequence_parallel. Do that here.
            got = got.clone()
            dist.all_reduce(got, group=parallel_state.get_tensor_model_parallel_group())
        assert_close(name, got, want)


def _sweep(tp: int) -> None:
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    failures = []
    for sp, frozen, bias, layout, pad in itertools.product(
            (False, True), (False, True), (False, True),
            ("mixed", "spans", "all_text", "all_image", "one_image_token"), (1, 16)):
        if bias and pad == 16:
            continue  # padding is orthogonal to bias; keep the sweep short
        try:
            pair_parity(tp, sp, frozen, bias, layout, pad)
        except AssertionError as e:
            failures.append(f"sp={sp} frozen_text={frozen} bias={bias} layout={layout} pad={pad}: {e}")
    if failures:
        raise AssertionError("\n".join(failures))


@case
def pair_parity_sweep():
    """Outputs and input/weight grads at TP = world size, SP on/off, frozen text on/off, bias, layouts, padding."""
    _sweep(dist.get_world_size())


@case
def pair_parity_tp_smaller_than_world():
    """TP = 2 inside a larger world (DP replicas): groups must not mix (only when world > 2)."""
    if dist.get_world_size() > 2:
        _sweep(2)


def _transformer_config(tp: int, sp: bool) -> TransformerConfig:
    return TransformerConfig(num_layers=1, hidden_size=H, ffn_hidden_size=F_OUT, num_attention_heads=4,
                             tensor_model_parallel_size=tp, sequence_parallel=sp, use_cpu_initialization=True,
                             params_dtype=torch.float32, perform_initialization=False, add_bias_linear=False,
                             gated_linear_unit=True, layernorm_epsilon=1e-5)


def ref_mlp(x, ids, norm_w, fc1, fc2, eps=1e-5):
    x32 = x.float()
    xn = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    xn = torch.where(ids.unsqueeze(-1) == 1, xn * norm_w[1], xn * norm_w[0])
    y = ref_routed(xn, ids, fc1, (None, None))
    gate, up = y.chunk(2, dim=-1)
    return x + ref_routed(F.silu(gate) * up, ids, fc2, (None, None))


@case
def routed_mlp_parity():
    """RoutedMLP (norm + fc1 + SwiGLU + fc2, grouped between fc1 and fc2) plus the layer's residual vs reference, SP
    on/off, frozen text."""
    tp = dist.get_world_size()
    for sp, frozen, layout in itertools.product((False, True), (False, True), ("mixed", "all_text", "all_image")):
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
        rank = parallel_state.get_tensor_model_parallel_rank()
        gen = torch.Generator().manual_seed(7)
        ids = layouts(S, B, gen)[layout]
        x_full = torch.randn(S, B, H, generator=gen)
        norm_w = [1 + 0.1 * torch.randn(H, generator=gen) for _ in range(2)]
        fc1 = [torch.randn(2 * F_OUT, H, generator=gen) * 0.2 for _ in range(2)]  # [gate; up]
        fc2 = [torch.randn(H, F_OUT, generator=gen) * 0.2 for _ in range(2)]
        g_full = torch.randn(S, B, H, generator=gen)
        trainable = [not frozen, True]
        rn = [w.clone().requires_grad_(trainable[m]) for m, w in enumerate(norm_w)]
        r1 = [w.clone().requires_grad_(trainable[m]) for m, w in enumerate(fc1)]
        r2 = [w.clone().requires_grad_(trainable[m]) for m, w in enumerate(fc2)]
        xr = x_full.clone().requires_grad_(True)
        out_ref = ref_mlp(xr, ids, rn, r1, r2)
        (out_ref * g_full).sum().backward()

        mlp = build_module(routed_mlp_spec("local"), config=_transformer_config(tp, sp))
        assert isinstance(mlp, RoutedMLP)

        def fc1_shard(w):  # per-rank [gate_r; up_r], megatron's fused SwiGLU layout
            gate, up = w.chunk(2, dim=0)
            return torch.cat([shard(gate, 0, rank, tp), shard(up, 0, rank, tp)])

        with torch.no_grad():
            for m, (nw, w1, w2) in enumerate(zip(norm_w, fc1, fc2)):
                suffix = "weight" if m == 0 else "image_weight"
                getattr(mlp.pre_mlp_layernorm, suffix).copy_(nw)
                getattr(mlp.linear_fc1, suffix).copy_(fc1_shard(w1))
                getattr(mlp.linear_fc2, suffix).copy_(shard(w2, 1, rank, tp))
        if frozen:
            for mod in (mlp.pre_mlp_layernorm, mlp.linear_fc1, mlp.linear_fc2):
                mod.weight.requires_grad_(False)
        x_local = (shard(x_full, 0, rank, tp) if sp else x_full.clone()).requires_grad_(True)
        out = x_local + mlp(x_local, RoutingPlan.build(ids), (rank, tp) if sp else None)  # the layer's residual
        tag = f"sp={sp} frozen={frozen} layout={layout}"
        assert_close(f"{tag} mlp output", out, shard(out_ref.detach(), 0, rank, tp) if sp else out_ref.detach())
        (out * (shard(g_full, 0, rank, tp) if sp else g_full)).sum().backward()
        assert_close(f"{tag} input grad", x_local.grad, shard(xr.grad, 0, rank, tp) if sp else xr.grad)
        for m in range(2):
            suffix = "weight" if m == 0 else "image_weight"
            params = (getattr(mlp.pre_mlp_layernorm, suffix), getattr(mlp.linear_fc1, suffix),
                      getattr(mlp.linear_fc2, suffix))
            if not trainable[m]:
                if any(p.grad is not None for p in params):
                    raise AssertionError(f"{tag}: frozen text parameter got a gradient")
                continue
            norm_grad = params[0].grad
            if sp:  # norm weights are sequence_parallel-tagged: megatron all-reduces their grads over TP
                # (a rank whose shard lacks the modality has no grad: DDP's main_grad holds zeros for it)
                norm_grad = torch.zeros_like(params[0]) if norm_grad is None else norm_grad.clone()
                dist.all_reduce(norm_grad, group=parallel_state.get_tensor_model_parallel_group())
            assert_close(f"{tag} norm {suffix} grad", norm_grad, rn[m].grad)
            assert_close(f"{tag} fc1 {suffix} grad", params[1].grad, fc1_shard(r1[m].grad))
            assert_close(f"{tag} fc2 {suffix} grad", params[2].grad, shard(r2[m].grad, 1, rank, tp))
        parallel_state.destroy_model_parallel()


class CollectiveCounter:
    """Counts collective calls (by kind) on the TP group, wherever megatron or we issue them."""

    def __init__(self, group):
        self.group = group
        self.counts: dict[str, int] = {}

    @contextlib.contextmanager
    def active(self):
        import megatron.core.tensor_parallel.layers as mlayers
        import megatron.core.tensor_parallel.mappings as mmappings

        def wrap(kind, fn):
            def counted(*args, **kwargs):
                group = kwargs.get("group")
                if group is self.group:
                    self.counts[kind] = self.counts.get(kind, 0) + 1
                return fn(*args, **kwargs)
            return counted

        patches = [(dist, "all_reduce", "all_reduce"), (dist, "all_gather_into_tensor", "all_gather"),
                   (dist, "reduce_scatter_tensor", "reduce_scatter"), (dist, "_all_gather_base", "all_gather"),
                   (dist, "_reduce_scatter_base", "reduce_scatter"), (dist, "all_gather", "all_gather"),
                   (dist, "reduce_scatter", "reduce_scatter"),
                   (mlayers, "dist_all_gather_func", "all_gather"),
                   (mlayers, "dist_reduce_scatter_func", "reduce_scatter"),
                   (mmappings, "dist_all_gather_func", "all_gather"),
                   (mmappings, "dist_reduce_scatter_func", "reduce_scatter")]
        saved = []
        for obj, name, kind in patches:
            if hasattr(obj, name):
                saved.append((obj, name, getattr(obj, name)))
                setattr(obj, name, wrap(kind, getattr(obj, name)))
        try:
            yield self
        finally:
            for obj, name, fn in saved:
                setattr(obj, name, fn)


@case
def collective_count_equals_dense():
    """Per routed column+row pair (fwd+bwd), the TP collectives equal a dense megatron pair's, kind by kind."""
    tp = dist.get_world_size()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    group = parallel_state.get_tensor_model_parallel_group()
    gen = torch.Generator().manual_seed(3)
    report = []
    for sp, frozen_text, layout in itertools.product((False, True), (False, True), ("mixed", "all_text")):
        config = cfg(tp, sp)
        ids = layouts(S, B, gen)[layout]
        plan = RoutingPlan.build(ids)
        x = torch.randn(S // tp if sp else S, B, H, generator=gen)

        def run(col, row, routed: bool) -> dict[str, int]:
            counter = CollectiveCounter(group)
            xi = x.clone().requires_grad_(True)
            with counter.active():
                h, _ = col(xi, plan) if routed else col(xi)
                out, _ = row(h, plan) if routed else row(h)
                out.sum().backward()
            return counter.counts

        dense_col = ColumnParallelLinear(H, F_OUT, config=config, init_method=torch.nn.init.zeros_, bias=False)
        dense_row = RowParallelLinear(F_OUT, H, config=config, init_method=torch.nn.init.zeros_, bias=False,
                                      input_is_parallel=True, skip_bias_add=False)
        col = ModalityColumnParallelLinear(H, F_OUT, config=config, init_method=torch.nn.init.zeros_, bias=False)
        row = ModalityRowParallelLinear(F_OUT, H, config=config, init_method=torch.nn.init.zeros_, bias=False,
                                        input_is_parallel=True, skip_bias_add=False)
        for lin in (col, row, dense_col, dense_row):
            with torch.no_grad():
                for p in lin.parameters():
                    p.normal_(generator=gen)
        if frozen_text:
            # The routed layer trains its image weight: compare with a dense layer that trains its weight.
            col.weight.requires_grad_(False)
            row.weight.requires_grad_(False)
        dense = run(dense_col, dense_row, routed=False)
        routed = run(col, row, routed=True)
        if not dense:
            raise AssertionError("counter saw no collectives in the dense pair: the counter is broken")
        if dense != routed:
            report.append(f"sp={sp} frozen_text={frozen_text} layout={layout}: dense {dense} routed {routed}")
        # All frozen: compare with a dense pair whose weights are frozen too.
        for lin in (col, row, dense_col, dense_row):
            lin.weight.requires_grad_(False)
            if hasattr(lin, "image_weight"):
                lin.image_weight.requires_grad_(False)
        dense, routed = run(dense_col, dense_row, routed=False), run(col, row, routed=True)
        if dense != routed:
            report.append(f"all frozen sp={sp} layout={layout}: dense {dense} routed {routed}")
    if report:
        raise AssertionError("\n".join(report))


@case
def bad_input_errors():
    """Clear errors naming the value: modality ids, shapes, TP divisibility."""
    tp = dist.get_world_size()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    config = cfg(tp, False)
    col = ModalityColumnParallelLinear(H, F_OUT, config=config, init_method=torch.nn.init.zeros_, bias=False)
    expect = [
        (lambda: RoutingPlan.build(torch.tensor([[0], [2]])), "modality id 2"),
        (lambda: RoutingPlan.build(torch.tensor([[0], [-1]])), "modality id -1"),
        (lambda: col(torch.zeros(S, B, H + 1), RoutingPlan.build(torch.zeros(S, B, dtype=torch.long))),
         f"(s, b, {H})"),
        (lambda: col(torch.zeros(S, B, H), RoutingPlan.build(torch.zeros(S + 1, B, dtype=torch.long))),
         f"covers {(S + 1) * B} tokens"),
        (lambda: ModalityColumnParallelLinear(H, tp * 3 + 1, config=config, init_method=torch.nn.init.zeros_,
                                              bias=False), f"{tp * 3 + 1} is not divisible"),
        (lambda: ModalityRowParallelLinear(tp * 3 + 1, H, config=config, init_method=torch.nn.init.zeros_,
                                           bias=False, input_is_parallel=True, skip_bias_add=False),
         f"{tp * 3 + 1} is not divisible"),
    ]
    for fn, needle in expect:
        try:
            fn()
        except ValueError as e:
            if needle not in str(e):
                raise AssertionError(f"error {e!r} does not mention {needle!r}")
        else:
            raise AssertionError(f"no ValueError for case expecting {needle!r}")


if __name__ == "__main__":
    worker_main()
