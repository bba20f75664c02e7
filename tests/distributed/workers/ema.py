"""``train.ema`` on 2 gloo ranks: the sharded average equals a one-process EMA of the full weights, resumes bit for
bit, reshards TP=2 -> TP=1 (with DP 1 -> 2) and leaves a run for the generation/export tests.

Inputs as tests/distributed/workers/train.py (``LMFUSION_TRAIN_SPEC``: tiny base, shards, tiny config) plus ``out``,
a directory the pytest side reads afterwards. fp32 on CPU, one thread per rank.

Tolerances: against a one-process ``torch.lerp`` EMA of the weights the training produced, exactly equal (the sharded
update is the same elementwise op on the same values, only split). Against diffusers' ``EMAModel`` (``s - (1 - d)
(s - p)``, another rounding of the same formula): 1e-6 absolute + 1e-6 relative after N steps (fp32 rounding of
weights of magnitude ~1, a few ulp per step). Resume and resharding: bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps

from lmfusion.ema import ema_decay
from lmfusion.rundir.export import shard_index, sharded_tensors
from lmfusion.training import checkpointing as ckpt
from lmfusion.training.ema import EMA_PREFIX
from lmfusion.training.model_setup import unwrap
from lmfusion.training.trainer import Trainer
from tests.distributed.harness import case, worker_main
from tests.distributed.workers.megatron_common import shared_tmpdir
from tests.distributed.workers.train import config, losses, spec, train

N = 4
# A decay that moves the average visibly away from the weights within N steps: (1 + s) / (10 + s), capped at 0.5
EMA = ["train.ema.enabled=true", "train.ema.ramp=hyperbolic", "train.ema.decay=0.5"]


class Recording(Trainer):
    """Records this rank's trainable weights (TP-local, whole: the distributed optimizer all-gathers them after each
    step) after every successful step, and keeps a one-process EMA of them, with torch.lerp and with diffusers."""

    def setup(self):
        super().setup()
        from diffusers.training_utils import EMAModel

        c = self.cfg.train.ema
        self.ref: dict[str, torch.Tensor] = {}
        self.diffusers = EMAModel([torch.nn.Parameter(p.detach().clone()) for p in self._params().values()],
                                  decay=c.decay, min_decay=c.min_decay, update_after_step=c.update_after_step,
                                  use_ema_warmup=c.ramp == "power", inv_gamma=c.inv_gamma, power=c.power, foreach=False)
        return self

    def _params(self) -> dict[str, torch.Tensor]:
        return {f"{i}.{n}": p.detach() for i, c in enumerate(self.tm.chunks)
                for n, p in unwrap(c).named_parameters() if p.requires_grad}

    def train_step(self, step):
        metrics = super().train_step(step)
        if metrics["update_skipped"]:
            return metrics
        decay = ema_decay(self.cfg.train.ema, self.ema.steps)
        for k, p in self._params().items():
            self.ref[k] = p.clone() if k not in self.ref else self.ref[k].lerp_(p, 1.0 - decay)
        self.diffusers.step([torch.nn.Parameter(p.clone()) for p in self._params().values()])
        return metrics


class SkipsStep2(Recording):
    """The optimizer skips step 2 (as megatron does on an fp16 overflow): no update, finite norm."""

    def optimizer_step(self):
        if self.iteration + 1 == 2:
            return False, 1.0
        return super().optimizer_step()


def check_against_one_process(trainer: Recording, what: str, steps: int = N) -> None:
    got = trainer.ema.gathered()
    assert trainer.ema.steps == steps and set(got) == set(trainer.ref), f"{what}: {trainer.ema.steps} steps"
    bad = [k for k in got if not torch.equal(got[k], trainer.ref[k])]
    assert not bad, f"{what}: sharded EMA differs from the one-process EMA in {bad[:3]}"
    for k, theirs in zip(trainer.ref, trainer.diffusers.shadow_params):
        torch.testing.assert_close(got[k], theirs, rtol=1e-6, atol=1e-6, msg=lambda m: f"{what}: {k} vs diffusers: {m}")
    moved = [k for k, v in trainer._params().items() if not torch.equal(v, got[k])]
    assert moved, f"{what}: the EMA equals the weights (decay had no effect)"


@case
def sharded_ema_equals_one_process_ema_dp2_tp2_and_without_distributed_optimizer():
    """DP=2 (distributed optimizer: each rank averages only its shard), TP=2 and DP=2 without the distributed
    optimizer (full TP-local average per rank): after N steps the EMA gathered over DP equals a one-process EMA of the
    weights each step produced (exact), and diffusers' EMAModel of them (1e-6). With the distributed optimizer each
    DP rank holds a part of the trainable set, the parts summing to it."""
    layouts = {"dp2": [], "tp2": ["parallel.tensor_model_parallel_size=2"],
               "dp2_no_distopt": ["parallel.use_distributed_optimizer=false"]}
    for name, overrides in layouts.items():
        trainer = train(config(shared_tmpdir(), f"train.train_iters={N}", *EMA, *overrides), Recording)
        try:
            check_against_one_process(trainer, name)
            total = sum(p.numel() for p in trainer._params().values())
            mine = torch.tensor([trainer.ema.numel], dtype=torch.float64)
            dist.all_reduce(mine, group=ps.get_data_parallel_group())
            dp = ps.get_data_parallel_world_size()
            want = total * dp if name == "dp2_no_distopt" else total
            assert int(mine.item()) == want, f"{name}: DP ranks average {int(mine.item())} elements, expected {want}"
            if name == "dp2":
                assert trainer.ema.sharded and trainer.ema.numel < total, f"{name}: {trainer.ema.numel} of {total}"
        finally:
            trainer.close()


@case
def skipped_step_leaves_the_ema_alone():
    """DP=2, N steps of which step 2 skips its update: the EMA took N - 1 updates (its decay schedule counts those)
    and equals the one-process EMA over the N - 1 successful steps."""
    trainer = train(config(shared_tmpdir(), f"train.train_iters={N}", *EMA), SkipsStep2)
    try:
        assert [h["update_skipped"] for h in trainer.history] == [False, True] + [False] * (N - 2)
        check_against_one_process(trainer, "skipped step 2", steps=N - 1)
    finally:
        trainer.close()


def ema_matches_checkpoint(trainer: Trainer, plain: dict[str, torch.Tensor], what: str) -> None:
    """Every local shard of this rank's EMA (placed into the model's parameters, so the model's own checkpoint
    metadata cuts it) equals the saved ``ema.*`` tensor at that place, bit for bit."""
    gathered = trainer.ema.gathered()
    entries = {e.key: e.param for e in trainer.ema.entries}
    saved = {k: p.detach().clone() for k, p in entries.items()}
    try:
        with torch.no_grad():
            for k, p in entries.items():
                p.copy_(gathered[k])
        checked = 0
        for chunk in trainer.tm.chunks:
            for sh in sharded_tensors(unwrap(chunk)):
                want = plain[EMA_PREFIX + sh.key][shard_index(sh)]
                assert torch.equal(sh.data.float(), want), f"{what}: {sh.key} differs from the checkpoint's EMA"
                checked += 1
        assert checked, f"{what}: nothing compared"
    finally:
        with torch.no_grad():
            for k, p in entries.items():
                p.copy_(saved[k])


@case
def ema_resumes_bit_exact_and_reshards_tp2_to_tp1():
    """TP=2: N steps + save + resume to 2N == 2N straight (losses, weights and EMA bit for bit, EMA step count). The
    step-2N checkpoint holds the EMA whole under ``ema.*`` keys; loaded at TP=1 (DP=2, distributed optimizer) each
    rank's EMA shard equals the saved tensors at its place, a re-save at TP=1 writes the same tensors, and the next
    step updates the average from there."""
    tp2 = ["parallel.tensor_model_parallel_size=2", f"checkpoint.save_interval={N}", "checkpoint.keep_last=null"]
    straight_dir = shared_tmpdir()
    straight = train(config(straight_dir, f"train.train_iters={2 * N}", *EMA, *tp2))
    want_losses, want_ema, want_steps = losses(straight), straight.ema.gathered(), straight.ema.steps
    source = Path(straight_dir) / ckpt.iter_name(2 * N)
    plain = dist_checkpointing.load_plain_tensors(str(source))
    assert any(k.startswith(EMA_PREFIX) for k in plain), f"{source}: no ema.* tensors saved"
    ema_matches_checkpoint(straight, plain, "TP=2 run")
    straight.close()

    split_dir = shared_tmpdir()
    first = train(config(split_dir, f"train.train_iters={N}", *EMA, *tp2))
    first.close()
    second = train(config(split_dir, f"train.train_iters={2 * N}", *EMA, *tp2))
    try:
        assert losses(first) + losses(second) == want_losses
        got = second.ema.gathered()
        bad = [k for k in got if not torch.equal(got[k], want_ema[k])]
        assert not bad and second.ema.steps == want_steps == 2 * N, f"EMA differs after resume: {bad[:3]}"
    finally:
        second.close()

    out = shared_tmpdir()
    t = Trainer(config(out, f"train.train_iters={2 * N + 1}", *EMA, f"checkpoint.load={source}")).setup()
    try:
        assert t.iteration == 2 * N and t.ema.steps == 2 * N and t.ema.sharded
        assert ps.get_tensor_model_parallel_world_size() == 1 and t.rt.dp_size == 2
        ema_matches_checkpoint(t, plain, "loaded at TP=1")
        t.checkpointer.save(2 * N, {})
        again = dist_checkpointing.load_plain_tensors(str(Path(out) / ckpt.iter_name(2 * N)))
        keys = [k for k in plain if k.startswith(EMA_PREFIX)]
        bad = [k for k in keys if not torch.equal(plain[k], again[k])]
        assert keys and not bad, f"EMA tensors changed through TP 2 -> 1: {bad[:3]}"
        before = t.ema.gathered()
        t.run()
        after = t.ema.gathered()
        assert t.ema.steps == 2 * N + 1 and any(not torch.equal(before[k], after[k]) for k in before)
    finally:
        t.close()


@case
def ema_run_for_generation_tests():
    """A DP=2 run with EMA (N steps) and one without, in ``out`` for the pytest side; the EMA of the first, whole in
    model space (export keys), in ``out/ema_reference.safetensors``."""
    out = Path(spec()["out"])
    with_ema = train(config(str(out / "ema_run"), f"train.train_iters={N}", *EMA))
    try:
        gathered = with_ema.ema.gathered()
        model = unwrap(with_ema.tm.chunks[0])
        entries = {e.key: e.param for e in with_ema.ema.entries}
        with torch.no_grad():
            for k, p in entries.items():
                p.copy_(gathered[k])
        if dist.get_rank() == 0:
            from safetensors.torch import save_file

            from lmfusion.rundir.export import image_set_tensors

            save_file(image_set_tensors(model), str(out / "ema_reference.safetensors"))
            (out / "ema_state.json").write_text(json.dumps(with_ema.ema.state()))
    finally:
        with_ema.close()
    train(config(str(out / "raw_run"), f"train.train_iters={N}")).close()


if __name__ == "__main__":
    worker_main()
