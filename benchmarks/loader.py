"""Benchmark: multimodal loader throughput vs. the training step's consumption, tiny and 8B configs.

The loader side is measured: ``MultimodalLoader`` runs in this process (``num_workers=0``: one CPU core, the
worst case; a training rank runs ``data.num_workers`` processes) over shard sets built by the real
``data_tools/build_shards.py``, and delivered samples (documents) per second are counted after a warm-up. Every
per-sample cost is inside the timed loop: reading and sha256-checking shards, tar parsing, ``.npy`` decoding,
caption tokenization, the mean + std * eps draw, layout, packing and collation into a ``Batch``.

* **tiny** (a CPU demo config defined here: identity "VAE" at 32 px -> 3x32x32 latents, 4x4 patches = 64 image
  tokens, a U-Net of 32-channel blocks, hidden 64, 2 layers, seq_length 512, micro-batch 2). Consumption is
  **measured**: forward + backward of the real ``LMFusionModel`` (megatron-core, one gloo rank, fp32 on this CPU)
  on a loader micro-batch, LM + diffusion loss; samples per micro-batch / median step time.
* **8B** (``ModelConfig()`` defaults: Llama-3-8B sizes, 4x32x32 latents, 256 image tokens; seq_length 4096,
  micro-batch 1; latents from a small random ``AutoencoderKL`` with 8x downsampling, ``--store mean_std``, float16
  as for a real SD-style VAE). Consumption is a **FLOP-model estimate**, stated: per image token
  6 x layer params (image weights trainable) + 4 x LM-head params (logits are computed everywhere; input gradient);
  per text token 4 x layer params (frozen, on the gradient path: an upper bound, text before the first image
  needs only 2x) + 4 x LM-head params; attention 3 x 4 x context x heads x head_dim x layers per token with the
  whole document as context (an upper bound); the U-Net/patchify (< 1% of the FLOPs) is left out. Step time is
  FLOPs / (GPUs per replica x peak x MFU) with H100 SXM bf16 dense peak 989 TFLOP/s, MFU 0.40, TP=2 (2 GPUs per
  data-parallel replica, e.g. 64 GPUs = 32 replicas): one replica consumes what one rank's loader delivers.

Captions: 5..60 random words from a 3,000-word vocabulary, tokenized by a BPE tokenizer trained on them (no
Llama-3 tokenizer is installable offline here; Rust BPE speed depends little on the vocabulary).

Usage: ``python benchmarks/loader.py [--configs tiny 8b] [--seconds 4] [--images 256]``. The last printed line is
the headline ``loader_over_consumption: <ratio>``, the smallest ratio over the configs run (target >= 10).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import os
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from PIL import Image

from data_tools import build_shards
from lmfusion.config import ModelConfig
from lmfusion.data import DataConfig, MultimodalLoader
from lmfusion.model.image_io import ImageIOConfig, tokens_per_image

H100_BF16_PEAK = 989e12
MFU = 0.40
GPUS_PER_REPLICA = 2  # TP=2, PP=1
SPECIALS = ["<unk>", "<bos>", "<eos>", "<boi>", "<eoi>"]


def write_inputs(root: Path, n: int, size: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    vocab = [f"word{i}" for i in range(3000)]
    root.mkdir(parents=True, exist_ok=True)
    captions = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / f"{i:05d}.png")
        captions.append(" ".join(rng.choice(vocab, size=int(rng.integers(5, 61)))))
        (root / f"{i:05d}.txt").write_text(captions[-1])
    return captions


def train_tokenizer(path: Path, captions: list[str]) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(captions, trainers.BpeTrainer(vocab_size=2048, special_tokens=SPECIALS))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>",
                            additional_special_tokens=["<boi>", "<eoi>"]).save_pretrained(path)
    return path


def build(out: Path, images: Path, vae: str, resolution: int, per_shard: int, extra: list[str]) -> Path:
    with contextlib.redirect_stdout(io.StringIO()):
        rc = build_shards.main([str(images), "--output", str(out), "--vae", vae, "--resolution", str(resolution),
                                "--min-size", "1", "--samples-per-shard", str(per_shard), "--workers", "1",
                                "--batch-size", "16", "--no-progress", *extra])
    if rc:
        raise SystemExit(f"build_shards failed for {out}")
    return out


def save_small_kl(path: Path) -> str:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    blocks = (8, 8, 8, 8)  # 8x downsampling; capacity is irrelevant to the loader (it reads stored latents)
    AutoencoderKL(block_out_channels=blocks, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=4,
                  layers_per_block=1).save_pretrained(path)
    return str(path)


def measure_loader(cfg: DataConfig, mc: ModelConfig, seconds: float) -> tuple[float, float, MultimodalLoader]:
    """(samples/s, samples per micro-batch) over ``seconds`` after a warm-up of one pass over every stream."""
    loader = MultimodalLoader(cfg, mc)
    for _ in range(2 * loader.micro_batches_per_step):
        next(loader)
    docs = batches = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        batch = next(loader)
        docs += batch.num_images
        batches += 1
    return docs / (time.perf_counter() - t0), docs / batches, loader


def tiny_step_seconds(mc: ModelConfig, loader: MultimodalLoader, reps: int) -> float:
    """Median seconds of forward + backward (LM + diffusion loss) of the tiny model on loader micro-batches."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _common import init_single_rank
    from lmfusion.diffusion import add_noise, sample_timesteps
    from lmfusion.losses import diffusion_loss, lm_loss, total_loss
    from lmfusion.model.builder import build_model
    from lmfusion.model.image_io import patchify

    init_single_rank()  # megatron CPU mode without a GPU
    model = build_model(mc)
    p = mc.image.patch_size * mc.image.downsample_factor
    times = []
    for i in range(reps + 1):
        batch = next(loader)
        t0 = time.perf_counter()
        noise = torch.randn_like(batch.image_latents)
        t = sample_timesteps(batch.num_images, batch.image_first)
        out = model(batch.to_model_inputs(add_noise(batch.image_latents, noise, t), t))
        lm = lm_loss(out.logits, batch.labels.t().contiguous(), batch.text_loss_mask.t())  # logits are (s, b, V)
        diff = diffusion_loss(patchify(out.noise_pred, p), patchify(noise, p))
        total_loss(*lm, *diff).loss.backward()
        if i:  # the first step pays one-time set-up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def flops_per_sample(mc: ModelConfig, doc_tokens: float) -> float:
    """Training FLOPs of one document (the stated model in the module docstring)."""
    h, kv = mc.hidden_size, mc.num_query_groups * mc.head_dim
    q = mc.num_attention_heads * mc.head_dim
    layers = mc.num_layers * (h * (q + 2 * kv) + q * h + 3 * h * mc.ffn_hidden_size)
    head = h * mc.vocab_size
    attention = 3 * 4 * doc_tokens * q * mc.num_layers
    image = tokens_per_image(mc.image)
    text = doc_tokens - image
    return image * (6 * layers + 4 * head + attention) + text * (4 * layers + 4 * head + attention)


def tiny_configs(tok: Path) -> tuple[ModelConfig, DataConfig]:
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(tok, local_files_only=True)
    ids = t.convert_tokens_to_ids
    mc = ModelConfig(vocab_size=len(t), hidden_size=64, ffn_hidden_size=128, num_layers=2, num_attention_heads=4,
                     num_query_groups=4, max_position_embeddings=512, rope_theta=10000.0, bos_token_id=ids("<bos>"),
                     eos_token_id=ids("<eos>"), boi_token_id=ids("<boi>"), eoi_token_id=ids("<eoi>"),
                     image=ImageIOConfig(latent_channels=3, latent_size=32, patch_size=4, block_channels=(32, 32),
                                         norm_groups=8, layers_per_block=1),
                     attention_backend="sdpa", linear_backend="local")
    return mc, DataConfig(tokenizer=str(tok), seq_length=512, micro_batch_size=2, global_batch_size=8,
                          num_workers=0)


def main(argv=None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", default=["tiny", "8b"], choices=["tiny", "8b"])
    ap.add_argument("--seconds", type=float, default=4.0, help="timed loader window per config")
    ap.add_argument("--images", type=int, default=256, help="distinct samples per shard set (cycled)")
    ap.add_argument("--reps", type=int, default=5, help="timed tiny training steps")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    rows, ratios = [], {}
    with tempfile.TemporaryDirectory(prefix="lmfusion-loader-bench-") as tmp:
        root = Path(tmp)
        captions = write_inputs(root / "images", args.images, 64)
        tok = train_tokenizer(root / "tok", captions)
        if "tiny" in args.configs:
            mc, base = tiny_configs(tok)
            shards = build(root / "tiny", root / "images", "identity", 32, 64, [])
            cfg = DataConfig(**{**vars(base), "datasets": [str(shards)]})
            rate, per_mb, loader = measure_loader(cfg, mc, args.seconds)
            step = tiny_step_seconds(mc, loader, args.reps)
            need = per_mb / step
            ratios["tiny"] = rate / need
            rows.append(("tiny", rate, per_mb, f"measured fwd+bwd {step * 1e3:.1f} ms / micro-batch (CPU, fp32)",
                         need))
        if "8b" in args.configs:
            mc = ModelConfig()
            shards = build(root / "8b", root / "images", save_small_kl(root / "vae"), 256, 64, [])
            cfg = DataConfig(datasets=[str(shards)], tokenizer=str(tok), seq_length=4096, micro_batch_size=1,
                             global_batch_size=8, num_workers=0)
            rate, per_mb, loader = measure_loader(cfg, mc, args.seconds)
            doc = cfg.seq_length * cfg.micro_batch_size / per_mb  # tokens per document incl. its padding share
            fl = flops_per_sample(mc, doc)
            need = GPUS_PER_REPLICA * H100_BF16_PEAK * MFU / fl
            ratios["8b"] = rate / need
            rows.append(("8b", rate, per_mb, f"FLOP model {fl / 1e12:.2f} TFLOP/sample on {GPUS_PER_REPLICA} H100 "
                         f"at MFU {MFU} -> {per_mb / need * 1e3:.0f} ms / micro-batch (estimate)", need))
    print(f"# loader: one process (num_workers=0), {torch.get_num_threads()} torch threads; "
          f"{args.images} distinct samples, 64 per shard, cycled; window {args.seconds:.0f} s")
    print("| config | loader samples/s | samples / micro-batch | consumption basis | consumed samples/s | ratio |")
    print("|---|---|---|---|---|---|")
    for name, rate, per_mb, basis, need in rows:
        print(f"| {name} | {rate:.0f} | {per_mb:.1f} | {basis} | {need:.1f} | {ratios[name]:.1f} |")
    worst = min(ratios.values())
    print(f"loader_over_consumption: {worst:.1f}")
    return worst


if __name__ == "__main__":
    main()
