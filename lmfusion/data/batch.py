"""One micro-batch as the loader hands it to the training step (b rows of s packed tokens)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from lmfusion.data.sequence import Document, row_arrays

if TYPE_CHECKING:  # importing the model pulls in megatron (seconds): only when converting
    from lmfusion.model.model import ModelInputs

__all__ = ["Batch", "collate"]


@dataclass
class Batch:
    """A packed micro-batch. Shapes: b = micro batch size, s = seq_length, n = images in the micro-batch.

    tokens:          (b, s) int64; image positions and padding hold the placeholder id (the model replaces images).
    labels:          (b, s) int64; ``tokens[:, t + 1]`` where ``text_loss_mask`` is 1, else -100.
    text_loss_mask:  (b, s) float32; 1 where the next-token prediction is trained (rules: ``sequence.py``).
    image_loss_mask: (b, s) float32; 1 at image token positions.
    modality_ids:    (b, s) int64; 1 at image token positions, 0 elsewhere (``<boi>``/``<eoi>`` included).
    document_ids:    (b, s) int64; packed document per token within its row, -1 for padding.
    position_ids:    (b, s) int64; RoPE positions, restarting at 0 per document.
    image_latents:   (n, C, H, W) float32 clean latents (a draw ``mean + std * eps`` when the shards hold a std).
    image_batch / image_start: (n,) int64; row and first position of each image's tokens (right after ``<boi>``).
    image_first:     (n,) bool; the image came before its caption (the step caps its noise level).
    sample_ids:      per row, ``"<dataset>:<key>:<epoch>"`` of each packed document, in order (bookkeeping).
    """

    tokens: Tensor
    labels: Tensor
    text_loss_mask: Tensor
    image_loss_mask: Tensor
    modality_ids: Tensor
    document_ids: Tensor
    position_ids: Tensor
    image_latents: Tensor
    image_batch: Tensor
    image_start: Tensor
    image_first: Tensor
    sample_ids: list[list[str]] = field(default_factory=list)

    @property
    def num_images(self) -> int:
        return int(self.image_batch.numel())

    def to_model_inputs(self, image_latents_noisy: Optional[Tensor], timesteps: Optional[Tensor]) -> "ModelInputs":
        """The model's view: ``image_latents_noisy`` (n, C, H, W) and ``timesteps`` (n,) come from the training step
        (or the clean latents with t = 0 for understanding)."""
        from lmfusion.model.model import ModelInputs

        if self.num_images == 0:
            return ModelInputs(tokens=self.tokens, document_ids=self.document_ids, position_ids=self.position_ids)
        for name, value in (("image_latents_noisy", image_latents_noisy), ("timesteps", timesteps)):
            if value is None or value.shape[0] != self.num_images:
                raise ValueError(f"Batch.to_model_inputs: {name} needs {self.num_images} entries (one per image), "
                                 f"got {None if value is None else tuple(value.shape)}")
        if image_latents_noisy.shape[1:] != self.image_latents.shape[1:]:
            raise ValueError(f"Batch.to_model_inputs: image_latents_noisy {tuple(image_latents_noisy.shape)} does not "
                             f"match the batch's latents {tuple(self.image_latents.shape)}")
        return ModelInputs(tokens=self.tokens, document_ids=self.document_ids, position_ids=self.position_ids,
                           image_latents=image_latents_noisy, image_timesteps=timesteps,
                           image_batch=self.image_batch, image_start=self.image_start)

    def _map(self, fn) -> "Batch":
        return replace(self, **{f.name: fn(getattr(self, f.name)) for f in fields(self)
                                if isinstance(getattr(self, f.name), Tensor)})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        """Called by torch's DataLoader with ``pin_memory=True``."""
        return self._map(lambda t: t.pin_memory())


def collate(rows: Sequence[Sequence[Document]], seq_length: int, tokens_per_image: int, pad: int, boi: int,
            latent_shape: Sequence[int]) -> Batch:
    """Stack packed rows into a :class:`Batch`; images are ordered by (row, position)."""
    arrays = [row_arrays(docs, seq_length, tokens_per_image, pad, boi) for docs in rows]
    stack = lambda name: torch.from_numpy(np.stack([getattr(a, name) for a in arrays]))  # noqa: E731
    docs = [d for row in rows for d in row]
    latents = (torch.from_numpy(np.stack([d.latent for d in docs])) if docs
               else torch.zeros((0, *latent_shape), dtype=torch.float32))
    modality = stack("modality_ids")
    return Batch(
        tokens=stack("tokens"), labels=stack("labels"), text_loss_mask=stack("text_loss_mask"),
        image_loss_mask=modality.float(), modality_ids=modality, document_ids=stack("document_ids"),
        position_ids=stack("position_ids"), image_latents=latents,
        image_batch=torch.tensor([i for i, row in enumerate(rows) for _ in row], dtype=torch.int64),
        image_start=torch.tensor([s for a in arrays for s in a.image_start], dtype=torch.int64),
        image_first=torch.tensor([d.image_first for d in docs], dtype=torch.bool),
        sample_ids=[[d.sample_id for d in row] for row in rows],
    )
