"""The data section of the training config: which shard sets, how sequences are built, how batches are laid out."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from lmfusion.errors import UserError

__all__ = ["DataConfig"]


@dataclass
class DataConfig:
    """Multimodal loader settings. Batch sizes count packed rows (sequences of ``seq_length`` tokens)."""

    datasets: list[str] = field(default_factory=list)
    """Shard-set directories written by ``data_tools/build_shards.py`` (each holds a ``manifest.json``)."""
    weights: Optional[list[float]] = None
    """Blending weight per dataset (probability of drawing the next sample from it); default: equal."""
    tokenizer: str = ""
    """Local Hugging Face tokenizer directory of the base model (never downloaded)."""
    seq_length: int = 4096
    """Tokens per packed row."""
    micro_batch_size: int = 1
    """Rows per micro-batch."""
    global_batch_size: int = 1
    """Rows per optimizer step over all data-parallel ranks (= dp_size x micro_batch_size x grad. accumulation)."""
    streams: Optional[int] = None
    """Independent sample streams the global batch is drawn from (default: global_batch_size / micro_batch_size,
    one micro-batch per stream and step). Fixed for a run: resuming at another dp_size needs dp_size | streams."""
    caption_first_prob: float = 0.8
    """Probability of ``<bos> caption <boi> image <eoi> <eos>``; otherwise ``<bos> <boi> image <eoi> caption <eos>``."""
    caption_dropout: float = 0.1
    """Probability of an empty caption (classifier-free guidance's unconditional branch)."""
    seed: int = 0
    """Seeds every random choice: shard order, in-shard order, blending, layout, dropout, latent sampling."""
    num_workers: int = 1
    """DataLoader worker processes per rank (each owns whole streams); 0 reads in the training process."""
    prefetch_factor: int = 2
    """Micro-batches each worker prepares ahead."""
    max_consecutive_failures: int = 3
    """A stream that meets this many unreadable shards in a row stops training with an error."""
    verify_checksums: bool = True
    """Check each shard's sha256 against the manifest when it is opened (catches corruption the tar parser misses)."""
    vae: Optional[str] = None
    """Expected VAE of the latents: the manifest's ``vae.id``, ``vae.path`` or ``vae.weights_hash``; None: any VAE,
    as long as every blended set used the same one."""

    def __post_init__(self) -> None:
        if self.weights is not None:
            if len(self.weights) != len(self.datasets):
                raise UserError(f"data.weights has {len(self.weights)} entries for {len(self.datasets)} data.datasets")
            if any(w < 0 for w in self.weights) or not sum(self.weights) > 0:
                raise UserError(f"data.weights must be >= 0 with a positive sum, got {self.weights}")
        for name in ("caption_first_prob", "caption_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UserError(f"data.{name} must lie in [0, 1], got {getattr(self, name)}")
        if self.seed < 0:
            raise UserError(f"data.seed must be >= 0, got {self.seed}")
        for name in ("seq_length", "micro_batch_size", "global_batch_size", "max_consecutive_failures"):
            if getattr(self, name) < 1:
                raise UserError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0 or self.prefetch_factor < 1:
            raise UserError(f"data.num_workers must be >= 0 and data.prefetch_factor >= 1, got "
                            f"{self.num_workers} / {self.prefetch_factor}")
        if self.global_batch_size % self.micro_batch_size:
            raise UserError(f"data.global_batch_size {self.global_batch_size} is not a multiple of "
                            f"data.micro_batch_size {self.micro_batch_size}")
        if self.streams is not None:
            rows = self.global_batch_size // self.streams if self.streams > 0 else 0
            if self.streams < 1 or self.global_batch_size % self.streams or rows % self.micro_batch_size:
                raise UserError(f"data.streams {self.streams} must divide data.global_batch_size "
                                f"{self.global_batch_size} into a multiple of data.micro_batch_size "
                                f"{self.micro_batch_size} rows per stream")

    @property
    def blend_weights(self) -> list[float]:
        w = self.weights if self.weights is not None else [1.0] * len(self.datasets)
        return [x / sum(w) for x in w]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
