"""A VLM base's understanding path on gloo ranks: logits equal HF's LlavaNextForConditionalGeneration at TP=1,
TP=world, TP=world + SP and PP=world, through megatron's schedule.

Rank 0 writes the tiny random LLaVA-NeXT of tests/unit/test_hf_llava.py and converts it; every rank builds the HF
reference from that directory. fp32; tolerance 1e-4 (the issue's bound; only summation order differs, ~1e-6).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch
import torch.distributed as dist

from lmfusion import hf
from lmfusion.model.builder import build_model
from lmfusion.model.model import ModelInputs
from lmfusion.model.vision import attach_vision_path
from tests.distributed.harness import case, worker_main
from tests.distributed.workers.model import IMAGE, gather_vocab, grid, last_stage, run_schedule, shared_tmpdir
from tests.fixtures_llava import add_processor, llava_config, make_llava

LOGIT_TOL = 1e-4
SIZES = [(70, 40), (40, 70), (70, 20)]  # (h, w): 2x1 and 1x2 tile grids; the last one unpadded


@functools.lru_cache(maxsize=None)
def converted():
    """(HF model, processor, base directory), written once by rank 0."""
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    root = shared_tmpdir()
    if dist.get_rank() == 0:
        config = llava_config()
        make_llava(config, seed=11).save_pretrained(root / "hf", safe_serialization=True)
        add_processor(root / "hf", config)
        hf.convert_hf(root / "hf", root / "base")
    dist.barrier()
    return (LlavaNextForConditionalGeneration.from_pretrained(root / "hf").eval(),
            AutoProcessor.from_pretrained(root / "hf"), root / "base")


def processed(processor, size, tp: int):
    """Processor output for an image + question; the sequence length made a multiple of ``tp`` (for SP)."""
    from PIL import Image

    pixels = np.random.default_rng(sum(size)).integers(0, 256, (*size, 3), dtype=np.uint8)
    for text in ("<image> w1 w2 w3", "<image> w1 w2 w3 w4"):
        out = processor(images=Image.fromarray(pixels), text=text, return_tensors="pt")
        if out["input_ids"].shape[1] % tp == 0:
            return out
    raise AssertionError("no prompt length divides tp")


@case
def vlm_parity_with_hf():
    world = dist.get_world_size()
    model, processor, base = converted()
    cfg, weights = hf.load_base_state(base)
    cfg = dataclasses.replace(cfg, image=IMAGE, attention_backend="sdpa", linear_backend="local")
    errors = []
    for tp, pp, sp in ((1, 1, False), (world, 1, False), (world, 1, True), (1, world, False)):
        grid(tp, pp)
        ours = build_model(cfg, base=weights, sequence_parallel=sp).eval()
        attach_vision_path(ours, base)
        for size in SIZES:
            inputs = processed(processor, size, world)
            with torch.no_grad():
                want = model(**inputs).logits  # (b, s, V)
            tokens = inputs["input_ids"]
            ours_in = ModelInputs(tokens=tokens, document_ids=torch.zeros_like(tokens),
                                  pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
            with torch.no_grad():
                got = run_schedule(ours, ours_in, None, forward_only=True)
            if last_stage():
                logits = gather_vocab(got["logits"])[..., : cfg.vocab_size].transpose(0, 1)
                err = (logits - want).abs().max().item()
                if err > LOGIT_TOL:
                    errors.append(f"tp={tp} pp={pp} sp={sp} image {size}: max |logits - HF| {err:.2e}")
    weights.close()
    if errors:
        raise AssertionError("\n".join(errors))


if __name__ == "__main__":
    worker_main()
