"""Understanding with a VLM base's own path: a prompt whose ``<image>`` placeholders the processor expanded, plus its
pixels, to new tokens through the KV cache (:class:`~lmfusion.inference.text.Session`).

The prompt runs once (prefill): the first pipeline stage's vision path (:mod:`lmfusion.model.vision`) fills the
placeholders, which the text modules process like any token, and their keys/values join the cache; every later step
is one text token. Greedy decoding in fp32 gives Hugging Face ``LlavaNextForConditionalGeneration.generate``'s tokens
(tests/unit/test_vlm_model.py). Inputs come from the base's own processor (``AutoProcessor.from_pretrained(base)``:
the conversion copies its files), so tiling and placeholder counts are HF's.

The command line (``lmfusion chat --image``, ``lmfusion caption`` on a VLM base) builds its prompts here: a question
through the processor's ``apply_chat_template`` (the base's own chat template, as HF's LLaVA-NeXT examples do), or
``--raw`` text as it is, ``<image>`` marking where the image goes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from lmfusion.errors import UserError
from lmfusion.inference.text import SamplingParams, Session, last_logits, sample_next

__all__ = ["CAPTION_QUESTION", "generate_with_images", "load_processor", "understanding_inputs", "check_room"]

#: ``lmfusion caption``'s question on a VLM base: lmms-eval's COCO-caption prompt for LLaVA models.
CAPTION_QUESTION = "Provide a one-sentence caption for the provided image."


def load_processor(base_dir: str | Path) -> Any:
    """The VLM base's own processor (image processor + tokenizer + chat template; local files only)."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(str(base_dir), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{base_dir}: cannot load the processor files ({first}); convert-hf copies them from the "
                        f"LLaVA-NeXT directory") from e


def understanding_inputs(processor: Any, image: Any, question: Optional[str] = None, raw: Optional[str] = None,
                         source: str = "base") -> Any:
    """Processor output (``input_ids``, ``pixel_values``, ``image_sizes``) for one PIL image and either a
    ``question`` (a user turn of the image then the text, through the processor's chat template with the generation
    prompt) or ``raw`` text sent as it is, its one ``<image>`` marking where the image goes (the tokenizer adds its
    BOS unless the text starts with it)."""
    if (question is None) == (raw is None):
        raise UserError("give a question or --raw TEXT (one of them)")
    marker = getattr(processor, "image_token", "<image>")
    if raw is not None:
        if raw.count(marker) != 1:
            raise UserError(f"--raw: the text holds {raw.count(marker)} {marker} markers, expected exactly one "
                            f"(where the image goes)")
        bos = getattr(processor.tokenizer, "bos_token", None)  # text that opens with it already has it (as HF's
        add_special_tokens = not (bos and raw.startswith(bos))  # apply_chat_template decides): no second one
        return processor(images=image, text=raw, return_tensors="pt", add_special_tokens=add_special_tokens)
    if not getattr(processor, "chat_template", None):
        raise UserError(f"{source}: the processor has no chat template; pass --raw TEXT with {marker} where the "
                        f"image goes")
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt")


def check_room(prompt_tokens: int, max_new_tokens: int, max_positions: int) -> None:
    """Refuse a prompt (its image placeholders expanded) that cannot fit the context with what it generates."""
    if prompt_tokens + max_new_tokens > max_positions:
        raise UserError(f"the prompt with its image takes {prompt_tokens} tokens; with --max-new-tokens "
                        f"{max_new_tokens} that is {prompt_tokens + max_new_tokens} positions, expected at most "
                        f"{max_positions} (the model's max_position_embeddings); nothing is truncated")


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
