"""One training step's pieces: noising a loader batch, the forward step megatron's schedules call, and the loss.

* **Noise is keyed by sample, not by rank.** Each image's timestep and noise come from a generator seeded with
  (``train.seed``, the image's sample id ``dataset:key:epoch``): the same image gets the same noise whatever the
  TP/PP/DP layout, micro-batch size or resume point, so runs at different layouts are comparable and a resumed run
  continues bit for bit. (A batch without sample ids falls back to (seed, step, dp rank, micro-batch, image).)
  Every rank of a model replica (TP, PP) thus draws identical noise.
* **The objective** (``diffusion.objective``: epsilon, v_prediction, flow) decides the noise level's form, the
  model input and the target (:func:`lmfusion.diffusion.noise_and_target`); ``diffusion.loss_weighting: min_snr``
  weights each image's squared error (:func:`lmfusion.diffusion.loss_weights`). The paper's defaults take exactly
  the path they took before objectives were configurable (same draws, same arithmetic).
* **Loss normalisation per step.** Counts of LM targets and image tokens are summed over the step's micro-batches
  and the data-parallel group *before* the schedule runs (one all-reduce per step); each micro-batch contributes
  ``S_mb / N_step`` (``lmfusion.losses.total_loss`` with the step's global counts). The gradient is then that of the
  step's global token mean, independent of how rows are split into micro-batches and DP ranks: a run at DP=2 has the
  loss of the same run at DP=1. The schedule divides each micro-batch's loss by their number and DDP averages over
  DP, so the loss handed back is scaled by ``dp x num_microbatches`` (the DP factor undoes DDP's mean over ranks,
  the micro-batch factor the schedule's averaging).
* **Clean context images** (``Batch.image_noised`` False, e.g. an editing document's source) enter the model as
  their clean latent at timestep 0 and add nothing to the diffusion loss or its token count; their noise is still
  drawn (and discarded), so every other image's draw is unchanged.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from lmfusion.config import DiffusionConfig
from lmfusion.diffusion import loss_weights, noise_and_target, noise_levels
from lmfusion.losses import diffusion_loss, lm_loss, total_loss
from lmfusion.model.image_io import patchify
from lmfusion.model.model import LMFusionOutput, ModelInputs
from lmfusion.training.flops import TokenCounts, count_tokens

__all__ = ["MicroBatch", "image_noise", "prepare_micro_batch", "StepLoss", "sample_seed"]


@dataclass
class MicroBatch:
    """A loader batch made ready for the model: noised latents, (s, b) targets, the loss's inputs."""

    inputs: ModelInputs
    labels: Tensor
    """(s, b) next-token targets (megatron's layout, like the logits)."""
    loss_mask: Tensor
    """(s, b) 1 where the LM loss counts."""
    target: Optional[Tensor]
    """(n_img, C, H, W) what the image head regresses to (the noise for epsilon; v; the flow velocity), fp32."""
    loss_weight: Optional[Tensor]
    """(n_img,) per-image weight of the squared error (``diffusion.loss_weighting``), or None (unweighted)."""
    lm_tokens: int
    image_tokens: int
    counts: TokenCounts
    image_trained: Optional[Tensor] = None
    """(n_img,) bool: which images the diffusion loss counts (None: all of them)."""


def sample_seed(*parts: Any) -> int:
    digest = hashlib.blake2b("|".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def image_noise(batch, seed: int, fallback_key: tuple, cap: int,
                diffusion: Optional[DiffusionConfig] = None) -> tuple[Tensor, Tensor]:
    """(noise levels (n,), noise (n, C, H, W) fp32) for the batch's images; see the module docstring. Levels are
    DDPM steps (int64) or, for flow, ``s`` (float32): :func:`lmfusion.diffusion.noise_levels`."""
    n = batch.num_images
    ids = list(getattr(batch, "image_keys", None) or [])  # one key per image (multi-image and text-only documents)
    if len(ids) != n:
        ids = [s for row in (batch.sample_ids or []) for s in row]
    if len(ids) != n:
        ids = [(*fallback_key, j) for j in range(n)]
    shape = tuple(batch.image_latents.shape[1:])
    first = batch.image_first.bool().cpu()
    diffusion = diffusion if diffusion is not None else DiffusionConfig()
    level_dtype = torch.float32 if diffusion.objective == "flow" else torch.long
    t, noise = torch.empty(n, dtype=level_dtype), torch.empty((n, *shape), dtype=torch.float32)
    for j, sample in enumerate(ids):
        gen = torch.Generator().manual_seed(sample_seed(seed, sample))
        t[j] = noise_levels(first[j:j + 1], diffusion, cap=cap, generator=gen)[0]
        noise[j] = torch.randn(shape, generator=gen)
    return t, noise


def prepare_micro_batch(batch, *, seed: int, step: int, dp_rank: int, index: int, device: torch.device,
                        dtype: torch.dtype, cap: int, diffusion: Optional[DiffusionConfig] = None) -> MicroBatch:
    """Noise the batch's latents per ``diffusion.objective`` (epsilon: x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps) and
    move everything to ``device``."""
    counts = count_tokens(batch.modality_ids, batch.document_ids)
    lm_tokens = int(batch.text_loss_mask.sum())
    image_tokens = int(batch.image_loss_mask.sum())
    diffusion = diffusion if diffusion is not None else DiffusionConfig()
    target = weight = trained = None
    if batch.num_images:
        level, noise = image_noise(batch, seed, (seed, step, dp_rank, index), cap, diffusion)
        # fp32 on CPU: layout-independent values
        x_t, t, target = noise_and_target(batch.image_latents.float(), noise, level, diffusion)
        weight = loss_weights(level, diffusion)
        noised = getattr(batch, "image_noised", None)
        if noised is not None and not bool(noised.all()):
            clean = ~noised.bool().cpu()
            x_t[clean] = batch.image_latents[clean].float()  # clean context: x_0 itself at t = 0
            t[clean] = 0
            trained = noised.bool().to(device)
        batch = batch.to(device)
        inputs = batch.to_model_inputs(x_t.to(device=device, dtype=dtype), t.to(device))
        target = target.to(device)
        weight = None if weight is None else weight.to(device)
    else:
        batch = batch.to(device)
        inputs = batch.to_model_inputs(None, None)
    return MicroBatch(inputs=inputs, labels=batch.labels.t().contiguous(),
                      loss_mask=batch.text_loss_mask.t().contiguous(), target=target, loss_weight=weight,
                      lm_tokens=lm_tokens, image_tokens=image_tokens, counts=counts, image_trained=trained)


class StepLoss:
    """The loss of one micro-batch, normalised by the step's global counts (see the module docstring)."""

    def __init__(self, lm_tokens: int, image_tokens: int, dp_size: int, num_microbatches: int, lam: float,
                 patch: int):
        self.lm_tokens, self.image_tokens = lm_tokens, image_tokens
        self.scale = dp_size * num_microbatches
        self.lam, self.patch = lam, patch

    def terms(self, mb: MicroBatch, output: LMFusionOutput):
        # lm_loss overwrites fp32 logits in place (megatron's kernel): they are not used afterwards.
        lm_sum, lm_count = lm_loss(output.logits.float(), mb.labels, mb.loss_mask)
        if output.noise_pred is not None:
            weight = None if mb.loss_weight is None else mb.loss_weight[:, None]  # (n_img, 1): every token of an image
            pred, target = patchify(output.noise_pred, self.patch), patchify(mb.target, self.patch)
            mask = None if mb.image_trained is None else mb.image_trained[:, None].expand(pred.shape[:-1])
            d_sum, _ = diffusion_loss(pred, target, image_mask=mask, weight=weight)
        else:
            d_sum = torch.zeros((), device=lm_sum.device)
        dev = lm_sum.device
        return total_loss(lm_sum, torch.tensor(self.lm_tokens, device=dev), d_sum,
                          torch.tensor(self.image_tokens, device=dev), lam=self.lam)

    def __call__(self, mb: MicroBatch, output: LMFusionOutput, non_loss_data: bool = False):
        terms = self.terms(mb, output)
        reported = torch.stack([terms.lm, terms.diffusion]).detach().double()
        return terms.loss * self.scale, {"lm_diffusion": reported}
