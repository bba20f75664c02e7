"""The quickstart's latent space: a small diffusers ``AutoencoderKL`` trained once on the real training images and
cached, so shards hold VAE latents (as in the paper) instead of pixels.

Why a VAE and not pixels (measured, see examples/README.md): in a 160-step quickstart run the diffusion
model sees ~2,400 images. In pixel space (3 x 32 x 32) that did not even learn the unconditional prior (feature FID
439, real images 9.3); on 4 x 8 x 8 latents (12x fewer numbers to predict, and a decoder that renders every latent
near its training set as a smooth garment) the same run reaches 186. Training the VAE costs ~100 s once per machine
(cached like the judge); the judge classifies its reconstructions of test images at 0.84 (originals 0.89).

The latent is scaled to unit standard deviation (``scaling_factor`` = 1 / std of the training latents, the Stable
Diffusion convention), and the largest absolute scaled value seen on the training set is recorded next to the
weights (``latent_range.json``): samplers clip their x0 estimates to it
(:func:`lmfusion.inference.image.latent_range`).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

__all__ = ["VAE_CONFIG", "to_pixels", "train_vae", "load_or_train"]

#: 32 px RGB -> 4 x 8 x 8: three encoder blocks (two halvings), no mid-block attention (8 x 8 needs none).
VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=32, layers_per_block=1, norm_num_groups=8,
    block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3, mid_block_add_attention=False,
)
KL_WEIGHT = 1e-4  # per latent element, relative to the per-pixel MSE: a smooth latent, sharp reconstructions


def to_pixels(images: np.ndarray, resolution: int = 32) -> torch.Tensor:
    """uint8 (n, H, W) grey -> (n, 3, resolution, resolution) float32 in [-1, 1], with the shard builder's
    preprocessing (:func:`lmfusion.data.preprocess.square_pixels`), so the VAE trains on what it encodes."""
    from PIL import Image

    from lmfusion.data.preprocess import square_pixels

    out = np.empty((len(images), resolution, resolution, 3), dtype=np.uint8)
    for i, im in enumerate(images):
        out[i] = square_pixels(Image.fromarray(im), resolution)[0]
    return torch.from_numpy(out).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_vae(pixels: torch.Tensor, *, epochs: int = 2, batch_size: int = 64, lr: float = 2e-3, seed: int = 0):
    """A fresh AutoencoderKL (:data:`VAE_CONFIG`) fitted to ``pixels`` (n, 3, H, W) in [-1, 1]: MSE + KL."""
    from diffusers import AutoencoderKL

    from lmfusion.progress import progress

    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    steps = epochs * ((len(pixels) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(seed)
    vae.train()
    bar = progress(total=steps, desc="VAE", leave=False)
    for _ in range(epochs):
        order = torch.randperm(len(pixels), generator=gen)
        for i in range(0, len(pixels), batch_size):
            x = pixels[order[i:i + batch_size]]
            dist = vae.encode(x).latent_dist
            z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen)
            rec = torch.nn.functional.mse_loss(vae.decode(z).sample, x)
            kl = 0.5 * (dist.mean.pow(2) + dist.var - 1.0 - dist.logvar).mean()
            loss = rec + KL_WEIGHT * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            if bar.n % 50 == 0:
                bar.set_postfix(rec=f"{rec.item():.4f}", kl=f"{kl.item():.2f}")
    bar.close()
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def _latent_means(vae, pixels: torch.Tensor, batch: int = 500) -> torch.Tensor:
    return torch.cat([vae.encode(pixels[i:i + batch]).latent_dist.mean for i in range(0, len(pixels), batch)])


def load_or_train(ds, cache_dir: Path, log: Callable[[str], None] = print, *, train_images: int = 10000,
                  epochs: int = 2, resolution: int = 32, seed: int = 0) -> tuple[Path, dict]:
    """The cached VAE directory of dataset ``ds`` (a diffusers ``AutoencoderKL`` with ``save_pretrained`` files),
    trained on a balanced subset of its training images if missing; returns (directory, info). ``seed`` sets the
    subset and the training draw (a non-zero seed is part of the cache key)."""
    from lmfusion.inference.image import LATENT_RANGE_FILE
    from lmfusion.quickstart.data import balanced_indices

    key = f"{ds.name}-vae-{resolution}px-{train_images}img-e{epochs}" + (f"-s{seed}" if seed else "")
    out = cache_dir / key
    info_path = out / "lmfusion_vae.json"
    if info_path.is_file() and (out / LATENT_RANGE_FILE).is_file():
        info = json.loads(info_path.read_text())
        log(f"VAE: {out} (cached; reconstruction MSE {info['test_reconstruction_mse']:.4f})")
        return out, info
    idx = balanced_indices(ds.train_labels, train_images // len(ds.classes), seed=5 + seed)
    log(f"VAE: training a small AutoencoderKL on {len(idx)} real {ds.name} images ({epochs} epochs, once)")
    t0 = time.perf_counter()
    pixels = to_pixels(ds.train_images[idx], resolution)
    vae = train_vae(pixels, epochs=epochs, seed=seed)
    means = _latent_means(vae, pixels)
    scaling = float(1.0 / means.std())
    test = to_pixels(ds.test_images[:2000], resolution)
    with torch.no_grad():
        recon = vae.decode(_latent_means(vae, test)).sample.clamp(-1, 1)
    info = {"dataset": ds.name, "train_images": len(idx), "epochs": epochs, "seed": seed, "scaling_factor": scaling,
            "test_reconstruction_mse": float(torch.nn.functional.mse_loss(recon, test)),
            "train_seconds": time.perf_counter() - t0}
    vae.register_to_config(scaling_factor=scaling)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(tmp, safe_serialization=True)
    (tmp / LATENT_RANGE_FILE).write_text(json.dumps({"abs_max": float((means * scaling).abs().max())}) + "\n")
    (tmp / "lmfusion_vae.json").write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    log(f"VAE: test reconstruction MSE {info['test_reconstruction_mse']:.4f} in {info['train_seconds']:.0f} s "
        f"-> {out}")
    return out, info
