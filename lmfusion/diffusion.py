"""DDPM pieces for LMFusion's image loss and sampling, on diffusers schedulers.

Training (paper, Transfusion): 1000 steps, cosine schedule (``squaredcos_cap_v2``: Nichol & Dhariwal's
``abar(t) = cos^2(((t/T) + 0.008) / 1.008 * pi/2)`` with betas capped at 0.999), epsilon prediction. A noise level
``t`` is drawn per image, uniform over all steps, but at most ``cap`` (500) for images that come *first* in their
sample (image -> caption) so the caption learns from a mostly clean image.

Choices:

* No fixed clipping: diffusers' default clips the predicted x0 to [-1, 1] when stepping, which is for pixel space;
  VAE latents are not bounded that way. Samplers clip to the range they are given (next item); the training
  scheduler never clips (it does not affect ``add_noise`` anyway).
* ``add_noise`` works in float32 and casts the result back: diffusers casts ``alphas_cumprod`` to the latents'
  dtype, which in bf16 would quantise ``sqrt(abar)`` to 8 mantissa bits.
* Samplers clip their x0 estimate to ``[-clip_x0, clip_x0]`` when given the data's range (:func:`make_sampler`):
  with the cosine schedule ``sqrt(abar)`` at the noisiest step (T-1) is 4.9e-5, so the first sampling step's
  ``x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)`` multiplies any error in the predicted noise by ~2e4 and, unclipped,
  the sample never recovers (measured: saturated noise from a model whose noise MSE at t=950 is 0.03). Improved DDPM
  (Nichol & Dhariwal), whose schedule this is, clips x0 to the pixel range [-1, 1] for the same reason; for VAE
  latents the range is that of the training latents (``lmfusion.inference.image.latent_range``).
* Samplers use ``timestep_spacing="trailing"``, so the first sampling step is the noisiest training step (T-1),
  whatever the number of steps (with "leading", a 50-step DDIM would start at t=980, never at pure noise).
* :func:`sample_timesteps` draws one uniform number per image whatever the image's kind, so the draws for a batch
  depend only on the generator state and the number of images.
* The noise-level density of caption-first images is uniform (the paper) or, optionally, logit-normal
  (``TimestepDensity("logit_normal", mean, std)``: ``t/T = sigmoid(N(mean, std))``, Stable Diffusion 3's scheme,
  drawn with diffusers' ``compute_density_for_timestep_sampling``). A positive mean spends more of the loss on
  high noise, the only levels at which the caption matters to the noise prediction (at ``t`` = 900 the cosine
  schedule's signal-to-noise ratio is 0.024): short runs learn text conditioning sooner. Image-first images keep
  their uniform draw in ``[0, cap]``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling
from torch import Tensor

__all__ = [
    "NUM_TRAIN_TIMESTEPS",
    "IMAGE_FIRST_CAP",
    "make_train_scheduler",
    "TimestepDensity",
    "sample_timesteps",
    "add_noise",
    "make_sampler",
    "cfg_combine",
]

NUM_TRAIN_TIMESTEPS = 1000
IMAGE_FIRST_CAP = 500


def make_train_scheduler(num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> DDPMScheduler:
    """The training noise schedule: DDPM, cosine (``squaredcos_cap_v2``), epsilon prediction."""
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="epsilon",
        clip_sample=False,  # latents are not in [-1, 1]; see module docstring
    )


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
            raise ValueError(f"timestep density must be one of {TIMESTEP_DENSITIES}, got {self.kind!r}")
        if not self.logit_std > 0:
            raise ValueError(f"timestep logit_std must be > 0, got {self.logit_std}")


def sample_timesteps(
    n_images: int,
    image_first: Tensor,
    cap: int = IMAGE_FIRST_CAP,
    generator: torch.Generator | None = None,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
    density: TimestepDensity = TimestepDensity(),
) -> Tensor:
    """Noise levels per image: ``density`` over [0, T) (default uniform) and, where ``image_first``, uniform in
    [0, cap] (inclusive).

    ``image_first``: (n_images,) bool. ``generator``: a CPU generator (the draw is made on CPU and moved to
    ``image_first.device``, so the values do not depend on the device). Returns (n_images,) int64.
    """
    if image_first.shape != (n_images,) or image_first.dtype != torch.bool:
        raise ValueError(f"image_first must be a ({n_images},) bool tensor, got {tuple(image_first.shape)} "
                         f"{image_first.dtype}")
    if not 0 <= cap < num_train_timesteps:
        raise ValueError(f"cap={cap} must be in [0, {num_train_timesteps - 1}]")
    u = torch.rand(n_images, generator=generator, dtype=torch.float64)  # one draw per image, [0, 1)
    high = torch.where(image_first.cpu(), cap + 1, num_train_timesteps).to(torch.float64)
    if density.kind != "uniform":  # a second draw per image, used where the image comes after its caption
        v = compute_density_for_timestep_sampling(density.kind, n_images, logit_mean=density.logit_mean,
                                                  logit_std=density.logit_std, generator=generator)
        u = torch.where(image_first.cpu(), u, v.to(torch.float64))
    t = torch.minimum(torch.floor(u * high), high - 1).to(torch.int64)  # min(): guard against rounding up to high
    return t.to(image_first.device)


def add_noise(latents: Tensor, noise: Tensor, t: Tensor, scheduler: DDPMScheduler | None = None) -> Tensor:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, per image: latents/noise (n, C, H, W), t (n,) int.

    Computed in float32 through ``scheduler.add_noise`` (default: :func:`make_train_scheduler`), returned in the
    latents' dtype.
    """
    if latents.shape != noise.shape:
        raise ValueError(f"latents {tuple(latents.shape)} and noise {tuple(noise.shape)} differ in shape")
    if t.shape != latents.shape[:1]:
        raise ValueError(f"t must be ({latents.shape[0]},) (one per image), got {tuple(t.shape)}")
    scheduler = scheduler if scheduler is not None else _default_scheduler()
    high = scheduler.config.num_train_timesteps
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= high):
        raise ValueError(f"timesteps must be in [0, {high - 1}], got range [{int(t.min())}, {int(t.max())}]")
    noisy = scheduler.add_noise(latents.float(), noise.float(), t.long())
    return noisy.to(latents.dtype)


@functools.cache
def _default_scheduler() -> DDPMScheduler:
    # add_noise only reads the schedule (it caches alphas_cumprod on the latents' device), so one per process does.
    return make_train_scheduler()


def make_sampler(
    kind: Literal["ddpm", "ddim"], steps: int, train_scheduler: DDPMScheduler | None = None,
    clip_x0: float | None = None,
) -> DDPMScheduler | DDIMScheduler:
    """A sampling scheduler with the training schedule, ``set_timesteps(steps)`` done. ``clip_x0``: clip each
    step's x0 estimate to ``[-clip_x0, clip_x0]`` (the data's range; None: no clipping, see module docstring).

    Loop: ``for t in s.timesteps: x = s.step(eps_model(x, t), t, x, generator=g).prev_sample``, starting from
    ``x ~ N(0, I)`` (``init_noise_sigma`` is 1 for both).
    """
    base = train_scheduler if train_scheduler is not None else make_train_scheduler()
    n_train = base.config.num_train_timesteps
    if not 1 <= steps <= n_train:
        raise ValueError(f"sampling steps={steps} must be in [1, {n_train}]")
    if clip_x0 is not None and not clip_x0 > 0:
        raise ValueError(f"clip_x0 must be a positive number or None, got {clip_x0!r}")
    clip = dict(clip_sample=clip_x0 is not None, clip_sample_range=float(clip_x0 or 1.0))
    if kind == "ddpm":
        sampler = DDPMScheduler.from_config(base.config, timestep_spacing="trailing", **clip)
    elif kind == "ddim":
        sampler = DDIMScheduler.from_config(base.config, timestep_spacing="trailing", **clip)
    else:
        raise ValueError(f"sampler kind must be 'ddpm' or 'ddim', got {kind!r}")
    sampler.set_timesteps(steps)
    return sampler


def cfg_combine(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance: uncond + scale * (cond - uncond). Exactly ``cond`` at scale 1, ``uncond`` at 0."""
    # torch.lerp evaluates weight >= 0.5 as end - (end - start) * (1 - weight): exact at the end points.
    return torch.lerp(uncond, cond, scale)
