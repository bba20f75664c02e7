"""Generation at tensor-parallel size = world (torchrun, gloo): the loader's TP path, vocab-gathered logits, a
training checkpoint saved at TP=1 and resharded by megatron at load.

Tolerances: greedy tokens must equal HF ``generate`` exactly (as at TP=1). Latents after 3 DDIM steps at TP=world vs
TP=1: summation order differs (row-parallel all-reduce), so within 1e-4 of their largest magnitude (untrained
predictions blow x0 up to ~1e4 at the noisiest step; see tests/unit/test_generation.py).
"""

from __future__ import annotations

import dataclasses
import json

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state

from lmfusion.hf import load_base_state
from lmfusion.inference.image import text_to_image
from lmfusion.inference.load import CHECKPOINT_JSON, load_for_inference
from lmfusion.inference.text import SamplingParams, generate_text
from lmfusion.model.builder import build_model
from lmfusion.model.image_io import ImageIOConfig
from lmfusion.model.weights import is_image_param
from tests.distributed.harness import case, worker_main
from tests.distributed.workers.model import shared_tmpdir
from tests.fixtures import convert_tiny_llama

IMAGE = ImageIOConfig(latent_channels=3, latent_size=8, patch_size=2, kind="unet", block_channels=(16, 16),
                      norm_groups=8, layers_per_block=1)
REL_TOL = 1e-4
PROMPTS = [[1, 17, 33, 250, 9], [1, 5, 6, 7, 8, 9, 10, 11, 12]]
CAPTIONS = [[17, 33, 250], [5, 6, 7, 8, 9]]


def _hf_generate(hf_dir, prompt: list[int], max_new: int) -> list[int]:
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    return hf.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False)[0, len(prompt):].tolist()


@case
def tp_generation_matches_hf_and_tp1():
    world = dist.get_world_size()
    root = shared_tmpdir()
    if dist.get_rank() == 0:
        convert_tiny_llama(root, num_key_value_heads=2, tie_word_embeddings=False)
    dist.barrier()
    # a training checkpoint written at TP=1 (data-parallel replicas), and its TP=1 images as the reference
    parallel_state.initialize_model_parallel(1, 1)
    cfg, weights = load_base_state(root / "base")
    cfg = dataclasses.replace(cfg, image=IMAGE, attention_backend="sdpa", linear_backend="local")
    with weights:
        model = build_model(cfg, base=weights, freeze=False).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_image_param(name):
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    ckpt = root / "run"
    if dist.get_rank() == 0:
        ckpt.mkdir()
    dist.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), str(ckpt))
    if dist.get_rank() == 0:
        from lmfusion.rundir import base_files, base_sha256

        (ckpt / CHECKPOINT_JSON).write_text(json.dumps({"base": str(root / "base"), "model": cfg.to_dict(),
                                                        "vae": None,
                                                        "base_conversion_sha256": base_sha256(root / "base"),
                                                        "base_files": base_files(root / "base")}))
    dist.barrier()
    want = text_to_image(model, CAPTIONS, sampler="ddim", steps=3, seed=0)
    parallel_state.destroy_model_parallel()

    bundle = load_for_inference(ckpt, device="cpu")  # the loader sets up TP = world
    assert parallel_state.get_tensor_model_parallel_world_size() == world
    got = text_to_image(bundle.model, CAPTIONS, sampler="ddim", steps=3, seed=0)
    torch.testing.assert_close(got, want, atol=REL_TOL * float(want.abs().max()), rtol=0)
    params = SamplingParams(max_new_tokens=10, stop_token_ids=bundle.meta.stop_token_ids)
    for prompt, tokens in zip(PROMPTS, generate_text(bundle.model, PROMPTS, params)):
        expected = _hf_generate(root / "hf", prompt, 10)
        if tokens != expected:
            raise AssertionError(f"tp={world}: {tokens} != HF {expected}")


if __name__ == "__main__":
    worker_main()
