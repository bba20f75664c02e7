"""The shard builder's image preprocessing, for everything that must see an image as training did.

RGB (transparency composited on white), the largest centred square, a bicubic resize to ``size x size``: the
builder (``data_tools/build_shards.py``) stores latents of exactly this, so captioning an image
(:func:`lmfusion.inference.image.load_image`) and the quickstart's VAE training (:mod:`lmfusion.quickstart.vae`)
call the same function.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["center_crop_box", "to_rgb", "square_pixels"]


def center_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The largest centred square, (left, top, right, bottom) in source pixels."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB; transparent images are composited on white (dropping alpha would expose arbitrary hidden colours)."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def square_pixels(img: Image.Image, size: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """``img`` preprocessed: (size, size, 3) uint8, and the crop box it was cut from (source pixels)."""
    box = center_crop_box(*img.size)
    out = to_rgb(img).resize((size, size), Image.Resampling.BICUBIC, box=box)
    return np.asarray(out, dtype=np.uint8), box
