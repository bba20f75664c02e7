"""megatron-core pieces on CPU/gloo, each checked against a single-process reference: process groups, TP/SP
mappings, RNG tracker + activation recompute, pipeline schedules (1F1B, interleaved, tp2 x pp2).

Launched on 2 and on 4 ranks; the pytest side names the cases for each size. The training pieces (DDP, optimizer,
checkpoints) live in ``megatron_train`` and are registered here too, so one torchrun launch per size runs both.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.pipeline_parallel import get_forward_backward_func, p2p_communication
from megatron.core.tensor_parallel import mappings

from megatron_ext import cpu
from tests.distributed.harness import case, worker_main
from tests.distributed.workers import megatron_train  # noqa: F401  (registers the training cases)
from tests.distributed.workers.megatron_common import (
    HIDDEN,
    PlainBlock,
    Stage,
    TPBlock,
    assert_close,
    assert_equal,
    full_weights,
    make_config,
)

# --------------------------------------------------------------------------------------------------------------
# 1. Process groups
# --------------------------------------------------------------------------------------------------------------


def _check_groups(tp: int, pp: int) -> None:
    """Groups as megatron documents them for the default order "tp-cp-ep-dp-pp": TP ranks are adjacent, DP next,
    PP outermost. Expected ranks come from that arithmetic, not from megatron."""
    world, rank = dist.get_world_size(), dist.get_rank()
    dp = world // (tp * pp)
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    tp_rank, dp_rank, pp_rank = rank % tp, (rank // tp) % dp, rank // (tp * dp)

    def ranks(t, d, p):
        return [tt + tp * dd + tp * dp * pp_ for pp_ in p for dd in d for tt in t]

    expected = {
        "tp": ranks(range(tp), [dp_rank], [pp_rank]),
        "dp": ranks([tp_rank], range(dp), [pp_rank]),
        "pp": ranks([tp_rank], [dp_rank], range(pp)),
        "mp": ranks(range(tp), [dp_rank], range(pp)),
        "embedding": ranks([tp_rank], [dp_rank], sorted({0, pp - 1})),
    }
    got = {
        "tp": ps.get_tensor_model_parallel_group(),
        "dp": ps.get_data_parallel_group(),
        "pp": ps.get_pipeline_model_parallel_group(),
        "mp": ps.get_model_parallel_group(),
    }
    got = {k: dist.get_process_group_ranks(g) for k, g in got.items()}
    if pp > 1 or rank in expected["embedding"]:
        got["embedding"] = dist.get_process_group_ranks(ps.get_embedding_group())
    else:
        expected.pop("embedding")
    got["dp_gloo"] = dist.get_process_group_ranks(ps.get_data_parallel_group_gloo())
    expected["dp_gloo"] = expected["dp"]
    assert got == expected, f"rank {rank}: groups {got} != documented {expected}"
    assert (ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank(), ps.get_pipeline_model_parallel_rank()) \
        == (tp_rank, dp_rank, pp_rank)
    assert (ps.get_tensor_model_parallel_world_size(), ps.get_data_parallel_world_size(),
            ps.get_pipeline_model_parallel_world_size()) == (tp, dp, pp)
    assert ps.is_pipeline_first_stage() == (pp_rank == 0) and ps.is_pipeline_last_stage() == (pp_rank == pp - 1)
    # The groups carry traffic: a sum over each group equals the sum of its documented members.
    for name, group in (("tp", ps.get_tensor_model_parallel_group()), ("dp", ps.get_data_parallel_group()),
                        ("pp", ps.get_pipeline_model_parallel_group())):
        t = torch.tensor([float(rank)])
        dist.all_reduce(t, group=group)
        assert t.item() == sum(expected[name]), f"{name} all_reduce {t.item()} != {sum(expected[name])}"


@case
def groups_tp2():
    _check_groups(tp=2, pp=1)


@case
def groups_tp2_pp2():
    _check_groups(tp=2, pp=2)


@case
def groups_tp2_dp2():
    _check_groups(tp=2, pp=1)
    assert ps.get_data_parallel_world_size() == 2


# --------------------------------------------------------------------------------------------------------------
# 2. TP / SP mappings
# --------------------------------------------------------------------------------------------------------------
# Each mapping is checked as the function it stands for over all ranks: given every rank's input (all ranks can
# generate all inputs), the reference computes every rank's output with plain tensor ops, and the gradient of
# L = sum_r <out_r, G_r> by autograd. "Replicated" inputs are one tensor that every rank holds (its gradient sums
# over ranks); a "replicated" output is one value computed by all ranks, counted once (every rank gets the same G).
# Values are small integers in fp32, so sums are exact in any order: the comparison is bit-exact.


def _chunks(t, n, dim):
    return list(torch.chunk(t, n, dim=dim))


def _mapping_specs(n: int):
    """name -> (megatron fn, reference fn(list of inputs) -> list of outputs, input replicated, output replicated,
    input shape)."""
    S, B, H = 2 * n, 2, 2 * n  # (seq, batch, hidden): divisible by the TP size
    cat0, cat_last = (lambda xs: torch.cat(xs, 0)), (lambda xs: torch.cat(xs, -1))
    total = lambda xs: functools.reduce(torch.add, xs)  # noqa: E731
    return {
        "copy_to_tp": (mappings.copy_to_tensor_model_parallel_region,
                       lambda xs: [xs[0]] * n, True, False, (S, B, H)),
        "reduce_from_tp": (mappings.reduce_from_tensor_model_parallel_region,
                           lambda xs: [total(xs)] * n, False, True, (S, B, H)),
        "scatter_to_tp": (mappings.scatter_to_tensor_model_parallel_region,
                          lambda xs: _chunks(xs[0], n, -1), True, False, (S, B, H)),
        "gather_from_tp": (mappings.gather_from_tensor_model_parallel_region,
                           lambda xs: [cat_last(xs)] * n, False, True, (S, B, H)),
        "scatter_to_sp": (mappings.scatter_to_sequence_parallel_region,
                          lambda xs: _chunks(xs[0], n, 0), True, False, (S, B, H)),
        "gather_from_sp": (mappings.gather_from_sequence_parallel_region,
                           lambda xs: [cat0(xs)] * n, False, False, (S, B, H)),
        "gather_from_sp_no_tp_grad": (
            functools.partial(mappings.gather_from_sequence_parallel_region, tensor_parallel_output_grad=False),
            lambda xs: [cat0(xs)] * n, False, True, (S, B, H)),
        "gather_from_sp_global_buffer": (
            functools.partial(mappings.gather_from_sequence_parallel_region, use_global_buffer=True),
            lambda xs: [cat0(xs)] * n, False, False, (S, B, H)),
        "reduce_scatter_to_sp": (mappings.reduce_scatter_to_sequence_parallel_region,
                                 lambda xs: _chunks(total(xs), n, 0), False, False, (S, B, H)),
        "all_gather_last_dim": (mappings.all_gather_last_dim_from_tensor_parallel_region,
                                lambda xs: [cat_last(xs)] * n, False, False, (S, B, H)),
        "reduce_scatter_last_dim": (mappings.reduce_scatter_last_dim_to_tensor_parallel_region,
                                    lambda xs: _chunks(total(xs), n, -1), False, False, (S, B, H)),
        # [tokens/TP, H] <-> [tokens, H/TP]: rank r holds rows r of a [tokens, H] tensor / columns r of it.
        "all_to_all_sp2hp": (mappings.all_to_all_sp2hp,
                             lambda xs: _chunks(cat0(xs), n, -1), False, False, (S, H)),
        "all_to_all_hp2sp": (mappings.all_to_all_hp2sp,
                             lambda xs: _chunks(cat_last(xs), n, 0), False, False, (S * n, H // n)),
    }


def _int_tensor(shape, seed):
    return torch.randint(-8, 9, shape, generator=torch.Generator().manual_seed(seed)).float()


def _check_mappings(tp: int) -> None:
    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    n, rank = tp, ps.get_tensor_model_parallel_rank()
    assert n == dist.get_world_size()
    failures = []
    for i, (name, (fn, ref, in_rep, out_rep, shape)) in enumerate(_mapping_specs(n).items()):
        # Reference over all ranks, single process.
        if in_rep:
            leaf = _int_tensor(shape, 1000 * i).requires_grad_()
            leaves, inputs = [leaf], [leaf] * n
        else:
            leaves = [_int_tensor(shape, 1000 * i + r).requires_grad_() for r in range(n)]
            inputs = leaves
        outs = ref(inputs)
        grads_out = [_int_tensor(o.shape, 1000 * i + 500 + (0 if out_rep else r)) for r, o in enumerate(outs)]
        loss = (outs[0] * grads_out[0]).sum() if out_rep else sum((o * g).sum() for o, g in zip(outs, grads_out))
        loss.backward()
        want_out, want_grad = outs[rank].detach(), (leaves[0] if in_rep else leaves[rank]).grad
        # megatron, this rank.
        x = inputs[0 if in_rep else rank].detach().clone().requires_grad_()
        out = fn(x)
        got_out = out.detach().clone()  # use_global_buffer outputs are views the backward overwrites
        out.backward(grads_out[rank])
        for what, got, want in (("forward", got_out, want_out), ("backward", x.grad, want_grad)):
            if got.shape != want.shape or not torch.equal(got, want):
                failures.append(f"{name} {what}: shape {tuple(got.shape)} vs {tuple(want.shape)}")
    assert not failures, "; ".join(failures)


@case
def mappings_tp2():
    _check_mappings(2)


@case
def uneven_split_gloo_limit_tp2():
    """Uneven sequence splits (``input_split_sizes``/``output_split_sizes``, used by MoE token dispatch) need an
    all_gather of unequal tensors, which gloo rejects: reduce_scatter_to_sequence_parallel_region's forward is
    exact, its backward raises (loudly, never a wrong result). Pins the limitation; dense SP splits are even."""
    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    rank, sizes = ps.get_tensor_model_parallel_rank(), [1, 3]
    xs = [_int_tensor((sum(sizes), 2, 4), r) for r in range(2)]
    x = xs[rank].clone().requires_grad_()
    out = mappings.reduce_scatter_to_sequence_parallel_region(x, input_split_sizes=sizes)
    assert_equal(out.detach(), torch.split(xs[0] + xs[1], sizes)[rank], "uneven reduce-scatter forward")
    try:
        out.backward(torch.ones_like(out))
    except RuntimeError as exc:
        assert "invalid tensor size" in str(exc), exc
    else:
        raise AssertionError("gloo now gathers unequal tensors: uneven splits may be tested like the others")


@case
def mappings_tp4():
    _check_mappings(4)


# --------------------------------------------------------------------------------------------------------------
# 6. RNG tracker and activation recompute
# --------------------------------------------------------------------------------------------------------------


def _dropout_mask(n: int = 4096) -> torch.Tensor:
    return F.dropout(torch.ones(n), p=0.5) != 0


def _reference_masks(seed: int, count: int) -> list[torch.Tensor]:
    """Masks a fresh CPU generator seeded with ``seed`` gives: what megatron's GPU generators give per stream."""
    saved = torch.get_rng_state()
    torch.manual_seed(seed)
    masks = [_dropout_mask() for _ in range(count)]
    torch.set_rng_state(saved)
    return masks


@case
def rng_tracker_tp2():
    """model_parallel_cuda_manual_seed: the default (data-parallel) stream is ``seed`` on every TP rank; the
    model-parallel stream is ``seed + 2718 + tp_rank`` (random.py:412-429), differs across TP ranks, and forking it
    neither disturbs nor is disturbed by the default stream."""
    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    seed, tp_rank = 1234, ps.get_tensor_model_parallel_rank()
    tracker = tensor_parallel.get_cuda_rng_tracker()
    assert isinstance(tracker, cpu.CpuRNGStatesTracker), type(tracker)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)

    d0 = _dropout_mask()
    with tracker.fork():
        t0 = _dropout_mask()
    d1 = _dropout_mask()
    with tracker.fork():
        t1 = _dropout_mask()
    with tracker.fork(tensor_parallel.random.get_expert_parallel_rng_tracker_name()):
        e0 = _dropout_mask()

    gathered = [torch.empty_like(torch.stack([d0, t0])) for _ in range(2)]
    dist.all_gather(gathered, torch.stack([d0, t0]), group=ps.get_tensor_model_parallel_group())
    assert_equal(torch.stack([d0, d1]), torch.stack(_reference_masks(seed, 2)), "default stream")
    assert_equal(torch.stack([t0, t1]), torch.stack(_reference_masks(seed + 2718 + tp_rank, 2)), "tp stream")
    # Expert stream: seed + 1024 + 100 * ep_rank + etp_rank; expert-TP defaults to the TP size (ep_rank 0 here).
    assert_equal(e0, _reference_masks(seed + 1024 + ps.get_expert_tensor_parallel_rank(), 1)[0], "expert stream")
    assert torch.equal(gathered[0][0], gathered[1][0]), "default stream must agree across TP ranks"
    assert not torch.equal(gathered[0][1], gathered[1][1]), "model-parallel stream must differ across TP ranks"


@case
def recompute_dropout_tp2():
    """tensor_parallel.checkpoint with dropout in both streams gives bit-identical outputs and grads to running
    without recompute, also with distribute_saved_activations (input split across TP ranks while waiting)."""
    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    tensor_parallel.model_parallel_cuda_manual_seed(77)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    torch.manual_seed(5)
    w = torch.randn(HIDDEN, HIDDEN, requires_grad=True)

    def block(x):
        h = F.dropout(torch.tanh(x @ w), p=0.3)  # default stream
        with tracker.fork():
            h = F.dropout(h, p=0.3)  # model-parallel stream
        return h * 2.0

    def run(recompute: bool, distribute: bool):
        x = torch.randn(4, 2, HIDDEN, generator=torch.Generator().manual_seed(3)).requires_grad_()
        out = tensor_parallel.checkpoint(block, distribute, x) if recompute else block(x)
        # Consume both streams between forward and backward: a recompute that does not restore them would differ.
        _dropout_mask()
        with tracker.fork():
            _dropout_mask()
        out.backward(torch.ones_like(out))
        grads = (out.detach(), x.grad.clone(), w.grad.clone())
        w.grad = None
        return grads

    states = (torch.get_rng_state(), tracker.get_states())
    want = run(recompute=False, distribute=False)
    assert (want[0] == 0).any() and (want[0] != 0).any(), "dropout must be active for the check to mean anything"
    for distribute in (False, True):
        torch.set_rng_state(states[0]), tracker.set_states(states[1])
        got = run(recompute=True, distribute=distribute)
        for what, g, e in zip(("output", "input grad", "weight grad"), got, want):
            assert_equal(g, e, f"recompute (distribute_saved_activations={distribute}) {what}")


# --------------------------------------------------------------------------------------------------------------
# 3. Pipeline schedules
# --------------------------------------------------------------------------------------------------------------
SEQ, MICRO_BATCH, NUM_MICROBATCHES = 4, 2, 4


def _microbatches(seed: int = 11):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(SEQ, MICRO_BATCH, HIDDEN, generator=gen), torch.randn(SEQ, MICRO_BATCH, HIDDEN, generator=gen))
            for _ in range(NUM_MICROBATCHES)]


def _loss_func(target, output):
    loss = F.mse_loss(output, target)
    return loss, {"loss": loss.detach().clone()}  # the schedule divides `loss` in place by M


def _forward_step(data_iterator, model):
    x, y = next(data_iterator)
    return model(x), functools.partial(_loss_func, y)


def _reference_pipeline(weights, data):
    """Single process: the whole block stack, per-microbatch losses and the grads of the mean loss, accumulated
    microbatch by microbatch in schedule order (each microbatch's loss scaled by 1/M as megatron does)."""
    blocks = [PlainBlock(w) for w in weights]
    losses = []
    for x, y in data:
        h = x
        for b in blocks:
            h = b(h)
        loss = F.mse_loss(h, y)
        losses.append(loss.detach())
        (loss / len(data)).backward()
    return losses, [b.full_grads() for b in blocks]


def _run_pipeline(tp: int, pp: int, vpp: int | None, *, batch_p2p_comm: bool = True, blocks_per_chunk: int = 1):
    """Run megatron's schedule for pp stages (vpp chunks each) over the block stack; returns (losses on the last
    stage or None, [(global block index, block)] held by this rank)."""
    chunks = vpp or 1
    num_blocks = pp * chunks * blocks_per_chunk
    weights = full_weights(num_blocks, seed=21)
    config = make_config(num_layers=num_blocks, virtual_pipeline_model_parallel_size=vpp, batch_p2p_comm=batch_p2p_comm)
    cpu.check_config(config)
    pp_rank = ps.get_pipeline_model_parallel_rank()
    model, held = [], []
    for c in range(chunks):
        stage_index = c * pp + pp_rank  # interleaved layout: chunk c of rank r is stage c * pp + r
        idx = range(stage_index * blocks_per_chunk, (stage_index + 1) * blocks_per_chunk)
        blocks = [PlainBlock(weights[i]) if tp == 1 else TPBlock(config, weights[i]) for i in idx]
        held += list(zip(idx, blocks))
        model.append(Stage(config, blocks, is_first=stage_index == 0))
    data = _microbatches()
    losses = get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=[iter(data) for _ in model],
        model=model,
        num_microbatches=NUM_MICROBATCHES,
        seq_length=SEQ,
        micro_batch_size=MICRO_BATCH,
    )
    last = ps.is_pipeline_last_stage(ignore_virtual=True)
    return ([d["loss"] for d in losses] if last else None), held, weights, data


def _check_pipeline(tp: int, pp: int, vpp: int | None, tol: float, **kwargs) -> None:
    losses, held, weights, data = _run_pipeline(tp, pp, vpp, **kwargs)
    ref_losses, ref_grads = _reference_pipeline(weights, data)
    check = (lambda a, e, what: assert_equal(a, e, what)) if tol == 0 else \
        (lambda a, e, what: assert_close(a, e, tol, what))
    if losses is not None:
        assert len(losses) == NUM_MICROBATCHES
        check(torch.stack(losses), torch.stack(ref_losses), "per-microbatch losses")
    for i, block in held:
        if tp == 1:
            got, want = block.full_grads(), ref_grads[i]
        else:
            got, want = block.local(grads=True), block.shard_of(ref_grads[i])
        for k in got:
            check(got[k], want[k], f"block {i} grad {k}")


@case
def pipeline_1f1b_pp2():
    """1F1B (pp=2, 4 microbatches, 2 blocks per stage) vs the unsplit stack: losses and grads bit-exact."""
    ps.initialize_model_parallel(pipeline_model_parallel_size=2)
    _check_pipeline(tp=1, pp=2, vpp=None, tol=0, blocks_per_chunk=2)


@case
def pipeline_interleaved_pp2_vpp2():
    """Interleaved schedule (pp=2, vpp=2): bit-exact with batch_p2p_comm False and True (the latter through CPU
    mode's reordered _batched_p2p_ops); megatron's own _batched_p2p_ops is wrong here on gloo (canary)."""
    ps.initialize_model_parallel(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)
    _check_pipeline(tp=1, pp=2, vpp=2, tol=0, batch_p2p_comm=False)
    _check_pipeline(tp=1, pp=2, vpp=2, tol=0, batch_p2p_comm=True)
    # Canary: with megatron's posting order the same run must go wrong, else the patch is no longer needed.
    patched = p2p_communication._batched_p2p_ops
    p2p_communication._batched_p2p_ops = cpu._STATE["saved"][(p2p_communication, "_batched_p2p_ops")]
    try:
        losses, held, weights, data = _run_pipeline(1, 2, 2, batch_p2p_comm=True)
    finally:
        p2p_communication._batched_p2p_ops = patched
    ref_losses, ref_grads = _reference_pipeline(weights, data)
    wrong = any(not torch.equal(b.full_grads()[k], ref_grads[i][k]) for i, b in held for k in ref_grads[i])
    flags = torch.tensor([float(wrong)])
    dist.all_reduce(flags)
    assert flags.item() > 0, "megatron's _batched_p2p_ops was right on gloo: the CPU-mode patch may be dropped"


@case
def pipeline_tp2_pp2():
    """1F1B with tp=2 x pp=2 (ColumnParallel -> RowParallel blocks) vs the unsplit stack. Tolerance 1e-6: the
    row-parallel all-reduce sums partial products in a different order than one full matmul."""
    ps.initialize_model_parallel(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    _check_pipeline(tp=2, pp=2, vpp=None, tol=1e-6, blocks_per_chunk=2)


if __name__ == "__main__":
    worker_main()
