"""The engine factory, above both engines: :class:`~lmfusion.training.trainer.Trainer` (megatron: DDP, distributed
optimizer, pipeline schedules) or :class:`~lmfusion.training.deepspeed_engine.DeepSpeedTrainer` (ZeRO), which
overrides the trainer's engine hooks only. Neither engine module imports this one, so there is no import cycle."""

from __future__ import annotations

from typing import Any, Optional

from lmfusion.config import Config
from lmfusion.training.trainer import Trainer

__all__ = ["build_trainer"]


def build_trainer(cfg: Config, loader: Optional[Any] = None) -> Trainer:
    """The trainer of ``cfg.engine``. ``loader``: as :class:`~lmfusion.training.trainer.Trainer`'s."""
    if cfg.engine == "deepspeed":
        from lmfusion.training.deepspeed_engine import DeepSpeedTrainer  # imports deepspeed only when it builds

        return DeepSpeedTrainer(cfg, loader)
    return Trainer(cfg, loader)
