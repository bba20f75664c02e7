"""Training checkpoints of the megatron engine: megatron ``dist_checkpointing`` for tensors, JSON for the rest, the
frozen base referenced. The run directory's layout, save protocol, integrity manifest, base check and safe reading are
:mod:`lmfusion.rundir`'s; this module says what goes in.

    iter_0000100/  model.*      the trainable (image) set only: LMFusionModel.sharded_state_dict
                   optimizer.*  distributed-optimizer state ('fully_reshardable' by default)
                   rng_state    per-rank RNG states (ShardedObject)
                   ema.*        train.ema: the average, model keys prefixed 'ema.' (lmfusion.training.ema)
                   train_state.json  iteration, scheduler, data-loader state (JSON), parallel layout
                   + config.yaml, integrity.json and, last, lmfusion_checkpoint.json (lmfusion.rundir)

* **Atomic.** Every rank writes into ``RUN/.tmp_iter_N``, its files hashed while megatron's writers write them;
  :func:`lmfusion.rundir.finish_save` completes the manifest, writes the record last, renames the directory and then
  replaces ``latest``. With ``checkpoint.async_save`` the tensors are written in the background and the same
  finalisation runs when every rank has finished writing. A failed write (disk full) is one line naming the file on
  every rank, with the temporary directory removed and ``latest`` unchanged
  (:class:`lmfusion.rundir.CheckpointWriteError`).
* **Loading verifies** the base (its hash and its files'), the model config and every file's size before megatron
  reads anything, every file's sha256 while megatron reads (a mismatch is raised before the state is used), and
  megatron reads with code execution refused (:mod:`lmfusion.rundir.trust`).
* **Resharding.** Model keys carry global layer indices and TP shard offsets, so the image weights load at any
  TP/PP. Optimizer state: 'fully_reshardable' loads at any TP/PP/DP (needs one gradient bucket in megatron-core
  0.16.1); 'dp_reshardable' only at the same TP/PP. RNG states are restored only at the same (PP, TP, DP) layout
  (the trainer's own randomness, the diffusion noise, is keyed by sample and needs none).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import ShardedObject

from lmfusion import rundir
from lmfusion.errors import UserError
from lmfusion.rundir import CHECKPOINT_JSON, LATEST, TRAIN_STATE, find_checkpoint, iter_name
from lmfusion.training.model_setup import unwrap
from megatron_ext.torch_adam import torch_optimizers

__all__ = ["CHECKPOINT_JSON", "TRAIN_STATE", "LATEST", "iter_name", "find_checkpoint", "Checkpointer",
           "scheduler_policy", "restore_scheduler", "rng_state", "set_rng_state"]

# OptimizerParamScheduler state key -> the config key that sets it (megatron's load_state_dict checks these)
_SCHEDULER_KEYS = {"max_lr": "optimizer.lr", "min_lr": "optimizer.min_lr",
                   "lr_warmup_steps": "optimizer.lr_warmup_iters",
                   "lr_decay_steps": "optimizer.lr_decay_iters (train.train_iters when null)",
                   "lr_decay_style": "optimizer.lr_decay_style", "start_wd": "optimizer.weight_decay",
                   "end_wd": "optimizer.weight_decay", "wd_incr_style": "(the weight-decay schedule)"}


def scheduler_policy(c) -> str:
    """'config' (checkpoint.override_scheduler), 'checkpoint' (checkpoint.use_checkpoint_scheduler) or 'check'."""
    return "config" if c.override_scheduler else "checkpoint" if c.use_checkpoint_scheduler else "check"


def restore_scheduler(scheduler, saved: dict[str, Any], policy: str, where: Path) -> None:
    """Megatron's resume semantics for the LR/WD schedule: a setting that differs from the checkpoint's is an error
    naming the key and both values, unless ``policy`` is 'config' (take this config's, as megatron's
    ``--override-opt_param-scheduler``) or 'checkpoint' (keep the checkpoint's, ``--use-checkpoint-opt_param-
    scheduler``); whichever applies is logged on rank 0. The step count always comes from the checkpoint."""
    differ = [k for k in _SCHEDULER_KEYS if k in saved and getattr(scheduler, k) != saved[k]]
    say = dist.get_rank() == 0
    if differ and policy == "check":
        k = differ[0]
        raise UserError(f"{where}: scheduler {k} is {saved[k]!r} in the checkpoint, {getattr(scheduler, k)!r} in "
                        f"this config ({_SCHEDULER_KEYS[k]}); set checkpoint.override_scheduler=true to take the "
                        f"config's or checkpoint.use_checkpoint_scheduler=true to keep the checkpoint's")
    if differ and say:
        took = "this config's" if policy == "config" else "the checkpoint's"
        values = ", ".join(f"{k} {saved[k]!r} -> {getattr(scheduler, k)!r}" for k in differ)
        print(f"lmfusion train: scheduler settings differ from {where} ({values}); using {took} "
              f"(checkpoint.{'override_scheduler' if policy == 'config' else 'use_checkpoint_scheduler'}=true)",
              flush=True)
    scheduler.override_opt_param_scheduler = policy == "config"
    scheduler.use_checkpoint_opt_param_scheduler = policy != "config"
    scheduler.load_state_dict(saved)
    if policy == "config" and differ:
        # megatron's param groups carry their own max_lr/min_lr (restored with the optimizer state): rescale them
        # by the change, which keeps any per-group ratio (e.g. a text learning rate), then set this step's lr
        for group in scheduler.optimizer.param_groups:
            for key in ("max_lr", "min_lr"):
                if key in group and saved.get(key):
                    group[key] = group[key] * getattr(scheduler, key) / saved[key]
        scheduler.step(increment=0)


def _layout() -> dict[str, int]:
    return {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size()}


def rng_state() -> dict[str, Any]:
    """This rank's RNG state: torch CPU (and CUDA) generators and megatron's RNG tracker (both engines save it)."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {"cpu": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore a :func:`rng_state`."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    torch.set_rng_state(state["cpu"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded() -> ShardedObject:
    lay = _layout()
    return ShardedObject("rng_state", rng_state(), global_shape=(lay["pp"], lay["tp"], lay["dp"]),
                         global_offset=(ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
                                        ps.get_data_parallel_rank()), replica_id=0)


class Checkpointer:
    """Saves and restores a run's state. ``chunks``: DDP model chunks; ``loader``: has JSON state_dict /
    load_state_dict (a collective over DP); ``record``: the lmfusion_checkpoint.json fields (base, model, vae)."""

    def __init__(self, run_dir: Path, chunks: list, optimizer, scheduler, loader, record: dict[str, Any],
                 config_text: str, optimizer_sharding: str, keep_last: Optional[int], async_save: bool,
                 scheduler_policy: str = "check", ema=None):
        self.ema = ema  # lmfusion.training.ema.ShardedEMA, or None
        self.run_dir, self.chunks, self.optimizer, self.scheduler, self.loader = (run_dir, chunks, optimizer,
                                                                                   scheduler, loader)
        if dist.get_rank() == 0 and record.get("base_conversion_sha256") and "base_files" not in record:
            record = {**record, "base_files": rundir.base_files(record["base"])}  # the base as training starts
        self.record, self.config_text = record, config_text
        self.metadata = {"distrib_optim_sharding_type": optimizer_sharding}
        self.keep_last, self.scheduler_policy = keep_last, scheduler_policy
        self._queue = None
        if async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self._queue = AsyncCallsQueue()
        self._pending = None  # (temporary directory, its hashing) of the background save in flight
        self.last_saved: Optional[int] = None
        self.hash_files = True  # False only to measure the hashing's cost (benchmarks/checkpoint_hashing.py)

    # ------------------------------------------------------------------ state dicts
    def _model_sd(self) -> dict[str, Any]:
        if len(self.chunks) == 1:
            return {"model": self.chunks[0].module.sharded_state_dict()}
        return {f"model{i}": c.module.sharded_state_dict() for i, c in enumerate(self.chunks)}

    def _sharded(self, is_loading: bool, with_optimizer: bool, with_rng: bool, with_ema: bool = False
                 ) -> dict[str, Any]:
        sd = self._model_sd()
        model_sd = dict(sd)
        if with_optimizer:
            sd["optimizer"] = self.optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                                metadata=self.metadata)
        if with_rng:
            sd["rng_state"] = _rng_sharded()
        if with_ema:
            sd["ema"] = self.ema.sharded_state_dict(list(self._model_sd().values()), is_loading)
        return sd

    # ------------------------------------------------------------------ save
    def save(self, iteration: int, extra: dict[str, Any]) -> None:
        """Collective: every rank calls it at the same step boundary."""
        self.wait()  # one checkpoint in flight at a time
        dirs = rundir.begin_save(self.run_dir, iteration)
        if dirs is None:
            return
        tmp, final = dirs
        state = self._sharded(is_loading=False, with_optimizer=True, with_rng=True, with_ema=self.ema is not None)
        if self.ema is not None:
            extra = {**extra, "ema": self.ema.state()}
        train_state = {"format": rundir.STATE_FORMAT, "version": rundir.STATE_VERSION, "iteration": iteration,
                       "scheduler": self.scheduler.state_dict(), "loader": self.loader.state_dict(),
                       "parallel": _layout(), "optimizer_sharding": self.metadata["distrib_optim_sharding_type"],
                       **extra}
        record = {**self.record, "iteration": iteration, "model_key_prefix": ""}
        if self.ema is not None:
            from lmfusion.training.ema import EMA_PREFIX

            record["ema_key_prefix"] = EMA_PREFIX

        written = None

        def finalize() -> None:  # every rank (megatron's async queue finalizes on all ranks together)
            rundir.finish_save(tmp, final, train_state, record, self.config_text, self.keep_last, self.hash_files,
                               written=written)
            self._pending = None
            self.last_saved = iteration

        if self._queue is None:
            written = rundir.integrity.hash_while_writing(tmp) if self.hash_files else None
            try:
                with rundir.write_guard(tmp):
                    dist_checkpointing.save(state, str(tmp), validate_access_integrity=True)
            except BaseException:
                if written is not None:
                    written.cancel()
                raise
            dist.barrier()  # every rank's shards are on disk before the directory is hashed and published
            finalize()
        else:
            with rundir.write_guard(tmp):  # planning and common.pt are written now, the tensors in the background
                request = dist_checkpointing.save(state, str(tmp), validate_access_integrity=True,
                                                  async_sharded_save=True)
            request.add_finalize_fn(finalize)
            self._queue.schedule_async_request(request)  # forks the writer
            written = rundir.integrity.hash_while_writing(tmp) if self.hash_files else None
            self._pending = (tmp, written)

    def _finalize_async(self, blocking: bool) -> None:
        """Finalise finished background saves; a failed write is one line (rundir.write_guard) on every rank."""
        pending = self._pending
        try:
            with rundir.write_guard(pending[0]) if pending is not None else contextlib.nullcontext():
                self._queue.maybe_finalize_async_calls(blocking=blocking)
        except BaseException:
            if pending is not None and pending[1] is not None:
                pending[1].cancel()
            self._pending = None
            raise

    def poll(self) -> None:
        """Finalise finished background saves (call once per step; a no-op for synchronous saving)."""
        if self._queue is not None:
            self._finalize_async(blocking=False)

    def wait(self) -> None:
        """Block until background saves are written and published."""
        if self._queue is not None:
            self._finalize_async(blocking=True)

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._queue is not None:
                self._queue.close()
                self._queue = None

    # ------------------------------------------------------------------ load
    def load(self, iter_dir: Path, load_optimizer: bool, check_model: Callable[[dict[str, Any], Path], None]
             ) -> dict[str, Any]:
        """Restore model (image set), optimizer, scheduler, loader and RNG from ``iter_dir``; returns its train state.
        ``check_model(record, path)`` validates the recorded base and model config first (raises ValueError); then
        every file's hash is verified."""
        state = rundir.read_train_state(iter_dir)
        record = rundir.read_record(iter_dir)
        check_model(record, iter_dir / CHECKPOINT_JSON)
        same_layout = state.get("parallel") == _layout()
        if load_optimizer and state.get("parallel", {}).get("engine", "megatron") != "megatron":
            raise UserError(f"{iter_dir}: written by the {state['parallel']['engine']} engine, whose optimizer state "
                            f"the megatron engine cannot read; set checkpoint.load_optimizer=false to start from its "
                            f"weights")
        if load_optimizer and state.get("optimizer_sharding") != self.metadata["distrib_optim_sharding_type"]:
            raise UserError(f"{iter_dir}: optimizer state saved as {state.get('optimizer_sharding')!r}, this run uses "
                            f"checkpoint.optimizer_sharding={self.metadata['distrib_optim_sharding_type']!r}")
        if load_optimizer and state.get("optimizer_sharding") == "dp_reshardable":
            saved, now = state.get("parallel", {}), _layout()
            if (saved.get("tp"), saved.get("pp")) != (now["tp"], now["pp"]):
                raise UserError(f"{iter_dir}: 'dp_reshardable' optimizer state loads only at the saved TP/PP "
                                f"{saved.get('tp')}/{saved.get('pp')}; set checkpoint.load_optimizer=false to load "
                                f"the weights alone")
        # Sizes and the manifest are checked now; the sha256s are computed while megatron reads and the state is
        # applied, and collected before load() returns: nothing loaded is used (no step runs) before that, and a
        # failed check stops the resume.
        verification = rundir.integrity.start_verify(iter_dir, record)
        try:
            self._apply(iter_dir, state, load_optimizer, same_layout)
        except ValueError:
            verification.result()  # a changed file explains a failed read best: raises naming it
            raise
        verification.result()
        self.loader.load_state_dict(state["loader"])
        return state

    def _apply(self, iter_dir: Path, state: dict[str, Any], load_optimizer: bool, same_layout: bool) -> None:
        """Read the distributed checkpoint (code execution refused) into the model, optimizer, scheduler, RNG and
        EMA."""
        with_ema = self.ema is not None and load_optimizer and "ema" in state
        sharded = self._sharded(is_loading=True, with_optimizer=load_optimizer, with_rng=same_layout,
                                with_ema=with_ema)
        loaded = rundir.load_dist_checkpoint(sharded, iter_dir)
        for i, chunk in enumerate(self.chunks):
            key = "model" if len(self.chunks) == 1 else f"model{i}"
            model = unwrap(chunk)
            missing, unexpected = model.load_state_dict(loaded[key], strict=False)
            rundir.trust.check_image_set_loaded(missing, unexpected, iter_dir,
                                                [n for n, p in model.named_parameters() if p.requires_grad])
        if load_optimizer:
            with torch.no_grad():  # dp_reshardable copies into fp32 main params, which are leaves needing grad
                self.optimizer.load_state_dict(loaded["optimizer"])
            if "optimizer_steps" in state:
                _restore_adam_steps(self.optimizer, int(state["optimizer_steps"]))
            restore_scheduler(self.scheduler, state["scheduler"], self.scheduler_policy, iter_dir / TRAIN_STATE)
        else:  # bf16: the optimizer's fp32 main params still hold the init weights; its next step would write them back
            self.optimizer.reload_model_params()
        if same_layout:
            set_rng_state(loaded["rng_state"])
        if with_ema:
            self.ema.load(loaded["ema"], state["ema"])
        elif self.ema is not None:
            self.ema.reset()  # from the loaded weights
            if dist.get_rank() == 0:
                why = "holds no EMA" if "ema" not in state else "is loaded without its optimizer state"
                print(f"lmfusion train: {iter_dir} {why}; train.ema starts from its weights", flush=True)


def _restore_adam_steps(optimizer, steps: int) -> None:
    """Per-parameter Adam ``step`` counts of torch's AdamW (megatron's fallback without apex/TE) after a load.

    megatron-core 0.16.1 restores them from 'fully_reshardable' state, but its 'dp_reshardable' load leaves the
    freshly initialised 0 (the bias corrections of the next update are then wrong and the resumed run drifts). Every
    trainable parameter is updated at every optimizer step, so its count is the number of steps taken."""
    for inner in torch_optimizers(optimizer):
        if not isinstance(inner, torch.optim.Optimizer):
            continue
        for param_state in inner.state.values():
            step = param_state.get("step")
            if isinstance(step, torch.Tensor) and int(step) != steps:
                param_state["step"] = torch.full_like(step, float(steps))
