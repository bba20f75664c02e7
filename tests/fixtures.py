"""Fixtures shared across test modules (pytest fixtures live in ``tests/conftest.py``; the helpers they and the
tests call live here, so that no test module imports another)."""

from __future__ import annotations

from pathlib import Path

from lmfusion.config import ModelConfig

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "examples" / "configs" / "tiny_cpu.yaml"


def config_only_base(root: Path) -> Path:
    """A directory holding only a small base's ``lmfusion_config.json``: all that reading a config needs."""
    cfg = ModelConfig(vocab_size=45, hidden_size=64, ffn_hidden_size=96, num_layers=2, num_attention_heads=4,
                      num_query_groups=2, bos_token_id=1, eos_token_id=2, boi_token_id=3, eoi_token_id=4)
    cfg.save(root / "base" / "lmfusion_config.json")
    return root / "base"

