"""The multimodal training loader: shard sets -> packed micro-batches for one data-parallel rank, resumable.

Layout of a global batch (``G`` rows; ``S`` streams, see ``stream.py``; ``R = G / S`` rows per stream and step):
every optimizer step takes the next ``R`` rows of every stream. Data-parallel rank ``r`` of ``D`` owns the streams
``[r * S/D, (r + 1) * S/D)``; its micro-batches of ``b`` rows come from one stream each, in the order (micro-batch
index within the stream, stream). Inside a rank, worker ``w`` of ``W`` owns every ``W``-th of the rank's streams.

* **Split by data-parallel rank, not global rank.** The loader is given (dp_rank, dp_size) (or reads them from
  megatron's ``parallel_state``), so all tensor/pipeline/context-parallel ranks of one model replica produce
  identical batches, and different replicas disjoint ones.
* **Resume rule.** The state (:meth:`MultimodalLoader.state_dict`) records, per stream, the rows it has delivered
  and where its reading stands; restored, every stream continues exactly where it stopped, whatever the number of
  workers. At the same ``(dp_size, micro_batch_size)`` a state saved anywhere resumes to the identical sequence of
  micro-batches. At another ``dp_size`` (or micro batch size), keep ``global_batch_size`` and ``streams`` (the
  default ``streams = global_batch_size / micro_batch_size`` is taken from the state when ``data.streams`` is
  unset), with ``dp_size`` dividing ``streams``, ``micro_batch_size`` dividing ``R``, and a state saved at an
  optimizer-step boundary: then every following optimizer step consumes exactly the same rows (bit-identical
  micro-batches when ``micro_batch_size`` is kept), only spread over ranks differently.
* **Bad shards** are skipped by the stream that meets them (logged with the shard's path, counted in
  ``stats()['skipped_shards']`` and in the state); ``data.max_consecutive_failures`` in a row raise
  :class:`DataError`.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any, Iterator, NamedTuple, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lmfusion.data.batch import Batch
from lmfusion.data.config import DataConfig
from lmfusion.data.sequence import SequenceBuilder
from lmfusion.data.shards import ShardSet, check_same_vae
from lmfusion.data.stream import (DataError, Stream, StreamContext, initial_stream_state, load_tokenizer,
                                  tokenizer_fingerprint)
from lmfusion.errors import UserError
from lmfusion.model.image_config import tokens_per_image

if TYPE_CHECKING:  # a type only: lmfusion.config imports this package (its data section)
    from lmfusion.config import ModelConfig

__all__ = ["MultimodalLoader", "merge_states", "all_gather_json", "DataError", "STATE_FORMAT"]

log = logging.getLogger("lmfusion.data")
STATE_FORMAT = "lmfusion-loader-state"
STATE_VERSION = 1


class _Item(NamedTuple):
    stream: int
    rows_before: int
    batch: Batch
    state: dict[str, Any]


class _StreamDataset(IterableDataset):
    """Runs a rank's streams (in a DataLoader worker: that worker's share) in the canonical order."""

    def __init__(self, ctx: StreamContext, streams: list[int], states: dict[int, Optional[dict[str, Any]]],
                 rows_per_batch: int, num_workers: int):
        self.ctx, self.streams, self.states = ctx, streams, states
        self.rows_per_batch, self.num_workers = rows_per_batch, num_workers

    def __iter__(self) -> Iterator[_Item]:
        info = get_worker_info()
        mine = self.streams if info is None else self.streams[info.id::self.num_workers]
        streams = [Stream(k, self.ctx, self.states[k]) for k in mine]
        while True:
            s = min(streams, key=lambda s: (s.state["rows"] // self.rows_per_batch, s.k))
            rows_before = s.state["rows"]
            batch, state = s.next_micro_batch(self.rows_per_batch)
            yield _Item(s.k, rows_before, batch, state)


def _check_format(state: dict[str, Any]) -> None:
    if not isinstance(state, dict):
        raise UserError(f"loader state: expected a dict, got {type(state).__name__}")
    if state.get("format") != STATE_FORMAT:
        raise UserError(f"loader state: field 'format' is {state.get('format')!r}, expected {STATE_FORMAT!r}")
    if state.get("version") != STATE_VERSION:
        raise UserError(f"loader state: field 'version' is {state.get('version')!r}, this code reads {STATE_VERSION}")


def merge_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """One state holding every stream, from the states of all data-parallel ranks (duplicates must agree)."""
    if not states:
        raise ValueError("merge_states: no states given")
    for s in states:
        _check_format(s)
        if s["identity"] != states[0]["identity"]:
            raise ValueError("merge_states: the states come from loaders with different data configs")
    merged = {k: v for k, v in states[0].items() if k != "streams"}
    streams: dict[str, Any] = {}
    for s in states:
        for k, v in s["streams"].items():
            if k in streams and streams[k] != v:
                raise ValueError(f"merge_states: two states disagree on stream {k}")
            streams[k] = v
    merged["streams"] = dict(sorted(streams.items(), key=lambda kv: int(kv[0])))
    return merged


def all_gather_json(obj: Any, group) -> list[Any]:
    """All-gather JSON-serialisable objects as UTF-8 byte tensors (no pickling)."""
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    data = torch.tensor(list(json.dumps(obj, sort_keys=True).encode()), dtype=torch.uint8, device=device)
    size = torch.tensor([data.numel()], dtype=torch.int64, device=device)
    n = dist.get_world_size(group)
    sizes = [torch.zeros_like(size) for _ in range(n)]
    dist.all_gather(sizes, size, group=group)
    longest = int(max(int(s) for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: data.numel()] = data
    out = [torch.zeros_like(padded) for _ in range(n)]
    dist.all_gather(out, padded, group=group)
    return [json.loads(bytes(o[: int(s)].cpu().tolist()).decode()) for o, s in zip(out, sizes)]


class MultimodalLoader:
    """Infinite iterator of :class:`Batch` for data-parallel rank ``dp_rank`` of ``dp_size``.

    ``dp_group``: the data-parallel process group; given (and ``dp_size > 1``), :meth:`state_dict` is a collective
    that gathers every rank's streams, so the saved state can be restored at another ``dp_size``.
    """

    def __init__(self, config: DataConfig, model_config: ModelConfig, *, dp_rank: int = 0, dp_size: int = 1,
                 dp_group=None):
        if not config.datasets:
            raise UserError("data.datasets is empty: name at least one shard-set directory")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} must lie in [0, dp_size {dp_size})")
        self.config, self.model_config = config, model_config
        self.dp_rank, self.dp_size, self.dp_group = dp_rank, dp_size, dp_group
        img = model_config.image
        latent_shape = (img.latent_channels, img.latent_size, img.latent_size)
        sets = [ShardSet(d, latent_shape, config.vae) for d in config.datasets]
        check_same_vae(sets)
        tokenizer = load_tokenizer(config.tokenizer)
        if len(tokenizer) > model_config.vocab_size:
            raise UserError(f"data.tokenizer {config.tokenizer} has {len(tokenizer)} tokens, more than "
                            f"model.vocab_size {model_config.vocab_size}")
        T = tokens_per_image(img)
        mc = model_config
        builder = SequenceBuilder(bos=mc.bos_token_id, eos=mc.eos_token_id, boi=mc.boi_token_id,
                                  eoi=mc.eoi_token_id, placeholder=mc.eos_token_id, tokens_per_image=T,
                                  seq_length=config.seq_length, caption_first_prob=config.caption_first_prob,
                                  caption_dropout=config.caption_dropout)
        self._identity = {
            "seed": config.seed, "global_batch_size": config.global_batch_size, "seq_length": config.seq_length,
            "tokens_per_image": T, "latent_shape": list(latent_shape),
            "caption_first_prob": config.caption_first_prob, "caption_dropout": config.caption_dropout,
            "datasets": [s.fingerprint for s in sets], "weights": config.blend_weights,
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "special_ids": [mc.bos_token_id, mc.eos_token_id, mc.boi_token_id, mc.eoi_token_id],
        }
        self._ctx = StreamContext(
            sets=sets, cum_weights=np.cumsum(config.blend_weights), tokenizer_path=config.tokenizer,
            builder=builder, seq_length=config.seq_length, tokens_per_image=T, pad=mc.eos_token_id,
            boi=mc.boi_token_id, control_ids=(mc.bos_token_id, mc.eos_token_id, mc.boi_token_id, mc.eoi_token_id),
            seed=config.seed, num_streams=0, max_consecutive_failures=config.max_consecutive_failures,
            verify_checksums=config.verify_checksums, latent_shape=tuple(latent_shape))
        self._iter: Optional[Iterator[_Item]] = None
        self._set_layout(config.streams or config.global_batch_size // config.micro_batch_size)
        self._states: dict[int, dict[str, Any]] = {k: initial_stream_state(len(sets)) for k in self.local_streams}

    @classmethod
    def from_parallel_state(cls, config: DataConfig, model_config: ModelConfig) -> "MultimodalLoader":
        """Rank and size from megatron's data-parallel group (TP/PP/CP ranks of one replica share it)."""
        from megatron.core import parallel_state as ps

        return cls(config, model_config, dp_rank=ps.get_data_parallel_rank(),
                   dp_size=ps.get_data_parallel_world_size(), dp_group=ps.get_data_parallel_group())

    # ------------------------------------------------------------------ layout
    def _set_layout(self, streams: int) -> None:
        G, b, D = self.config.global_batch_size, self.config.micro_batch_size, self.dp_size
        if streams < 1 or G % streams or (G // streams) % b:
            raise UserError(f"streams {streams} must divide data.global_batch_size {G} into a multiple of "
                            f"data.micro_batch_size {b} rows per stream")
        if streams % D:
            raise UserError(f"dp_size {D} does not divide the {streams} streams (data.global_batch_size {G} / "
                            f"micro_batch_size {b} by default): each rank must own whole streams")
        self.num_streams = streams
        self.rows_per_stream_step = G // streams
        per_rank = streams // D
        self.local_streams = list(range(self.dp_rank * per_rank, (self.dp_rank + 1) * per_rank))
        workers = max(w for w in range(min(self.config.num_workers, per_rank) + 1) if w == 0 or per_rank % w == 0)
        if workers != self.config.num_workers:
            log.warning("data: %d worker(s) instead of data.num_workers %d: a worker owns whole streams and each "
                        "the same number (%d streams on this rank)", workers, self.config.num_workers, per_rank)
        self.num_workers = workers
        self._ctx.num_streams = streams

    @property
    def micro_batches_per_step(self) -> int:
        """Micro-batches this rank yields per optimizer step (the gradient-accumulation count)."""
        return self.config.global_batch_size // (self.dp_size * self.config.micro_batch_size)

    # ------------------------------------------------------------------ iteration
    def _start(self) -> None:
        dataset = _StreamDataset(self._ctx, self.local_streams, dict(self._states), self.config.micro_batch_size,
                                 self.num_workers)
        if self.num_workers == 0:
            self._iter = iter(dataset)
        else:
            self._iter = iter(DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                                         prefetch_factor=self.config.prefetch_factor, persistent_workers=False,
                                         pin_memory=torch.cuda.is_available()))
        self._buffer: dict[tuple[int, int], _Item] = {}

    def __iter__(self) -> "MultimodalLoader":
        return self

    def __next__(self) -> Batch:
        if self._iter is None:
            self._start()
        b = self.config.micro_batch_size
        k = min(self.local_streams, key=lambda k: (self._states[k]["rows"] // b, k))
        want = (k, self._states[k]["rows"])
        # Workers are read round-robin; with states saved mid-step one may run ahead: hold its items until due.
        while want not in self._buffer:
            try:
                item = next(self._iter)
            except DataError as e:  # from a worker: its traceback is in the message; keep the error's own line
                raise DataError.unwrap(e) from None
            self._buffer[(item.stream, item.rows_before)] = item
        item = self._buffer.pop(want)
        self._states[k] = item.state
        return item.batch

    def close(self) -> None:
        """Stop the workers (prefetched micro-batches are dropped; the state is that of delivered ones)."""
        self._iter = None
        self._buffer = {}

    # ------------------------------------------------------------------ state
    def local_state_dict(self) -> dict[str, Any]:
        """This rank's streams only (no communication)."""
        return {"format": STATE_FORMAT, "version": STATE_VERSION,
                "identity": {**self._identity, "streams": self.num_streams},
                "dp_size": self.dp_size, "micro_batch_size": self.config.micro_batch_size,
                "streams": {str(k): self._states[k] for k in self.local_streams}}

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state of what has been delivered. With a ``dp_group`` (and dp_size > 1) it is a
        collective returning every rank's streams (call it on all ranks; save it from one)."""
        local = self.local_state_dict()
        if self.dp_group is None or self.dp_size == 1:
            return local
        import torch.distributed as dist

        if not dist.is_initialized():
            return local
        return merge_states(all_gather_json(local, self.dp_group))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore (before or between iterations; prefetched batches are dropped). Rules: module docstring."""
        _check_format(state)
        saved, previous = state["identity"], self.num_streams
        try:
            if self.config.streams is None:
                self._set_layout(int(saved["streams"]))
            self._check_state(state)
        except ValueError:
            self._set_layout(previous)
            raise
        self._states = {k: state["streams"][str(k)] for k in self.local_streams}
        self.close()

    def _check_state(self, state: dict[str, Any]) -> None:
        saved = state["identity"]
        mine = {**self._identity, "streams": self.num_streams}
        diff = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
        if diff:
            raise UserError(f"loader state: saved with other data settings ({', '.join(diff)}); the stream contents "
                            f"would differ, so an exact resume is impossible")
        missing = [k for k in self.local_streams if str(k) not in state["streams"]]
        if missing:
            raise UserError(f"loader state lacks streams {missing} of dp rank {self.dp_rank}: save it with "
                            f"state_dict() on every rank (or merge_states) to resume at another dp_size")
        b = self.config.micro_batch_size
        if (state.get("dp_size"), state.get("micro_batch_size")) != (self.dp_size, b):
            rows = {v["rows"] for v in state["streams"].values()}
            if len(rows) != 1 or next(iter(rows)) % self.rows_per_stream_step or next(iter(rows)) % b:
                raise UserError(f"loader state: saved at dp_size {state.get('dp_size')} / micro_batch_size "
                                f"{state.get('micro_batch_size')}, resumed at {self.dp_size} / {b}: that needs a "
                                f"state saved at an optimizer-step boundary (rows per stream {sorted(rows)[:4]}, "
                                f"{self.rows_per_stream_step} per step)")

    def stats(self) -> dict[str, int]:
        """Counters over this rank's delivered data: documents, truncated captions, skipped shards, rows."""
        out = {"documents": 0, "truncated": 0, "skipped_shards": 0, "rows": 0}
        for s in self._states.values():
            out["rows"] += s["rows"]
            for key in ("documents", "truncated", "skipped_shards"):
                out[key] += s["source"][key]
        return out
