"""Shared inputs of the data-loader tests (no tests here): tiny shard sets built by the real shard builder
(``--vae identity``: latents are the pixels, (3, RES, RES)), a tiny word-level Hugging Face tokenizer saved to a
directory, and a ModelConfig whose special ids and latent shape come from them."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from data_tools import build_shards
from lmfusion.config import ModelConfig
from lmfusion.data import DataConfig
from lmfusion.model.image_io import ImageIOConfig

RES = 8              # image side = identity latent side
PATCH = 2
WORDS = [f"w{i}" for i in range(40)]
SPECIALS = ["<unk>", "<bos>", "<eos>", "<boi>", "<eoi>"]
MAX_WORDS = 12


def make_images(root: Path, n: int, seed: int, prefix: str = "img") -> dict[str, str]:
    """``n`` random RES x RES PNGs with captions of 1..MAX_WORDS words; returns {file name: caption}."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    captions = {}
    for i in range(n):
        name = f"{prefix}{i:04d}.png"
        Image.fromarray(rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8)).save(root / name)
        words = rng.choice(WORDS, size=int(rng.integers(1, MAX_WORDS + 1)))
        captions[name] = " ".join(words)
        (root / name).with_suffix(".txt").write_text(captions[name])
    return captions


def build_set(out: Path, images: Path, samples_per_shard: int) -> Path:
    with contextlib.redirect_stdout(io.StringIO()):
        rc = build_shards.main([str(images), "--output", str(out), "--vae", "identity", "--resolution", str(RES),
                                "--samples-per-shard", str(samples_per_shard), "--workers", "0", "--no-progress",
                                "--latent-dtype", "float32"])
    assert rc == 0
    return out


def make_tokenizer(path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>",
                                   additional_special_tokens=["<boi>", "<eoi>"])
    fast.save_pretrained(path)
    return path


def model_config(tokenizer_dir: Path, latent_size: int = RES, channels: int = 3) -> ModelConfig:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    ids = tok.convert_tokens_to_ids
    return ModelConfig(vocab_size=len(tok), hidden_size=32, ffn_hidden_size=64, num_layers=2, num_attention_heads=4,
                       num_query_groups=2, max_position_embeddings=256, bos_token_id=ids("<bos>"),
                       eos_token_id=ids("<eos>"), boi_token_id=ids("<boi>"), eoi_token_id=ids("<eoi>"),
                       image=ImageIOConfig(latent_channels=channels, latent_size=latent_size, patch_size=PATCH,
                                           kind="linear"), attention_backend="sdpa", linear_backend="local")


def data_config(sets: list[Path], tokenizer_dir: Path, **overrides) -> DataConfig:
    kw = dict(datasets=[str(s) for s in sets], tokenizer=str(tokenizer_dir), seq_length=64, micro_batch_size=2,
              global_batch_size=8, num_workers=0, seed=3)
    kw.update(overrides)
    return DataConfig(**kw)


def manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())
