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
    image_loss_mask: (b, s) float32; 1 at the token positions of noised images (clean context images: 0).
    modality_ids:    (b, s) int64; 1 at image token positions, 0 elsewhere (``<boi>``/``<eoi>`` included).
    document_ids:    (b, s) int64; packed document per token within its row, -1 for padding.
    position_ids:    (b, s) int64; RoPE positions, restarting at 0 per document.
    image_latents:   (n, C, H, W) float32 clean latents (a draw ``mean + std * eps`` when the shards hold a std).
    image_batch / image_start: (n,) int64; row and first position of each image's tokens (right after ``<boi>``).
    image_first:     (n,) bool; the image came before its caption (the step caps its noise level).
    image_noised:    (n,) bool; the image is noised and trained; False: clean context (t = 0, no loss; editing).
    sample_ids:      per row, ``"<dataset>:<key>:<epoch>"`` of each packed document, in order (bookkeeping).
    image_keys:      per image, the key its noise is drawn from (``Document.image_keys``: the sample id for a
                     document's first image), so the noise does not depend on layout or text-only neighbours.
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
    image_noised: Optional[Tensor] = None
    image_keys: Optional[list[str]] = None

    def __post_init__(self) -> None:
        if self.image_noised is None:  # built by hand with caption images only: every image is trained
            self.image_noised = torch.ones(self.image_batch.shape[0], dtype=torch.bool)

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
    images = [im for row in rows for d in row for im in d.images]  # (row, position) order, as image_start
    latents = (torch.from_numpy(np.stack([im.latent for im in images])) if images
               else torch.zeros((0, *latent_shape), dtype=torch.float32))
    return Batch(
        tokens=stack("tokens"), labels=stack("labels"), text_loss_mask=stack("text_loss_mask"),
        image_loss_mask=stack("image_loss_mask"), modality_ids=stack("modality_ids"),
        document_ids=stack("document_ids"), position_ids=stack("position_ids"), image_latents=latents,
        image_batch=torch.tensor([i for i, row in enumerate(rows) for d in row for _ in d.images], dtype=torch.int64),
        image_start=torch.tensor([s for a in arrays for s in a.image_start], dtype=torch.int64),
        image_first=torch.tensor([im.image_first for im in images], dtype=torch.bool),
        sample_ids=[[d.sample_id for d in row] for row in rows],
        image_noised=torch.tensor([im.noised for im in images], dtype=torch.bool),
        image_keys=[k for row in rows for d in row for k in d.image_keys()],
    )
