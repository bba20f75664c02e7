"""``train.ema``: the exponential moving average of the trainable weights, its settings and decay schedule.

The schedule is diffusers' ``EMAModel.get_decay`` (the reference the tests compare against): after the ``n``-th
successful optimizer step the average moves by ``ema <- decay * ema + (1 - decay) * weights`` with

    s = max(0, n - update_after_step - 1)
    decay = 0                                        s == 0 (the first update copies the weights)
          = 1 - (1 + s / inv_gamma) ** -power        ramp: power      (diffusers use_ema_warmup=True)
          = (1 + s) / (10 + s)                       ramp: hyperbolic (diffusers use_ema_warmup=False)
    decay = max(min_decay, min(decay, max decay))

With ``power`` 2/3 the decay reaches 0.999 after ~31.6k steps (diffusers' advice for long runs); 3/4 for short ones.
The average itself is kept sharded like the optimizer state (:mod:`lmfusion.training.ema`).
"""

from __future__ import annotations

from dataclasses import dataclass

from lmfusion.errors import UserError

__all__ = ["EmaConfig", "ema_decay", "RAMPS", "WEIGHTS"]

RAMPS = ("power", "hyperbolic")

WEIGHTS = ("ema", "raw")
"""``--weights`` choices of generation and evaluation."""


@dataclass
class EmaConfig:
    """``train.ema``: an exponential moving average of the trainable weights (off by default; the paper has none)."""

    enabled: bool = False
    """Keep the average (each data-parallel rank: only its distributed-optimizer shard), checkpoint and export it;
    generation and evaluation then use it unless ``--weights raw``."""
    decay: float = 0.9999
    """The largest decay (diffusers ``decay``)."""
    min_decay: float = 0.0
    """The smallest decay after the first update (diffusers ``min_decay``)."""
    update_after_step: int = 0
    """Optimizer steps during which the average only copies the weights (diffusers ``update_after_step``)."""
    ramp: str = "power"
    """How the decay rises to ``decay``: 'power', ``1 - (1 + s / inv_gamma) ** -power`` (diffusers
    ``use_ema_warmup=True``), or 'hyperbolic', ``(1 + s) / (10 + s)`` (``use_ema_warmup=False``)."""
    inv_gamma: float = 1.0
    """Warm-up time scale (diffusers ``inv_gamma``)."""
    power: float = 2 / 3
    """Warm-up exponent (diffusers ``power``)."""

    def __post_init__(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise UserError(f"train.ema.{message}")

        check(self.ramp in RAMPS, f"ramp must be one of {RAMPS}, got {self.ramp!r}")
        check(0.0 <= self.decay < 1.0, f"decay must be in [0, 1), got {self.decay}")
        check(0.0 <= self.min_decay <= self.decay, f"min_decay must be in [0, train.ema.decay={self.decay}], got "
              f"{self.min_decay}")
        check(self.update_after_step >= 0, f"update_after_step must be >= 0, got {self.update_after_step}")
        check(self.inv_gamma > 0, f"inv_gamma must be > 0, got {self.inv_gamma}")
        check(self.power > 0, f"power must be > 0, got {self.power}")


def ema_decay(cfg: EmaConfig, optimization_step: int) -> float:
    """The decay of the ``optimization_step``-th update (counting from 1), as diffusers' ``EMAModel.get_decay``."""
    step = max(0, optimization_step - cfg.update_after_step - 1)
    if step <= 0:
        return 0.0
    if cfg.ramp == "power":
        value = 1 - (1 + step / cfg.inv_gamma) ** -cfg.power
    else:
        value = (1 + step) / (10 + step)
    return max(min(value, cfg.decay), cfg.min_decay)
