"""Text -> image (diffusion sampling with classifier-free guidance) and image -> text (captioning).

Sampling (Transfusion/LMFusion): the prompt ``<bos> caption <boi>`` is computed once into a KV cache; at every
denoising step the image positions run against that cache without joining it (``commit=False``), with
``image_latents = x_t`` and ``image_timesteps = t``; the model's ``noise_pred`` is what its objective predicts
(``diffusion.objective``, recorded in the checkpoint: epsilon, v or the flow velocity) and a diffusers scheduler for
that objective steps ``x_t`` (:mod:`lmfusion.diffusion`: DDPM, default 250 steps, or DDIM for epsilon and v;
``FlowMatchEulerDiscreteScheduler``, "euler", default 50 steps, for flow). A sampler that does not fit the
objective is refused. Image tokens attend each other bidirectionally and the whole prefix.

Classifier-free guidance: the unconditional branch is the prompt with an empty caption, ``<bos> <boi>``, exactly what
caption dropout trains; ``pred = uncond + scale * (cond - uncond)`` (:func:`lmfusion.diffusion.cfg_combine`, default
scale 1.6). The two branches keep separate caches and run as two forwards per step (one extra launch): the
conditional prefix can then be a chat's own cache (:mod:`lmfusion.inference.chat`), and the conditional prediction
does not depend on whether guidance runs (scale 1 equals the conditional-only sample bit for bit).

After sampling, :func:`commit_image` appends the clean latent at t=0 and ``<eoi>``, as training lays a clean image
out, so text can continue after it.

Each step's x0 estimate is clipped to the data's range (:func:`latent_range`: [-1, 1] for pixels, the training
latents' largest magnitude for a VAE that records it); without it the cosine schedule's first step amplifies the
noise prediction's error ~2e4-fold (:mod:`lmfusion.diffusion`). For flow the implied ``x0 = x_s - s v`` is clipped
and ``v`` re-derived (:func:`lmfusion.diffusion.sampler_step`).

Latents are the shard set's: scaled VAE latents (``lmfusion.data.shard_format``), decoded by the VAE named in the shard
manifest, or pixels in [-1, 1] for the identity VAE. Images for captioning get the shard builder's preprocessing
(RGB on white, centre crop, bicubic resize) and the VAE mean (no sampling).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from lmfusion.config import DiffusionConfig
from lmfusion.diffusion import (cfg_combine, check_sampler, default_sampler, initial_noise_sigma, make_sampler,
                                sampler_step)
from lmfusion.errors import UserError
from lmfusion.inference.text import Image, SamplingParams, Session, generate_text

__all__ = ["DEFAULT_CFG_SCALE", "DEFAULT_STEPS", "LATENT_RANGE_FILE", "latent_range", "denoise", "commit_image",
           "unconditional_session", "text_to_image", "edit_image", "check_vae", "vae_scale_factor", "check_image_file",
           "read_rgb", "load_image", "encode_image", "caption_image", "to_pil", "make_grid", "save_images"]

DEFAULT_CFG_SCALE = 1.6
DEFAULT_STEPS = {"ddpm": 250, "ddim": 50, "euler": 50}
#: Optional file in a VAE directory: ``{"abs_max": float}``, the largest |scaled latent| of its training data.
LATENT_RANGE_FILE = "latent_range.json"


def latent_range(codec) -> Optional[float]:
    """The range samplers clip x0 estimates to: 1.0 for pixels (identity), the VAE directory's
    :data:`LATENT_RANGE_FILE` value when it has one, else None (no clipping)."""
    import json

    if codec.model is None:
        return 1.0
    path = Path(codec.path) / LATENT_RANGE_FILE
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))["abs_max"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{path}: expected a JSON object with a positive number under 'abs_max' ({e})") from e
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise UserError(f"{path}: 'abs_max' must be a positive number, got {value!r}")
    return float(value)


def _predict(session: Session, x: Tensor, t: Tensor) -> Tensor:
    """The model's prediction (n, C, H, W) float32 for latents ``x`` at timestep ``t`` (a DDPM step, or 1000 s for
    flow), against the session's cache."""
    rows = [[Image(x[i], t.item())] for i in range(x.shape[0])]
    return session.extend(rows, commit=False).noise_pred.float()


@torch.no_grad()
def denoise(cond: Session, uncond: Optional[Session], *, sampler: Optional[str] = None,
            steps: Optional[int] = None, cfg_scale: float = DEFAULT_CFG_SCALE,
            generator: Optional[torch.Generator] = None, clip_x0: Optional[float] = None,
            diffusion: Optional[DiffusionConfig] = None) -> Tensor:
    """Sample one clean latent per row of ``cond`` (its cache ends with ``<boi>``); ``uncond`` (same rows, ending
    with ``<boi>`` too) adds classifier-free guidance at ``cfg_scale``; x0 estimates are clipped to
    ``[-clip_x0, clip_x0]`` (:func:`latent_range`; None: unclipped). ``diffusion``: the model's objective (the
    checkpoint's, ``InferenceModel.diffusion``; default epsilon); ``sampler``: one of its samplers (default: its
    first, ddpm or euler). Returns (n, C, H, W) float32."""
    n = cond.batch_size
    diffusion = diffusion if diffusion is not None else DiffusionConfig()
    sampler = sampler if sampler is not None else default_sampler(diffusion.objective)
    if sampler not in DEFAULT_STEPS:
        raise UserError(f"sampler must be one of {sorted(DEFAULT_STEPS)}, got {sampler!r}")
    check_sampler(sampler, diffusion.objective)
    if uncond is not None and uncond.batch_size != n:
        raise ValueError(f"unconditional branch has {uncond.batch_size} rows, conditional {n}")
    scheduler = make_sampler(sampler, steps if steps is not None else DEFAULT_STEPS[sampler], clip_x0=clip_x0,
                             diffusion=diffusion)
    # Initial noise from the CPU generator: the same seed gives the same images on any device.
    x = torch.randn((n, *cond.latent_shape), generator=generator, dtype=torch.float32).to(cond.device)
    x = x * initial_noise_sigma(scheduler)
    for t in scheduler.timesteps:
        pred = _predict(cond, x, t)
        if uncond is not None:
            pred = cfg_combine(pred, _predict(uncond, x, t), cfg_scale)
        x = sampler_step(scheduler, pred, t, x, clip_x0=clip_x0, generator=generator)
    return x


def commit_image(session: Session, latents: Tensor) -> Tensor:
    """Append each row's clean latent (t=0) and ``<eoi>`` to the cache; (b, V) logits of the token after ``<eoi>``."""
    eoi = session.model.model_config.eoi_token_id
    return session.next_logits([[Image(latents[i], 0), eoi] for i in range(latents.shape[0])])


def unconditional_session(model: torch.nn.Module, n: int) -> Session:
    """``<bos> <boi>`` (the dropped caption) for ``n`` rows."""
    cfg = model.model_config
    session = Session(model, n)
    session.extend([[cfg.bos_token_id, cfg.boi_token_id]] * n)
    return session


@torch.no_grad()
def text_to_image(model: torch.nn.Module, captions: Sequence[Sequence[int]], *, n_per_caption: int = 1,
                  sampler: Optional[str] = None, steps: Optional[int] = None,
                  cfg_scale: Optional[float] = DEFAULT_CFG_SCALE, seed: int = 0, clip_x0: Optional[float] = None,
                  diffusion: Optional[DiffusionConfig] = None) -> Tensor:
    """Latents (len(captions) * n_per_caption, C, H, W), caption-major. ``captions``: token ids without
    ``<bos>``/``<boi>``. ``cfg_scale=None`` samples from the conditional branch only; ``clip_x0``, ``sampler``,
    ``diffusion`` (the model's objective): see :func:`denoise`."""
    if n_per_caption < 1 or not captions:
        raise UserError(f"need at least one caption and n_per_caption >= 1, got {len(captions)} and {n_per_caption}")
    cfg = model.model_config
    rows = [[cfg.bos_token_id, *cap, cfg.boi_token_id] for cap in captions for _ in range(n_per_caption)]
    cond = Session(model, len(rows))
    cond.extend(rows)  # the text prefix, computed once
    uncond = None if cfg_scale is None else unconditional_session(model, len(rows))
    generator = torch.Generator().manual_seed(seed)
    return denoise(cond, uncond, sampler=sampler, steps=steps, cfg_scale=1.0 if cfg_scale is None else cfg_scale,
                   generator=generator, clip_x0=clip_x0, diffusion=diffusion)


@torch.no_grad()
def edit_image(model: torch.nn.Module, source: Tensor, instructions: Sequence[Sequence[int]], *,
               n_per_instruction: int = 1, sampler: Optional[str] = None, steps: Optional[int] = None,
               cfg_scale: Optional[float] = DEFAULT_CFG_SCALE, seed: int = 0, clip_x0: Optional[float] = None,
               diffusion: Optional[DiffusionConfig] = None) -> Tensor:
    """Image editing as trained (``SequenceBuilder.build_edit``): the prefix ``<bos> <boi> [source at t=0] <eoi>
    instruction <boi>`` is cached once and the target sampled after it. ``source``: (C, H, W) clean latent;
    guidance's unconditional branch drops the instruction but keeps the source (what instruction dropout trains).
    Returns (len(instructions) * n_per_instruction, C, H, W) float32, instruction-major."""
    if n_per_instruction < 1 or not instructions:
        raise UserError(f"need at least one instruction and n >= 1, got {len(instructions)} and {n_per_instruction}")
    cfg = model.model_config
    prefix = [cfg.bos_token_id, cfg.boi_token_id, Image(source, 0), cfg.eoi_token_id]
    rows = [[*prefix, *ins, cfg.boi_token_id] for ins in instructions for _ in range(n_per_instruction)]
    cond = Session(model, len(rows))
    cond.extend(rows)
    uncond = None
    if cfg_scale is not None:
        uncond = Session(model, len(rows))
        uncond.extend([[*prefix, cfg.boi_token_id]] * len(rows))
    generator = torch.Generator().manual_seed(seed)
    return denoise(cond, uncond, sampler=sampler, steps=steps, cfg_scale=1.0 if cfg_scale is None else cfg_scale,
                   generator=generator, clip_x0=clip_x0, diffusion=diffusion)


# ---------------------------------------------------------------------------------------------------- VAE side
def vae_scale_factor(codec) -> int:
    """Pixels per latent cell: 1 for pixels (identity), 2**(blocks - 1) for diffusers AutoencoderKL/Tiny."""
    if codec.model is None:
        return 1
    return 2 ** (len(codec.model.config.block_out_channels) - 1)


def check_vae(codec, model_config) -> None:
    """The VAE's latent channels must be the model's (identity: RGB pixels, 3)."""
    have = 3 if codec.model is None else int(codec.model.config.latent_channels)
    want = model_config.image.latent_channels
    if have != want:
        raise UserError(f"VAE {codec.vae_id} has {have} latent channels but the model takes {want}; pass the VAE "
                        f"the training shards were built with (--vae)")


@contextlib.contextmanager
def _image_errors(path: Path) -> Iterator[None]:
    """Pillow's failures on ``path`` as one-line user errors naming the file."""
    from PIL import Image as PILImage
    from PIL import UnidentifiedImageError

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    try:
        yield
    except UnidentifiedImageError:
        raise UserError(f"{path}: not an image Pillow can read") from None
    except (OSError, SyntaxError, EOFError, PILImage.DecompressionBombError) as e:
        raise UserError(f"{path}: unreadable image ({type(e).__name__}: {e})") from e


def check_image_file(path: str | Path) -> None:
    """Fail early (before a model loads) on a missing or unreadable image."""
    from PIL import Image as PILImage

    path = Path(path)
    with _image_errors(path), PILImage.open(path) as img:
        img.load()


def read_rgb(path: str | Path) -> Any:
    """The image at ``path`` as an RGB PIL image, upright (EXIF orientation applied), as transformers' ``load_image``
    gives a processor; unreadable files are one-line errors naming them."""
    from PIL import Image as PILImage
    from PIL import ImageOps

    path = Path(path)
    with _image_errors(path), PILImage.open(path) as img:
        img.load()
        return ImageOps.exif_transpose(img).convert("RGB")


def load_image(path: str | Path, size: int) -> Tensor:
    """(3, size, size) float32 in [-1, 1], preprocessed as the shard builder does."""
    from PIL import Image as PILImage
    from PIL import ImageOps

    from lmfusion.data.preprocess import square_pixels

    path = Path(path)
    with _image_errors(path), PILImage.open(path) as img:
        img.load()
        out, _ = square_pixels(ImageOps.exif_transpose(img), size)
    pixels = torch.from_numpy(np.array(out)).permute(2, 0, 1)  # (H, W, 3) uint8, writable copy -> (3, H, W)
    return pixels.float() / 127.5 - 1.0


def encode_image(codec, model_config, path: str | Path) -> Tensor:
    """Scaled latent (C, H, W) of the image at ``path``: the VAE mean (clean, as a caption's image is)."""
    img = model_config.image
    size = img.latent_size * vae_scale_factor(codec)
    mean, _ = codec.encode(load_image(path, size)[None].to(codec.device))
    want = (img.latent_channels, img.latent_size, img.latent_size)
    if tuple(mean.shape[1:]) != want:
        raise UserError(f"VAE {codec.vae_id} encodes a {size}px image to {tuple(mean.shape[1:])}, the model "
                        f"expects latents {want}; checkpoint and VAE mismatch")
    return mean[0]


@torch.no_grad()
def caption_image(model: torch.nn.Module, latent: Tensor, params: SamplingParams) -> list[int]:
    """Caption token ids for a clean latent: ``<bos> <boi> image <eoi>`` then text generation."""
    cfg = model.model_config
    return generate_text(model, [[cfg.bos_token_id, cfg.boi_token_id, Image(latent, 0), cfg.eoi_token_id]],
                         params)[0]


def to_pil(codec, latents: Tensor) -> list:
    """Decode latents (n, C, H, W) with the VAE (identity: pixels) into Pillow images."""
    from PIL import Image as PILImage

    images = codec.decode(latents.to(codec.device))  # (n, c, H, W) in [-1, 1]
    if images.shape[1] not in (1, 3):
        raise UserError(f"decoded images have {images.shape[1]} channels; need 1 or 3 to write PNGs (is the VAE "
                        f"the one the model was trained with?)")
    arr = ((images.float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    arr = arr.permute(0, 2, 3, 1).numpy()  # (n, H, W, c)
    return [PILImage.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arr]  # uint8: "L" or "RGB"


def make_grid(images: Sequence, cols: Optional[int] = None, pad: int = 2):
    """Images (same size) in a grid, ``cols`` per row (default: about square), ``pad`` pixels apart."""
    from PIL import Image as PILImage

    if not images:
        raise ValueError("no images to put in a grid")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = PILImage.new("RGB", (cols * w + (cols - 1) * pad, rows * h + (rows - 1) * pad), (255, 255, 255))
    for i, im in enumerate(images):
        grid.paste(im.convert("RGB"), ((i % cols) * (w + pad), (i // cols) * (h + pad)))
    return grid


def save_images(images: Sequence, grid_path: str | Path, cols: Optional[int] = None) -> list[Path]:
    """Write ``grid_path`` (the grid) and each image as ``<stem>-<i>.png`` beside it; returns all paths."""
    grid_path = Path(grid_path)
    if grid_path.suffix.lower() != ".png":
        raise UserError(f"--out {grid_path}: must end in .png")
    grid_path.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, im in enumerate(images):
        p = grid_path.with_name(f"{grid_path.stem}-{i:03d}.png")
        im.save(p, format="PNG")
        paths.append(p)
    make_grid(images, cols).save(grid_path, format="PNG")
    return [grid_path, *paths]
