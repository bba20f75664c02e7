"""The LMFusion trainer: one loop, one overridable step (torchtitan's Flux trainer overrides only its
``forward_backward_step``), everything a resume needs in one checkpoint.

    loader -> noise (per sample) -> megatron schedule (1F1B / interleaved; DDP over image params) -> optimizer
           -> scheduler -> metrics -> checkpoint every N steps, on SIGTERM/SIGUSR1 and at the end

Guards: a non-finite loss stops the run before the optimizer step, a non-finite gradient norm right after it; either
raises :class:`TrainingDiverged` naming the step, and no checkpoint is written (the last good one stays ``latest``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from lmfusion import rundir
from lmfusion.config import Config, ModelConfig
from lmfusion.config_io import TEXT_FIELDS, dump_config
from lmfusion.errors import UserError
from lmfusion.training import checkpointing as ckpt
from lmfusion.training.flops import TokenCounts, peak_tflops, step_flops
from lmfusion.training.metrics import MetricsWriter
from lmfusion.training.model_setup import TrainModel, build_train_model, params_dtype, resolve_precision
from lmfusion.training.runtime import Runtime, init_runtime
from lmfusion.training.signals import SignalWatcher
from lmfusion.training.step import MicroBatch, StepLoss, prepare_micro_batch
from lmfusion.utils import atomic_write_text

__all__ = ["Trainer", "TrainResult", "TrainingDiverged", "EXIT_STATUS"]

EXIT_STATUS = "exit_status.json"


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient norm."""


@dataclass
class TrainResult:
    iteration: int
    reason: str
    """'finished' (train_iters reached) or 'signal' (stopped by checkpoint.exit_signals after saving)."""
    history: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    """``Trainer(cfg).run()``. ``loader``: any iterator of :class:`lmfusion.data.Batch` with JSON
    ``state_dict()/load_state_dict()`` for this data-parallel rank (default: ``MultimodalLoader`` over
    ``cfg.data``). Engine hooks (the DeepSpeed engine overrides them): ``build_train_model``, ``make_checkpointer``,
    ``zero_grad``, ``forward_backward_step``, ``optimizer_step``; :func:`lmfusion.training.engines.build_trainer`
    picks the engine of a config."""

    def __init__(self, cfg: Config, loader: Optional[Any] = None):
        self.cfg = cfg
        self._loader = loader
        self.iteration = 0
        self.optimizer_steps = 0  # successful updates (megatron skips one only on fp16 overflow)
        self.history: list[dict[str, Any]] = []
        self._closed = False

    # ------------------------------------------------------------------ setup
    def setup(self) -> "Trainer":
        cfg = self.cfg
        self.rt: Runtime = init_runtime(cfg)
        self.run_dir = Path(cfg.checkpoint.save).expanduser().resolve()
        self._lock_run_dir()
        if self.rt.rank == 0:
            atomic_write_text(self.run_dir / rundir.CONFIG, dump_config(cfg))
        self.base_dir = self._prepare_base()
        from lmfusion.hf import load_base_state

        base_cfg, weights = load_base_state(self.base_dir)
        self._check_text_fields(dataclasses.asdict(base_cfg), f"base {self.base_dir}")
        if self.rt.rank == 0:
            from lmfusion.hf.llava import base_kind

            if base_kind(self.base_dir) == "vlm":  # lmfusion/model/vision.py: an inference-time path only
                print("lmfusion train: the base is a vision-language model; training reads latents, so its vision "
                      "tower, projector and image_newline stay in the base (not built, not checkpointed)", flush=True)
        self.num_microbatches = cfg.train.global_batch_size // (cfg.train.micro_batch_size * self.rt.dp_size)
        with weights:
            self.tm: TrainModel = self.build_train_model(weights)
        self.loader = self._loader if self._loader is not None else self._make_loader()
        self.dtype = params_dtype(cfg)
        if self.rt.rank == 0:
            precision, why = resolve_precision(cfg)
            print(f"lmfusion train: precision: {precision} ({why})", flush=True)
        record = {"format": rundir.RECORD_FORMAT, "base": str(self.base_dir),
                  "base_conversion_sha256": rundir.base_sha256(self.base_dir), "model": cfg.model.to_dict(),
                  "vae": self._vae_block(), "diffusion": dataclasses.asdict(cfg.diffusion),
                  "text_lr_ratio": cfg.optimizer.text_lr_ratio}  # > 0: the text set is in the checkpoint
        c = cfg.checkpoint
        self.ema = self.make_ema()
        self.checkpointer = self.make_checkpointer(record)
        self._resume()
        log = cfg.logging
        self.metrics = MetricsWriter(self.run_dir, self.rt.rank == 0, log.tensorboard_dir, log.tensorboard,
                                     log.log_interval)
        self.metrics.truncate_after(self.iteration)
        self.peak = peak_tflops(log.peak_tflops)
        self.signals = SignalWatcher(c.exit_signals)
        return self

    def _lock_run_dir(self) -> None:
        """Rank 0 holds ``RUN/run.lock`` for the run; every rank raises the same error when another training holds
        it."""
        self._lock = None
        error = [None]
        if self.rt.rank == 0:
            try:
                self._lock = rundir.RunLock(self.run_dir, log=lambda m: print(f"lmfusion train: {m}", flush=True))
                self._lock.acquire()
            except (rundir.RunLocked, OSError) as e:
                self._lock, error[0] = None, str(e)
        dist.broadcast_object_list(error, src=0)
        if error[0] is not None:
            raise rundir.RunLocked(error[0])

    def build_train_model(self, weights) -> TrainModel:
        """The model, its data-parallel wrapping, optimizer and scheduler (an engine overrides it)."""
        return build_train_model(self.cfg, weights, device=self.rt.device)

    def make_checkpointer(self, record: dict[str, Any]):
        """The run's checkpointer (an engine overrides it): ``save``, ``poll``, ``wait``, ``close``, ``load``."""
        c = self.cfg.checkpoint
        return ckpt.Checkpointer(self.run_dir, self.tm.chunks, self.tm.optimizer, self.tm.scheduler, self.loader,
                                 record, dump_config(self.cfg), c.optimizer_sharding, c.keep_last, c.async_save,
                                 scheduler_policy=ckpt.scheduler_policy(c), ema=self.ema)

    def make_ema(self):
        """``train.ema``: the sharded average (:mod:`lmfusion.training.ema`), or None."""
        if not self.cfg.train.ema.enabled:
            return None
        from lmfusion.training.ema import ShardedEMA

        return ShardedEMA(self.cfg.train.ema, self.tm.chunks, self.tm.optimizer)

    def _prepare_base(self) -> Path:
        init = self.cfg.init
        if init.base_checkpoint is not None:
            return Path(init.base_checkpoint).expanduser().resolve()
        from lmfusion.hf import BASE_CONFIG, convert_hf

        target = Path(init.convert_to or self.run_dir / "base").expanduser().resolve()
        if self.rt.rank == 0 and not (target / BASE_CONFIG).is_file():
            m = self.cfg.model
            convert_hf(init.hf_dir, target, tp=self.cfg.parallel.tensor_model_parallel_size,
                       pp=self.cfg.parallel.pipeline_model_parallel_size, boi=m.boi_token_id, eoi=m.eoi_token_id)
        dist.barrier()
        return target

    def _check_text_fields(self, other: dict[str, Any], source: str) -> None:
        mine = dataclasses.asdict(self.cfg.model)
        for key in TEXT_FIELDS:
            if mine[key] != other.get(key):
                raise UserError(f"model.{key}={mine[key]!r} does not match {source} ({other.get(key)!r})")

    def _make_loader(self):
        from lmfusion.data import MultimodalLoader

        data = self.cfg.data
        if not data.tokenizer:  # the base carries its tokenizer files
            data = dataclasses.replace(data, tokenizer=str(self.base_dir))
        return MultimodalLoader.from_parallel_state(data, self.cfg.model)

    def _vae_block(self) -> Optional[dict[str, Any]]:
        if not self.cfg.data.datasets:
            return None
        from lmfusion.data import shard_format

        blocks = (shard_format.read_manifest(Path(d)).get("vae") for d in self.cfg.data.datasets)
        return next((b for b in blocks if b is not None), None)  # text-only sets have no VAE: the first image set's

    def _resume(self) -> None:
        c = self.cfg.checkpoint
        say = (lambda m: print(f"lmfusion train: {m}", flush=True)) if self.rt.rank == 0 else None
        found = rundir.find_checkpoint(self.run_dir, repair=self.rt.rank == 0, log=say)
        if found is None and c.load is not None:
            found = rundir.find_checkpoint(Path(c.load).expanduser(), log=say)
            if found is None:
                raise FileNotFoundError(f"checkpoint.load: {c.load} holds no checkpoint ({ckpt.LATEST} or "
                                        f"{ckpt.TRAIN_STATE})")
        if found is None:
            return

        def check(record: dict[str, Any], path: Path) -> None:
            rundir.check_base(record, path, self.base_dir)
            saved = ModelConfig.from_dict(record.get("model", {}), source=f"{path} key 'model'")
            self._check_text_fields(dataclasses.asdict(saved), str(path))
            mine, theirs = dataclasses.asdict(self.cfg.model.image), dataclasses.asdict(saved.image)
            for key in sorted(set(mine) | set(theirs)):
                if mine.get(key) != theirs.get(key):
                    raise UserError(f"{path}: model.image.{key} is {theirs.get(key)!r} in the checkpoint, "
                                    f"{mine.get(key)!r} in this config; image modules cannot load across image "
                                    f"configs")
            if c.load_optimizer:
                saved = _saved_lr_mult(path.parent / rundir.CONFIG)
                if saved != self.cfg.optimizer.lr_mult:
                    raise UserError(f"{path.parent}: optimizer.lr_mult is {saved} in the checkpoint, "
                                    f"{self.cfg.optimizer.lr_mult} in this config: the optimizer's parameter groups "
                                    f"differ; keep {saved} or set checkpoint.load_optimizer=false")
            check_training_setup(record, self.cfg, path)
            objective = (record.get("diffusion") or {}).get("objective", "epsilon")  # older records: epsilon
            if objective != self.cfg.diffusion.objective:
                raise UserError(f"{path}: diffusion.objective is {objective!r} in the checkpoint, "
                                f"{self.cfg.diffusion.objective!r} in this config; the image head predicts another "
                                f"quantity: set diffusion.objective={objective}")

        state = self.checkpointer.load(found, c.load_optimizer, check)
        self.iteration = int(state["iteration"]) if c.load_optimizer or found.parent == self.run_dir else 0
        self.optimizer_steps = int(state.get("optimizer_steps", self.iteration)) if c.load_optimizer else 0
        self.resumed_from = found
        if self.rt.rank == 0:
            print(f"lmfusion train: resumed from {found} (step {self.iteration})", flush=True)

    # ------------------------------------------------------------------ one step
    def step_loss(self, lm_tokens: int, image_tokens: int) -> StepLoss:
        """The loss of this step's micro-batches (override to change the objective)."""
        img = self.cfg.model.image
        return StepLoss(lm_tokens, image_tokens, self.rt.dp_size, self.num_microbatches,
                        self.cfg.train.diffusion_loss_weight, img.patch_size * img.downsample_factor)

    def forward_step(self, data_iterator: Iterator[MicroBatch], model):
        """megatron's forward_step_func: one micro-batch through one model chunk."""
        mb = next(data_iterator)
        return model(mb.inputs), functools.partial(self._loss, mb)

    def forward_backward_step(self, micro_batches: list[MicroBatch]) -> list[dict[str, torch.Tensor]]:
        """Forward and backward of one step's micro-batches through megatron's schedule; returns the last stage's
        per-micro-batch loss dicts (empty elsewhere)."""
        chunks = self.tm.chunks
        data = iter(micro_batches) if len(chunks) == 1 else [iter(micro_batches) for _ in chunks]
        s = self.cfg.data.seq_length
        return get_forward_backward_func()(
            forward_step_func=self.forward_step, data_iterator=data, model=chunks,
            num_microbatches=len(micro_batches), seq_length=s, micro_batch_size=self.cfg.train.micro_batch_size,
            decoder_seq_length=s, forward_only=False)

    def zero_grad(self) -> None:
        for chunk in self.tm.chunks:
            chunk.zero_grad_buffer()
        self.tm.optimizer.zero_grad()

    def optimizer_step(self) -> tuple[bool, Optional[float]]:
        """Clip, update; (update applied, gradient norm before clipping)."""
        ok, grad_norm, _ = self.tm.optimizer.step()
        return ok, grad_norm

    def _next_micro_batches(self, step: int) -> tuple[list[MicroBatch], float]:
        wait, out = 0.0, []
        for i in range(self.num_microbatches):
            t0 = time.perf_counter()
            batch = next(self.loader)
            wait += time.perf_counter() - t0
            out.append(prepare_micro_batch(batch, seed=self.cfg.train.seed, step=step, dp_rank=self.rt.dp_rank,
                                           index=i, device=self.rt.device, dtype=self.dtype,
                                           cap=self.cfg.train.image_first_max_timestep,
                                           diffusion=self.cfg.diffusion))
        return out, wait

    def train_step(self, step: int) -> dict[str, Any]:
        """One optimizer step (``step`` counts from 1); returns its metrics (identical on every rank)."""
        t0 = time.perf_counter()
        mbs, wait = self._next_micro_batches(step)
        counts = sum((mb.counts for mb in mbs), TokenCounts())
        local = [sum(mb.lm_tokens for mb in mbs), sum(mb.image_tokens for mb in mbs), *counts.as_list()]
        totals = torch.tensor(local, dtype=torch.float64, device=self.rt.device)
        dist.all_reduce(totals, group=ps.get_data_parallel_group())  # the step's global counts (exact in fp64)
        totals = [int(v) for v in totals.tolist()]
        self._loss = self.step_loss(totals[0], totals[1])
        step_counts = TokenCounts(*totals[2:])

        self.zero_grad()
        losses = self.forward_backward_step(mbs)

        # Losses live on the last stage; one world all-reduce shares them (TP rank 0 of each DP replica counts) with
        # the loader wait and the stop flag, so every rank takes the same decisions below.
        reported = torch.zeros(2, dtype=torch.float64)
        if ps.is_pipeline_last_stage(ignore_virtual=True) and self.rt.tp_rank == 0:
            for d in losses:
                reported += d["lm_diffusion"].double().cpu()
        stop = float(self.signals.received is not None)
        shared = torch.tensor([*reported.tolist(), wait, stop], dtype=torch.float64, device=self.rt.device)
        dist.all_reduce(shared)
        lm, diff, wait_sum, stop_sum = shared.tolist()
        loss = lm + self.cfg.train.diffusion_loss_weight * diff
        if not math.isfinite(loss):
            raise TrainingDiverged(f"step {step}: loss is {loss} (lm {lm}, diffusion {diff}); stopped before the "
                                   f"optimizer step, no checkpoint written ({self._last_good()})")
        lr = self._schedule_lr()
        ok, grad_norm = self.optimizer_step()
        self.optimizer_steps += int(bool(ok))
        if grad_norm is None or not math.isfinite(float(grad_norm)):
            raise TrainingDiverged(f"step {step}: gradient norm is {grad_norm} (loss {loss}); no checkpoint written "
                                   f"({self._last_good()})")
        if ok and self.ema is not None:  # a skipped update leaves the average (and its decay schedule) alone
            self.ema.update()
        self.tm.scheduler.step(increment=1)
        elapsed = time.perf_counter() - t0
        mode = "all_trainable" if self.cfg.optimizer.trains_text else "lmfusion"  # frozen-aware only if text is frozen
        flops = step_flops(self.cfg.model, step_counts, mode)
        tflops = flops / elapsed / self.rt.world_size / 1e12
        tokens = self.cfg.train.global_batch_size * self.cfg.data.seq_length
        return {"loss": loss, "lm_loss": lm, "diffusion_loss": diff, "grad_norm": float(grad_norm), "lr": lr,
                "update_skipped": not ok, "tokens_per_s": tokens / elapsed, "tflops_per_device": tflops,
                "mfu": tflops / self.peak if self.peak else None, "loader_wait_s": wait_sum / self.rt.world_size,
                "step_time_s": elapsed, "model_flops": flops, "text_tokens_off_path": step_counts.text_off,
                "text_tokens_on_path": step_counts.text_on, "image_tokens": step_counts.image,
                "stop": stop_sum > 0}

    def _schedule_lr(self) -> float:
        """The schedule's lr: that of the groups without an lr override (``optimizer.lr_mult`` scales the image
        I/O groups' lr away from it)."""
        groups = self.tm.optimizer.param_groups
        default = [g["lr"] for g in groups if g.get("default_config", True)]
        return max(default or [g["lr"] for g in groups])

    def _last_good(self) -> str:
        latest = self.run_dir / rundir.LATEST
        return f"last good checkpoint: {self.run_dir / latest.read_text().strip()}" if latest.is_file() else \
            "no checkpoint saved yet"

    # ------------------------------------------------------------------ loop
    def run(self) -> TrainResult:
        """Train to ``train.train_iters`` (or until a signal); saves every ``save_interval`` steps and at exit."""
        if not hasattr(self, "tm"):
            self.setup()
        cfg = self.cfg
        reason = "finished"
        try:
            while self.iteration < cfg.train.train_iters:
                step = self.iteration + 1
                metrics = self.train_step(step)
                self.iteration = step
                stop = metrics.pop("stop")
                self.history.append({"step": step, **metrics})
                self.metrics.log(step, metrics)
                if stop or step % cfg.checkpoint.save_interval == 0 or step == cfg.train.train_iters:
                    self.checkpointer.save(step, {"optimizer_steps": self.optimizer_steps, "metrics": {
                        k: metrics[k] for k in ("loss", "lm_loss", "diffusion_loss")}})
                self.checkpointer.poll()
                if stop:
                    reason = "signal"
                    who = self.signals.received or "a stop signal (on another rank)"
                    self.metrics.note(f"{who} received: saved step {step}, exiting")
                    break
            self.checkpointer.wait()
        except TrainingDiverged as e:
            self._write_status("error", str(e))
            raise
        self._write_status(reason, None)
        return TrainResult(self.iteration, reason, self.history)

    def _write_status(self, reason: str, message: Optional[str]) -> None:
        if self.rt.rank == 0:
            atomic_write_text(self.run_dir / EXIT_STATUS, json.dumps(
                {"reason": reason, "iteration": self.iteration, "message": message}) + "\n")

    def close(self) -> None:
        """Release handlers, writers and megatron state (the process group only if this trainer created it)."""
        if self._closed:
            return
        self._closed = True
        for name in ("signals", "metrics", "checkpointer"):
            obj = getattr(self, name, None)
            if obj is not None:
                obj.close()
        if getattr(self, "_lock", None) is not None:
            self._lock.release()
        close = getattr(self.loader if hasattr(self, "loader") else None, "close", None)
        if close is not None:
            close()
        if hasattr(self, "rt"):
            self.rt.close()


def check_training_setup(record: dict[str, Any], cfg: Config, path: Path) -> None:
    """A checkpoint resumes only with its ``model.separation`` (other separations have other parameters) and with
    its text set trained or frozen as it was (trained text lives in the run, frozen text in the base)."""
    separation = (record.get("model") or {}).get("separation", "deep")  # older records: deep
    if separation != cfg.model.separation:
        raise UserError(f"{path}: model.separation is {separation!r} in the checkpoint, {cfg.model.separation!r} in "
                        f"this config; set model.separation={separation}")
    ratio = float(record.get("text_lr_ratio", 0.0))
    if (ratio > 0) != cfg.optimizer.trains_text:
        raise UserError(f"{path}: optimizer.text_lr_ratio is {ratio} in the checkpoint, {cfg.optimizer.text_lr_ratio} "
                        f"in this config; the text set is {'in the run' if ratio > 0 else 'the frozen base'} there: "
                        f"keep it {'> 0' if ratio > 0 else '0'}")
    if ratio != cfg.optimizer.text_lr_ratio and cfg.checkpoint.load_optimizer:
        raise UserError(f"{path}: optimizer.text_lr_ratio is {ratio} in the checkpoint, {cfg.optimizer.text_lr_ratio} "
                        f"in this config: the optimizer's parameter groups differ; keep {ratio} or set "
                        f"checkpoint.load_optimizer=false")


def _saved_lr_mult(config_path: Path) -> float:
    """``optimizer.lr_mult`` of a checkpoint's config.yaml (1 where it predates the key or has no config)."""
    import yaml

    if not config_path.is_file():
        return 1.0
    try:
        data = yaml.safe_load(config_path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{config_path}: invalid YAML ({e})") from None
    return float(((data.get("optimizer") if isinstance(data, dict) else None) or {}).get("lr_mult", 1.0))

