"""The ``diffusion:`` config section: the image objective, its noise levels and loss weighting.

Kept apart from :mod:`lmfusion.config` (which re-exports it) so that file stays one screenful per section; the
objectives themselves live in :mod:`lmfusion.diffusion`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lmfusion.errors import UserError
from lmfusion.utils import literal_choices

__all__ = ["OBJECTIVES", "DiffusionConfig", "TimestepDensity", "TIMESTEP_DENSITIES"]


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


TIMESTEP_DENSITIES = ("uniform", "logit_normal")


@dataclass(frozen=True)
class TimestepDensity:
    """How caption-first images draw their noise level: ``kind`` 'uniform' (paper) or 'logit_normal'
    (``t/T = sigmoid(N(logit_mean, logit_std))``)."""

    kind: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in TIMESTEP_DENSITIES:
            raise UserError(f"timestep density must be one of {TIMESTEP_DENSITIES}, got {self.kind!r}")
        if not self.logit_std > 0:
            raise UserError(f"timestep logit_std must be > 0, got {self.logit_std}")


Objective = Literal["epsilon", "v_prediction", "flow"]
OBJECTIVES = literal_choices(Objective)


@dataclass
class DiffusionConfig:
    """The image objective (:mod:`lmfusion.diffusion`). Paper: epsilon, uniform noise levels, no loss weighting."""

    objective: Objective = "epsilon"
    """What the image head predicts: 'epsilon' (the noise, cosine DDPM; paper), 'v_prediction' (sqrt(abar) eps -
    sqrt(1 - abar) x0, same schedule) or 'flow' (rectified flow x_s = (1 - s) x0 + s eps, velocity eps - x0).
    Checkpoints record it; generation uses its samplers (ddpm/ddim; flow: euler)."""
    timestep_density: Literal["uniform", "logit_normal"] = "uniform"
    """Noise levels of caption-first images: 'uniform' (paper) or 'logit_normal' (t/T or s = sigmoid(N(mean, std)),
    Stable Diffusion 3's; a positive mean weights the loss toward high noise, where the caption matters).
    Formerly ``train.timestep_density`` (still read)."""
    timestep_logit_mean: float = 0.0
    timestep_logit_std: float = 1.0
    flow_shift: float = 1.0
    """flow only: SD3's / BAGEL's timestep shift s -> shift s / (1 + (shift - 1) s) of training draws and of the
    sampler's schedule (> 1: more time at high noise; SD3 uses 3 at 1024 px)."""
    loss_weighting: Literal["none", "min_snr"] = "none"
    """'min_snr': Min-SNR-gamma (Hang et al. 2023), per objective (:func:`lmfusion.diffusion.loss_weights`)."""
    min_snr_gamma: float = 5.0

    def __post_init__(self) -> None:
        for name, allowed in (("objective", OBJECTIVES), ("timestep_density", ("uniform", "logit_normal")),
                              ("loss_weighting", ("none", "min_snr"))):
            _check(getattr(self, name) in allowed,
                   f"diffusion.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        _check(self.timestep_logit_std > 0, f"diffusion.timestep_logit_std must be > 0, got {self.timestep_logit_std}")
        _check(self.flow_shift > 0, f"diffusion.flow_shift must be > 0, got {self.flow_shift}")
        _check(self.flow_shift == 1.0 or self.objective == "flow",
               f"diffusion.flow_shift={self.flow_shift} applies to diffusion.objective=flow only (got "
               f"{self.objective!r})")
        _check(self.min_snr_gamma > 0, f"diffusion.min_snr_gamma must be > 0, got {self.min_snr_gamma}")

    @property
    def density(self):
        """The caption-first noise-level density (:class:`TimestepDensity`)."""
        return TimestepDensity(self.timestep_density, self.timestep_logit_mean, self.timestep_logit_std)
