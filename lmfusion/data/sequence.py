"""Sequence building and packing: caption ids + one image -> a document; documents -> rows of ``seq_length``.

Layout of one document (one shard sample), ``T = tokens_per_image`` placeholders for the image::

    caption first (prob. caption_first_prob):  <bos> caption <boi> [T image] <eoi> <eos>
    image first   (otherwise):                 <bos> <boi> [T image] <eoi> caption <eos>

* **Caption dropout** (prob. ``caption_dropout``, drawn independently of the layout) empties the caption: the
  document is ``<bos> <boi> [T] <eoi> <eos>`` in either layout, exactly the unconditional prefix ``<bos> <boi>`` of
  classifier-free guidance at sampling time. A dropped-caption image is never flagged ``image_first``: there is no
  caption to learn from it, so its noise level must not be capped.
* **Too long** (``<bos>``, ``<boi>``, ``<eoi>``, ``<eos>`` + T + caption > seq_length): the caption is cut so the
  document fills one row; an image-first document then loses its ``<eos>`` as well (its caption does not end
  there). Documents are never split across rows: a continuation row would hold an image without its caption (or
  a caption without its image), which trains nothing the model needs (the text path is frozen).
* **Packing** is greedy and order-preserving: documents fill a row until the next does not fit; it then opens the
  next row; the rest of the row is padding.

Other document kinds (any number of images per document, each with its own noise/loss flag, :class:`DocImage`):

* **Text-only** (a text shard set): ``<bos> text <eos>``, no image; every next-token target is trained. A text
  longer than ``seq_length - 2`` tokens becomes consecutive pieces, each its own document (only the last ends
  with ``<eos>``), so no token of a long text is dropped.
* **Editing** (an edit shard set): ``<bos> <boi> [T source] <eoi> instruction <boi> [T target] <eoi> <eos>``; the
  source is clean context (``noised=False``: t = 0, no noise, no diffusion loss), the target noised with loss;
  the document trains no LM target. The attention rule (causal across, bidirectional inside each image) lets the
  target see the source and the instruction. Caption dropout empties the instruction.

Per-token arrays of a row (see :class:`lmfusion.data.batch.Batch` for the whole micro-batch):

* ``labels[t] = tokens[t + 1]`` where ``text_loss_mask[t] = 1``, else -100.
* ``text_loss_mask[t] = 1`` iff ``t`` and ``t + 1`` belong to the same document, **both are text** (modality 0)
  and ``tokens[t + 1]`` is not ``<boi>``. Hence: no loss on predicting an image position (the token after
  ``<boi>``), none from an image position (the last image token's "prediction" of ``<eoi>``: that output belongs to
  the diffusion head), none on ``<boi>`` (DESIGN: where an image starts is the layout's choice, and with a
  dropped caption ``<bos> -> <boi>`` is no text to learn), none across documents or into padding. ``<eoi> ->``
  first caption token (image first) and ``<eoi> -> <eos>`` (caption first) are trained.
* ``modality_ids[t] = 1`` at the T positions of each image; ``<boi>``/``<eoi>`` are text. ``image_loss_mask[t] = 1``
  at those of each noised image only (clean context images train nothing).
* ``text_loss_mask`` is also 0 throughout a document built with ``lm_loss=False`` (editing).
* ``document_ids``: 0, 1, ... per document within the row, -1 on padding; ``position_ids`` restart at 0 per
  document (0 on padding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

from lmfusion.errors import UserError

__all__ = ["IGNORE_INDEX", "DocImage", "Document", "SequenceBuilder", "Packer", "RowArrays", "row_arrays"]

IGNORE_INDEX = -100
SPECIAL = 4  # <bos>, <boi>, <eoi>, <eos>


@dataclass
class DocImage:
    """One image of a document: where its ``tokens_per_image`` positions start, its clean latent, and its flags."""

    offset: int                 # index of the image's first token within the document (right after <boi>)
    latent: np.ndarray          # (C, H, W) float32 clean latent
    noised: bool = True         # noised and trained (diffusion loss); False: clean context at t = 0, no loss
    image_first: bool = False   # came before its caption (the step caps its noise level)


@dataclass
class Document:
    """One sample laid out as tokens; ``tokens`` holds ``placeholder`` at each image's ``tokens_per_image``
    positions. Any number of images (0: a text-only document); ``lm_loss`` False trains no next-token target."""

    tokens: np.ndarray          # (L,) int64
    images: list[DocImage]
    sample_id: str
    caption_tokens: int         # caption/instruction/text tokens kept (0 when dropped)
    truncated: bool
    lm_loss: bool = True

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    # The caption document's single image (the common case; tests and callers read these).
    @property
    def image_offset(self) -> int:
        return self.images[0].offset

    @property
    def image_first(self) -> bool:
        return self.images[0].image_first

    @property
    def latent(self) -> np.ndarray:
        return self.images[0].latent

    def image_keys(self) -> list[str]:
        """Per image, the key its noise is drawn from: the sample id (first image), ``id/image{j}`` after it."""
        return [self.sample_id if j == 0 else f"{self.sample_id}/image{j}" for j in range(len(self.images))]


class SequenceBuilder:
    """Lays out one sample. Random choices come from the caller's generator (seeded per sample by the loader)."""

    def __init__(self, *, bos: int, eos: int, boi: int, eoi: int, placeholder: int, tokens_per_image: int,
                 seq_length: int, caption_first_prob: float, caption_dropout: float):
        if seq_length < tokens_per_image + SPECIAL:
            raise UserError(f"data.seq_length {seq_length} cannot hold one image: it needs tokens_per_image "
                            f"{tokens_per_image} + {SPECIAL} (<bos> <boi> <eoi> <eos>)")
        self.bos, self.eos, self.boi, self.eoi = bos, eos, boi, eoi
        self.placeholder = placeholder
        self.T = tokens_per_image
        self.seq_length = seq_length
        self.caption_first_prob = caption_first_prob
        self.caption_dropout = caption_dropout
        self.max_caption = seq_length - tokens_per_image - SPECIAL

    def choices(self, rng: np.random.Generator) -> tuple[bool, bool]:
        """(dropped, caption_first): two uniform draws, always both, so later draws do not depend on them."""
        u = rng.random(2)
        return bool(u[0] < self.caption_dropout), bool(u[1] < self.caption_first_prob)

    def build(self, caption_ids: Sequence[int], dropped: bool, caption_first: bool, latent: np.ndarray,
              sample_id: str) -> Document:
        cap = np.zeros(0, dtype=np.int64) if dropped else np.asarray(caption_ids, dtype=np.int64)
        truncated = cap.shape[0] > self.max_caption
        cap = cap[: self.max_caption]
        image = np.concatenate([[self.boi], np.full(self.T, self.placeholder), [self.eoi]]).astype(np.int64)
        bos = np.array([self.bos], dtype=np.int64)
        eos = np.array([self.eos], dtype=np.int64)
        image_first = not caption_first and cap.shape[0] > 0
        if image_first:
            parts = [bos, image, cap] + ([] if truncated else [eos])
            offset = 2
        else:
            parts = [bos, cap, image, eos]
            offset = 2 + cap.shape[0]
        tokens = np.concatenate(parts)
        return Document(tokens=tokens, images=[DocImage(offset, latent, True, image_first)], sample_id=sample_id,
                        caption_tokens=int(cap.shape[0]), truncated=bool(truncated))

    def build_text(self, ids: Sequence[int], last: bool, sample_id: str) -> Document:
        """A text-only piece: ``<bos> ids [<eos> if last]`` (``ids`` at most ``seq_length - 2``, see
        :meth:`text_piece_length`); no image, every next-token target trained."""
        body = np.asarray(ids, dtype=np.int64)[: self.text_piece_length]
        parts = [np.array([self.bos], dtype=np.int64), body] + ([np.array([self.eos], dtype=np.int64)] if last else [])
        return Document(tokens=np.concatenate(parts), images=[], sample_id=sample_id,
                        caption_tokens=int(body.shape[0]), truncated=False)

    @property
    def text_piece_length(self) -> int:
        """Text tokens per text-only document: a longer text is cut into consecutive pieces of this many."""
        return self.seq_length - 2

    def build_edit(self, instruction_ids: Sequence[int], dropped: bool, source: np.ndarray, target: np.ndarray,
                   sample_id: str) -> Document:
        """``<bos> <boi> [T source] <eoi> instruction <boi> [T target] <eoi> <eos>``: the source is clean context
        (t = 0, no noise, no loss), the target noised with diffusion loss; no LM loss (the instruction conditions
        the edit, it is not a prediction target). ``dropped`` empties the instruction (guidance's branch that
        keeps the source image)."""
        room = self.seq_length - 2 * self.T - 6
        if room < 0:
            raise UserError(f"data.seq_length {self.seq_length} cannot hold an editing document: it needs 2 x "
                            f"tokens_per_image {self.T} + 6 (<bos> 2x<boi> 2x<eoi> <eos>)")
        ins = np.zeros(0, dtype=np.int64) if dropped else np.asarray(instruction_ids, dtype=np.int64)
        truncated = ins.shape[0] > room
        ins = ins[:room]
        image = np.concatenate([[self.boi], np.full(self.T, self.placeholder), [self.eoi]]).astype(np.int64)
        tokens = np.concatenate([[self.bos], image, ins, image, [self.eos]]).astype(np.int64)
        target_offset = 1 + image.shape[0] + ins.shape[0] + 1
        return Document(tokens=tokens, images=[DocImage(2, source, False), DocImage(target_offset, target, True)],
                        sample_id=sample_id, caption_tokens=int(ins.shape[0]), truncated=bool(truncated),
                        lm_loss=False)


class Packer:
    """Greedy packing of a document source into rows. ``source()`` returns ``(document, state_before)``, where
    ``state_before`` is the source's resumable state before it produced that document. A document that does not fit
    waits for the next row; :meth:`resume_state` is then its ``state_before`` (rereading it restores the packer)."""

    def __init__(self, seq_length: int, source: Callable[[], tuple[Document, Any]]):
        self.seq_length = seq_length
        self.source = source
        self.pending: Optional[tuple[Document, Any]] = None

    def next_row(self) -> list[Document]:
        row: list[Document] = []
        used = 0
        while used < self.seq_length:
            item = self.pending if self.pending is not None else self.source()
            self.pending = None
            doc = item[0]
            if len(doc) > self.seq_length:
                raise ValueError(f"document {doc.sample_id} has {len(doc)} tokens > seq_length {self.seq_length}")
            if used + len(doc) > self.seq_length:
                self.pending = item
                break
            row.append(doc)
            used += len(doc)
        return row

    def resume_state(self) -> Optional[Any]:
        """The source state to resume from after the rows returned so far (None: the source's current state)."""
        return None if self.pending is None else self.pending[1]


@dataclass
class RowArrays:
    tokens: np.ndarray
    labels: np.ndarray
    text_loss_mask: np.ndarray
    modality_ids: np.ndarray
    image_loss_mask: np.ndarray
    document_ids: np.ndarray
    position_ids: np.ndarray
    image_start: list[int]


def row_arrays(docs: Sequence[Document], seq_length: int, tokens_per_image: int, pad: int, boi: int) -> RowArrays:
    """Per-token arrays of one packed row (rules in the module docstring)."""
    tokens = np.full(seq_length, pad, dtype=np.int64)
    document_ids = np.full(seq_length, -1, dtype=np.int64)
    position_ids = np.zeros(seq_length, dtype=np.int64)
    modality = np.zeros(seq_length, dtype=np.int64)
    image_loss = np.zeros(seq_length, dtype=np.float32)
    lm_doc = np.zeros(seq_length, dtype=bool)
    starts: list[int] = []
    offset = 0
    for j, doc in enumerate(docs):
        n = len(doc)
        tokens[offset:offset + n] = doc.tokens
        document_ids[offset:offset + n] = j
        position_ids[offset:offset + n] = np.arange(n)
        lm_doc[offset:offset + n] = doc.lm_loss
        for image in doc.images:
            start = offset + image.offset
            modality[start:start + tokens_per_image] = 1
            image_loss[start:start + tokens_per_image] = float(image.noised)
            starts.append(start)
        offset += n
    trained = np.zeros(seq_length, dtype=bool)
    trained[:-1] = ((document_ids[1:] == document_ids[:-1]) & (document_ids[:-1] >= 0) & lm_doc[:-1]
                    & (modality[:-1] == 0) & (modality[1:] == 0) & (tokens[1:] != boi))
    labels = np.full(seq_length, IGNORE_INDEX, dtype=np.int64)
    labels[:-1] = np.where(trained[:-1], tokens[1:], IGNORE_INDEX)
    return RowArrays(tokens=tokens, labels=labels, text_loss_mask=trained.astype(np.float32), modality_ids=modality,
                     image_loss_mask=image_loss, document_ids=document_ids, position_ids=position_ids, image_start=starts)
