"""Fixtures shared across test modules (pytest fixtures live in ``tests/conftest.py``; the helpers they and the
tests call live here, so that no test module imports another)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import math
import string
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data_tools import build_shards
from lmfusion.config import ModelConfig
from lmfusion.data import DataConfig
from lmfusion.hf import convert_hf, load_base_state
from lmfusion.model.image_config import ImageIOConfig

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "examples" / "configs" / "tiny_cpu.yaml"


def config_only_base(root: Path) -> Path:
    """A directory holding only a small base's ``lmfusion_config.json``: all that reading a config needs."""
    cfg = ModelConfig(vocab_size=45, hidden_size=64, ffn_hidden_size=96, num_layers=2, num_attention_heads=4,
                      num_query_groups=2, bos_token_id=1, eos_token_id=2, boi_token_id=3, eoi_token_id=4)
    cfg.save(root / "base" / "lmfusion_config.json")
    return root / "base"


# ---------------------------------------------------------------------------------------------------- data
# Tiny shard sets built by the real shard builder (``--vae identity``: latents are the pixels, (3, RES, RES)), a tiny
# word-level Hugging Face tokenizer saved to a directory, and a ModelConfig whose special ids and latent shape come
# from them.
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


# ---------------------------------------------------------------------------------------------------- tiny Llama
# Tiny random Hugging Face Llama models, converted with our importer, for model tests (no hub, no files shipped).
TINY_LLAMA = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0)
BOI, EOI = 290, 291  # ids inside the tiny vocabulary, reserved for images in these tests


class _ConvertTinyLlama:
    """``convert_tiny_llama(root, **overrides)`` writes ``root/hf`` (a random LlamaForCausalLM, safetensors) and
    converts it to ``root/base``; ``convert_tiny_llama.load(root, image=...)`` -> (hf_dir, ModelConfig, weights)."""

    def __call__(self, root: Path, seed: int = 0, **overrides) -> None:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        config = LlamaConfig(**{**TINY_LLAMA, **overrides}, bos_token_id=1, eos_token_id=2)
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


# ---------------------------------------------------------------------------------------------------- generation
# A tiny Llama base, its byte-level BPE tokenizer and a training checkpoint whose image set is perturbed (the
# decoder's output layer is zero at init, which would make every prediction 0): the inference and evaluation tests'
# model (the ``ckpts`` fixture in tests/conftest.py).
GEN_IMAGE = ImageIOConfig(latent_channels=3, latent_size=8, patch_size=2, kind="unet", block_channels=(16, 16),
                          norm_groups=8, layers_per_block=1)
GEN_PROMPTS = ["a photo of a cat", "the quick brown fox jumps over the lazy dog, twice"]


def write_bpe_tokenizer(directory) -> None:
    """A byte-level BPE tokenizer (HF tokenizers, trained here): <pad>, <bos>, <eos> = 0, 1, 2 like the tiny
    config; 290 entries, then <boi>, <eoi> = 290, 291 as BOI, EOI above."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["a photo of a cat sitting on a mat", "a drawing of a red shoe", GEN_PROMPTS[1],
              "an image of a dress, a shirt, a bag and a sneaker", "hello world, this is a tiny tokenizer"] * 5
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=290, special_tokens=["<pad>", "<bos>", "<eos>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens(["<boi>", "<eoi>"])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                            pad_token="<pad>").save_pretrained(directory)


def perturb_image_set(model, seed: int) -> None:
    """Stand-in for training: move every image parameter (the zero-initialised output layer included)."""
    from lmfusion.model.weights import is_image_param

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_image_param(name):
                p.add_(0.05 * torch.randn(p.shape, generator=gen))


def write_generation_checkpoints(root: Path) -> dict[str, torch.Tensor]:
    """root/hf (HF Llama + tokenizer), root/base (convert-hf), root/run (a training checkpoint on root/base); returns
    the checkpoint's parameters by name. Needs a process group and megatron parallel state (``runtime``)."""
    from megatron.core import dist_checkpointing

    from lmfusion.inference.load import CHECKPOINT_JSON, LATEST, load_vae
    from lmfusion.model.builder import build_model
    from lmfusion.rundir import base_sha256

    (root / "hf").mkdir()
    write_bpe_tokenizer(root / "hf")
    convert_tiny_llama(root, num_key_value_heads=2, tie_word_embeddings=False)
    cfg, weights = load_base_state(root / "base")
    cfg = dataclasses.replace(cfg, image=GEN_IMAGE, attention_backend="sdpa", linear_backend="local")
    with weights:
        model = build_model(cfg, base=weights, freeze=False)
    perturb_image_set(model, seed=1)
    iter_dir = root / "run" / "iter_0000007"
    iter_dir.mkdir(parents=True)
    dist_checkpointing.save(model.sharded_state_dict(), str(iter_dir))
    vae = load_vae("identity", None, torch.device("cpu")).describe()
    from lmfusion.rundir import base_files

    (iter_dir / CHECKPOINT_JSON).write_text(json.dumps({"base": "../../base", "model": cfg.to_dict(), "vae": vae,
                                                        "base_conversion_sha256": base_sha256(root / "base"),
                                                        "base_files": base_files(root / "base")}))
    (root / "run" / LATEST).write_text("7\n")
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def write_eval_inputs(root: Path, prompts: list[str]) -> Path:
    """``root/p.jsonl`` (one ``{"prompt": ...}`` per line) and ``root/ref``, four 8 x 8 single-colour reference
    images for FID; returns the reference folder."""
    (root / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    ref = root / "ref"
    ref.mkdir()
    for i, color in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 220)]):
        Image.new("RGB", (8, 8), color).save(ref / f"{i}.png")
    return ref


# ---------------------------------------------------------------------------------------------------- CLIP
CLIP_MAX_POSITIONS = 16  # short, so that one prompt of test_eval_clip must be truncated
CLIP_SEED = 0  # random weights whose cosines on test_eval_clip's pairs have both signs (asserted there)
CLIP_MERGES = ["w h", "wh i"]  # "white" -> whi t e</w>


def tiny_tokenizer():
    """CLIP's byte-level BPE (transformers' CLIPTokenizer) over lowercase letters: each letter inside a word and at
    its end (``x</w>``), plus two merges; other words are spelled letter by letter."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in string.ascii_lowercase:
            vocab[c + suffix] = len(vocab)
    for merge in CLIP_MERGES:
        vocab[merge.replace(" ", "")] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in CLIP_MERGES])


def tiny_clip(seed: int = CLIP_SEED):
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    tokenizer = tiny_tokenizer()
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    text = dict(small, vocab_size=len(tokenizer), max_position_embeddings=CLIP_MAX_POSITIONS,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    config = CLIPConfig(text_config=text,
                        vision_config=dict(small, image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return model, tokenizer, processor


def save_tiny_clip(directory: Path, seed: int = CLIP_SEED, text_sign: int = 1, bpe_files: bool = False) -> Path:
    """A tiny random CLIP directory as clip_score reads it; ``text_sign=-1`` negates the text projection.
    ``bpe_files``: the tokenizer as ``vocab.json`` + ``merges.txt`` (the original CLIP layout) instead of the
    ``tokenizer.json`` that transformers 5's ``save_pretrained`` writes."""
    model, tokenizer, processor = tiny_clip(seed)
    with torch.no_grad():
        model.text_projection.weight.mul_(text_sign)
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    processor.save_pretrained(directory)
    if bpe_files:
        (directory / "tokenizer.json").unlink()
        (directory / "vocab.json").write_text(json.dumps(tokenizer.get_vocab()))
        (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(CLIP_MERGES) + "\n")
    return directory


def make_tiny_assets(root: Path, num_layers: int = 2, tie_word_embeddings: bool = False) -> dict[str, str]:
    """A tiny random Llama (HF, safetensors) with the data fixtures' word tokenizer, converted to a base, and a shard
    set of random 8 x 8 images (identity VAE); returns the paths and the tiny example config."""
    from transformers import LlamaConfig, LlamaForCausalLM


    make_images(root / "img", 40, seed=7)
    shards = build_set(root / "shards", root / "img", 8)
    make_tokenizer(root / "hf")  # the HF directory carries the tokenizer; the base copies it
    ids = {tok: i for i, tok in enumerate(SPECIALS)}
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(SPECIALS) + len(WORDS), hidden_size=64, intermediate_size=96,
                         num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, rope_theta=10000.0, bos_token_id=ids["<bos>"],
                         eos_token_id=ids["<eos>"], tie_word_embeddings=tie_word_embeddings)
    LlamaForCausalLM(config).save_pretrained(root / "hf", safe_serialization=True)
    convert_hf(root / "hf", root / "base", boi=ids["<boi>"], eoi=ids["<eoi>"])
    return {"base": str(root / "base"), "hf": str(root / "hf"), "shards": str(shards), "config": str(TINY_CONFIG)}


def cosine_alphas_cumprod(num_steps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal (2021) cosine schedule, computed here in float64 independently of diffusers."""
    def f(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = torch.tensor([min(1 - f((i + 1) / num_steps) / f(i / num_steps), max_beta) for i in range(num_steps)],
                         dtype=torch.float64)
    return torch.cumprod(1 - betas, dim=0)
