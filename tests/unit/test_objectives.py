"""Diffusion objectives (lmfusion.diffusion): epsilon / v-prediction / rectified-flow targets and noise levels, every
sampler driven by the exact denoiser of 1-D Gaussian data, Min-SNR weights, and the training step: the paper's
defaults reproduce the previous code path bit for bit.

Gaussian data ``x0 ~ N(MU, SIGMA^2)``: for ``x_t = a x0 + b eps`` (DDPM: a = sqrt(abar), b = sqrt(1 - abar); flow:
a = 1 - s, b = s) ``x_t ~ N(a MU, V)``, ``V = a^2 SIGMA^2 + b^2``, and the posterior means are linear in ``x_t``:
``E[eps | x_t] = b (x_t - a MU) / V``, ``E[x0 | x_t] = MU + a SIGMA^2 (x_t - a MU) / V``. The exact (minimum-MSE)
model of each objective is the same combination of them as its target: eps, ``a eps - b x0`` (v), ``eps - x0``
(flow velocity). Sampling with it must give back the data's mean and variance.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from lmfusion.config import DiffusionConfig, ModelConfig
from lmfusion.diffusion import (
    IMAGE_FIRST_CAP,
    NUM_TRAIN_TIMESTEPS,
    TimestepDensity,
    add_noise,
    check_sampler,
    flow_cap,
    initial_noise_sigma,
    loss_weights,
    make_sampler,
    noise_and_target,
    noise_levels,
    sample_timesteps,
    sampler_step,
)
from lmfusion.losses import diffusion_loss
from tests.fixtures import cosine_alphas_cumprod

T = NUM_TRAIN_TIMESTEPS
MU, SIGMA = 1.5, 0.5
N_SAMPLES = 100000
ABAR = cosine_alphas_cumprod(T)  # float64, independent of diffusers


def exact_prediction(objective: str, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The minimum-MSE prediction of ``objective`` at model timestep ``t`` (float64 math, float32 out, as a model)."""
    x = x.double()
    if objective == "flow":
        s = float(t) / T  # the model sees 1000 s
        a, b = 1 - s, s
    else:
        abar = float(ABAR[int(t)])
        a, b = math.sqrt(abar), math.sqrt(1 - abar)
    var = a * a * SIGMA ** 2 + b * b
    r = x - a * MU
    eps, x0 = b * r / var, MU + a * SIGMA ** 2 * r / var
    out = {"epsilon": eps, "v_prediction": a * eps - b * x0, "flow": eps - x0}[objective]
    return out.float()


def sample(spec: DiffusionConfig, kind: str, steps: int, predict=exact_prediction, clip: float | None = None):
    s = make_sampler(kind, steps, clip_x0=clip, diffusion=spec)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_SAMPLES, 1, generator=g) * initial_noise_sigma(s)  # (n, 1): diffusers reads a channel axis
    for t in s.timesteps:
        x = sampler_step(s, predict(spec.objective, x, t), t, x, clip_x0=clip, generator=g)
    return x.double()


# Tolerances: with 100,000 samples the sample mean's standard error is SIGMA / sqrt(1e5) = 0.0016 and the variance's
# relative one sqrt(2 / 1e5) = 0.45%. The samplers are first order: their variance comes out low by O(1 / steps)
# (measured at 50 steps: DDIM -5%, Euler -5%, Euler with shift 3 -10%; DDPM at 250 steps -3%), falling toward 0 with
# more steps (DDIM at 1000: -0.1%). At the step counts below the measured errors are at most 0.0023 on the mean and
# 1.3% on the variance (fixed seed: deterministic). Bounds: 0.008 (5 standard errors) and 3% (the worst measured
# bias plus 3.5 standard errors). A prediction of another objective misses by more than 10x these (next test).
MEAN_TOL, VAR_RTOL = 0.008, 0.03
CASES = [("epsilon", "ddpm", 1000, 1.0), ("epsilon", "ddim", 200, 1.0), ("v_prediction", "ddpm", 1000, 1.0),
         ("v_prediction", "ddim", 200, 1.0), ("flow", "euler", 200, 1.0), ("flow", "euler", 400, 3.0)]


@pytest.mark.parametrize("objective, kind, steps, shift", CASES)
def test_exact_denoiser_through_each_sampler_reproduces_the_data(objective, kind, steps, shift):
    spec = DiffusionConfig(objective=objective, flow_shift=shift)
    x = sample(spec, kind, steps)
    assert abs(float(x.mean()) - MU) < MEAN_TOL, float(x.mean())
    assert abs(float(x.var()) / SIGMA ** 2 - 1) < VAR_RTOL, float(x.var())
    # x0 clipping far outside the data changes nothing but rounding
    clipped = sample(spec, kind, steps, clip=50.0)
    torch.testing.assert_close(clipped, x, atol=1e-4, rtol=0)


@pytest.mark.parametrize("objective, kind, wrong", [("v_prediction", "ddim", "epsilon"),
                                                   ("epsilon", "ddim", "v_prediction")])
def test_a_prediction_of_another_objective_does_not_reproduce_the_data(objective, kind, wrong):
    """The check above can fail: the same sampler fed another objective's exact prediction misses the data."""
    x = sample(DiffusionConfig(objective=objective), kind, 50,
               predict=lambda _, x, t: exact_prediction(wrong, x, t))
    assert abs(float(x.mean()) - MU) > 10 * MEAN_TOL or abs(float(x.var()) / SIGMA ** 2 - 1) > 10 * VAR_RTOL


def test_flow_sampler_clips_the_implied_x0_and_rederives_the_velocity():
    spec = DiffusionConfig(objective="flow", flow_shift=2.0)
    s = make_sampler("euler", 10, diffusion=spec)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 8, 8, generator=g)
    v = torch.randn(x.shape, generator=g) * 3  # implied x0 = x - s v: partly outside [-1, 1]
    t = s.timesteps[1]
    sigma, sigma_next = float(s.sigmas[1]), float(s.sigmas[2])
    x0 = x.double() - sigma * v.double()
    plain = make_sampler("euler", 10, diffusion=spec)
    out_plain = sampler_step(plain, v, t, x)
    out = sampler_step(s, v, t, x, clip_x0=1.0)
    expected = x.double() + (sigma_next - sigma) * (x.double() - x0.clamp(-1, 1)) / sigma  # Euler with clipped x0
    inside = x0.abs() <= 1
    assert 0 < int(inside.sum()) < inside.numel()
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)
    assert torch.equal(out[inside], out_plain[inside])  # unclipped elements: the velocity untouched
    # the next x0 estimate from the stepped sample stays in range where the clip acted
    # the x0 the stepped sample implies with the re-derived velocity is the clipped one
    implied = out.double() - sigma_next * (x.double() - x0.clamp(-1, 1)) / sigma
    torch.testing.assert_close(implied, x0.clamp(-1, 1), atol=1e-5, rtol=0)


def test_samplers_refuse_another_objective():
    with pytest.raises(ValueError, match="sampler 'ddim' does not fit the checkpoint's diffusion.objective=flow; "
                                         "its sampler is euler"):
        check_sampler("ddim", "flow")
    with pytest.raises(ValueError, match="its samplers are ddpm or ddim"):
        make_sampler("euler", 10, diffusion=DiffusionConfig(objective="v_prediction"))
    v = make_sampler("ddpm", 10, diffusion=DiffusionConfig(objective="v_prediction"))
    assert v.config.prediction_type == "v_prediction" and v.config.timestep_spacing == "trailing"
    f = make_sampler("euler", 10, diffusion=DiffusionConfig(objective="flow", flow_shift=3.0))
    assert f.config.shift == 3.0 and float(f.timesteps[0]) == T and float(f.sigmas[-1]) == 0


# ---------------------------------------------------------------------------------------------------- targets, levels
def test_targets_and_model_timesteps_match_closed_forms():
    g = torch.Generator().manual_seed(0)
    x0, eps = 2 * torch.randn(6, 3, 4, 4, generator=g), torch.randn(6, 3, 4, 4, generator=g)
    t = torch.tensor([0, 1, 250, 500, 998, T - 1])
    a, b = ABAR[t].sqrt().view(-1, 1, 1, 1), (1 - ABAR[t]).sqrt().view(-1, 1, 1, 1)
    x_t, tm, target = noise_and_target(x0, eps, t, DiffusionConfig())
    assert torch.equal(x_t, add_noise(x0, eps, t)) and torch.equal(target, eps) and torch.equal(tm, t)
    x_t, tm, v = noise_and_target(x0, eps, t, DiffusionConfig(objective="v_prediction"))
    # float32 schedule coefficients (abar to ~1e-6) times O(1) values: well under 1e-5
    torch.testing.assert_close(x_t.double(), a * x0.double() + b * eps.double(), atol=1e-5, rtol=0)
    torch.testing.assert_close(v.double(), a * eps.double() - b * x0.double(), atol=1e-5, rtol=0)
    torch.testing.assert_close((a * x_t.double() - b * v.double()).float(), x0, atol=1e-4, rtol=0)  # what DDPM inverts
    assert torch.equal(tm, t)
    s = torch.tensor([0.0, 0.1, 0.5, 0.503, 0.9, 0.999])
    x_t, tm, u = noise_and_target(x0, eps, s, DiffusionConfig(objective="flow"))
    sv = s.double().view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t.double(), (1 - sv) * x0.double() + sv * eps.double(), atol=1e-6, rtol=0)
    torch.testing.assert_close(u, eps - x0, atol=0, rtol=0)
    assert tm.dtype == torch.float32 and torch.equal(tm, s * T)
    torch.testing.assert_close(x_t - s.view(-1, 1, 1, 1) * u, x0, atol=1e-5, rtol=0)  # the x0 the sampler clips


def test_flow_cap_keeps_the_ddpm_caps_signal_to_noise_ratio():
    for cap in (100, 250, IMAGE_FIRST_CAP, 900):
        s = flow_cap(cap)
        snr_ddpm = float(ABAR[cap] / (1 - ABAR[cap]))
        assert ((1 - s) / s) ** 2 == pytest.approx(snr_ddpm, rel=1e-4), cap  # float32 schedule
    assert flow_cap(IMAGE_FIRST_CAP) == pytest.approx(0.503, abs=1e-3)
    assert abs(flow_cap(250) - 250 / T) > 0.03  # same SNR, not the same fraction


def test_flow_noise_levels_density_shift_and_image_first_cap():
    n = 20000
    first = torch.rand(n, generator=torch.Generator().manual_seed(1)) < 0.3
    uniform = noise_levels(first, DiffusionConfig(objective="flow"), generator=torch.Generator().manual_seed(2))
    assert uniform.dtype == torch.float32 and float(uniform.min()) >= 0 and float(uniform.max()) < 1
    cap = flow_cap(IMAGE_FIRST_CAP)
    assert float(uniform[first].max()) <= cap and float(uniform[first].max()) > 0.99 * cap
    assert abs(float(uniform[~first].double().mean()) - 0.5) < 0.01
    # shift 3: s = 3u / (1 + 2u), so the q-quantile of s is 3q / (1 + 2q); sampling error of a quantile ~0.004
    shifted = noise_levels(first, DiffusionConfig(objective="flow", flow_shift=3.0),
                           generator=torch.Generator().manual_seed(2))
    for q in (0.1, 0.5, 0.9):
        assert abs(float(torch.quantile(shifted[~first].double(), q)) - 3 * q / (1 + 2 * q)) < 0.015, q
    assert torch.equal(shifted[first], uniform[first])  # the cap is an absolute level: not shifted
    # logit-normal (mean 1, std 1): the q-quantile is sigmoid(1 + sqrt(2) erfinv(2q - 1))
    spec = DiffusionConfig(objective="flow", timestep_density="logit_normal", timestep_logit_mean=1.0)
    ln = noise_levels(first, spec, generator=torch.Generator().manual_seed(2))
    for q in (0.1, 0.5, 0.9):
        z = 1.0 + math.sqrt(2) * torch.erfinv(torch.tensor(2 * q - 1, dtype=torch.float64))
        assert abs(float(torch.quantile(ln[~first].double(), q)) - float(torch.sigmoid(z))) < 0.015, q
    assert torch.equal(ln[first], uniform[first])  # same first draw per image, as sample_timesteps
    # DDPM objectives: exactly sample_timesteps
    for objective in ("epsilon", "v_prediction"):
        spec = DiffusionConfig(objective=objective, timestep_density="logit_normal")
        assert torch.equal(noise_levels(first, spec, generator=torch.Generator().manual_seed(5)),
                           sample_timesteps(n, first, generator=torch.Generator().manual_seed(5),
                                            density=TimestepDensity("logit_normal")))


# ---------------------------------------------------------------------------------------------------- Min-SNR
@pytest.mark.parametrize("objective", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("gamma", [5.0, 1.0])
def test_min_snr_weights_match_the_formula(objective, gamma):
    t = torch.arange(T)
    snr = ABAR / (1 - ABAR)  # float64, independent of diffusers
    clipped = torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64))
    expected = clipped / snr if objective == "epsilon" else clipped / (snr + 1)
    got = loss_weights(t, DiffusionConfig(objective=objective, loss_weighting="min_snr", min_snr_gamma=gamma))
    assert got.dtype == torch.float32 and got.shape == (T,)
    # diffusers' float32 abar: 1 - abar near t = 0 (4e-5) carries ~1e-3 relative error; elsewhere ~1e-5
    torch.testing.assert_close(got.double()[20:], expected[20:], rtol=1e-4, atol=0)
    torch.testing.assert_close(got.double(), expected, rtol=5e-3, atol=0)
    assert loss_weights(t, DiffusionConfig(objective=objective)) is None


@pytest.mark.parametrize("gamma", [5.0, 0.5])
def test_flow_min_snr_weight_is_the_x0_weighting_through_its_snr(gamma):
    s = torch.linspace(0, 1, 1001)
    got = loss_weights(s, DiffusionConfig(objective="flow", loss_weighting="min_snr", min_snr_gamma=gamma)).double()
    sd = s.double()[1:-1]
    snr = ((1 - sd) / sd) ** 2
    expected = torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64)) * sd ** 2
    torch.testing.assert_close(got[1:-1], expected, rtol=1e-6, atol=1e-7)
    assert float(got[0]) == 0 and float(got[-1]) == 0 and bool(torch.isfinite(got).all())
    # the velocity error is the x0 error over s: weight * |v err|^2 == min(snr, gamma) * |x0 err|^2
    v_err = 0.3
    torch.testing.assert_close(got[1:-1] * v_err ** 2, torch.minimum(snr, torch.tensor(gamma).double())
                               * (sd * v_err) ** 2, rtol=1e-6, atol=1e-9)


def test_weighted_diffusion_loss_weights_each_image():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 3, 4, 5, generator=g)  # 3 images, 4 tokens, 5 elements
    w = torch.tensor([0.5, 2.0, 0.0])
    total, count = diffusion_loss(pred, target, weight=w[:, None])
    per_image = (pred - target).pow(2).mean(-1).sum(-1)
    torch.testing.assert_close(total, (w * per_image).sum(), atol=0, rtol=1e-6)  # fp32 sums in another order
    assert int(count) == 12  # rows, not weights
    with pytest.raises(ValueError, match="does not broadcast"):
        diffusion_loss(pred, target, weight=w)


# ---------------------------------------------------------------------------------------------------- config
def test_diffusion_config_checks():
    with pytest.raises(ValueError, match="diffusion.objective must be one of"):
        DiffusionConfig(objective="x0")
    with pytest.raises(ValueError, match="diffusion.flow_shift=2.0 applies to diffusion.objective=flow only"):
        DiffusionConfig(flow_shift=2.0)
    assert DiffusionConfig().density == TimestepDensity()


# ---------------------------------------------------------------------------------------------------- training step
@pytest.fixture(scope="module")
def megatron_tp1(tmp_path_factory):
    """A one-rank gloo group with megatron's parallel state (the LM loss needs its TP group)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path_factory.mktemp('dist') / 'store'}", rank=0,
                                world_size=1)
    owns = not parallel_state.model_parallel_is_initialized()
    if owns:
        parallel_state.initialize_model_parallel()
    yield
    if owns:
        parallel_state.destroy_model_parallel()
    if created:
        dist.destroy_process_group()


def _tiny_model() -> ModelConfig:
    from lmfusion.model.image_config import ImageIOConfig

    return ModelConfig(vocab_size=64, hidden_size=64, ffn_hidden_size=96, num_layers=2, num_attention_heads=4,
                       num_query_groups=2, bos_token_id=1, eos_token_id=2, boi_token_id=3, eoi_token_id=4,
                       image=ImageIOConfig(latent_channels=3, latent_size=8, patch_size=2, block_channels=(16, 16),
                                           layers_per_block=1, norm_groups=8))


def _old_step_terms(batch, seed, cap, density, noise_pred, logits, lam, patch, lm_tokens, image_tokens):
    """The training step's noising and loss as lmfusion/training/step.py had them before objectives were
    configurable (commit 1af99b4), kept here as the reference: (x_t, t, loss terms)."""
    from lmfusion.losses import lm_loss, total_loss
    from lmfusion.model.image_io import patchify
    from lmfusion.training.step import sample_seed

    ids = [s for row in (batch.sample_ids or []) for s in row]
    shape = tuple(batch.image_latents.shape[1:])
    first = batch.image_first.bool().cpu()
    t, noise = torch.empty(len(ids), dtype=torch.long), torch.empty((len(ids), *shape), dtype=torch.float32)
    for j, sample in enumerate(ids):
        gen = torch.Generator().manual_seed(sample_seed(seed, sample))
        t[j] = sample_timesteps(1, first[j:j + 1], cap=cap, generator=gen, density=density)[0]
        noise[j] = torch.randn(shape, generator=gen)
    x_t = add_noise(batch.image_latents.float(), noise, t)
    lm_sum, _ = lm_loss(logits, batch.labels.t().contiguous(), batch.text_loss_mask.t().contiguous())
    d_sum = (patchify(noise_pred, patch).float() - patchify(noise, patch).float()).pow(2).mean(dim=-1).sum()
    terms = total_loss(lm_sum, torch.tensor(lm_tokens), d_sum, torch.tensor(image_tokens), lam=lam)
    return x_t, t, terms


@pytest.mark.parametrize("density", [TimestepDensity(), TimestepDensity("logit_normal", 1.0, 1.0)])
def test_paper_defaults_give_the_previous_step_bit_for_bit(megatron_tp1, density):
    from lmfusion.model.model import LMFusionOutput
    from lmfusion.training.step import StepLoss, prepare_micro_batch
    from lmfusion.training.synthetic import synthetic_batches

    model = _tiny_model()
    spec = DiffusionConfig(timestep_density=density.kind, timestep_logit_mean=density.logit_mean,
                           timestep_logit_std=density.logit_std)
    patch, g = model.image.patch_size, torch.Generator().manual_seed(9)
    batches = list(itertools.islice(synthetic_batches(model, 256, 2, caption_first_prob=0.5, seed=3), 2))
    first = torch.cat([b.image_first.bool() for b in batches])
    assert bool(first.any()) and not bool(first.all())  # both kinds of image, so the cap is exercised
    for batch in batches:
        mb = prepare_micro_batch(batch, seed=7, step=1, dp_rank=0, index=0, device=torch.device("cpu"),
                                 dtype=torch.float32, cap=IMAGE_FIRST_CAP, diffusion=spec)
        noise_pred = torch.randn(mb.target.shape, generator=g)
        logits = torch.randn(*mb.labels.shape, 64, generator=g)
        loss = StepLoss(mb.lm_tokens, mb.image_tokens, 1, 1, 5.0, patch)
        new = loss.terms(mb, LMFusionOutput(logits.clone(), noise_pred))
        x_t, t, old = _old_step_terms(batch, 7, IMAGE_FIRST_CAP, density, noise_pred, logits.clone(), 5.0, patch,
                                      mb.lm_tokens, mb.image_tokens)
        assert torch.equal(mb.inputs.image_latents, x_t) and torch.equal(mb.inputs.image_timesteps, t)
        assert mb.inputs.image_timesteps.dtype == torch.long and mb.loss_weight is None
        for name in ("loss", "lm", "diffusion"):
            assert torch.equal(getattr(new, name), getattr(old, name)), name


def test_flow_and_min_snr_in_the_step(megatron_tp1):
    """flow + min_snr: the model sees x_s and 1000 s, regresses eps - x0, each image weighted by its Min-SNR
    weight; the noise draws are the per-sample ones of the paper's path (same generator, same order)."""
    from lmfusion.model.image_io import patchify
    from lmfusion.model.model import LMFusionOutput
    from lmfusion.training.step import StepLoss, image_noise, prepare_micro_batch
    from lmfusion.training.synthetic import synthetic_batches

    model = _tiny_model()
    spec = DiffusionConfig(objective="flow", loss_weighting="min_snr", flow_shift=2.0)
    batch = next(synthetic_batches(model, 256, 2, caption_first_prob=0.5, seed=4))
    assert bool(batch.image_first.any()) and not bool(batch.image_first.all())
    mb = prepare_micro_batch(batch, seed=7, step=1, dp_rank=0, index=0, device=torch.device("cpu"),
                             dtype=torch.float32, cap=IMAGE_FIRST_CAP, diffusion=spec)
    s, noise = image_noise(batch, 7, (7, 1, 0, 0), IMAGE_FIRST_CAP, spec)
    _, eps_noise = image_noise(batch, 7, (7, 1, 0, 0), IMAGE_FIRST_CAP)  # the paper's draw: same noise tensors
    assert torch.equal(noise, eps_noise)
    assert s.dtype == torch.float32 and float(s[batch.image_first.bool()].max()) < flow_cap(IMAGE_FIRST_CAP)
    x0 = batch.image_latents.float()
    assert torch.equal(mb.inputs.image_timesteps, s * T)
    assert torch.equal(mb.target, noise - x0)
    torch.testing.assert_close(mb.inputs.image_latents, (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * noise,
                               atol=0, rtol=0)
    w = mb.loss_weight
    torch.testing.assert_close(w, torch.minimum((1 - s) ** 2, 5.0 * s ** 2), atol=1e-7, rtol=0)
    pred = torch.zeros_like(mb.target)
    p = model.image.patch_size
    terms = StepLoss(mb.lm_tokens, mb.image_tokens, 1, 1, 5.0, p).terms(
        mb, LMFusionOutput(torch.zeros(*mb.labels.shape, 64), pred))
    per_image = patchify(mb.target, p).pow(2).mean(-1).sum(-1)  # zero prediction: the target's own energy
    torch.testing.assert_close(terms.diffusion, (w * per_image).sum() / mb.image_tokens, atol=1e-6, rtol=1e-6)
