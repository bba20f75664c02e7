"""``lmfusion plot``: one or several runs' metrics.jsonl as panels of curves (pixels checked, not just a file)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from lmfusion.training import plot as plot_mod
from lmfusion.training.plot import plot_runs


def _run(tmp_path, name: str, losses: list[float], extra_key: str | None = None):
    run = tmp_path / name
    run.mkdir()
    rows = [{"step": i + 1, "loss": v, "lm_loss": v / 2, "diffusion_loss": v / 3, **({extra_key: v} if extra_key
                                                                                     else {})}
            for i, v in enumerate(losses)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def _has_colour(region: np.ndarray, colour) -> bool:
    return bool((region == np.array(colour, np.uint8)).all(-1).any())


def test_several_runs_share_panels_one_colour_each_with_a_legend(tmp_path):
    runs = [_run(tmp_path, f"r{i}", [4.0 - i - 0.1 * s for s in range(10)]) for i in range(3)]
    out = plot_runs(runs, tmp_path / "cmp.png", ["lm_loss", "diffusion_loss"], ["deep", "shallow", "none"])
    pixels = np.asarray(Image.open(out).convert("RGB"))
    w, h = plot_mod._W, plot_mod._H
    assert pixels.shape[1] == 2 * w and pixels.shape[0] > h  # two panels, a legend row per run below them
    for panel in range(2):
        region = pixels[:h, panel * w:(panel + 1) * w]
        for j in range(3):
            assert _has_colour(region, plot_mod._COLOURS[j]), (panel, j)
        assert not _has_colour(region, plot_mod._COLOURS[3])
    legend = pixels[h:]
    assert all(_has_colour(legend, plot_mod._COLOURS[j]) for j in range(3))


def test_one_run_keeps_its_default_file_and_a_colour_per_panel(tmp_path):
    run = _run(tmp_path, "one", [3.0, 2.0, 1.5])
    out = plot_mod.plot_losses(run)
    assert out == run / "loss.png"
    pixels = np.asarray(Image.open(out).convert("RGB"))
    assert pixels.shape[:2] == (plot_mod._H, 3 * plot_mod._W)
    for i in range(3):
        assert _has_colour(pixels[:, i * plot_mod._W:(i + 1) * plot_mod._W], plot_mod._COLOURS[i])


def test_errors_name_the_metric_and_the_labels(tmp_path):
    a, b = _run(tmp_path, "a", [1.0, 0.5], extra_key="text_ppl"), _run(tmp_path, "b", [1.0, 0.4])
    with pytest.raises(Exception, match="metric 'hellaswag': logged by none of the runs; expected one of .*text_ppl"):
        plot_runs([a, b], tmp_path / "x.png", ["hellaswag"])
    plot_runs([a, b], tmp_path / "y.png", ["text_ppl"])  # logged by one run: drawn for it
    with pytest.raises(Exception, match="--labels has 1 names for 2 run directories"):
        plot_runs([a, b], tmp_path / "z.png", labels=["only"])
    cli = subprocess.run([sys.executable, "-m", "lmfusion.cli", "plot", str(a), str(b)], capture_output=True,
                         text=True)
    assert cli.returncode != 0 and "several run directories need --output PNG" in cli.stderr, cli.stderr
    cli = subprocess.run([sys.executable, "-m", "lmfusion.cli", "plot", str(a), str(b), "--output",
                          str(tmp_path / "ok.png"), "--metrics", "lm_loss,diffusion_loss", "--labels", "a,b"],
                         capture_output=True, text=True)
    assert cli.returncode == 0 and (tmp_path / "ok.png").is_file(), cli.stderr
