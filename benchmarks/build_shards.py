"""Benchmark: shard-builder throughput vs. the VAE encoder alone on pre-decoded tensors.

The builder run is a full ``build_shards.main`` call on freshly written JPEGs, timed end to end (VAE load, input
listing, DataLoader start-up, decode/crop in workers, encoding, ``.npy``/tar writing, manifest merge). The
reference loop runs only ``vae.encode`` (plus taking mean and std) on the same images, already decoded, cropped,
normalised and on the device, with the same batch size, dtype, device and resolution. Both are timed warm: the
first encode in a process is several seconds slower (oneDNN/cuDNN set-up, allocator growth), a fixed cost a real
build amortises over thousands of images, so the encoder gets one untimed batch and the builder one untimed
one-batch build in the same process (the whole pipeline, VAE load included, then runs timed). Each side runs
``--repeats`` times and the best is kept (the machine may be shared). The ratio says how much of the encoder's
speed the pipeline around it keeps (target >= 0.90).

Without ``--vae`` a small random AutoencoderKL (4 down blocks, channels 32-64-128-128, 4 latent channels, 8x
downsampling, mid-block attention: the SD-VAE layout, narrower) is saved to a temporary directory and loaded back
by path, as the builder would load a real one.

Usage: ``python benchmarks/build_shards.py [--images 48] [--image-size 320] [--resolution 256] [--batch-size 8]``.
The last printed line is the headline ``build_shards_vs_encoder_only: <ratio>``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `data_tools` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from PIL import Image

from data_tools import _sources, build_shards
from lmfusion.data import shard_format as fmt


def write_images(root: Path, n: int, size: int, seed: int = 0) -> None:
    """``n`` JPEGs of smooth random content (upsampled noise, so JPEG sizes resemble photos) with captions."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = size + int(rng.integers(0, size // 4)), size
        small = Image.fromarray(rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8))
        small.resize((w, h), Image.Resampling.BICUBIC).save(root / f"img{i:05d}.jpg", quality=90)
        (root / f"img{i:05d}.txt").write_text(f"benchmark image number {i}")


def save_small_kl(path: Path) -> Path:
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    blocks = (32, 64, 128, 128)
    AutoencoderKL(block_out_channels=blocks, down_block_types=("DownEncoderBlock2D",) * len(blocks),
                  up_block_types=("UpDecoderBlock2D",) * len(blocks), latent_channels=4,
                  layers_per_block=1).save_pretrained(path)
    return path


def encoder_only(vae: str, images: Path, n: int, resolution: int, batch: int, device: torch.device,
                 dtype: torch.dtype, repeats: int) -> float:
    """Best images/s over ``repeats`` passes of ``vae.encode`` alone on pre-decoded device tensors (after warm-up)."""
    codec = fmt.load_codec(vae, device, dtype)
    items = _sources.enumerate_inputs([str(images)])[:n]
    pixels = np.stack([_sources.load_item(i, resolution, resolution).pixels for i in items])
    x = torch.from_numpy(pixels).to(device).permute(0, 3, 1, 2).to(dtype, memory_format=torch.contiguous_format)
    x = x.div(127.5).sub(1.0)  # (n, 3, H, W) in [-1, 1], laid out as the builder's batches are
    batches = list(x.split(batch))
    codec.encode(batches[0])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = 0.0
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        for b in batches:
            codec.encode(b)
        sync()
        best = max(best, len(x) / (time.perf_counter() - t0))
    return best


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--image-size", type=int, default=320, help="short side of the generated JPEGs")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--vae", default=None, help="diffusers VAE directory (default: a small random AutoencoderKL)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--repeats", type=int, default=2, help="timed runs of each side; the best of each is used")
    args = p.parse_args(argv)
    device, dtype = build_shards.resolve_device(args.device, args.dtype)
    with tempfile.TemporaryDirectory(prefix="bench_build_shards_") as tmp:
        tmp_path = Path(tmp)
        vae = args.vae or str(save_small_kl(tmp_path / "vae"))
        write_images(tmp_path / "images", args.images, args.image_size)
        write_images(tmp_path / "warmup", args.batch_size, args.image_size, seed=1)

        def build(images: Path, out: Path) -> float:
            t0 = time.perf_counter()
            rc = build_shards.main([str(images), "--output", str(out), "--vae", vae,
                                    "--resolution", str(args.resolution), "--batch-size", str(args.batch_size),
                                    "--workers", str(args.workers), "--samples-per-shard", str(4 * args.batch_size),
                                    "--device", str(device), "--dtype", str(dtype).removeprefix("torch."),
                                    "--min-size", "1", "--no-progress"])
            if rc != 0:
                raise SystemExit("benchmark: the builder failed")
            return time.perf_counter() - t0

        build(tmp_path / "warmup", tmp_path / "warmup_shards")  # one batch, untimed: like the encoder's warm-up
        # Best of N: the machine may be shared; both sides get the same treatment.
        builder_s = min(build(tmp_path / "images", tmp_path / f"shards{rep}") for rep in range(args.repeats))
        builder = args.images / builder_s
        encoder = encoder_only(vae, tmp_path / "images", args.images, args.resolution, args.batch_size, device, dtype,
                               args.repeats)
    ratio = builder / encoder
    rows = [("device", f"{device} {str(dtype).removeprefix('torch.')}, {torch.get_num_threads()} threads"),
            ("VAE", args.vae or "random AutoencoderKL 32-64-128-128"),
            ("images", f"{args.images} JPEGs ~{args.image_size} px -> {args.resolution} px, batch {args.batch_size}, "
                       f"{args.workers} decode worker(s)"),
            ("builder (end to end)", f"{builder:.2f} images/s (best of {args.repeats}: {builder_s:.1f} s)"),
            ("encoder only", f"{encoder:.2f} images/s (best of {args.repeats})"),
            ("ratio", f"{ratio:.3f} (target >= 0.90)")]
    width = max(len(r[0]) for r in rows)
    print(f"| {'quantity'.ljust(width)} | value |")
    print(f"| {'-' * width} | ----- |")
    for name, value in rows:
        print(f"| {name.ljust(width)} | {value} |")
    print(f"build_shards_vs_encoder_only: {ratio:.3f}")
    return ratio


if __name__ == "__main__":
    main()
