"""The DeepSpeed engine (``engine: deepspeed``): the megatron trainer's loop, step, loss, LR schedule, metrics, guards
and signals, with DeepSpeed ZeRO doing data parallelism, the optimizer step and the training checkpoints.

    Trainer.run / train_step (lmfusion.training.trainer)     unchanged: loader -> noise -> counts -> ... -> metrics
      DeepSpeedTrainer.build_train_model   the same LMFusionModel (TP = PP = 1), torch AdamW over the image set only,
                                           megatron's OptimizerParamScheduler, deepspeed.initialize
      DeepSpeedTrainer.forward_backward_step   engine(inputs) -> StepLoss -> engine.backward, per micro-batch
      DeepSpeedTrainer.optimizer_step      engine.step() at the accumulation boundary (clip, AdamW, zero grads)
      DeepSpeedCheckpointer                engine.save_checkpoint / load_checkpoint + the run directory's contract

* **Parallel state.** megatron's ``parallel_state`` is initialised at TP = PP = 1 (the model's megatron layers read
  it); DP is the whole world, which is also DeepSpeed's data-parallel group. The config refuses TP/PP > 1.
* **Only the image set reaches DeepSpeed.** The text model is frozen before the optimizer exists
  (``build_model(freeze=True)``); the optimizer is built over the trainable parameters only, in megatron's parameter
  groups (biases and 1-D weights get ``wd_mult`` 0), and DeepSpeed's ZeRO optimizer shards what the optimizer holds.
  ZeRO-1/2 thus hold no gradient or optimizer state for text weights. ZeRO-3 partitions *every* parameter of the
  module (the frozen text model too, which saves its memory) but still keeps gradients and state for the image set
  only.
* **Same gradient as megatron.** :class:`~lmfusion.training.step.StepLoss` returns each micro-batch's loss times
  ``dp x num_microbatches``; DeepSpeed divides the loss by the accumulation steps and averages gradients over DP,
  exactly what megatron's schedule and DDP do: both engines take the gradient of the step's global token mean.
* **Same schedule.** megatron's ``OptimizerParamScheduler`` (built with the megatron engine's arguments) drives the
  learning rate and weight decay of the param groups DeepSpeed steps; clipping is DeepSpeed's
  ``gradient_clipping`` (global norm over the image set, like megatron's ``clip_grad``).
* **Precision.** bf16 (``train.precision``; 'auto': ``model_setup.resolve_precision``): DeepSpeed's bf16 mode, bf16
  parameters and fp32 master weights and optimizer state in the ZeRO optimizer. Otherwise fp32.
* **Checkpoints.** The run directory keeps the megatron engine's layout and save protocol (:mod:`lmfusion.rundir`:
  ``RUN/.tmp_iter_N``, every file hashed into ``integrity.json``, the record written last, renamed to ``iter_N``,
  then ``latest``). Inside, DeepSpeed's own files
  (``engine.save_checkpoint(..., exclude_frozen_parameters=True)``: ``mp_rank_00_model_states.pt`` with the image
  weights and ``client_state``, ``zero_pp_rank_*_optim_states.pt`` with the ZeRO shards) hold what a resume needs;
  ``client_state`` carries iteration, scheduler, data-loader state and every rank's RNG state (DeepSpeed reads its
  files back with ``torch.load(weights_only=False)``: load only checkpoints you trust). Next to them the image set is
  also written as megatron ``dist_checkpointing`` files (what the megatron engine writes as ``model.*``), so
  ``lmfusion generate --ckpt RUN`` and :func:`lmfusion.inference.load.load_for_inference` read a DeepSpeed run
  unchanged. Optimizer state resumes at the saved data-parallel size and ZeRO stage (DeepSpeed's ZeRO files are
  per rank); ``checkpoint.load_optimizer=false`` loads the image weights alone from the dist_checkpointing set: at
  any DP size and ZeRO stage, from either engine's checkpoints (and the megatron engine reads this engine's the
  same way).
* **ZeRO-3 note.** DeepSpeed warns once that it cannot see tensors inside ``LMFusionOutput`` (its backward hooks on
  the root module); the root module holds no parameters of its own, and ZeRO-3 losses match the megatron engine's.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps

from lmfusion import rundir
from lmfusion.config import Config
from lmfusion.config_io import dump_config
from lmfusion.errors import UserError
from lmfusion.model.builder import build_model
from lmfusion.model.model import LMFusionModel
from lmfusion.model.weights import is_image_param
from lmfusion.training import checkpointing as ckpt
from lmfusion.training.model_setup import (TrainModel, build_scheduler, optimizer_config, param_groups, params_dtype,
                                           recompute_layers)
from lmfusion.training.step import MicroBatch
from lmfusion.training.trainer import Trainer

__all__ = ["DeepSpeedTrainer", "DeepSpeedCheckpointer", "deepspeed_config", "image_param_groups", "ENGINE"]

ENGINE = "deepspeed"
_CLIENT_KEY = "lmfusion"
_INSTALL = "DS_BUILD_OPS=0 pip install -e '.[deepspeed]' (deepspeed==0.19.8)"


def _import_deepspeed():
    try:
        import deepspeed
    except ImportError as e:
        raise UserError(f"engine=deepspeed needs the deepspeed package ({e}); install it with {_INSTALL}") from None
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its INFO lines would drown the step metrics
    # torch 2.13 deprecates the collective DeepSpeed's ZeRO-3 all-gathers with, warning at every call
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    return deepspeed


def deepspeed_config(cfg: Config, num_microbatches: int, dtype: torch.dtype) -> dict[str, Any]:
    """The DeepSpeed JSON config of a run (batch sizes, clipping, precision, ZeRO) from ours."""
    d, t = cfg.deepspeed, cfg.train
    zero: dict[str, Any] = {"stage": d.zero_stage, "overlap_comm": d.overlap_comm,
                            "reduce_bucket_size": d.reduce_bucket_size, "contiguous_gradients": True}
    if d.zero_stage < 3:
        zero["allgather_bucket_size"] = d.allgather_bucket_size
    pin = torch.cuda.is_available()
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if d.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": num_microbatches,
        "gradient_clipping": cfg.optimizer.clip_grad,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "zero_optimization": zero,
        "steps_per_print": 1 << 30,  # metrics are ours (lmfusion.training.metrics)
        "wall_clock_breakdown": False,
        "checkpoint": {"tag_validation": "FAIL"},
    }


def image_param_groups(model: torch.nn.Module, cfg: Config) -> list[dict[str, Any]]:
    """megatron's parameter groups over the trainable (image) parameters: the same groups, ``wd_mult``,
    ``max_lr``/``min_lr`` (``optimizer.lr_mult`` included) as the megatron engine's optimizer
    (:func:`~lmfusion.training.model_setup.param_groups`), so the shared scheduler sets the same values."""
    groups = param_groups(model, cfg, optimizer_config(cfg, params_dtype(cfg)))
    frozen = [n for n, p in model.named_parameters() if p.requires_grad and not is_image_param(n)]
    if frozen:
        raise ValueError(f"text parameters {frozen[:3]} are trainable; the DeepSpeed engine trains the image set only")
    return groups


class DeepSpeedTrainer(Trainer):
    """``engine: deepspeed``; built by :func:`~lmfusion.training.engines.build_trainer` for such a config. Overrides
    the :class:`~lmfusion.training.trainer.Trainer`'s engine hooks only."""

    engine: Any

    # ------------------------------------------------------------------ setup
    def build_train_model(self, weights) -> TrainModel:
        cfg = self.cfg
        deepspeed = _import_deepspeed()
        dtype = params_dtype(cfg)
        model = build_model(cfg.model, base=weights, params_dtype=dtype, seed=cfg.train.seed, freeze=True,
                            device=self.rt.device)  # every tensor, frozen text included, before DeepSpeed wraps it
        if cfg.train.recompute == "full":
            recompute_layers(model)
        groups = image_param_groups(model, cfg)
        o = cfg.optimizer
        kwargs = dict(lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps, weight_decay=o.weight_decay)
        if cfg.deepspeed.offload_optimizer:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
        else:
            optimizer = torch.optim.AdamW(groups, **kwargs)  # what megatron-core uses without apex/TE
        ds_config = deepspeed_config(cfg, self.num_microbatches, dtype)
        self.engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                                                dist_init_required=False)
        return TrainModel(chunks=[self.engine], optimizer=ds_optimizer, scheduler=build_scheduler(cfg, ds_optimizer),
                          config=model.config)

    def make_checkpointer(self, record: dict[str, Any]) -> "DeepSpeedCheckpointer":
        c = self.cfg.checkpoint
        return DeepSpeedCheckpointer(self.run_dir, self.engine, self.tm.scheduler, self.loader, record,
                                     dump_config(self.cfg), self.cfg.deepspeed.zero_stage, c.keep_last,
                                     ckpt.scheduler_policy(c))

    # ------------------------------------------------------------------ one step
    def zero_grad(self) -> None:
        """Nothing to do: DeepSpeed zeroes gradients after each optimizer step."""

    def forward_backward_step(self, micro_batches: list[MicroBatch]) -> list[dict[str, torch.Tensor]]:
        """Forward and backward of each micro-batch. The accumulation boundary's ``engine.step()`` (the update) is left
        to :meth:`optimizer_step`, after the trainer has checked the step's loss."""
        out = []
        last = len(micro_batches) - 1
        for i, mb in enumerate(micro_batches):
            loss, reported = self._loss(mb, self.engine(mb.inputs))
            self.engine.backward(loss)
            if i < last:
                self.engine.step()  # inside the accumulation window: DeepSpeed counts the micro-step, updates nothing
            out.append(reported)
        return out

    def optimizer_step(self) -> tuple[bool, Optional[float]]:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return self.engine.was_step_applied(), None if norm is None else float(norm)


def _rank_rng_states() -> list[dict[str, Any]]:
    """Every rank's RNG state (a collective), indexed by global rank."""
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, ckpt.rng_state())
    return states


class DeepSpeedCheckpointer:
    """:class:`lmfusion.training.checkpointing.Checkpointer`'s interface over DeepSpeed's checkpointing."""

    def __init__(self, run_dir: Path, engine, scheduler, loader, record: dict[str, Any], config_text: str,
                 zero_stage: int, keep_last: Optional[int], scheduler_policy: str = "check"):
        self.run_dir, self.engine, self.scheduler, self.loader = run_dir, engine, scheduler, loader
        self.record, self.config_text, self.zero_stage, self.keep_last = record, config_text, zero_stage, keep_last
        self.scheduler_policy = scheduler_policy
        self.last_saved: Optional[int] = None

    def _layout(self) -> dict[str, Any]:
        return {"engine": ENGINE, "zero_stage": self.zero_stage, "dp": ps.get_data_parallel_world_size()}

    # ------------------------------------------------------------------ save
    @contextlib.contextmanager
    def _image_set(self, modifier_rank: Optional[int] = None) -> Iterator[dict[str, Any]]:
        """``LMFusionModel.sharded_state_dict()`` (the image set) over whole tensors. Under ZeRO-3 the image
        parameters are gathered for the duration (``modifier_rank``: whose changes are kept), and the partitioned
        frozen text parameters, whose shapes megatron reads before the image filter drops them, get shape-only
        stand-ins (one element, expanded: no memory) while the dict is built; the text model is never gathered."""
        import deepspeed

        model: LMFusionModel = self.engine.module
        trainable = [p for p in model.parameters() if p.requires_grad]
        z3 = self.zero_stage == 3
        with deepspeed.zero.GatheredParameters(trainable, modifier_rank=modifier_rank, enabled=z3):
            partitioned = [p for p in model.parameters() if not p.requires_grad and getattr(p, "ds_shape", None)
                           is not None and p.data.shape != p.ds_shape] if z3 else []
            kept = [p.data for p in partitioned]
            for p in partitioned:
                p.data = torch.empty(1, dtype=p.dtype, device=p.device).expand(p.ds_shape)
            try:
                sharded = model.sharded_state_dict()
            finally:
                for p, data in zip(partitioned, kept):
                    p.data = data
            yield sharded

    def _save_image_set(self, directory: Path) -> None:
        """The image set as megatron dist_checkpointing files: what lmfusion.inference.load reads (``model.*`` of a
        megatron-engine checkpoint)."""
        with self._image_set() as sharded:
            dist_checkpointing.save({"model": sharded}, str(directory), validate_access_integrity=True)

    def save(self, iteration: int, extra: dict[str, Any]) -> None:
        """Collective: every rank calls it at the same step boundary."""
        dirs = rundir.begin_save(self.run_dir, iteration)
        if dirs is None:
            return
        tmp, final = dirs
        with rundir.write_guard(tmp):
            self._save_image_set(tmp)  # first: megatron's save wants an empty directory
        scheduler, loader = self.scheduler.state_dict(), self.loader.state_dict()
        client = {"iteration": iteration, "scheduler": scheduler, "loader": loader, "rng": _rank_rng_states(),
                  **extra}
        self.engine.save_checkpoint(str(self.run_dir), tag=tmp.name, client_state={_CLIENT_KEY: client},
                                    save_latest=False, exclude_frozen_parameters=True)  # ends in a barrier
        # scheduler and loader as the megatron engine writes them: weights-only starts read the loader here
        train_state = {"format": rundir.STATE_FORMAT, "version": rundir.STATE_VERSION, "iteration": iteration,
                       "scheduler": scheduler, "loader": loader, "parallel": self._layout(), **extra}
        record = {**self.record, "iteration": iteration, "model_key_prefix": ""}
        rundir.finish_save(tmp, final, train_state, record, self.config_text, self.keep_last)
        self.last_saved = iteration

    def poll(self) -> None:
        """Saving is synchronous."""

    def wait(self) -> None:
        """Saving is synchronous."""

    def close(self) -> None:
        """Nothing held."""

    # ------------------------------------------------------------------ load
    def load(self, iter_dir: Path, load_optimizer: bool, check_model: Callable[[dict[str, Any], Path], None]
             ) -> dict[str, Any]:
        """Restore a run from ``iter_dir``; returns its train state. With ``load_optimizer``: a DeepSpeed-engine
        checkpoint of the same ZeRO stage and DP size (DeepSpeed's ``load_checkpoint``: image weights, ZeRO optimizer
        state; ``client_state``: scheduler, data loader, RNG). Without: the image weights alone, from the megatron
        dist_checkpointing image set both engines write (any ZeRO stage, any DP size, either engine), and the
        data-loader position from ``train_state.json``."""
        state = rundir.read_train_state(iter_dir)
        record = rundir.read_record(iter_dir)
        check_model(record, iter_dir / rundir.CHECKPOINT_JSON)
        rundir.integrity.verify(iter_dir, record)
        if not load_optimizer:
            self._load_image_set(iter_dir)
            self.loader.load_state_dict(state["loader"])
            return state
        saved, now = state.get("parallel", {}), self._layout()
        if saved.get("engine") != ENGINE:
            raise UserError(f"{iter_dir}: written by the megatron engine, whose optimizer state DeepSpeed cannot "
                            f"read; set checkpoint.load_optimizer=false to start from its weights")
        if saved != now:
            raise UserError(f"{iter_dir}: DeepSpeed optimizer state was saved at ZeRO stage {saved.get('zero_stage')}"
                            f" on {saved.get('dp')} data-parallel ranks, this run is stage {now['zero_stage']} on "
                            f"{now['dp']}; set checkpoint.load_optimizer=false to load the weights alone")
        problems: list[str] = []

        def load_module(src: dict[str, torch.Tensor], dst: torch.nn.Module) -> None:
            missing, unexpected = dst.load_state_dict(src, strict=False)
            problems.extend(self._unloaded(dst, missing, unexpected))

        path, client = self.engine.load_checkpoint(
            str(iter_dir.parent), tag=iter_dir.name, load_module_strict=False, load_optimizer_states=True,
            load_lr_scheduler_states=False, custom_load_fn=load_module)
        if path is None:
            raise UserError(f"{iter_dir}: DeepSpeed found no checkpoint files")
        if problems:
            raise UserError(f"{iter_dir}: {problems[0]}")
        client = client[_CLIENT_KEY]
        ckpt.restore_scheduler(self.scheduler, client["scheduler"], self.scheduler_policy,
                               iter_dir / "client_state")
        rng = client["rng"]
        if len(rng) == dist.get_world_size():
            ckpt.set_rng_state(rng[dist.get_rank()])
        self.loader.load_state_dict(client["loader"])
        return {**state, "iteration": client["iteration"]}

    @staticmethod
    def _unloaded(model: torch.nn.Module, missing, unexpected) -> list[str]:
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        not_loaded = sorted(trainable & set(missing))
        if not_loaded or unexpected:
            return [f"image parameters {not_loaded[:3]} not in the checkpoint / unexpected {list(unexpected)[:3]}"]
        return []

    def _load_image_set(self, iter_dir: Path) -> None:
        """Image weights from the dist_checkpointing image set (megatron reshards it), then DeepSpeed's fp32 master
        copy refreshed from them (the next update starts from the loaded weights)."""
        model: LMFusionModel = self.engine.module
        with self._image_set(modifier_rank=0) as sharded:  # every rank loads the same values
            loaded = rundir.load_dist_checkpoint({"model": sharded}, iter_dir)
            missing, unexpected = model.load_state_dict(loaded["model"], strict=False)
        rundir.trust.check_image_set_loaded(missing, unexpected, iter_dir,
                                            [n for n, p in model.named_parameters() if p.requires_grad])
        self.engine.optimizer.refresh_fp32_params()
