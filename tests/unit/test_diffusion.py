"""DDPM schedule, noising, timestep sampling, samplers and guidance (lmfusion.diffusion)."""

from __future__ import annotations

import math

import pytest
import torch

from lmfusion.diffusion import (
    IMAGE_FIRST_CAP,
    NUM_TRAIN_TIMESTEPS,
    TimestepDensity,
    add_noise,
    cfg_combine,
    make_sampler,
    make_train_scheduler,
    sample_timesteps,
)
from tests.fixtures import cosine_alphas_cumprod

T = NUM_TRAIN_TIMESTEPS


def test_train_scheduler_is_cosine_epsilon():
    s = make_train_scheduler()
    assert s.config.num_train_timesteps == T
    assert s.config.beta_schedule == "squaredcos_cap_v2"
    assert s.config.prediction_type == "epsilon"
    # diffusers keeps the schedule in float32: relative error of a float32 cumprod over T terms ~ T * 6e-8.
    torch.testing.assert_close(s.alphas_cumprod.double(), cosine_alphas_cumprod(T), atol=1e-5, rtol=0)


def test_add_noise_matches_closed_form():
    g = torch.Generator().manual_seed(0)
    n = 6
    x0 = torch.randn(n, 4, 8, 8, generator=g)
    eps = torch.randn(n, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 250, 500, 998, T - 1])
    abar = cosine_alphas_cumprod(T)[t].view(n, 1, 1, 1)
    expected = abar.sqrt() * x0.double() + (1 - abar).sqrt() * eps.double()
    # float32 coefficients (abar to ~1e-6) times O(1) Gaussians (|x| < 5 here): error well under 1e-5.
    torch.testing.assert_close(add_noise(x0, eps, t).double(), expected, atol=1e-5, rtol=0)


def test_add_noise_keeps_dtype_and_computes_in_fp32():
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 2, 3, 4, 4, generator=g)  # two images each
    t = torch.tensor([10, 900])
    out = add_noise(x0.bfloat16(), eps.bfloat16(), t)
    assert out.dtype == torch.bfloat16
    # Same bf16 inputs through fp32 math, rounded once at the end: identical.
    assert torch.equal(out, add_noise(x0.bfloat16().float(), eps.bfloat16().float(), t).bfloat16())


def test_sample_timesteps_range_and_cap():
    n = 4000
    g = torch.Generator().manual_seed(0)
    image_first = torch.rand(n, generator=g) < 0.2
    t = sample_timesteps(n, image_first, generator=g)
    assert t.dtype == torch.int64 and t.shape == (n,)
    assert int(t.min()) >= 0 and int(t.max()) <= T - 1
    assert int(t[image_first].max()) <= IMAGE_FIRST_CAP
    # With ~3200 uniform draws over [0, T) the chance that none exceeds the cap is 2^-3200: the cap is not global.
    assert int(t[~image_first].max()) > IMAGE_FIRST_CAP
    # Both ends of [0, cap] are reachable (inclusive cap): with cap 0 every image-first draw is 0.
    assert int(sample_timesteps(8, torch.ones(8, dtype=torch.bool), cap=0, generator=g).max()) == 0


def test_sample_timesteps_is_deterministic_with_a_seeded_generator():
    image_first = torch.tensor([True, False] * 16)
    n = image_first.numel()
    a = sample_timesteps(n, image_first, generator=torch.Generator().manual_seed(123))
    b = sample_timesteps(n, image_first, generator=torch.Generator().manual_seed(123))
    c = sample_timesteps(n, image_first, generator=torch.Generator().manual_seed(124))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_logit_normal_density_moves_caption_first_draws_only():
    n = 20000
    image_first = torch.rand(n, generator=torch.Generator().manual_seed(1)) < 0.3
    mean, std = 1.0, 1.0
    t = sample_timesteps(n, image_first, generator=torch.Generator().manual_seed(2),
                         density=TimestepDensity("logit_normal", mean, std))
    later = t[~image_first].double()
    # t/T = sigmoid(N(mean, std)): its quantiles are sigmoid of the normal's, computed here independently.
    for q in (0.1, 0.5, 0.9):
        z = mean + std * math.sqrt(2) * torch.erfinv(torch.tensor(2 * q - 1, dtype=torch.float64))
        expected = T * torch.sigmoid(z)
        assert abs(float(torch.quantile(later, q)) - float(expected)) < 12, q
    # Image-first draws stay uniform in [0, cap]: mean cap / 2, both ends reached.
    first = t[image_first].double()
    assert int(first.max()) == IMAGE_FIRST_CAP and int(first.min()) == 0
    assert abs(float(first.mean()) - IMAGE_FIRST_CAP / 2) < 8
    # The default density is the paper's uniform draw, unchanged.
    uniform = sample_timesteps(n, image_first, generator=torch.Generator().manual_seed(2))
    assert torch.equal(uniform, sample_timesteps(n, image_first, generator=torch.Generator().manual_seed(2),
                                                 density=TimestepDensity("uniform", 5.0, 2.0)))
    assert abs(float(uniform[~image_first].double().mean()) - (T - 1) / 2) < 10
    assert torch.equal(uniform[image_first], t[image_first])  # same first draw; the density's is a second one


def test_timestep_density_errors():
    with pytest.raises(ValueError, match="one of \\('uniform', 'logit_normal'\\), got 'mode'"):
        TimestepDensity("mode")
    with pytest.raises(ValueError, match="logit_std must be > 0, got -1"):
        TimestepDensity("logit_normal", 0.0, -1.0)


def test_sample_timesteps_errors():
    with pytest.raises(ValueError, match=f"cap={T}"):
        sample_timesteps(2, torch.zeros(2, dtype=torch.bool), cap=T)
    with pytest.raises(ValueError, match="bool tensor"):
        sample_timesteps(2, torch.zeros(2))
    with pytest.raises(ValueError, match=r"got range \[0, 1000\]"):
        add_noise(torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 2, 2), torch.tensor([0, T]))


def test_cfg_combine():
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 5, 4, generator=g)
    assert torch.equal(cfg_combine(cond, uncond, 1.0), cond)
    assert torch.equal(cfg_combine(cond, uncond, 0.0), uncond)
    scale = 4.5
    # fp32 lerp vs the textbook formula: values O(1) x scale 4.5 -> rounding differences of a few 1e-7.
    torch.testing.assert_close(cfg_combine(cond, uncond, scale), uncond + scale * (cond - uncond), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_sampler_configuration(kind: str):
    steps = 25
    s = make_sampler(kind, steps)
    assert len(s.timesteps) == steps
    assert int(s.timesteps[0]) == T - 1, "trailing spacing starts at the noisiest training step"
    assert not s.config.clip_sample
    torch.testing.assert_close(s.alphas_cumprod, make_train_scheduler().alphas_cumprod, atol=0, rtol=0)
    with pytest.raises(ValueError, match="steps=0"):
        make_sampler(kind, 0)


def test_ddim_with_an_oracle_denoiser_recovers_unbounded_latents():
    # An epsilon model that knows x0 makes deterministic DDIM land on x0. Latents with |x| >> 1 check that nothing
    # clips the predicted sample to [-1, 1] (diffusers' default would).
    g = torch.Generator().manual_seed(0)
    x0 = 3 * torch.randn(2, 4, 8, 8, generator=g)
    s = make_sampler("ddim", 20)
    abar = s.alphas_cumprod
    x = torch.randn(x0.shape, generator=g)
    for t in s.timesteps:
        eps = (x - abar[t].sqrt() * x0) / (1 - abar[t]).sqrt()
        x = s.step(eps, t, x).prev_sample
    # The last step leaves a sqrt(1 - abar_0)-weighted noise term in float32; observed ~1e-5, 1e-3 is margin.
    torch.testing.assert_close(x, x0, atol=1e-3, rtol=0)


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_sampler_x0_clipping_option(kind: str):
    s = make_sampler(kind, 10, clip_x0=2.5)
    assert s.config.clip_sample and s.config.clip_sample_range == 2.5
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="clip_x0"):
            make_sampler(kind, 10, clip_x0=bad)


def test_x0_clipping_keeps_the_first_step_in_distribution():
    # The cosine schedule's sqrt(abar) at t = T-1 is ~5e-5: a noise prediction off by 0.01 there (a good network)
    # becomes an x0 estimate off by ~200, and the next x_t is ~15 standard deviations out: an input no denoiser was
    # trained on (the quickstart's samples were saturated noise). Clipped to the data's range, x0 stays in it and
    # x_t keeps the training distribution's scale.
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1  # data in [-1, 1]
    noise = torch.randn(x0.shape, generator=g)
    for clip in (None, 1.0):
        s = make_sampler("ddim", 20, clip_x0=clip)
        t = s.timesteps[0]
        abar = s.alphas_cumprod[t]
        x = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
        out = s.step(noise + 0.01, t, x)
        if clip is None:
            assert out.pred_original_sample.abs().min() > 100
            assert out.prev_sample.abs().mean() > 10
        else:
            assert out.pred_original_sample.abs().max() <= 1.0
            assert out.prev_sample.std() < 1.5  # ~ N(0, 1): what the denoiser saw in training at this t
