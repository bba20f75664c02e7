"""``lmfusion plot RUN_DIR``: loss curves of ``metrics.jsonl`` as a PNG, drawn with Pillow (no plotting library).

Three panels side by side: total loss, LM loss, diffusion loss, each against the step, with min/max labels on the
y axis and the step range on the x axis.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from lmfusion.errors import UserError
from lmfusion.training.metrics import read_metrics

__all__ = ["plot_losses"]

_PANELS = (("loss", "total loss", (31, 119, 180)), ("lm_loss", "LM loss", (44, 160, 44)),
           ("diffusion_loss", "diffusion loss", (214, 39, 40)))
_W, _H, _PAD = 420, 300, 48


def _panel(draw, x0: int, steps: list[int], values: list[float], title: str, color) -> None:
    from PIL import ImageFont

    font = ImageFont.load_default()
    left, top, right, bottom = x0 + _PAD, _PAD // 2 + 14, x0 + _W - 12, _H - _PAD
    draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    draw.text((left, 4), title, fill=(0, 0, 0), font=font)
    pts = [(s, v) for s, v in zip(steps, values) if v is not None and math.isfinite(v)]
    if not pts:
        draw.text((left + 8, top + 8), "no finite values", fill=(0, 0, 0), font=font)
        return
    s0, s1 = min(s for s, _ in pts), max(s for s, _ in pts)
    lo, hi = min(v for _, v in pts), max(v for _, v in pts)
    if hi == lo:
        lo, hi = lo - 0.5, hi + 0.5
    sx = (right - left) / max(s1 - s0, 1)
    sy = (bottom - top) / (hi - lo)
    xy = [(left + (s - s0) * sx, bottom - (v - lo) * sy) for s, v in pts]
    if len(xy) == 1:
        draw.ellipse([xy[0][0] - 2, xy[0][1] - 2, xy[0][0] + 2, xy[0][1] + 2], fill=color)
    else:
        draw.line(xy, fill=color, width=2)
    draw.text((x0 + 2, top - 4), f"{hi:.4g}", fill=(0, 0, 0), font=font)
    draw.text((x0 + 2, bottom - 8), f"{lo:.4g}", fill=(0, 0, 0), font=font)
    draw.text((left, bottom + 4), f"step {s0}", fill=(0, 0, 0), font=font)
    draw.text((right - 60, bottom + 4), f"step {s1}", fill=(0, 0, 0), font=font)


def plot_losses(run_dir: str | Path, output: Optional[str | Path] = None) -> Path:
    """Write the loss-curve PNG of a run (default ``RUN_DIR/loss.png``); returns its path."""
    from PIL import Image, ImageDraw

    records = read_metrics(run_dir)
    if not records:
        raise UserError(f"{Path(run_dir) / 'metrics.jsonl'}: empty; nothing to plot")
    steps = [int(r["step"]) for r in records]
    image = Image.new("RGB", (_W * len(_PANELS), _H), "white")
    draw = ImageDraw.Draw(image)
    for i, (key, title, color) in enumerate(_PANELS):
        _panel(draw, i * _W, steps, [r.get(key) for r in records], title, color)
    out = Path(output) if output is not None else Path(run_dir) / "loss.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    image.save(tmp, format="PNG")
    tmp.replace(out)
    return out
