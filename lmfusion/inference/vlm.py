"""Understanding with a VLM base's own path: a prompt whose ``<image>`` placeholders the processor expanded, plus its
pixels, to new tokens through the KV cache (:class:`~lmfusion.inference.text.Session`).

The prompt runs once (prefill): the first pipeline stage's vision path (:mod:`lmfusion.model.vision`) fills the
placeholders, which the text modules process like any token, and their keys/values join the cache; every later step
is one text token. Greedy decoding in fp32 gives Hugging Face ``LlavaNextForConditionalGeneration.generate``'s tokens
(tests/unit/test_vlm_model.py). Inputs come from the base's own processor (``AutoProcessor.from_pretrained(base)``:
the conversion copies its files), so tiling and placeholder counts are HF's.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch
from torch import Tensor

from lmfusion.inference.text import SamplingParams, Session, last_logits, sample_next

__all__ = ["generate_with_images"]


@torch.no_grad()
def generate_with_images(model: torch.nn.Module, input_ids: Sequence[int] | Tensor, pixel_values: Tensor,
                         image_sizes: Tensor, params: SamplingParams,
                         generator: Optional[torch.Generator] = None) -> list[int]:
    """New tokens for one prompt (processor output: ``input_ids`` of one row, ``pixel_values``, ``image_sizes``);
    generation stops after a stop token (kept) or at ``max_new_tokens``. ``model`` has a vision path attached."""
    ids = [int(t) for t in (input_ids.reshape(-1).tolist() if isinstance(input_ids, Tensor) else input_ids)]
    session = Session(model, 1)
    inputs, lengths = session.inputs([ids])
    inputs = dataclasses.replace(inputs, pixel_values=pixel_values.to(session.device), image_sizes=image_sizes)
    session.cache.commit = True
    logits = last_logits(model(inputs, kv_cache=session.cache), session.vocab_size)  # prefill, images included
    session.lengths += lengths
    out: list[int] = []
    stops = set(params.stop_token_ids)
    for _ in range(params.max_new_tokens):
        token = int(sample_next(logits, params, generator)[0])
        out.append(token)
        if token in stops or len(out) == params.max_new_tokens:
            break
        logits = session.next_logits([[token]])
    return out
