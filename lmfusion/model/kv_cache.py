"""Key/value cache for incremental decoding (generation), with the ids the attention mask needs.

Keys and values are kept per layer in the attention's (s, b, kv_heads, d) layout, after RoPE. The cache also keeps
the document and image ids of every cached position, so a step's mask (its queries against all cached keys plus
its own) is the same one definition as in training (``lmfusion.model.attention``).

``commit=False`` runs a step *against* the cache without adding to it: text-to-image sampling evaluates the same
image positions at every denoising step on top of the cached text prefix, and only the final (clean) image is
committed.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["KVCache"]


class KVCache:
    def __init__(self) -> None:
        self.keys: dict[int, Tensor] = {}
        self.values: dict[int, Tensor] = {}
        self.document_ids: Optional[Tensor] = None  # (b, s_cached)
        self.image_ids: Optional[Tensor] = None  # (b, s_cached), -1 for text
        self.positions: Optional[Tensor] = None  # (b, s_cached)
        self.commit = True

    @property
    def length(self) -> int:
        return 0 if self.document_ids is None else self.document_ids.shape[1]

    @property
    def num_images(self) -> int:
        """Images cached so far (new images get ids after them: ids are unique within a sequence)."""
        if self.image_ids is None or self.image_ids.numel() == 0:
            return 0
        return int(self.image_ids.max()) + 1

    def next_positions(self, b: int, s: int, device) -> Tensor:
        start = 0 if self.positions is None else int(self.positions[:, -1].max()) + 1
        return (start + torch.arange(s, device=device)).expand(b, s)

    def extend(self, layer_number: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Cached + new keys/values along the sequence (dim 0); stores them when committing."""
        if layer_number in self.keys:
            k = torch.cat([self.keys[layer_number], k], dim=0)
            v = torch.cat([self.values[layer_number], v], dim=0)
        if self.commit:
            self.keys[layer_number], self.values[layer_number] = k, v
        return k, v

    def full_ids(self, document_ids: Tensor, image_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Cached + new ids, (b, s_cached + s_new), new image ids shifted past the cached ones."""
        image_ids = torch.where(image_ids >= 0, image_ids + self.num_images, image_ids)
        if self.document_ids is None:
            return document_ids, image_ids
        return (torch.cat([self.document_ids, document_ids], dim=1), torch.cat([self.image_ids, image_ids], dim=1))

    def commit_ids(self, document_ids: Tensor, image_ids: Tensor, positions: Tensor) -> None:
        """Record the step's ids (call once per committed forward, after the layers extended their k/v)."""
        full_doc, full_img = self.full_ids(document_ids, image_ids)
        self.document_ids, self.image_ids = full_doc, full_img
        self.positions = positions if self.positions is None else torch.cat([self.positions, positions], dim=1)
