"""Training metrics: one console line per logged step, ``<run>/metrics.jsonl`` (one JSON object per step, used by
``lmfusion plot`` and tests) and TensorBoard scalars. Only global rank 0 writes; every rank computes the same values
(they come from collectives).

Throughput: ``tokens_per_s`` counts every position of the global batch (rows x seq_length). ``tflops_per_device`` is
the frozen-aware model FLOPs of the step's actual batches (:mod:`lmfusion.training.flops`) over the step time and the
number of devices; ``mfu`` divides it by the device's dense peak (``logging.peak_tflops`` or the datasheet value of a
known GPU; absent on CPU). ``loader_wait_s`` is the time the step waited on the data loader (mean over ranks).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Optional

from lmfusion.errors import UserError

__all__ = ["MetricsWriter", "read_metrics", "METRICS_FILE"]

METRICS_FILE = "metrics.jsonl"
_TB_KEYS = ("loss", "lm_loss", "diffusion_loss", "grad_norm", "lr", "tokens_per_s", "tflops_per_device", "mfu",
            "loader_wait_s", "step_time_s")


class MetricsWriter:
    def __init__(self, run_dir: Path, enabled: bool, tensorboard_dir: Optional[str], use_tensorboard: bool,
                 log_interval: int = 1):
        self.enabled, self.log_interval = enabled, log_interval
        self.path = Path(run_dir) / METRICS_FILE
        self._tb = None
        if enabled and use_tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise UserError(f"logging.tensorboard=true needs the tensorboard package (pip install "
                                f"tensorboard==2.21.0), or set logging.tensorboard=false ({e})") from None
            self._tb = SummaryWriter(log_dir=tensorboard_dir or str(Path(run_dir) / "tensorboard"))

    def truncate_after(self, iteration: int) -> None:
        """On resume: drop lines of steps after ``iteration`` (logged by a run that stopped before saving them)."""
        if not self.enabled or not self.path.is_file():
            return
        from lmfusion.utils import atomic_write_text

        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= iteration]
        atomic_write_text(self.path, "".join(line + "\n" for line in keep))

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key in _TB_KEYS:
                value = values.get(key)
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"train/{key}", value, step)
        if step % self.log_interval == 0:
            print(_console_line(record), file=sys.stdout, flush=True)

    def note(self, message: str) -> None:
        if self.enabled:
            print(f"lmfusion train: {message}", flush=True)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None


def _console_line(r: dict[str, Any]) -> str:
    parts = [f"step {r['step']}", f"loss {r['loss']:.5f}", f"lm {r['lm_loss']:.5f}", f"diff {r['diffusion_loss']:.5f}",
             f"gnorm {r['grad_norm']:.4f}", f"lr {r['lr']:.3e}", f"{r['tokens_per_s']:.0f} tok/s",
             f"{r['tflops_per_device']:.3g} TFLOP/s/dev"]
    if r.get("mfu") is not None:
        parts.append(f"MFU {100 * r['mfu']:.1f}%")
    parts.append(f"wait {r['loader_wait_s'] * 1000:.0f} ms")
    return " | ".join(parts)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every record of ``<run_dir>/metrics.jsonl`` (one per logged step, in order)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics (is {run_dir} a training run directory?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
