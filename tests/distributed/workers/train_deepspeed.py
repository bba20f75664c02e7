"""DeepSpeed-engine cases on 2 gloo ranks (DP = 2): parity with the megatron engine, bit-exact resume, only the
image set in the optimizer, inference loading, guards, signals.

Inputs come from the pytest side (``LMFUSION_TRAIN_SPEC``, a JSON file): the tiny converted base, the shard set and
``examples/configs/tiny_cpu.yaml`` (tests/distributed/workers/train.py ``make_tiny_assets``). fp32 on CPU.

Tolerances (vs the megatron engine at DP = 2 on the same data and seed):
* step 1: equal bit for bit. Both engines run the same LMFusionModel forward on the same micro-batches with the same
  weights (the loss is computed before any update), so nothing may differ.
* steps 2-4: 1e-5 absolute (losses are ~9). From step 2 on the weights went through one update each, and the engines
  sum the same gradients in different orders (megatron: one fp32 reduce-scatter over a contiguous buffer;
  DeepSpeed: its own bucketed all-reduce / reduce-scatter) and compute the clipping norm differently: fp32 rounding,
  measured <= 2.4e-7 on the loss and <= 3e-7 on the gradient norm here.
* gradient norms (before clipping): 1e-5 at every step. Adam's update hardly depends on the gradient's scale, so a
  wrong scale (accumulation, DP averaging, loss normalisation) would barely move the losses; it moves the norm.
* learning rates: equal (the same megatron scheduler code on the same parameter groups).
Resume (same engine, stage, layout, process count, one thread per rank) is compared bit for bit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from lmfusion.config_io import load_config
from lmfusion.model.weights import is_image_param
from lmfusion.training import checkpointing as ckpt
from lmfusion.training.deepspeed_engine import DeepSpeedTrainer
from lmfusion.training.model_setup import unwrap
from lmfusion.training.engines import build_trainer
from lmfusion.training.trainer import Trainer
from tests.distributed.harness import case, worker_main
from tests.distributed.workers import engine_cases
from tests.distributed.workers.megatron_common import shared_tmpdir
from tests.distributed.workers.train import train as train_to_end

PARITY_TOL = 1e-5
STEPS = 4


def spec() -> dict:
    return json.loads(Path(os.environ["LMFUSION_TRAIN_SPEC"]).read_text())


def config(run_dir: str, *overrides: str):
    s = spec()
    return load_config(s["config"], [f"init.base_checkpoint={s['base']}", f"data.datasets=[{s['shards']}]",
                                     f"checkpoint.save={run_dir}", *overrides])


def ds(stage: int) -> list[str]:
    return ["engine=deepspeed", f"deepspeed.zero_stage={stage}"]


def train(cfg, make=build_trainer) -> Trainer:
    """Run to the end with the engine ``make`` builds; returned open (model in memory): close it."""
    return train_to_end(cfg, make)


def history(trainer: Trainer, key: str = "loss") -> list[float]:
    return [h[key] for h in trainer.history]


def full_image_params(trainer: DeepSpeedTrainer) -> dict[str, torch.Tensor]:
    """Every image parameter, whole (gathered under ZeRO-3), cloned."""
    import deepspeed

    model = trainer.engine.module
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters([p for _, p in named], enabled=trainer.cfg.deepspeed.zero_stage == 3):
        return {n: p.detach().clone() for n, p in named}


def optimizer_params(trainer: DeepSpeedTrainer) -> list[torch.nn.Parameter]:
    """The model parameters DeepSpeed's ZeRO optimizer updates."""
    opt = trainer.engine.optimizer
    groups = opt.fp16_groups if trainer.cfg.deepspeed.zero_stage == 3 else opt.bit16_groups
    return [p for group in groups for p in group]


_MEGATRON: dict[str, list[float]] = {}


def megatron_reference() -> dict[str, list[float]]:
    """The megatron engine at DP = 2: losses, gradient norms and learning rates of STEPS steps (computed once)."""
    if not _MEGATRON:
        t = train(config(shared_tmpdir(), f"train.train_iters={STEPS}"))
        _MEGATRON.update({k: history(t, k) for k in ("loss", "grad_norm", "lr")})
        t.close()
    return _MEGATRON


def check_parity(stage: int, trainer: Trainer) -> None:
    ref = megatron_reference()
    got = history(trainer)
    assert len(got) == STEPS, got
    assert got[0] == ref["loss"][0], f"ZeRO-{stage} step-1 loss {got[0]!r} != megatron {ref['loss'][0]!r}"
    diff = max(abs(a - b) for a, b in zip(got, ref["loss"]))
    assert diff <= PARITY_TOL, f"ZeRO-{stage} losses {got} vs megatron {ref['loss']}: {diff:.2e}"
    assert history(trainer, "lr") == ref["lr"], f"ZeRO-{stage} lr {history(trainer, 'lr')} vs {ref['lr']}"
    gn = max(abs(a - b) for a, b in zip(history(trainer, "grad_norm"), ref["grad_norm"]))
    assert gn <= 1e-5, f"ZeRO-{stage} gradient norms differ from megatron's by {gn:.2e}"


def check_only_image_params_trained(stage: int, trainer: DeepSpeedTrainer) -> None:
    """The optimizer holds exactly the image set; text parameters have no gradient and equal the base bit for bit."""
    from lmfusion.hf import load_base_state
    from lmfusion.model.builder import build_model
    import deepspeed

    model = trainer.engine.module
    named = dict(model.named_parameters())
    in_opt = {id(p) for p in optimizer_params(trainer)}
    image = {n for n in named if is_image_param(n)}
    held = {n for n, p in named.items() if id(p) in in_opt}
    assert held == image, f"ZeRO-{stage}: optimizer holds {sorted(held - image)[:3]}, misses {sorted(image - held)[:3]}"
    assert all(named[n].requires_grad == (n in image) for n in named)
    text = [(n, p) for n, p in named.items() if n not in image]
    assert text and all(p.grad is None for _, p in text), f"ZeRO-{stage}: a text parameter has a gradient"
    if stage == 3:  # ZeRO-3 partitions the frozen text model too (its memory is sharded), grads and state aside
        assert all(hasattr(p, "ds_id") for _, p in text), "ZeRO-3 left text parameters unpartitioned"
    _, base = load_base_state(trainer.cfg.init.base_checkpoint)
    with base:
        fresh = dict(build_model(trainer.cfg.model, base=base).named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in text], enabled=stage == 3):
        changed = [n for n, p in text if not torch.equal(p, fresh[n])]
    assert not changed, f"ZeRO-{stage}: {len(changed)} of {len(text)} text weights changed: {changed[:3]}"


def check_resume(stage: int, straight: DeepSpeedTrainer) -> Path:
    """STEPS/2 steps, a relaunch in the same run directory (resumes from ``latest``), STEPS/2 more: the loss
    sequence and the final image weights equal the straight run's bit for bit."""
    half = STEPS // 2
    run_dir = Path(shared_tmpdir())
    first = train(config(str(run_dir), f"train.train_iters={half}", *ds(stage)))
    first.close()
    assert (run_dir / ckpt.LATEST).read_text().strip() == ckpt.iter_name(half)
    second = train(config(str(run_dir), f"train.train_iters={STEPS}", *ds(stage)))
    try:
        assert second.resumed_from.name == ckpt.iter_name(half)
        got = history(first) + history(second)
        assert got == history(straight), f"ZeRO-{stage}: resumed {got} != straight {history(straight)}"
        want = full_image_params(straight)
        for name, value in full_image_params(second).items():
            assert torch.equal(value, want[name]), f"ZeRO-{stage}: {name} differs after resume"
    finally:
        second.close()
    return run_dir


def check_inference_loads(trainer: DeepSpeedTrainer) -> None:
    """``lmfusion generate --ckpt RUN`` reads a DeepSpeed run: load_for_inference gets the trained image set."""
    from lmfusion.inference.load import load_for_inference

    loaded = load_for_inference(trainer.run_dir, device="cpu")  # megatron state is the trainer's: TP = 1
    assert loaded.meta.kind == "training" and loaded.meta.path.name == ckpt.iter_name(STEPS)
    got = dict(loaded.model.named_parameters())
    for name, value in full_image_params(trainer).items():
        assert torch.equal(got[name], value), f"inference loaded {name} different from the trained weights"


def stage_case(stage: int) -> None:
    megatron_reference()  # first: closing a trainer tears down megatron's parallel state, which an open one uses
    straight = train(config(shared_tmpdir(), f"train.train_iters={STEPS}", "checkpoint.save_interval=2",
                            "checkpoint.keep_last=null", *ds(stage)))
    try:
        assert isinstance(straight, DeepSpeedTrainer)
        check_parity(stage, straight)
        check_only_image_params_trained(stage, straight)
        check_inference_loads(straight)
        check_resume(stage, straight)
    finally:
        straight.close()


@case
def zero1_matches_megatron_resumes_bit_exact_trains_only_images():
    stage_case(1)


@case
def zero2_matches_megatron_resumes_bit_exact_trains_only_images():
    stage_case(2)


@case
def zero3_matches_megatron_resumes_bit_exact_trains_only_images():
    stage_case(3)


@case
def zero2_honours_lr_mult_on_the_image_io_blocks():
    """optimizer.lr_mult=3 under ZeRO-2 (no warm-up, constant lr): the groups DeepSpeed steps carry 3 x the lr for the
    image I/O blocks and the schedule's for the twins, and one step moves the I/O parameters 3 x as far as with
    lr_mult=1 (Adam's first update is lr x g / (|g| + eps), updates up to 3e-3 here) and the twins as far, to 2.4e-7
    absolute: two float32 ulps of weights near 1 (norm scales), the rounding of p + delta (measured 1.2e-7)."""
    moved = {}
    for m in (1.0, 3.0):
        t = build_trainer(config(shared_tmpdir(), *ds(2), "train.train_iters=1", "optimizer.lr_warmup_iters=0",
                                 "optimizer.lr_decay_style=constant", f"optimizer.lr_mult={m}"))
        try:
            t.setup()
            before = full_image_params(t)
            t.run()
            moved[m] = {k: v - before[k] for k, v in full_image_params(t).items()}
            lr = t.cfg.optimizer.lr
            assert sorted({g["lr"] for g in t.tm.optimizer.param_groups}) == sorted({lr, lr * m}), \
                [g["lr"] for g in t.tm.optimizer.param_groups]
        finally:
            t.close()
    io = [k for k in moved[1.0] if k.startswith(("image_encoder.", "image_decoder."))]
    assert io and any(float(moved[1.0][k].abs().max()) > 0 for k in io)
    for k, d in moved[1.0].items():
        want = 3.0 * d if k in io else d
        torch.testing.assert_close(moved[3.0][k], want, rtol=0, atol=2.4e-7, msg=k)


def setup_error(cfg) -> str:
    """The one-line ValueError a trainer's setup raises for ``cfg`` (AssertionError if it raises none)."""
    trainer = build_trainer(cfg)
    try:
        trainer.setup()
    except ValueError as e:
        assert "\n" not in str(e), e
        return str(e)
    finally:
        trainer.close()
    raise AssertionError("setup succeeded")


@case
def zero3_with_cpu_offload_and_recompute_matches_megatron():
    """ZeRO-3 with optimizer and parameter offload (DeepSpeedCPUAdam, compiled on first use) and full activation
    recompute: the megatron engine's losses within the parity tolerance, the image set alone in the optimizer."""
    megatron_reference()
    t = train(config(shared_tmpdir(), f"train.train_iters={STEPS}", *ds(3), "deepspeed.offload_optimizer=true",
                     "deepspeed.offload_param=true", "train.recompute=full"))
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        assert isinstance(t.engine.optimizer.optimizer, DeepSpeedCPUAdam), type(t.engine.optimizer.optimizer)
        check_parity(3, t)
        check_only_image_params_trained(3, t)
    finally:
        t.close()


BF16_TOL = 1e-3


@case
def bf16_zero2_matches_megatron_bf16():
    """train.precision=bf16 (DeepSpeed's bf16 mode: bf16 weights, fp32 master weights and Adam state in ZeRO; what
    precision=auto picks on a GPU) against the megatron engine in bf16 (Float16Module + fp32 main params): step 1
    bit for bit (the same bf16 forward), then within 1e-3. Rounding differs from step 2 on: DeepSpeed reduces the
    bf16 gradients in bf16, megatron in fp32 (grad_reduce_in_fp32); measured 6.7e-5 at step 4."""
    mega = train(config(shared_tmpdir(), f"train.train_iters={STEPS}", "train.precision=bf16"))
    ref = history(mega)
    mega.close()
    t = train(config(shared_tmpdir(), f"train.train_iters={STEPS}", "train.precision=bf16", *ds(2)))
    try:
        assert next(t.engine.module.parameters()).dtype == torch.bfloat16
        got = history(t)
        assert got[0] == ref[0], f"bf16 step-1 loss {got[0]!r} != megatron {ref[0]!r}"
        diff = max(abs(a - b) for a, b in zip(got, ref))
        assert len(got) == STEPS and diff <= BF16_TOL, f"bf16 losses {got} vs megatron {ref}: {diff:.2e}"
    finally:
        t.close()


@case
def weights_only_loads_across_stages_and_engines_optimizer_state_needs_the_same_layout():
    """From a ZeRO-1 checkpoint (step 2): resuming its optimizer state at ZeRO-2 or in the megatron engine is refused,
    naming the way out. checkpoint.load_optimizer=false loads its image weights (and data position) at ZeRO-3 and in
    the megatron engine: both continue with the same losses (first loss bit for bit: same weights, same batch; second
    within the parity tolerance: one update from fresh Adam state, so DeepSpeed's fp32 master copy was refreshed from
    the loaded weights). A megatron-engine checkpoint: its optimizer state is refused, its weights load."""
    src = Path(shared_tmpdir())
    t = train(config(str(src), "train.train_iters=2", *ds(1)))
    want = full_image_params(t)
    t.close()
    source = src / ckpt.iter_name(2)
    message = setup_error(config(shared_tmpdir(), "train.train_iters=3", f"checkpoint.load={source}", *ds(2)))
    assert "ZeRO stage 1" in message and "set checkpoint.load_optimizer=false" in message, message
    message = setup_error(config(shared_tmpdir(), "train.train_iters=3", f"checkpoint.load={source}"))  # megatron
    assert "written by the deepspeed engine" in message and "checkpoint.load_optimizer=false" in message, message

    weights_only = [f"checkpoint.load={source}", "checkpoint.load_optimizer=false", "train.train_iters=2"]
    t = build_trainer(config(shared_tmpdir(), *weights_only, *ds(3)))
    try:
        t.setup()
        assert t.iteration == 0 and t.resumed_from == source
        for name, value in full_image_params(t).items():
            assert torch.equal(value, want[name]), f"{name} not loaded"
        t.run()
        got = history(t)
    finally:
        t.close()
    mega_dir = Path(shared_tmpdir())
    mega = train(config(str(mega_dir), *weights_only))
    ref = history(mega)
    mega_params = {n: p.detach().clone() for n, p in unwrap(mega.tm.chunks[0]).named_parameters() if p.requires_grad}
    mega.close()
    assert got[0] == ref[0] and abs(got[1] - ref[1]) <= PARITY_TOL, f"ZeRO-3 {got} vs megatron {ref}"

    mega_ckpt = mega_dir / ckpt.iter_name(2)
    message = setup_error(config(shared_tmpdir(), "train.train_iters=3", f"checkpoint.load={mega_ckpt}", *ds(1)))
    assert "written by the megatron engine" in message and "checkpoint.load_optimizer=false" in message, message
    t = build_trainer(config(shared_tmpdir(), "train.train_iters=3", f"checkpoint.load={mega_ckpt}",
                             "checkpoint.load_optimizer=false", *ds(1)))
    try:
        t.setup()
        for name, value in full_image_params(t).items():
            assert torch.equal(value, mega_params[name]), f"{name} not loaded from the megatron checkpoint"
    finally:
        t.close()


def _ds_config(stage: int):
    return lambda run_dir, *overrides: config(run_dir, *overrides, *ds(stage))


@case
def nan_loss_or_grad_stops_with_the_step_and_keeps_the_last_checkpoint():
    """ZeRO-2."""
    engine_cases.nan_stops_with_the_step_and_keeps_the_last_checkpoint(DeepSpeedTrainer, _ds_config(2))


@case
def signal_on_one_rank_stops_all_ranks_after_saving():
    """ZeRO-1."""
    engine_cases.signal_on_one_rank_stops_all_ranks(DeepSpeedTrainer, _ds_config(1), rank=0)


@case
def signal_on_a_non_zero_rank_is_logged_as_such():
    """ZeRO-1."""
    engine_cases.signal_on_one_rank_stops_all_ranks(DeepSpeedTrainer, _ds_config(1), rank=1)


if __name__ == "__main__":
    worker_main()
