"""Guards every training engine owes its user, written once and run by each engine's worker
(tests/distributed/workers/train.py with the megatron ``Trainer``, train_deepspeed.py with ``DeepSpeedTrainer``):

* a NaN loss or a NaN gradient stops the run with the step and the last good checkpoint named, leaves that
  checkpoint's files as they were, writes no checkpoint for the bad step and no temporary directory, and records the
  stop in ``exit_status.json``;
* a stop signal received by one rank stops every rank after a save at the same step, restores the previous handler,
  and rank 0 says on which rank it arrived.

Each function takes the engine class and a config; the NaN is injected through the step's loss (an identity whose
gradient is NaN for the gradient case), the one place both engines share, so the same injection tests both.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist

from lmfusion.training import checkpointing as ckpt
from lmfusion.training.step import StepLoss
from lmfusion.training.trainer import Trainer, TrainingDiverged, TrainResult
from tests.distributed.workers.megatron_common import shared_tmpdir

NAN_STEP = 4  # a save step: the guard must fire before the save
NAN_WORDS = {"loss": ("loss is nan",),
             # DeepSpeed's ZeRO norm reports a NaN gradient as inf
             "grad": ("gradient norm is nan", "gradient norm is inf")}


def tree_digest(path: Path) -> str:
    """One hash over the names and bytes of every file below ``path``."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


class _NanGrad(torch.autograd.Function):
    """Identity forward (the loss stays finite), NaN gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class _NanLoss(StepLoss):
    kind = "loss"

    def terms(self, mb, output):
        terms = super().terms(mb, output)
        if self.kind == "loss":
            terms.loss = terms.loss * float("nan")
            terms.lm = terms.lm * float("nan")
        else:
            terms.loss = _NanGrad.apply(terms.loss)
        return terms


class _NanAt:
    """Mixed in front of an engine: step ``NAN_STEP``'s loss (or its gradient) is NaN; the digest of the checkpoint
    before it is taken when the step after that save starts."""

    kind = "loss"
    digest: str | None = None

    def train_step(self, step):
        if step == NAN_STEP - 1:
            self.digest = tree_digest(Path(self.cfg.checkpoint.save) / ckpt.iter_name(NAN_STEP - 2))
        return super().train_step(step)

    def step_loss(self, lm_tokens, image_tokens):
        if self.iteration + 1 != NAN_STEP:
            return super().step_loss(lm_tokens, image_tokens)
        img = self.cfg.model.image
        loss = _NanLoss(lm_tokens, image_tokens, self.rt.dp_size, self.num_microbatches,
                        self.cfg.train.diffusion_loss_weight, img.patch_size * img.downsample_factor)
        loss.kind = self.kind
        return loss


def nan_stops_with_the_step_and_keeps_the_last_checkpoint(engine: type[Trainer], make_config) -> None:
    """``make_config(run_dir, *overrides)`` gives the engine's config for a run directory."""
    for kind, words in NAN_WORDS.items():
        run_dir = Path(shared_tmpdir())
        cls = type(f"NanAt_{kind}_{engine.__name__}", (_NanAt, engine), {"kind": kind})
        trainer = cls(make_config(str(run_dir), f"train.train_iters={NAN_STEP + 2}",
                                  f"checkpoint.save_interval={NAN_STEP - 2}"))
        try:
            trainer.run()
        except TrainingDiverged as e:
            message = str(e)
        else:
            raise AssertionError(f"{engine.__name__} {kind}: no TrainingDiverged")
        finally:
            trainer.close()
        last_good = ckpt.iter_name(NAN_STEP - 2)
        assert message.startswith(f"step {NAN_STEP}:") and any(w in message for w in words), message
        assert last_good in message, f"the error does not name the last good checkpoint: {message}"
        assert (run_dir / ckpt.LATEST).read_text().strip() == last_good
        assert not (run_dir / ckpt.iter_name(NAN_STEP)).exists()
        assert not list(run_dir.glob(".tmp_*")), "a partial checkpoint was left"
        assert trainer.digest is not None and tree_digest(run_dir / last_good) == trainer.digest, \
            f"{last_good} changed after the NaN"
        status = json.loads((run_dir / "exit_status.json").read_text())
        assert status["reason"] == "error" and status["iteration"] == NAN_STEP - 1, status


def _signalled_on(engine: type[Trainer], rank: int) -> type[Trainer]:
    def train_step(self, step):
        if step == 2 and dist.get_rank() == rank:
            os.kill(os.getpid(), signal.SIGUSR1)  # one rank only: the ranks must agree anyway
        return engine.train_step(self, step)

    return type(f"SignalRank{rank}_{engine.__name__}", (engine,), {"train_step": train_step})


def signal_on_one_rank_stops_all_ranks(engine: type[Trainer], make_config, rank: int) -> tuple[TrainResult, list[str]]:
    """Run with SIGUSR1 sent to ``rank`` only at step 2; checks the stop, the save and the handler, and returns the
    result and the notes the run logged."""
    before = signal.getsignal(signal.SIGUSR1)
    run_dir = Path(shared_tmpdir())
    trainer = _signalled_on(engine, rank)(make_config(str(run_dir), "train.train_iters=50",
                                                      "checkpoint.save_interval=100")).setup()
    notes: list[str] = []
    note = trainer.metrics.note
    trainer.metrics.note = lambda message: (notes.append(message), note(message))
    try:
        result = trainer.run()
    finally:
        trainer.close()
    assert (result.reason, result.iteration) == ("signal", 2), (result.reason, result.iteration)
    assert (run_dir / ckpt.LATEST).read_text().strip() == ckpt.iter_name(2)
    assert signal.getsignal(signal.SIGUSR1) == before, "the trainer did not restore the SIGUSR1 handler"
    if dist.get_rank() == 0:
        who = "SIGUSR1" if rank == 0 else "a stop signal (on another rank)"  # never "None received"
        assert f"{who} received: saved step 2, exiting" in notes, notes
    return result, notes
