"""Loader-shaped batches without shards: the real sequence builder and packer on synthetic captions and latents.

For FLOP estimates when a config has no data yet (``lmfusion flops``) and for benchmarks: documents are laid out and
packed exactly as :class:`lmfusion.data.MultimodalLoader` does (caption-first with ``caption_first_prob``, caption
dropout, greedy packing), with caption lengths drawn uniformly from ``caption_tokens`` (default 8-40 tokens:
COCO/CC-style captions run 10-30 Llama-3 tokens) and random token ids / latents.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from lmfusion.config import ModelConfig
from lmfusion.data.batch import Batch, collate
from lmfusion.data.sequence import Packer, SequenceBuilder
from lmfusion.model.image_io import tokens_per_image

__all__ = ["synthetic_batches"]


def synthetic_batches(model: ModelConfig, seq_length: int, micro_batch_size: int, *, caption_first_prob: float = 0.8,
                      caption_dropout: float = 0.1, caption_tokens: tuple[int, int] = (8, 40),
                      seed: int = 0) -> Iterator[Batch]:
    """An endless stream of micro-batches of ``micro_batch_size`` packed rows."""
    rng = np.random.default_rng(seed)
    T = tokens_per_image(model.image)
    img = model.image
    shape = (img.latent_channels, img.latent_size, img.latent_size)
    builder = SequenceBuilder(bos=model.bos_token_id, eos=model.eos_token_id, boi=model.boi_token_id,
                              eoi=model.eoi_token_id, placeholder=model.eos_token_id, tokens_per_image=T,
                              seq_length=seq_length, caption_first_prob=caption_first_prob,
                              caption_dropout=caption_dropout)
    special = {model.bos_token_id, model.eos_token_id, model.boi_token_id, model.eoi_token_id}
    count = [0]

    def source():
        n = int(rng.integers(caption_tokens[0], caption_tokens[1] + 1))
        ids = rng.integers(0, model.vocab_size, size=n)
        ids = np.where(np.isin(ids, list(special)), 0, ids)
        dropped, first = builder.choices(rng)
        latent = rng.standard_normal(shape).astype(np.float32)
        count[0] += 1
        return builder.build(ids, dropped, first, latent, f"synthetic:{count[0]}:0"), None

    packer = Packer(seq_length, source)
    while True:
        rows = [packer.next_row() for _ in range(micro_batch_size)]
        yield collate(rows, seq_length, T, model.eos_token_id, model.boi_token_id, shape)
