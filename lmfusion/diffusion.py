"""Diffusion objectives for LMFusion's image loss and sampling, on diffusers schedulers.

Objectives (``diffusion.objective``, :class:`lmfusion.config.DiffusionConfig`); ``x0`` the clean latent, ``eps`` the
noise, the model's prediction is ``LMFusionOutput.noise_pred`` whatever it predicts:

* **epsilon** (paper, Transfusion): DDPM, 1000 steps, cosine schedule (``squaredcos_cap_v2``: Nichol & Dhariwal's
  ``abar(t) = cos^2(((t/T) + 0.008) / 1.008 * pi/2)`` with betas capped at 0.999); target ``eps``. Samplers: DDPM,
  DDIM.
* **v_prediction** (Salimans & Ho 2022): the same schedule and noise levels; target ``v = sqrt(abar) eps -
  sqrt(1 - abar) x0`` (diffusers' ``get_velocity``). Samplers: DDPM, DDIM with ``prediction_type="v_prediction"``.
* **flow** (rectified flow; SD3, Flux, BAGEL): ``x_s = (1 - s) x0 + s eps``, ``s`` in [0, 1]; target the velocity
  ``eps - x0``. The model's timestep input is ``1000 s`` (SD3's convention: the timesteps of diffusers'
  ``FlowMatchEulerDiscreteScheduler``), a float. Training levels: ``u`` from the density (uniform, or logit-normal
  through diffusers' ``compute_density_for_timestep_sampling``), then SD3's / BAGEL's shift
  ``s = shift u / (1 + (shift - 1) u)``; sampler: ``FlowMatchEulerDiscreteScheduler(shift=shift)``.

A noise *level* per image is the int64 DDPM step ``t`` (epsilon, v) or the float32 ``s`` (flow):
:func:`noise_levels` draws it, :func:`noise_and_target` makes the model input, its timestep and the regression target,
:func:`loss_weights` the optional Min-SNR weights.

Choices:

* **Image-first cap.** Images that come *first* in their sample (image -> caption) draw a low noise level so the
  caption learns from a mostly clean image: uniform in [0, cap] DDPM steps (paper: 500). The cap is a statement about
  how much of the image survives, i.e. about the signal-to-noise ratio of ``x_t``, which does not depend on the
  parametrisation: v-prediction shares the schedule (same cap), and flow caps ``s`` at the level with the *same SNR*
  as DDPM step ``cap`` (:func:`flow_cap`: ``(1 - s)^2 / s^2 = abar / (1 - abar)``, ``s = 0.503`` for 500). The same
  *fraction* (``s = cap / T``) would be another SNR in general (a straight path spends its levels differently from
  the cosine one: cap 250 is ``s = 0.296`` by SNR, 0.25 by fraction).
* **Min-SNR-gamma** (Hang et al. 2023) weights each image's loss so that, in x0 terms, it is ``min(SNR, gamma) *
  |x0 - x0_hat|^2``. With diffusers' ``compute_snr`` (as its ``train_text_to_image``): epsilon ``min(snr, g) / snr``,
  v ``min(snr, g) / (snr + 1)``. Flow, through its SNR ``(1 - s)^2 / s^2``: the velocity error is the x0 error over
  ``s`` (``x0_hat = x_s - s v_hat``), so the weight is ``min(snr, g) s^2 = min((1 - s)^2, g s^2)`` (finite at s = 0
  and 1; at most ``g / (1 + sqrt g)^2`` = 0.48 for g = 5). All three are the same weighting of the x0 error.
* No fixed clipping: diffusers' default clips the predicted x0 to [-1, 1] when stepping, which is for pixel space;
  VAE latents are not bounded that way. Samplers clip to the range they are given (next item); the training
  scheduler never clips (it does not affect ``add_noise`` anyway).
* ``add_noise`` works in float32 and casts the result back: diffusers casts ``alphas_cumprod`` to the latents'
  dtype, which in bf16 would quantise ``sqrt(abar)`` to 8 mantissa bits.
* Samplers clip their x0 estimate to ``[-clip_x0, clip_x0]`` when given the data's range (:func:`make_sampler`,
  :func:`sampler_step`): with the cosine schedule ``sqrt(abar)`` at the noisiest step (T-1) is 4.9e-5, so the first
  sampling step's ``x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)`` multiplies any error in the predicted noise by
  ~2e4 and, unclipped, the sample never recovers (measured: saturated noise from a model whose noise MSE at t=950 is
  0.03). Improved DDPM (Nichol & Dhariwal), whose schedule this is, clips x0 to the pixel range [-1, 1] for the same
  reason; for VAE latents the range is that of the training latents (``lmfusion.inference.image.latent_range``).
  DDPM/DDIM clip in their own step (``clip_sample``); the flow sampler has no such option, so :func:`sampler_step`
  clips the implied ``x0 = x_s - s v`` and re-derives ``v = (x_s - x0) / s`` where the clip changed it.
* DDPM/DDIM use ``timestep_spacing="trailing"``, so the first sampling step is the noisiest training step (T-1),
  whatever the number of steps (with "leading", a 50-step DDIM would start at t=980, never at pure noise). The flow
  sampler starts at s = 1.
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
import math
from typing import Literal

import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_snr
from torch import Tensor

from lmfusion.diffusion_config import DiffusionConfig, TimestepDensity  # TimestepDensity re-exported
from lmfusion.errors import UserError

__all__ = [
    "NUM_TRAIN_TIMESTEPS",
    "IMAGE_FIRST_CAP",
    "make_train_scheduler",
    "TimestepDensity",
    "sample_timesteps",
    "add_noise",
    "make_sampler",
    "cfg_combine",
    "SAMPLERS",
    "flow_cap",
    "noise_levels",
    "noise_and_target",
    "snr",
    "loss_weights",
    "default_sampler",
    "check_sampler",
    "initial_noise_sigma",
    "sampler_step",
]

NUM_TRAIN_TIMESTEPS = 1000
IMAGE_FIRST_CAP = 500


def make_train_scheduler(num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
                         prediction_type: Literal["epsilon", "v_prediction"] = "epsilon") -> DDPMScheduler:
    """The training noise schedule: DDPM, cosine (``squaredcos_cap_v2``), epsilon (or v) prediction."""
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule="squaredcos_cap_v2",
        prediction_type=prediction_type,
        clip_sample=False,  # latents are not in [-1, 1]; see module docstring
    )


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
        raise UserError(f"cap={cap} must be in [0, {num_train_timesteps - 1}]")
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


# ---------------------------------------------------------------------------------------------------- objectives
def flow_cap(cap: int) -> float:
    """The flow level ``s`` whose signal-to-noise ratio ``(1 - s)^2 / s^2`` is the cosine schedule's at DDPM step
    ``cap``: ``s = sqrt(1 - abar) / (sqrt(abar) + sqrt(1 - abar))`` (module docstring)."""
    abar = float(_default_scheduler().alphas_cumprod[cap])
    return math.sqrt(1 - abar) / (math.sqrt(abar) + math.sqrt(1 - abar))


def _sample_flow_levels(image_first: Tensor, cap: int, generator: torch.Generator | None,
                        spec: DiffusionConfig) -> Tensor:
    """Flow levels ``s`` (n,) float32: the density then the shift for caption-first images, uniform in
    [0, :func:`flow_cap`) where ``image_first``. Draw order as :func:`sample_timesteps`'s (one uniform per image, then
    the density's draws)."""
    n = image_first.shape[0]
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    later = u
    if spec.timestep_density != "uniform":
        later = compute_density_for_timestep_sampling(spec.timestep_density, n, logit_mean=spec.timestep_logit_mean,
                                                      logit_std=spec.timestep_logit_std, generator=generator).double()
    shift = spec.flow_shift
    later = shift * later / (1 + (shift - 1) * later)
    s = torch.where(image_first.cpu(), u * flow_cap(cap), later)
    return s.float().to(image_first.device)


def noise_levels(image_first: Tensor, spec: DiffusionConfig, cap: int = IMAGE_FIRST_CAP,
                 generator: torch.Generator | None = None) -> Tensor:
    """One noise level per image (``image_first``: (n,) bool): DDPM steps (n,) int64 for epsilon and v (exactly
    :func:`sample_timesteps`), flow levels ``s`` (n,) float32 in [0, 1) for flow. ``cap``: the image-first cap in
    DDPM steps (flow: :func:`flow_cap`)."""
    if spec.objective == "flow":
        if not 0 <= cap < NUM_TRAIN_TIMESTEPS:
            raise UserError(f"cap={cap} must be in [0, {NUM_TRAIN_TIMESTEPS - 1}]")
        return _sample_flow_levels(image_first, cap, generator, spec)
    return sample_timesteps(image_first.shape[0], image_first, cap=cap, generator=generator, density=spec.density)


def noise_and_target(latents: Tensor, noise: Tensor, level: Tensor, spec: DiffusionConfig
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """(x_t, the model's timestep input (n,), the regression target), x_t and target float32.

    epsilon: (:func:`add_noise`, t, eps); v: (add_noise, t, ``get_velocity``); flow: ((1 - s) x0 + s eps, 1000 s,
    eps - x0). ``latents``/``noise``: (n, C, H, W); ``level``: from :func:`noise_levels`."""
    x0, eps = latents.float(), noise.float()
    if spec.objective == "flow":
        s = level.float().view(-1, *([1] * (x0.dim() - 1)))  # (n, 1, 1, 1)
        return (1 - s) * x0 + s * eps, level.float() * NUM_TRAIN_TIMESTEPS, eps - x0
    x_t = add_noise(x0, eps, level)
    if spec.objective == "v_prediction":
        return x_t, level, _default_scheduler().get_velocity(x0, eps, level.long())
    return x_t, level, eps


def snr(level: Tensor, objective: str) -> Tensor:
    """Signal-to-noise ratio per image, float32: diffusers' ``compute_snr`` on the cosine schedule (epsilon, v), or
    ``(1 - s)^2 / s^2`` (flow; inf at s = 0)."""
    if objective == "flow":
        s = level.double()
        return ((1 - s) / s).pow(2).float()
    return compute_snr(_default_scheduler(), level.long())


def loss_weights(level: Tensor, spec: DiffusionConfig) -> Tensor | None:
    """Per-image loss weights (n,) float32 for ``diffusion.loss_weighting``; None for 'none' (module docstring)."""
    if spec.loss_weighting == "none":
        return None
    gamma = spec.min_snr_gamma
    if spec.objective == "flow":  # min(snr, g) s^2, written without the infinite snr at s = 0
        s = level.double()
        return torch.minimum((1 - s).pow(2), gamma * s.pow(2)).float()
    ratio = snr(level, spec.objective)
    clipped = ratio.clamp(max=gamma)
    return clipped / ratio if spec.objective == "epsilon" else clipped / (ratio + 1)


# ---------------------------------------------------------------------------------------------------- sampling
SAMPLERS = {"epsilon": ("ddpm", "ddim"), "v_prediction": ("ddpm", "ddim"), "flow": ("euler",)}


def default_sampler(objective: str) -> str:
    return SAMPLERS[objective][0]


def check_sampler(kind: str, objective: str) -> None:
    """Refuse a sampler that does not fit the objective the model was trained with."""
    if kind not in SAMPLERS[objective]:
        raise UserError(f"sampler {kind!r} does not fit the checkpoint's diffusion.objective={objective}; its "
                        f"sampler{'s are' if len(SAMPLERS[objective]) > 1 else ' is'} "
                        f"{' or '.join(SAMPLERS[objective])}")


def make_sampler(
    kind: Literal["ddpm", "ddim", "euler"], steps: int, train_scheduler: DDPMScheduler | None = None,
    clip_x0: float | None = None, diffusion: DiffusionConfig | None = None,
) -> DDPMScheduler | DDIMScheduler | FlowMatchEulerDiscreteScheduler:
    """A sampling scheduler for ``diffusion``'s objective (default: epsilon), ``set_timesteps(steps)`` done.
    ``clip_x0``: clip each step's x0 estimate to ``[-clip_x0, clip_x0]`` (the data's range; None: no clipping, see
    module docstring); DDPM/DDIM do it in their step, the flow sampler through :func:`sampler_step`.

    Loop: ``for t in s.timesteps: x = sampler_step(s, model(x, t), t, x, clip_x0, g)``, starting from
    ``x ~ N(0, I)`` (:func:`initial_noise_sigma` is 1 for all three).
    """
    spec = diffusion if diffusion is not None else DiffusionConfig()
    if kind not in ("ddpm", "ddim", "euler"):
        raise UserError(f"sampler kind must be 'ddpm', 'ddim' or 'euler', got {kind!r}")
    check_sampler(kind, spec.objective)
    base = train_scheduler if train_scheduler is not None else make_train_scheduler()
    n_train = base.config.num_train_timesteps
    if not 1 <= steps <= n_train:
        raise UserError(f"sampling steps={steps} must be in [1, {n_train}]")
    if clip_x0 is not None and not clip_x0 > 0:
        raise UserError(f"clip_x0 must be a positive number or None, got {clip_x0!r}")
    if kind == "euler":
        sampler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=n_train, shift=spec.flow_shift)
    else:
        cls = DDPMScheduler if kind == "ddpm" else DDIMScheduler
        sampler = cls.from_config(base.config, timestep_spacing="trailing", prediction_type=spec.objective,
                                  clip_sample=clip_x0 is not None, clip_sample_range=float(clip_x0 or 1.0))
    sampler.set_timesteps(steps)
    return sampler


def initial_noise_sigma(sampler) -> float:
    """The scale of the starting noise ``x ~ N(0, sigma^2 I)``: ``init_noise_sigma`` for DDPM/DDIM (1), the first
    flow level for flow (``x_1 = eps``: 1)."""
    if isinstance(sampler, FlowMatchEulerDiscreteScheduler):
        return float(sampler.sigmas[0])
    return float(sampler.init_noise_sigma)


def sampler_step(sampler, pred: Tensor, t: Tensor, x: Tensor, clip_x0: float | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
    """One step of ``sampler`` (from :func:`make_sampler`) from ``x`` at ``t`` given the model's prediction.

    Flow: where the implied ``x0 = x - s v`` lies outside ``[-clip_x0, clip_x0]`` it is clipped and ``v`` re-derived
    as ``(x - x0) / s`` (elsewhere ``v`` is untouched); DDPM/DDIM clip in their own step (configured by
    :func:`make_sampler`)."""
    if isinstance(sampler, FlowMatchEulerDiscreteScheduler) and clip_x0 is not None:
        sigma = sampler.sigmas[sampler.index_for_timestep(t)].to(device=x.device, dtype=torch.float32)  # > 0
        x0 = x.float() - sigma * pred.float()
        pred = torch.where(x0.abs() > clip_x0, (x.float() - x0.clamp(-clip_x0, clip_x0)) / sigma, pred.float())
    return sampler.step(pred, t, x, generator=generator).prev_sample


def cfg_combine(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance: uncond + scale * (cond - uncond). Exactly ``cond`` at scale 1, ``uncond`` at 0."""
    # torch.lerp evaluates weight >= 0.5 as end - (end - start) * (1 - weight): exact at the end points.
    return torch.lerp(uncond, cond, scale)
