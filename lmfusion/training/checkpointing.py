"""Training checkpoints: megatron ``dist_checkpointing`` for tensors, JSON for the rest, the frozen base referenced.

Layout of a run directory (``checkpoint.save``)::

    RUN/config.yaml                      the resolved config of the latest launch
    RUN/latest                           name of the newest *complete* iteration directory (written last, atomically)
    RUN/iter_0000100/                    megatron dist_checkpointing files:
                                           model.*      the trainable (image) set only: LMFusionModel.sharded_state_dict
                                           optimizer.*  distributed-optimizer state ('fully_reshardable' by default)
                                           rng_state    per-rank RNG states (ShardedObject)
    RUN/iter_0000100/lmfusion_checkpoint.json   base path + its conversion.json sha256, model config, VAE block
                                                (the contract lmfusion.inference.load reads)
    RUN/iter_0000100/train_state.json    iteration, scheduler, data-loader state (JSON), parallel layout
    RUN/iter_0000100/config.yaml         the config the iteration was trained with

* **Atomic.** Every rank writes into ``RUN/.tmp_iter_N``; when all are done, rank 0 adds the JSON files, renames
  the directory to ``iter_N`` and only then replaces ``latest``; older iteration directories beyond
  ``checkpoint.keep_last`` are removed after that. A crash at any point leaves ``latest`` on a complete checkpoint.
  With ``checkpoint.async_save`` the tensors are written in the background and the same finalisation runs when
  every rank has finished writing.
* **The frozen base is referenced, not copied**: resume rebuilds the text model from ``init.base_checkpoint`` and
  refuses a base whose ``conversion.json`` differs from the recorded sha256. Self-contained export:
  :func:`export_self_contained` copies the iteration and the base into one directory and points ``base`` at the
  copy (a relative path), which ``lmfusion generate --ckpt`` and resume both accept.
* **Resharding.** Model keys carry global layer indices and TP shard offsets, so the image weights load at any
  TP/PP. Optimizer state: 'fully_reshardable' loads at any TP/PP/DP (needs one gradient bucket in megatron-core
  0.16.1); 'dp_reshardable' only at the same TP/PP. RNG states are restored only at the same (PP, TP, DP) layout
  (the trainer's own randomness, the diffusion noise, is keyed by sample and needs none).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import ShardedObject

from lmfusion.training.model_setup import unwrap
from lmfusion.utils import atomic_write_text

__all__ = ["CHECKPOINT_JSON", "TRAIN_STATE", "LATEST", "iter_name", "find_checkpoint", "base_sha256",
           "Checkpointer", "export_self_contained", "begin_save", "publish", "prune"]

CHECKPOINT_JSON = "lmfusion_checkpoint.json"  # same name as lmfusion.inference.load.CHECKPOINT_JSON
TRAIN_STATE = "train_state.json"
LATEST = "latest"
STATE_FORMAT, STATE_VERSION = "lmfusion-train-state", 1


def iter_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def find_checkpoint(path: str | Path) -> Optional[Path]:
    """The iteration directory ``path`` names: itself, or the run directory's ``latest``; None if it has neither."""
    path = Path(path)
    if (path / TRAIN_STATE).is_file():
        return path
    latest = path / LATEST
    if not latest.is_file():
        return None
    target = path / latest.read_text().strip()
    if not (target / TRAIN_STATE).is_file():
        raise FileNotFoundError(f"{latest}: points to {target.name}, which holds no {TRAIN_STATE}")
    return target


def base_sha256(base_dir: str | Path) -> str:
    path = Path(base_dir) / "conversion.json"
    if not path.is_file():
        raise FileNotFoundError(f"{base_dir}: no conversion.json; is it a converted base (lmfusion convert-hf)?")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read ({e})") from None


def _json_text(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def _layout() -> dict[str, int]:
    return {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size()}


def _rng_state() -> dict[str, Any]:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {"cpu": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    torch.set_rng_state(state["cpu"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded() -> ShardedObject:
    lay = _layout()
    return ShardedObject("rng_state", _rng_state(), global_shape=(lay["pp"], lay["tp"], lay["dp"]),
                         global_offset=(ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
                                        ps.get_data_parallel_rank()), replica_id=0)


class Checkpointer:
    """Saves and restores a run's state. ``chunks``: DDP model chunks; ``loader``: has JSON state_dict /
    load_state_dict (a collective over DP); ``record``: the lmfusion_checkpoint.json fields (base, model, vae)."""

    def __init__(self, run_dir: Path, chunks: list, optimizer, scheduler, loader, record: dict[str, Any],
                 config_text: str, optimizer_sharding: str, keep_last: Optional[int], async_save: bool):
        self.run_dir, self.chunks, self.optimizer, self.scheduler, self.loader = (run_dir, chunks, optimizer,
                                                                                   scheduler, loader)
        self.record, self.config_text = record, config_text
        self.metadata = {"distrib_optim_sharding_type": optimizer_sharding}
        self.keep_last = keep_last
        self._queue = None
        if async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self._queue = AsyncCallsQueue()
        self.last_saved: Optional[int] = None

    # ------------------------------------------------------------------ state dicts
    def _model_sd(self) -> dict[str, Any]:
        if len(self.chunks) == 1:
            return {"model": self.chunks[0].module.sharded_state_dict()}
        return {f"model{i}": c.module.sharded_state_dict() for i, c in enumerate(self.chunks)}

    def _sharded(self, is_loading: bool, with_optimizer: bool, with_rng: bool) -> dict[str, Any]:
        sd = self._model_sd()
        model_sd = dict(sd)
        if with_optimizer:
            sd["optimizer"] = self.optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                                metadata=self.metadata)
        if with_rng:
            sd["rng_state"] = _rng_sharded()
        return sd

    # ------------------------------------------------------------------ save
    def save(self, iteration: int, extra: dict[str, Any]) -> None:
        """Collective: every rank calls it at the same step boundary."""
        self.wait()  # one checkpoint in flight at a time
        dirs = begin_save(self.run_dir, iteration)
        if dirs is None:
            return
        tmp, final = dirs
        state = self._sharded(is_loading=False, with_optimizer=True, with_rng=True)
        train_state = {"format": STATE_FORMAT, "version": STATE_VERSION, "iteration": iteration,
                       "scheduler": self.scheduler.state_dict(), "loader": self.loader.state_dict(),
                       "parallel": _layout(), "optimizer_sharding": self.metadata["distrib_optim_sharding_type"],
                       **extra}
        record = {**self.record, "iteration": iteration, "model_key_prefix": ""}

        def finalize() -> None:
            if dist.get_rank() == 0:
                publish(tmp, final, train_state, record, self.config_text, self.keep_last)
            self.last_saved = iteration

        if self._queue is None:
            dist_checkpointing.save(state, str(tmp), validate_access_integrity=True)
            dist.barrier()  # every rank's shards are on disk before rank 0 publishes the directory
            finalize()
            dist.barrier()
        else:
            request = dist_checkpointing.save(state, str(tmp), validate_access_integrity=True,
                                              async_sharded_save=True)
            request.add_finalize_fn(finalize)
            self._queue.schedule_async_request(request)

    def poll(self) -> None:
        """Finalise finished background saves (call once per step; a no-op for synchronous saving)."""
        if self._queue is not None:
            self._queue.maybe_finalize_async_calls(blocking=False)

    def wait(self) -> None:
        """Block until background saves are written and published."""
        if self._queue is not None:
            self._queue.maybe_finalize_async_calls(blocking=True)

    def close(self) -> None:
        self.wait()
        if self._queue is not None:
            self._queue.close()
            self._queue = None

    # ------------------------------------------------------------------ load
    def load(self, iter_dir: Path, load_optimizer: bool, check_model: Callable[[dict[str, Any], Path], None]
             ) -> dict[str, Any]:
        """Restore model (image set), optimizer, scheduler, loader and RNG from ``iter_dir``; returns its train state.
        ``check_model(record, path)`` validates the recorded base and model config first (raises ValueError)."""
        state = _read_json(iter_dir / TRAIN_STATE)
        if state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
            raise ValueError(f"{iter_dir / TRAIN_STATE}: not a {STATE_FORMAT} v{STATE_VERSION} file")
        check_model(_read_json(iter_dir / CHECKPOINT_JSON), iter_dir / CHECKPOINT_JSON)
        same_layout = state.get("parallel") == _layout()
        if load_optimizer and state.get("parallel", {}).get("engine", "megatron") != "megatron":
            raise ValueError(f"{iter_dir}: written by the {state['parallel']['engine']} engine, whose optimizer state "
                             f"the megatron engine cannot read; set checkpoint.load_optimizer=false to start from its "
                             f"weights")
        if load_optimizer and state.get("optimizer_sharding") != self.metadata["distrib_optim_sharding_type"]:
            raise ValueError(f"{iter_dir}: optimizer state saved as {state.get('optimizer_sharding')!r}, this run uses "
                             f"checkpoint.optimizer_sharding={self.metadata['distrib_optim_sharding_type']!r}")
        if load_optimizer and state.get("optimizer_sharding") == "dp_reshardable":
            saved, now = state.get("parallel", {}), _layout()
            if (saved.get("tp"), saved.get("pp")) != (now["tp"], now["pp"]):
                raise ValueError(f"{iter_dir}: 'dp_reshardable' optimizer state loads only at the saved TP/PP "
                                 f"{saved.get('tp')}/{saved.get('pp')}; set checkpoint.load_optimizer=false to load "
                                 f"the weights alone")
        sharded = self._sharded(is_loading=True, with_optimizer=load_optimizer, with_rng=same_layout)
        loaded = dist_checkpointing.load(sharded, str(iter_dir))
        for i, chunk in enumerate(self.chunks):
            key = "model" if len(self.chunks) == 1 else f"model{i}"
            model = unwrap(chunk)
            missing, unexpected = model.load_state_dict(loaded[key], strict=False)
            trainable = {n for n, p in model.named_parameters() if p.requires_grad}
            not_loaded = sorted(trainable & set(missing))
            if not_loaded or unexpected:
                raise ValueError(f"{iter_dir}: image parameters {not_loaded[:3]} not in the checkpoint / unexpected "
                                 f"{list(unexpected)[:3]}")
        if load_optimizer:
            with torch.no_grad():  # dp_reshardable copies into fp32 main params, which are leaves needing grad
                self.optimizer.load_state_dict(loaded["optimizer"])
            if "optimizer_steps" in state:
                _restore_adam_steps(self.optimizer, int(state["optimizer_steps"]))
            self.scheduler.load_state_dict(state["scheduler"])
        if same_layout:
            _set_rng_state(loaded["rng_state"])
        self.loader.load_state_dict(state["loader"])
        return state


def begin_save(run_dir: Path, iteration: int) -> Optional[tuple[Path, Path]]:
    """Collective start of a save: ``(tmp, final)`` directories, ``tmp`` empty on every rank after the barrier; None
    when ``final`` is already a complete checkpoint (e.g. a signal right after an interval save)."""
    final = run_dir / iter_name(iteration)
    if final.is_dir() and (final / TRAIN_STATE).is_file():
        return None
    tmp = run_dir / f".tmp_{iter_name(iteration)}"
    if dist.get_rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a crashed save
        tmp.mkdir(parents=True)
    dist.barrier()
    return tmp, final


def publish(tmp: Path, final: Path, train_state: dict[str, Any], record: dict[str, Any], config_text: str,
            keep_last: Optional[int]) -> None:
    """Rank 0, once every rank's files are in ``tmp``: add the JSON files and the config, rename ``tmp`` to
    ``final``, then point ``latest`` at it and prune older iterations."""
    atomic_write_text(tmp / TRAIN_STATE, _json_text(train_state))
    atomic_write_text(tmp / CHECKPOINT_JSON, _json_text(record))
    atomic_write_text(tmp / "config.yaml", config_text)
    os.replace(tmp, final)
    atomic_write_text(final.parent / LATEST, final.name + "\n")
    prune(final.parent, final, keep_last)


def prune(run_dir: Path, newest: Path, keep_last: Optional[int]) -> None:
    """Remove complete iteration directories beyond the newest ``keep_last`` (never ``newest``)."""
    if keep_last is None:
        return
    done = sorted(p for p in run_dir.glob("iter_*") if p.is_dir() and (p / TRAIN_STATE).is_file())
    for old in done[:-keep_last]:
        if old != newest:
            shutil.rmtree(old, ignore_errors=True)


def _torch_optimizers(optimizer) -> list:
    chained = getattr(optimizer, "chained_optimizers", None)
    if chained is not None:
        return [inner for opt in chained for inner in _torch_optimizers(opt)]
    return [getattr(optimizer, "optimizer", optimizer)]


def _restore_adam_steps(optimizer, steps: int) -> None:
    """Per-parameter Adam ``step`` counts of torch's AdamW (megatron's fallback without apex/TE) after a load.

    megatron-core 0.16.1 restores them from 'fully_reshardable' state, but its 'dp_reshardable' load leaves the
    freshly initialised 0 (the bias corrections of the next update are then wrong and the resumed run drifts). Every
    trainable parameter is updated at every optimizer step, so its count is the number of steps taken."""
    for inner in _torch_optimizers(optimizer):
        if not isinstance(inner, torch.optim.Optimizer):
            continue
        for param_state in inner.state.values():
            step = param_state.get("step")
            if isinstance(step, torch.Tensor) and int(step) != steps:
                param_state["step"] = torch.full_like(step, float(steps))


def export_self_contained(iter_dir: str | Path, output: str | Path) -> Path:
    """Copy a training iteration and the base it refers to into ``output`` (``output/base`` + the iteration files,
    ``base`` rewritten to the relative path ``base``): a directory that loads without the original base."""
    iter_dir, output = Path(iter_dir), Path(output)
    record = _read_json(iter_dir / CHECKPOINT_JSON)
    base = Path(record["base"])
    if not base.is_absolute():
        base = (iter_dir / base).resolve()
    if output.exists():
        raise FileExistsError(f"{output}: exists")
    tmp = output.with_name(f".tmp_{output.name}")  # a crash leaves no half-copied directory under the final name
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(iter_dir, tmp)
    shutil.copytree(base, tmp / "base")
    record["base"] = "base"
    atomic_write_text(tmp / CHECKPOINT_JSON, _json_text(record))
    os.replace(tmp, output)
    return output
