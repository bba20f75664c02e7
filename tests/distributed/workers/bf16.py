"""``train.precision=bf16`` on CPU, 2 gloo ranks: weights-only loads, the sharded EMA and the losses at TP/PP/DP.

Inputs as tests/distributed/workers/train.py (``LMFUSION_TRAIN_SPEC``: tiny base, shards, tiny config). In bf16 the
model's parameters are bf16 (megatron's ``Float16Module``) and the distributed optimizer keeps fp32 main copies of
its shard; the loss math stays fp32.

Tolerances: the weights-only load and the EMA are compared bit for bit (copies and the same elementwise lerp on the
same fp32 values). bf16 vs fp32 losses: see :data:`BF16_LOSS_RTOL`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from megatron.core import dist_checkpointing

from lmfusion.ema import ema_decay
from lmfusion.training import checkpointing as ckpt
from lmfusion.training.ema import EMA_PREFIX
from lmfusion.training.trainer import Trainer
from tests.distributed.harness import case, worker_main
from tests.distributed.workers.ema import EMA
from tests.distributed.workers.megatron_common import shared_tmpdir
from tests.distributed.workers.train import LAYOUTS, config, image_params, losses, train

N = 3
BF16 = ["train.precision=bf16"]

# bf16 keeps 8 significant bits: one rounding changes a value by at most u = 2^-9 relative. The loss is fp32 math (CE
# over the vocabulary, MSE over the image tokens) averaged over every token of the batch, from bf16 activations whose
# rounding errors are independent from token to token and cancel in the mean: the loss moves far less than one
# rounding (measured 4e-5 relative over 5 steps at TP=2). The bound is one rounding, u, relative per step; a layout bug
# (a wrong shard, a lost reduction, a skipped update) moves the loss by far more, which _check_discriminates makes sure
# this comparison can see: the fp32 run's own losses move by more than 10 u over the 5 steps.
BF16_LOSS_RTOL = 2.0 ** -9


def _opt_fp32_key(plain: dict, model_key: str) -> str:
    """The key under which megatron's distributed-optimizer checkpoint ('fully_reshardable') holds a parameter's fp32
    main value (model space, whole tensor)."""
    found = [k for k in plain if k.endswith("." + model_key) and k.startswith("optimizer.")
             and "exp_avg" not in k]
    assert len(found) == 1, f"{model_key}: fp32 main value in the checkpoint: {found}"
    return found[0]


@case
def bf16_weights_only_load_restarts_the_fp32_main_params_from_the_loaded_weights():
    """bf16, DP=2, distributed optimizer: N steps and a save; a new run loads that checkpoint with
    ``checkpoint.load_optimizer=false``. Its fp32 main params (read through the EMA, which restarts from them) equal
    the loaded bf16 weights exactly; without megatron's ``reload_model_params`` they keep the init weights and the
    first step would write those back over the loaded ones. After one step the weights are the loaded ones moved by
    at most one Adam step (lr, plus one bf16 rounding), not the init weights'."""
    source_dir = shared_tmpdir()
    first = train(config(source_dir, f"train.train_iters={N}", *BF16, f"checkpoint.save_interval={N}"))
    trained = image_params(first)
    first.close()
    out = shared_tmpdir()
    t = Trainer(config(out, "train.train_iters=1", *BF16, *EMA, "checkpoint.load_optimizer=false",
                       f"checkpoint.load={Path(source_dir) / ckpt.iter_name(N)}")).setup()
    try:
        loaded = image_params(t)
        assert all(v.dtype == torch.bfloat16 for v in loaded.values())
        bad = [k for k in loaded if not torch.equal(loaded[k], trained[k])]
        assert not bad, f"the loaded weights differ from the saved ones: {bad[:3]}"
        main = t.ema.gathered()
        bad = [k for k in loaded if not torch.equal(main[k], loaded[k].float())]
        assert not bad, f"fp32 main params are not the loaded weights after a weights-only load: {bad[:3]}"
        t.run()
        lr = t.history[0]["lr"]
        stepped = image_params(t)
        for k, v in stepped.items():
            # one Adam step moves an element by <= lr (bias-corrected first step); bf16 rounding adds <= 2^-8 |v|
            bound = lr * 1.001 + loaded[k].float().abs() * 2.0 ** -8
            over = ((v.float() - loaded[k].float()).abs() > bound).sum().item()
            assert not over, f"{k}: {over} elements moved more than one step from the loaded weights"
    finally:
        t.close()


@case
def bf16_sharded_ema_is_the_fp32_average_of_the_fp32_main_weights():
    """bf16, DP=2, distributed optimizer, EMA on, a checkpoint after every step. The EMA tensors are fp32; the
    average saved at step N equals a one-process ``torch.lerp`` EMA of the fp32 main weights that megatron's own
    optimizer checkpoints hold at steps 1..N (bit for bit), and differs from the EMA of the bf16 model weights (so
    it is kept from the fp32 values, not the rounded ones)."""
    run_dir = shared_tmpdir()
    t = train(config(run_dir, f"train.train_iters={N}", *BF16, *EMA, "checkpoint.save_interval=1",
                     "checkpoint.keep_last=null"))
    try:
        assert t.ema.sharded and t.ema.steps == N
        assert all(e.ema.dtype == torch.float32 for e in t.ema.entries)
        ref: dict[str, torch.Tensor] = {}
        ref_bf16: dict[str, torch.Tensor] = {}
        for step in range(1, N + 1):
            plain = dist_checkpointing.load_plain_tensors(str(Path(run_dir) / ckpt.iter_name(step)))
            keys = [k[len(EMA_PREFIX):] for k in plain if k.startswith(EMA_PREFIX)]
            assert keys, f"step {step}: no EMA saved"
            decay = ema_decay(t.cfg.train.ema, step)
            for k in keys:
                main = plain[_opt_fp32_key(plain, k)]
                weight = plain[k]
                assert main.dtype == torch.float32 and weight.dtype == torch.bfloat16, (k, main.dtype, weight.dtype)
                ref[k] = main.clone() if k not in ref else ref[k].lerp_(main, 1.0 - decay)
                ref_bf16[k] = weight.float() if k not in ref_bf16 else ref_bf16[k].lerp_(weight.float(), 1.0 - decay)
        bad = [k for k in ref if not torch.equal(plain[EMA_PREFIX + k], ref[k])]
        assert not bad, f"saved EMA differs from the one-process EMA of the fp32 main weights: {bad[:3]}"
        assert any(not torch.equal(ref[k], ref_bf16[k]) for k in ref), "EMA of fp32 and of bf16 weights coincide"
    finally:
        t.close()


def _check_discriminates(fp32: list[float], what: str) -> None:
    """The comparison can fail: the fp32 run's own losses move by more than the tolerance over the steps."""
    spread = max(fp32) - min(fp32)
    assert spread > 10 * BF16_LOSS_RTOL * max(fp32), f"{what}: fp32 losses {fp32} move too little to test bf16 against"


@case
def bf16_losses_track_fp32_at_tp2_pp2_dp2():
    """TP=2, PP=2, TP=2+SP and DP=2 (and DP=2 with the gradient reduce in bf16): 5 steps in bf16 and in fp32 from the
    same base and data; every bf16 loss is finite and within BF16_LOSS_RTOL (relative) of the fp32 run's at the same
    step. With ``parallel.grad_reduce_in_fp32=false`` the DDP gradient buffer is bf16 and the optimizer's main
    weights stay fp32."""
    variants = {name: (overrides, []) for name, overrides in LAYOUTS.items()}
    variants["dp2_bf16_reduce"] = (LAYOUTS["dp2"], ["parallel.grad_reduce_in_fp32=false"])
    errors = []
    for name, (overrides, bf16_only) in variants.items():
        runs = {}
        for precision in ("fp32", "bf16"):
            extra = bf16_only if precision == "bf16" else []
            trainer = train(config(shared_tmpdir(), "train.train_iters=5", f"train.precision={precision}",
                                   "checkpoint.save_interval=100", *overrides, *extra))
            try:
                runs[precision] = losses(trainer)
                if precision == "bf16":
                    _check_dtypes(trainer, torch.float32 if not bf16_only else torch.bfloat16, name)
            finally:
                trainer.close()
        a, b = runs["fp32"], runs["bf16"]
        rel = max(abs(x - y) / abs(x) for x, y in zip(a, b))
        print(f"bf16 vs fp32 {name}: fp32 {a} bf16 {b}: max relative loss difference {rel:.3g}", flush=True)
        _check_discriminates(a, name)
        if len(b) != 5 or not all(torch.isfinite(torch.tensor(b))) or rel > BF16_LOSS_RTOL:
            errors.append(f"{name}: bf16 {b} vs fp32 {a}: relative {rel:.3g} > {BF16_LOSS_RTOL}")
    if errors:
        raise AssertionError("\n".join(errors))


def _check_dtypes(trainer, grad_dtype: torch.dtype, what: str) -> None:
    """bf16 trainable parameters, the DDP gradient buffers in ``grad_dtype``, fp32 main weights in the optimizer."""
    from lmfusion.training.ema import main_ranges

    params = [p for c in trainer.tm.chunks for p in c.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.bfloat16 for p in params), f"{what}: trainable parameters not bf16"
    buffers = [b for c in trainer.tm.chunks for b in c.buffers]
    assert buffers and all(b.grad_dtype == grad_dtype for b in buffers), \
        f"{what}: gradient buffers {[b.grad_dtype for b in buffers]}, expected {grad_dtype}"
    mains, _ = main_ranges(trainer.tm.optimizer)
    assert mains and all(m.dtype == torch.float32 for m, _, _ in mains.values()), f"{what}: main weights not fp32"


if __name__ == "__main__":
    worker_main()
