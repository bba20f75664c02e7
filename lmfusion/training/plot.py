"""``lmfusion plot RUN_DIR [RUN_DIR ...]``: curves of ``metrics.jsonl`` as a PNG, drawn with Pillow (no plotting
library).

One panel per metric (default: total loss, LM loss, diffusion loss), each against the step, with min/max labels on
the y axis and the step range on the x axis. Several runs share the panels, one colour per run with a legend: the
way to compare ablations (examples/ablations.md), e.g. LM loss (text) and diffusion loss (images) of nine runs.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

from lmfusion.errors import UserError
from lmfusion.training.metrics import read_metrics

__all__ = ["plot_losses", "plot_runs", "DEFAULT_METRICS"]

DEFAULT_METRICS = ("loss", "lm_loss", "diffusion_loss")
_TITLES = {"loss": "total loss", "lm_loss": "LM loss", "diffusion_loss": "diffusion loss"}
#: one colour per run (a single run keeps one colour per panel, as before)
_COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75),
            (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
_W, _H, _PAD, _LEGEND_ROW = 420, 300, 48, 14


def _panel(draw, x0: int, curves: list[tuple[list[tuple[int, float]], tuple[int, int, int]]], title: str) -> None:
    from PIL import ImageFont

    font = ImageFont.load_default()
    left, top, right, bottom = x0 + _PAD, _PAD // 2 + 14, x0 + _W - 12, _H - _PAD
    draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    draw.text((left, 4), title, fill=(0, 0, 0), font=font)
    every = [p for pts, _ in curves for p in pts]
    if not every:
        draw.text((left + 8, top + 8), "no finite values", fill=(0, 0, 0), font=font)
        return
    s0, s1 = min(s for s, _ in every), max(s for s, _ in every)
    lo, hi = min(v for _, v in every), max(v for _, v in every)
    if hi == lo:
        lo, hi = lo - 0.5, hi + 0.5
    sx = (right - left) / max(s1 - s0, 1)
    sy = (bottom - top) / (hi - lo)
    for pts, colour in curves:
        xy = [(left + (s - s0) * sx, bottom - (v - lo) * sy) for s, v in pts]
        if len(xy) == 1:
            draw.ellipse([xy[0][0] - 2, xy[0][1] - 2, xy[0][0] + 2, xy[0][1] + 2], fill=colour)
        elif xy:
            draw.line(xy, fill=colour, width=2)
    draw.text((x0 + 2, top - 4), f"{hi:.4g}", fill=(0, 0, 0), font=font)
    draw.text((x0 + 2, bottom - 8), f"{lo:.4g}", fill=(0, 0, 0), font=font)
    draw.text((left, bottom + 4), f"step {s0}", fill=(0, 0, 0), font=font)
    draw.text((right - 60, bottom + 4), f"step {s1}", fill=(0, 0, 0), font=font)


def _points(records: list[dict], key: str) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r[key])) for r in records
            if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]


def plot_runs(run_dirs: Sequence[str | Path], output: str | Path, metrics: Sequence[str] = DEFAULT_METRICS,
              labels: Optional[Sequence[str]] = None) -> Path:
    """One PNG with a panel per metric and a curve per run (legend below, ``labels`` default: the directory
    names). A metric no run logged is an error naming it and the keys there are."""
    from PIL import Image, ImageDraw, ImageFont

    runs = [Path(r) for r in run_dirs]
    if not runs:
        raise UserError("lmfusion plot: no run directory given")
    labels = list(labels) if labels is not None else [r.name or str(r) for r in runs]
    if len(labels) != len(runs):
        raise UserError(f"--labels has {len(labels)} names for {len(runs)} run directories")
    if len(runs) > len(_COLOURS):
        raise UserError(f"lmfusion plot: {len(runs)} runs; at most {len(_COLOURS)} fit one plot")
    records = []
    for run in runs:
        rs = read_metrics(run)
        if not rs:
            raise UserError(f"{run / 'metrics.jsonl'}: empty; nothing to plot")
        records.append(rs)
    for key in metrics:
        if not any(key in r for rs in records for r in rs):
            known = sorted({k for rs in records for r in rs for k, v in r.items() if isinstance(v, (int, float))})
            raise UserError(f"metric {key!r}: logged by none of the runs; expected one of {', '.join(known)}")
    single = len(runs) == 1
    legend = 0 if single else _LEGEND_ROW * len(runs) + 8
    image = Image.new("RGB", (_W * len(metrics), _H + legend), "white")
    draw = ImageDraw.Draw(image)
    for i, key in enumerate(metrics):
        curves = [(_points(rs, key), _COLOURS[(i if single else j) % len(_COLOURS)]) for j, rs in enumerate(records)]
        _panel(draw, i * _W, curves, _TITLES.get(key, key))
    if not single:
        font = ImageFont.load_default()
        for j, label in enumerate(labels):
            y = _H + 4 + j * _LEGEND_ROW
            draw.rectangle([_PAD, y + 3, _PAD + 20, y + 7], fill=_COLOURS[j])
            draw.text((_PAD + 28, y), label, fill=(0, 0, 0), font=font)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    image.save(tmp, format="PNG")
    tmp.replace(out)
    return out


def plot_losses(run_dir: str | Path, output: Optional[str | Path] = None) -> Path:
    """Write the loss-curve PNG of one run (default ``RUN_DIR/loss.png``); returns its path."""
    return plot_runs([run_dir], output if output is not None else Path(run_dir) / "loss.png")
