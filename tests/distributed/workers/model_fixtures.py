"""Tiny random Hugging Face Llama models, converted with our importer, for model tests (no hub, no files shipped)."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import torch

from lmfusion.hf import convert_hf, load_base_state

TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0)
BOI, EOI = 290, 291  # ids inside the tiny vocabulary, reserved for images in these tests


class _ConvertTinyLlama:
    """``convert_tiny_llama(root, **overrides)`` writes ``root/hf`` (a random LlamaForCausalLM, safetensors) and
    converts it to ``root/base``; ``convert_tiny_llama.load(root, image=...)`` -> (hf_dir, ModelConfig, weights)."""

    def __call__(self, root: Path, seed: int = 0, **overrides) -> None:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        config = LlamaConfig(**{**TINY, **overrides}, bos_token_id=1, eos_token_id=2)
        model = LlamaForCausalLM(config).eval()
        with torch.no_grad():  # HF initialises norms to 1: perturb them so a norm mix-up cannot pass
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(0.1 * torch.randn_like(p))
        model.save_pretrained(root / "hf", safe_serialization=True)
        convert_hf(root / "hf", root / "base", boi=BOI, eoi=EOI)

    @staticmethod
    def load(root: Path, image, attention_backend: str = "sdpa", linear_backend: str = "local"):
        cfg, weights = load_base_state(root / "base")
        cfg = dataclasses.replace(cfg, image=image, attention_backend=attention_backend,
                                  linear_backend=linear_backend)
        return root / "hf", cfg, weights


convert_tiny_llama = _ConvertTinyLlama()


@functools.lru_cache(maxsize=8)
def _hf_model(hf_dir: str):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


@torch.no_grad()
def hf_logits(hf_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    """(b, s) -> (b, s, V) logits of the original HF model (the independent reference)."""
    return _hf_model(str(hf_dir))(tokens).logits.float()
