"""Modality routing: one plan per micro-batch, reused by every routed layer.

A token runs through exactly one modality's weights. Instead of computing both modalities and selecting (twice the
FLOPs) or filling per-op zero buffers by index, the plan is a permutation that groups the tokens of a micro-batch
as ``[text..., (pad), image..., (pad)]``; a routed GEMM then runs one dense GEMM per group on a contiguous slice
(the pattern of megatron-core's ``MoEAllGatherTokenDispatcher``). Each group is optionally padded to a multiple
(16 for FP8 GEMMs, as megatron's ``Fp8Padding``); pad rows are zero in both directions, so they change neither
outputs nor weight gradients.

The plan covers the *full* token set a column-parallel GEMM sees: with sequence parallelism that is the
all-gathered sequence, without it the (replicated) local sequence; both are every token of the micro-batch, in
megatron's flattened ``[s, b]`` order. Build it from modality ids laid out like the hidden states, ``(s, b)``.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

TEXT = 0
IMAGE = 1
NUM_MODALITIES = 2
MODALITY_NAMES = ("text", "image")

__all__ = ["TEXT", "IMAGE", "NUM_MODALITIES", "MODALITY_NAMES", "RoutingPlan"]


@dataclass(frozen=True)
class RoutingPlan:
    """Grouping of one micro-batch's tokens by modality.

    Attributes:
        modality_ids: (n,) int64, the flattened modality id of every token (0 text, 1 image).
        counts: real tokens per modality (host ints: GEMM shapes are decided on the host anyway).
        padded_counts: counts rounded up to ``pad_multiple`` (equal to ``counts`` when it is 1).
        gather_index: (sum(padded_counts),) int64; row r of the grouped buffer holds token ``gather_index[r]``.
            Pad rows point at token 0 and are zeroed after the gather (see ``pad_rows``).
        scatter_index: (n,) int64; token i sits at row ``scatter_index[i]`` of the grouped buffer.
        pad_rows: (num_pad,) int64 rows of the grouped buffer that are padding, or None.
        pad_multiple: the multiple each group is padded to.
        seq_shape: the (s, b) shape the ids came in, or None for flat ids.
        text_no_dgrad: the first ``text_no_dgrad`` rows of the text group are tokens whose input gradient nobody
            needs (see :meth:`build`); routed GEMMs skip their data-gradient rows and return zeros there.
        row_run_starts, row_run_modalities: host-side runs along the sequence dim ``s`` (plans from (s, b) ids):
            sequence rows ``row_run_starts[i]`` up to the next start hold the modalities whose bits
            (``1 << modality``) are set in ``row_run_modalities[i]``. Read on the host once, when the plan is
            built, so a sequence-parallel shard's modality (:meth:`shard_modality`) costs no device sync per layer.
    """

    modality_ids: torch.Tensor
    counts: tuple[int, ...]
    padded_counts: tuple[int, ...]
    gather_index: torch.Tensor
    scatter_index: torch.Tensor
    pad_rows: torch.Tensor | None
    pad_multiple: int
    seq_shape: tuple[int, ...] | None
    text_no_dgrad: int = 0
    row_run_starts: tuple[int, ...] = ()
    row_run_modalities: tuple[int, ...] = ()

    @classmethod
    def build(cls, modality_ids: torch.Tensor, pad_multiple: int = 1,
              no_dgrad: torch.Tensor | None = None) -> "RoutingPlan":
        """Plan the grouping for ``modality_ids`` of shape (s, b) (megatron layout) or (n,).

        ``no_dgrad`` (bool, shaped like the ids) marks text tokens whose input gradient is never needed: with the
        text weights frozen, text that comes before every image of its document depends on no trainable
        parameter, so the gradient reaching it would flow on to frozen weights only. They are grouped first
        within the text group (the others keep their sequence order after them) and routed GEMMs skip their
        data-gradient rows: a caption-first document's caption then costs a forward only (2n in lmfusion/training/flops.py).
        Marks on image tokens are ignored.

        Raises ValueError naming the offending value for ids outside {0, 1}, a non-integer tensor or a bad
        ``pad_multiple``.
        """
        if not isinstance(pad_multiple, int) or pad_multiple < 1:
            raise ValueError(f"pad_multiple must be a positive int, got {pad_multiple!r}")
        if modality_ids.dtype.is_floating_point or modality_ids.dtype == torch.bool or modality_ids.is_complex():
            raise ValueError(f"modality_ids must be an integer tensor, got dtype {modality_ids.dtype}")
        if modality_ids.dim() not in (1, 2):
            raise ValueError(f"modality_ids must be (s, b) or (n,), got shape {tuple(modality_ids.shape)}")
        seq_shape = tuple(modality_ids.shape) if modality_ids.dim() == 2 else None
        ids = modality_ids.reshape(-1).long()
        n = ids.numel()
        bad = (ids < 0) | (ids >= NUM_MODALITIES)
        if bool(bad.any()):
            value = int(ids[bad][0])
            raise ValueError(f"modality id {value} is not 0 (text) or 1 (image)")

        counts = tuple(int(c) for c in torch.bincount(ids, minlength=NUM_MODALITIES).tolist())
        padded = tuple(-(-c // pad_multiple) * pad_multiple for c in counts)
        key, text_no_dgrad = ids, 0
        if no_dgrad is not None:
            if no_dgrad.shape != modality_ids.shape or no_dgrad.dtype != torch.bool:
                raise ValueError(f"no_dgrad must be a bool tensor shaped like modality_ids "
                                 f"{tuple(modality_ids.shape)}, got {no_dgrad.dtype} {tuple(no_dgrad.shape)}")
            skip = no_dgrad.reshape(-1).to(ids.device) & (ids == TEXT)
            text_no_dgrad = int(skip.sum())
            key = 2 * ids + (~skip).long()  # 0: text without dgrad, 1: other text, 3: image
        # Stable: tokens of one modality (or no-dgrad class) keep their sequence order inside their group.
        order = torch.argsort(key, stable=True)
        device = ids.device
        if padded == counts:
            gather_index = order
            pad_rows = None
            scatter_index = torch.empty_like(order)
            scatter_index[order] = torch.arange(n, device=device)
        else:
            total = sum(padded)
            gather_index = torch.zeros(total, dtype=torch.long, device=device)
            scatter_index = torch.empty(n, dtype=torch.long, device=device)
            is_pad = torch.ones(total, dtype=torch.bool, device=device)
            src = dst = 0
            for count, padded_count in zip(counts, padded):
                rows = torch.arange(dst, dst + count, device=device)
                gather_index[dst : dst + count] = order[src : src + count]
                scatter_index[order[src : src + count]] = rows
                is_pad[dst : dst + count] = False
                src += count
                dst += padded_count
            pad_rows = torch.nonzero(is_pad).flatten()
        run_starts, run_modalities = _row_runs(ids, seq_shape)
        return cls(ids, counts, padded, gather_index, scatter_index, pad_rows, pad_multiple, seq_shape,
                   text_no_dgrad, run_starts, run_modalities)

    # ------------------------------------------------------------------ derived
    @property
    def num_tokens(self) -> int:
        return self.modality_ids.numel()

    @property
    def num_grouped_rows(self) -> int:
        return sum(self.padded_counts)

    @property
    def offsets(self) -> tuple[int, ...]:
        """Start row of each modality's group in the grouped buffer (plus the end)."""
        out = [0]
        for c in self.padded_counts:
            out.append(out[-1] + c)
        return tuple(out)

    def group_slices(self) -> list[tuple[int, slice]]:
        """``(modality, rows)`` for every modality with tokens; rows include that group's padding."""
        off = self.offsets
        return [(m, slice(off[m], off[m + 1])) for m in range(NUM_MODALITIES) if self.counts[m] > 0]

    def dgrad_slices(self) -> list[tuple[int, slice]]:
        """:meth:`group_slices` without the leading text rows that need no input gradient."""
        out = []
        for m, rows in self.group_slices():
            if m == TEXT and self.text_no_dgrad:
                rows = slice(rows.start + self.text_no_dgrad, rows.stop)
            if rows.stop > rows.start:
                out.append((m, rows))
        return out

    @property
    def single_modality(self) -> int | None:
        """The modality id when every token has it (no permutation needed), else None."""
        if self.pad_rows is not None or 0 < self.text_no_dgrad < self.counts[TEXT]:
            return None  # padded, or text split into no-dgrad rows first: the grouping is not the identity
        present = [m for m in range(NUM_MODALITIES) if self.counts[m] > 0]
        return present[0] if len(present) == 1 else None

    def shard_modality(self, tp_rank: int = 0, tp_size: int = 1) -> int | None:
        """The modality of every token of sequence-parallel shard ``tp_rank`` of ``tp_size`` (the whole plan when
        ``tp_size`` is 1), or None when the shard holds both (or no tokens). Host-side facts only: no device sync.

        Unlike :attr:`single_modality` this ignores the grouping (padding, no-dgrad order): it is for token-order
        consumers such as the routed norm."""
        if tp_size == 1:
            present = [m for m in range(NUM_MODALITIES) if self.counts[m] > 0]
            return present[0] if len(present) == 1 else None
        start, stop = self._shard_rows(tp_rank, tp_size)
        starts = self.row_run_starts
        i = bisect.bisect_right(starts, start) - 1
        if i < 0 or (i + 1 < len(starts) and starts[i + 1] < stop):
            return None  # no tokens, or the shard spans runs of different modality sets
        bits = self.row_run_modalities[i]
        return next((m for m in range(NUM_MODALITIES) if bits == 1 << m), None)

    def _shard_rows(self, tp_rank: int, tp_size: int) -> tuple[int, int]:
        """Sequence rows [start, stop) of sequence-parallel shard ``tp_rank`` of ``tp_size``."""
        if self.seq_shape is None:
            raise ValueError("a sequence-parallel shard needs a plan built from (s, b) modality ids")
        s = self.seq_shape[0]
        if s % tp_size:
            raise ValueError(f"sequence length {s} is not divisible by tensor-parallel size {tp_size}")
        chunk = s // tp_size
        return tp_rank * chunk, (tp_rank + 1) * chunk

    # ------------------------------------------------------------------ moves (no autograd; see linear.py)
    def group(self, x: torch.Tensor) -> torch.Tensor:
        """(n, ...) in token order -> (rows, ...) grouped by modality, pad rows zero."""
        if x.shape[0] != self.num_tokens:
            raise ValueError(f"routing plan covers {self.num_tokens} tokens, got a tensor with {x.shape[0]} rows")
        out = x.index_select(0, self.gather_index)
        if self.pad_rows is not None:
            out.index_fill_(0, self.pad_rows, 0)
        return out

    def ungroup(self, y: torch.Tensor) -> torch.Tensor:
        """(rows, ...) grouped -> (n, ...) in token order (pad rows dropped)."""
        if y.shape[0] != self.num_grouped_rows:
            raise ValueError(f"routing plan has {self.num_grouped_rows} grouped rows, got {y.shape[0]}")
        return y.index_select(0, self.scatter_index)

    def local_modality_ids(self, tp_rank: int, tp_size: int) -> torch.Tensor:
        """Flat modality ids of this rank's sequence-parallel shard (the first dim ``s`` split over TP)."""
        start, stop = self._shard_rows(tp_rank, tp_size)
        s, b = self.seq_shape
        return self.modality_ids.view(s, b)[start:stop].reshape(-1)


def _row_runs(ids: torch.Tensor, seq_shape: tuple[int, ...] | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(run starts, modality bits per run) along the sequence dim of (s, b) ids, read to the host once."""
    if seq_shape is None or ids.numel() == 0:
        return (), ()
    grid = ids.view(seq_shape)  # (s, b)
    bits = sum(((grid == m).any(1).long() << m) for m in range(NUM_MODALITIES))  # (s,) modalities per row
    starts = torch.cat([bits.new_zeros(1), torch.nonzero(bits[1:] != bits[:-1]).flatten() + 1])
    return tuple(starts.tolist()), tuple(bits[starts].tolist())
