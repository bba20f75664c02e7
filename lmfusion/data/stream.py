"""One sample stream: a deterministic walk over the blended shard sets that yields packed micro-batches.

The global batch is drawn from ``S`` streams (``DataConfig.streams``). Everything a stream yields is a function
of (seed, S, stream index k, the data) and not of the number of ranks or workers, which is what makes resume exact
and lets a run continue at another data-parallel size.

Order of a stream (``d``: dataset, ``n_d``: its shards, ``p``: a position in its infinite shard sequence):

* Dataset ``d``'s shard sequence is the concatenation of per-epoch permutations: position ``p`` is shard
  ``perm(seed, d, epoch = p // n_d)[p % n_d]``. Stream ``k`` takes positions ``k, k + S, k + 2S, ...`` ("visits"), so
  within one epoch every shard goes to exactly one stream (and with fewer shards than streams every stream still
  has data: epochs simply interleave).
* A visited shard is read whole (:func:`read_shard`) and walked in a permutation seeded by (seed, d, p).
* Each next sample comes from dataset ``d`` drawn with the blending weights by a generator seeded by
  (seed, k, draw counter); its layout, caption dropout and latent noise by one seeded by (seed, d, p, sample).

Document kinds follow the dataset's ``kind`` (:mod:`lmfusion.data.shards`): ``caption`` documents as before;
``text`` samples are **tokenised here, at load time**, like captions: text shards stay independent of the base
model's tokenizer (one corpus serves any base; the loader state already fingerprints the tokenizer, so a resume
with another one is refused), and the cost is small next to a step (a shard is tokenised once per visit, in a
worker, as one batched fast-tokenizer call). A text longer than ``seq_length - 2`` tokens is cut into pieces at
that point; the pieces are the shard's "documents" (key ``<key>.<piece>``) and are walked in the shard's seeded
order like samples, so the resume state is unchanged. ``edit`` samples become editing documents (clean source,
noised target; :meth:`lmfusion.data.sequence.SequenceBuilder.build_edit`).

The resumable state is plain JSON: per dataset the visit number and the index within the visited shard (plus
failure and bookkeeping counters), the draw counter, and the rows emitted. A micro-batch's state is taken before
the document left waiting for the next row, so a restored stream rereads it and continues identically.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

import numpy as np

from lmfusion.data.batch import Batch, collate
from lmfusion.data.sequence import Document, Packer, SequenceBuilder
from lmfusion.data.shards import RawSample, ShardError, ShardSet, read_shard
from lmfusion.errors import UserError

__all__ = ["DataError", "StreamContext", "Stream", "initial_stream_state", "load_tokenizer", "tokenizer_fingerprint"]

log = logging.getLogger("lmfusion.data")

# Distinct generator domains, so no two kinds of random choice share a seed.
_SHARD_ORDER, _SAMPLE_ORDER, _BLEND, _SAMPLE = 1, 2, 3, 4


class DataError(RuntimeError):
    """Training data cannot be read (e.g. too many consecutive unreadable shards); its message is one line."""

    @classmethod
    def unwrap(cls, e: "DataError") -> "DataError":
        """The worker's own one-line error from one that torch's DataLoader re-raised in the main process (its
        message is "Caught DataError in DataLoader worker process N." followed by the worker's traceback)."""
        text = str(e)
        if "Original Traceback" not in text:
            return e
        last = [line for line in text.splitlines() if line.strip()][-1].strip()
        prefix = f"{cls.__module__}.{cls.__name__}: "
        for p in (prefix, f"{cls.__name__}: "):
            if last.startswith(p):
                last = last[len(p):]
        return cls(last)


def load_tokenizer(path: str):
    """The base model's tokenizer from its local Hugging Face directory (never a hub download)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"data.tokenizer {path}: cannot load a Hugging Face tokenizer there ({e})") from e


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the vocabulary (token -> id): what the token ids a stream produces depend on."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def _copy_source(source: dict[str, Any]) -> dict[str, Any]:
    """Copy of a stream's source state (flat counters + one flat dict per dataset; cheaper than deepcopy)."""
    return {**source, "readers": [dict(r) for r in source["readers"]]}


def initial_stream_state(num_datasets: int) -> dict[str, Any]:
    return {"rows": 0, "source": {"draws": 0, "documents": 0, "truncated": 0, "skipped_shards": 0,
                                  "readers": [{"visit": 0, "index": 0, "consecutive_failures": 0}
                                              for _ in range(num_datasets)]}}


@dataclass
class StreamContext:
    """What every stream needs, built once on the training process and sent to workers (picklable)."""

    sets: list[ShardSet]
    cum_weights: np.ndarray
    tokenizer_path: str
    builder: SequenceBuilder
    seq_length: int
    tokens_per_image: int
    pad: int
    boi: int
    control_ids: tuple[int, ...]
    seed: int
    num_streams: int
    max_consecutive_failures: int
    verify_checksums: bool
    latent_shape: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        self._tokenizer = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_tokenizer"] = None  # each process loads its own (fast tokenizers do not survive a fork well)
        return state

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_path)
        return self._tokenizer


@lru_cache(maxsize=64)
def _shard_permutation(seed: int, dataset: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, _SHARD_ORDER, dataset, epoch]).permutation(n)


@dataclass
class _OpenShard:
    visit: int
    position: int
    epoch: int
    samples: list[RawSample]
    caption_ids: list[list[int]]
    order: np.ndarray
    pieces: Optional[list[tuple[int, int]]] = None  # kind text: (sample, piece) per document, in file order


def _draw(mean: np.ndarray, std: Optional[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """The clean latent to train on: the stored one, or (store=mean_std) a fresh draw at every visit."""
    latent = mean.astype(np.float32)
    if std is not None:
        latent = latent + std.astype(np.float32) * rng.standard_normal(latent.shape, dtype=np.float32)
    return latent


class Stream:
    """Stream ``k`` of ``ctx.num_streams``; ``state`` as produced by :meth:`next_micro_batch` (None: the start)."""

    def __init__(self, k: int, ctx: StreamContext, state: Optional[dict[str, Any]] = None):
        self.k, self.ctx = k, ctx
        self.state = copy.deepcopy(state) if state is not None else initial_stream_state(len(ctx.sets))
        if len(self.state["source"]["readers"]) != len(ctx.sets):
            raise UserError(f"stream {k}: state has {len(self.state['source']['readers'])} dataset readers, "
                            f"config has {len(ctx.sets)} datasets")
        self._open: dict[int, _OpenShard] = {}
        self._failed: dict[int, list[str]] = {}  # per dataset: the shards of the current run of failures (for errors)
        self.packer = Packer(ctx.seq_length, self.next_document)

    # ------------------------------------------------------------------ reading
    def _position(self, visit: int) -> int:
        return self.k + visit * self.ctx.num_streams

    def _shard(self, d: int) -> Optional[_OpenShard]:
        """The shard of dataset ``d``'s current visit, read if needed; None if it was unreadable (then skipped)."""
        reader = self.state["source"]["readers"][d]
        cached = self._open.get(d)
        if cached is not None and cached.visit == reader["visit"]:
            return cached
        shards = self.ctx.sets[d].shards
        p = self._position(reader["visit"])
        epoch, r = divmod(p, len(shards))
        entry = shards[int(_shard_permutation(self.ctx.seed, d, epoch, len(shards))[r])]
        try:
            samples = read_shard(entry, self.ctx.sets[d].latent_shape, self.ctx.sets[d].has_std,
                                 self.ctx.verify_checksums, self.ctx.sets[d].kind)
        except ShardError as e:
            source = self.state["source"]
            source["skipped_shards"] += 1
            reader["consecutive_failures"] += 1
            log.warning("data: skipping shard %s (stream %d; %d skipped so far by this stream): %s",
                        entry.path, self.k, source["skipped_shards"], e)
            failed = self._failed.setdefault(d, [])
            failed.append(Path(entry.path).name)
            if reader["consecutive_failures"] >= self.ctx.max_consecutive_failures:
                n = reader["consecutive_failures"]
                named = ", ".join(failed[-3:]) + (f" and {len(failed) - 3} more" if len(failed) > 3 else "")
                raise DataError(f"{self.ctx.sets[d].directory}: {n} unreadable shards in a row ({named}; stream "
                                f"{self.k}), expected readable shards as its manifest lists them "
                                f"(data.max_consecutive_failures={self.ctx.max_consecutive_failures}); "
                                f"last: {' '.join(str(e).split())}") from None
            reader["visit"] += 1
            reader["index"] = 0
            return None
        reader["consecutive_failures"] = 0
        self._failed.pop(d, None)
        ids = self.ctx.tokenizer([s.caption for s in samples], add_special_tokens=False)["input_ids"]
        control = set(self.ctx.control_ids)  # a caption spelling out e.g. "<boi>" must not become the real token
        ids = [[t for t in x if t not in control] for x in ids]
        pieces = None
        if self.ctx.sets[d].kind == "text":
            n = self.ctx.builder.text_piece_length
            pieces = [(i, j) for i, x in enumerate(ids) for j in range(max(1, -(-len(x) // n)))]
        count = len(pieces) if pieces is not None else len(samples)
        order = np.random.default_rng([self.ctx.seed, _SAMPLE_ORDER, d, p]).permutation(count)
        self._open[d] = _OpenShard(reader["visit"], p, epoch, samples, ids, order, pieces)
        return self._open[d]

    def _choose_dataset(self) -> int:
        source = self.state["source"]
        draw = source["draws"]
        source["draws"] += 1
        if len(self.ctx.sets) == 1:
            return 0
        u = np.random.default_rng([self.ctx.seed, _BLEND, self.k, draw]).random()
        return int(min(np.searchsorted(self.ctx.cum_weights, u, side="right"), len(self.ctx.sets) - 1))

    def next_document(self) -> tuple[Document, dict[str, Any]]:
        """The next document and the source state before it (what resuming at this document restores)."""
        before = _copy_source(self.state["source"])
        d = self._choose_dataset()
        reader = self.state["source"]["readers"][d]
        while True:
            shard = self._shard(d)
            if shard is None:
                continue
            if reader["index"] < len(shard.order):
                break
            reader["visit"] += 1
            reader["index"] = 0
        i = int(shard.order[reader["index"]])
        reader["index"] += 1
        kind = self.ctx.sets[d].kind
        if kind == "text":
            i, piece = shard.pieces[i]
            n = self.ctx.builder.text_piece_length
            ids = shard.caption_ids[i]
            sample = shard.samples[i]
            doc = self.ctx.builder.build_text(ids[piece * n:(piece + 1) * n], (piece + 1) * n >= len(ids),
                                              f"{d}:{sample.key}.{piece}:{shard.epoch}")
        else:
            sample = shard.samples[i]
            rng = np.random.default_rng([self.ctx.seed, _SAMPLE, d, shard.position, i])
            dropped, caption_first = self.ctx.builder.choices(rng)
            latent = _draw(sample.latent, sample.std, rng)
            sample_id = f"{d}:{sample.key}:{shard.epoch}"
            if kind == "edit":
                target = _draw(sample.target, sample.target_std, rng)
                doc = self.ctx.builder.build_edit(shard.caption_ids[i], dropped, latent, target, sample_id)
            else:
                doc = self.ctx.builder.build(shard.caption_ids[i], dropped, caption_first, latent, sample_id)
        self.state["source"]["documents"] += 1
        self.state["source"]["truncated"] += int(doc.truncated)
        return doc, before

    # ------------------------------------------------------------------ batches
    def next_micro_batch(self, rows: int) -> tuple[Batch, dict[str, Any]]:
        """``rows`` packed rows as a :class:`Batch`, and the stream state right after them."""
        packed = [self.packer.next_row() for _ in range(rows)]
        self.state["rows"] += rows
        resume = self.packer.resume_state()
        after = {"rows": self.state["rows"],
                 "source": _copy_source(resume if resume is not None else self.state["source"])}
        batch = collate(packed, self.ctx.seq_length, self.ctx.tokens_per_image, self.ctx.pad, self.ctx.boi,
                        self.ctx.latent_shape or self.ctx.sets[0].latent_shape)
        return batch, after
