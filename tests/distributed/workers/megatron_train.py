"""megatron DDP + (distributed) optimizer + dist_checkpointing on CPU/gloo, against single-process torch.

Cases are registered on import and run through ``megatron_cpu``'s launch (one torchrun per world size).
"""

from __future__ import annotations

import contextlib
import shutil

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.transformer.module import MegatronModule

from megatron_ext import cpu
from tests.distributed.harness import case
from tests.distributed.workers.megatron_common import (
    HIDDEN,
    PlainBlock,
    TPBlock,
    assert_close,
    assert_equal,
    full_weights,
    make_config,
    shared_tmpdir,
)

GLOBAL_BATCH, STEPS = 8, 3
LR, BETAS, EPS, WD, CLIP = 1e-2, (0.9, 0.95), 1e-8, 0.1, 1.0
# Optimizer state in a DP-size-independent layout; the default ('fully_sharded_model_space') fails at save.
CKPT_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


class TrainModel(MegatronModule):
    """A frozen block (no grad buffer, no optimizer state, never updated) feeding two trainable blocks."""

    def __init__(self, config, weights):
        super().__init__(config=config)
        self.frozen = PlainBlock(weights[0]).requires_grad_(False)
        self.blocks = torch.nn.ModuleList(PlainBlock(w) for w in weights[1:])

    def forward(self, x):
        h = self.frozen(x)
        for block in self.blocks:
            h = block(h)
        return h


def _global_batch(step: int):
    gen = torch.Generator().manual_seed(100 + step)
    # Targets far from the outputs: the grad norm is well above CLIP, so clipping is exercised every step.
    return torch.randn(GLOBAL_BATCH, HIDDEN, generator=gen), 4 * torch.randn(GLOBAL_BATCH, HIDDEN, generator=gen)


def _local(t: torch.Tensor) -> torch.Tensor:
    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per = t.shape[0] // dp
    return t[rank * per:(rank + 1) * per]


# ~1.5 blocks per bucket: several buckets, so overlapped reduction really fires per bucket.
SMALL_BUCKETS = 400


def _build(weights, *, dist_opt: bool, overlap: bool, bucket_size: int | None = SMALL_BUCKETS):
    config = make_config(num_layers=1)
    model = TrainModel(config, weights)
    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=dist_opt, overlap_grad_reduce=overlap,
                                               bucket_size=bucket_size)
    ddp = DistributedDataParallel(config, ddp_config, model)
    opt_config = OptimizerConfig(optimizer="adam", lr=LR, weight_decay=WD, adam_beta1=BETAS[0], adam_beta2=BETAS[1],
                                 adam_eps=EPS, clip_grad=CLIP, use_distributed_optimizer=dist_opt)
    # config_overrides={}: every param decays (the default exempts biases, a rule that only an
    # OptimizerParamScheduler applies; without one the reference would have to guess).
    return ddp, get_megatron_optimizer(opt_config, [ddp], config_overrides={})


def _train_step(ddp, optimizer, step: int):
    x, y = _global_batch(step)
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    loss = F.mse_loss(ddp(_local(x)), _local(y))
    loss.backward()
    ddp.finish_grad_sync()
    ok, grad_norm, _ = optimizer.step()
    assert ok, "optimizer step skipped"
    return loss.detach(), grad_norm


def _reference(weights, steps: range, state=None):
    """torch AdamW + clip_grad_norm_ on the whole global batch, one process. Returns (model, optimizer, norms)."""
    model, opt = state or (None, None)
    if model is None:
        model = TrainModel(make_config(num_layers=1), weights)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, betas=BETAS, eps=EPS,
                                weight_decay=WD)
    norms = []
    for step in steps:
        x, y = _global_batch(step)
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        norms.append(torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], CLIP))
        opt.step()
    return model, opt, norms


def _check_ddp_optimizer() -> None:
    """After STEPS steps, every variant's params equal the reference (fp32, ≤1e-6: the DP mean of local grads and
    the full-batch grad differ by rounding); reported grad norms match clip_grad_norm_ (relative 1e-6); frozen
    params are unchanged by exactly 0.0 and have no main_grad, no grad, no place in a grad buffer."""
    weights = full_weights(3, seed=31)
    ref, _, ref_norms = _reference(weights, range(STEPS))
    assert all(n > 2 * CLIP for n in ref_norms), f"clipping not exercised: norms {ref_norms}"
    failures = []
    for dist_opt in (False, True):
        for overlap in (False, True):
            variant = f"dist_opt={dist_opt} overlap_grad_reduce={overlap}"
            ddp, optimizer = _build(weights, dist_opt=dist_opt, overlap=overlap)
            norms = [_train_step(ddp, optimizer, s)[1] for s in range(STEPS)]
            n_buckets = sum(len(buf.buckets) for buf in ddp.buffers)
            if overlap and n_buckets < 2:
                failures.append(f"{variant}: {n_buckets} bucket(s); overlap is only exercised with several")
            trainable = {p for p in ddp.module.parameters() if p.requires_grad}
            in_buffers = {p for buf in ddp.buffers for p in buf.param_index_map}
            if in_buffers != trainable:
                failures.append(f"{variant}: grad buffers hold {len(in_buffers)} params, {len(trainable)} trainable")
            for (name, p), (_, p_ref) in zip(ddp.module.named_parameters(), ref.named_parameters()):
                try:
                    if name.startswith("frozen."):
                        assert not p.requires_grad and p.grad is None and not hasattr(p, "main_grad"), \
                            f"{name} has a gradient"
                        assert_equal(p.detach(), p_ref.detach(), f"{name} (frozen)")
                    else:
                        assert_close(p.detach(), p_ref.detach(), 1e-6, name)
                except AssertionError as exc:
                    failures.append(f"{variant}: {exc}")
            for s, (n, n_ref) in enumerate(zip(norms, ref_norms)):
                if abs(n - n_ref.item()) > 1e-6 * n_ref.item():
                    failures.append(f"{variant}: step {s} grad norm {n} != {n_ref.item()}")
    assert not failures, "\n".join(failures)


@case
def ddp_optimizer_dp2():
    ps.initialize_model_parallel()
    assert ps.get_data_parallel_world_size() == 2
    _check_ddp_optimizer()


@case
def ddp_optimizer_dp4():
    ps.initialize_model_parallel()
    assert ps.get_data_parallel_world_size() == 4
    _check_ddp_optimizer()


# --------------------------------------------------------------------------------------------------------------
# 5. dist_checkpointing
# --------------------------------------------------------------------------------------------------------------


def _save(ddp, optimizer, path: str) -> None:
    model_sd = ddp.module.sharded_state_dict()
    dist_checkpointing.save({"model": model_sd, "optimizer": optimizer.sharded_state_dict(
        model_sd, metadata=CKPT_METADATA)}, path)


def _load(ddp, optimizer, path: str) -> None:
    """megatron's documented flow, nothing CPU-specific: build the load state dicts, load, apply."""
    model_sd = ddp.module.sharded_state_dict()
    optim_sd = optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=CKPT_METADATA)
    state = dist_checkpointing.load({"model": model_sd, "optimizer": optim_sd}, path)
    ddp.module.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])


def _params(ddp) -> list[torch.Tensor]:
    return [p.detach().clone() for p in ddp.module.parameters()]


@contextlib.contextmanager
def _without_cpu_patch(name: str):
    """Run with megatron's own DistributedOptimizer.<name> instead of CPU mode's wrapper."""
    patched = getattr(DistributedOptimizer, name)
    setattr(DistributedOptimizer, name, cpu._original(DistributedOptimizer, name))
    try:
        yield
    finally:
        setattr(DistributedOptimizer, name, patched)


@case
def resume_bit_exact_dp2():
    """Train 2 steps, save model + optimizer, train 3 more = the uninterrupted run. A fresh model (other weights)
    loads the checkpoint and trains the same 3 steps: losses and params equal bit for bit, for the plain and the
    distributed optimizer. Then, for the distributed optimizer, each of CPU mode's three wrappers is shown still
    necessary: without it the load fails (state_dict, _set_main_param_and_optimizer_states) or the resumed run
    drifts (load_state_dict: shared step tensor)."""
    ps.initialize_model_parallel()
    weights, other = full_weights(3, seed=41), full_weights(3, seed=42)
    for dist_opt in (False, True):
        path = shared_tmpdir()
        try:
            ddp, opt = _build(weights, dist_opt=dist_opt, overlap=dist_opt, bucket_size=None)
            for s in range(2):
                _train_step(ddp, opt, s)
            _save(ddp, opt, path)
            want_losses = [_train_step(ddp, opt, s)[0] for s in range(2, 5)]
            want_params = _params(ddp)

            ddp, opt = _build(other, dist_opt=dist_opt, overlap=dist_opt, bucket_size=None)
            _load(ddp, opt, path)
            got_losses = [_train_step(ddp, opt, s)[0] for s in range(2, 5)]
            for i, (g, w) in enumerate(zip(got_losses, want_losses)):
                assert_equal(g, w, f"dist_opt={dist_opt}: loss at resumed step {i}")
            for i, (g, w) in enumerate(zip(_params(ddp), want_params)):
                assert_equal(g, w, f"dist_opt={dist_opt}: param {i} after resume")
            if not dist_opt:
                continue
            for name, error in (("state_dict", AssertionError), ("_set_main_param_and_optimizer_states", KeyError)):
                ddp, opt = _build(other, dist_opt=True, overlap=True, bucket_size=None)
                with _without_cpu_patch(name):
                    try:
                        _load(ddp, opt, path)
                    except error:
                        pass
                    else:
                        raise AssertionError(f"load worked without CPU mode's {name} wrapper: drop it")
            ddp, opt = _build(other, dist_opt=True, overlap=True, bucket_size=None)
            with _without_cpu_patch("load_state_dict"):
                _load(ddp, opt, path)
            steps = [s["step"] for s in opt.chained_optimizers[0].optimizer.state.values()]
            assert len({id(t) for t in steps}) == 1, "megatron no longer shares one step tensor: drop the wrapper"
            for s in range(2, 5):
                _train_step(ddp, opt, s)
            drift = max((g - w).abs().max().item() for g, w in zip(_params(ddp), want_params))
            assert drift > 0, "resume with a shared step tensor was exact: the load_state_dict wrapper may be dropped"
        finally:
            dist.barrier()
            if dist.get_rank() == 0:
                shutil.rmtree(path, ignore_errors=True)


@case
def multi_bucket_checkpoint_bug_dp2():
    """megatron-core 0.16.1 bug, not CPU-specific (fixed upstream by Megatron-LM PR #5077): with the distributed
    optimizer and more than one grad bucket, the 'fully_reshardable' save reads every param after the first bucket
    from the wrong offset (get_parameter_state_dp_zero strips inter-bucket padding, distrib_optimizer.py:1114;
    sharded_param_state_fully_reshardable slices with padded offsets, :1501). Pins it: the saved main params of a
    single-bucket model equal the live params, those of a multi-bucket model do not. Resume tests use one bucket."""
    ps.initialize_model_parallel()
    weights = full_weights(3, seed=43)
    for bucket_size, should_match in ((None, True), (SMALL_BUCKETS, False)):
        ddp, opt = _build(weights, dist_opt=True, overlap=True, bucket_size=bucket_size)  # buckets need overlap
        _train_step(ddp, opt, 0)
        n_buckets = sum(len(buf.buckets) for buf in ddp.buffers)
        assert (n_buckets == 1) == should_match, f"bucket_size={bucket_size}: {n_buckets} buckets"
        model_sd = ddp.module.sharded_state_dict()
        param_state = opt.sharded_state_dict(model_sd, metadata=CKPT_METADATA)["param_state"]
        ordered = [p for buf in ddp.buffers for p in buf.param_index_map]  # param_state's order
        matches = all(torch.equal(param_state[i]["param"].data, p.detach()) for i, p in enumerate(ordered))
        assert matches == should_match, (
            f"bucket_size={bucket_size} ({n_buckets} buckets): saved params match live params: {matches}; "
            + ("megatron fixed the multi-bucket save: SMALL_BUCKETS may be used in resume tests" if matches else "")
        )


class TPModel(MegatronModule):
    """Two TP blocks held directly: a torch.nn.ModuleList in between would hide their TP sharding (see below)."""

    def __init__(self, config, weights=None):
        super().__init__(config=config)
        weights = weights or [None, None]
        self.block0, self.block1 = TPBlock(config, weights[0]), TPBlock(config, weights[1])

    def forward(self, x):
        return self.block1(self.block0(x))


class TPModelInList(MegatronModule):
    def __init__(self, config):
        super().__init__(config=config)
        self.blocks = torch.nn.ModuleList([TPBlock(config)])


@case
def reshard_tp2_to_tp1():
    """Save a ColumnParallel/RowParallel model at tp=2, load it at tp=1 (dp=2): every rank holds the full
    weights, bit-identical to the ones the tp=2 shards were cut from, and computes the reference output (≤1e-6:
    the tp=1 RowParallelLinear is one matmul, the reference F.linear may round differently). Also pins a megatron
    trap: TP layers under a plain torch.nn.ModuleList of a MegatronModule are saved as TP-replicated local shards
    (global shape = local shape; transformer/module.py:97 -> transformer/utils.py:245), silently wrong."""
    weights = full_weights(2, seed=51)
    path = shared_tmpdir()
    try:
        ps.initialize_model_parallel(tensor_model_parallel_size=2)
        config = make_config(num_layers=2)
        hidden_sd = TPModelInList(config).sharded_state_dict()["blocks.0.fc1.weight"]
        assert tuple(hidden_sd.global_shape) == tuple(hidden_sd.local_shape), "ModuleList trap fixed in megatron?"
        model = TPModel(config, weights)
        sharded = model.sharded_state_dict()
        assert tuple(sharded["block0.fc1.weight"].global_shape) == tuple(weights[0]["w1"].shape)
        dist_checkpointing.save(sharded, path)
        ps.destroy_model_parallel()

        ps.initialize_model_parallel(tensor_model_parallel_size=1)
        model = TPModel(make_config(num_layers=2))  # zeros
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), path))
        for i, (block, w) in enumerate(zip((model.block0, model.block1), weights)):
            for k, v in block.local().items():
                assert_equal(v, w[k], f"block {i} {k} at tp=1")
        x = torch.randn(3, 2, HIDDEN, generator=torch.Generator().manual_seed(1))
        ref = x
        for w in weights:
            ref = PlainBlock(w)(ref)
        assert_close(model(x).detach(), ref.detach(), 1e-6, "tp=1 forward after load")
    finally:
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(path, ignore_errors=True)
