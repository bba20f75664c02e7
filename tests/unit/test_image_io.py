"""Image input/output layers (lmfusion.model.image_io): shapes, token counts, gradients, timestep conditioning."""

from __future__ import annotations

import pytest
import torch

from lmfusion.model.image_io import (
    ImageIOConfig,
    UNetImageDecoder,
    build_image_io,
    patchify,
    tokens_per_image,
    unpatchify,
)

HIDDEN = 48
# Small configs (channels 16-64) so the whole file runs in seconds on 2 cores.
CONFIGS = {
    "unet_no_downsample": ImageIOConfig(latent_channels=4, latent_size=8, block_channels=(16, 32), norm_groups=8,
                                        layers_per_block=1),
    "unet_resnet_blocks_downsample": ImageIOConfig(
        latent_channels=4, latent_size=16, block_channels=(16, 32), downsample=(True, False), norm_groups=8,
        down_block_type="ResnetDownsampleBlock2D", up_block_type="ResnetUpsampleBlock2D"),
    "unet_three_blocks_patch4": ImageIOConfig(latent_channels=8, latent_size=16, patch_size=4,
                                              block_channels=(16, 32, 32), downsample=(True, False, False),
                                              norm_groups=8),
    "linear": ImageIOConfig(latent_channels=1, latent_size=28, patch_size=4, kind="linear"),
}


def make_inputs(cfg: ImageIOConfig, batch: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.latent_channels, cfg.latent_size, cfg.latent_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    return x, t


def perturb_output_layer(decoder: torch.nn.Module, seed: int = 1) -> None:
    """Give the zero-initialised output layer random weights, so gradients reach the rest of the decoder."""
    g = torch.Generator().manual_seed(seed)
    out = decoder.conv_out if isinstance(decoder, UNetImageDecoder) else decoder.proj
    with torch.no_grad():
        out.weight.copy_(torch.randn(out.weight.shape, generator=g) * 0.1)


@pytest.mark.parametrize("name", CONFIGS)
def test_shapes_and_token_count(name: str):
    cfg = CONFIGS[name]
    enc, dec = build_image_io(cfg, HIDDEN)
    x, t = make_inputs(cfg)
    tokens = enc(x, t)
    grid = cfg.latent_size // 2 ** (sum(cfg.downsample) if cfg.kind == "unet" else 0) // cfg.patch_size
    assert tokens.shape == (x.shape[0], tokens_per_image(cfg), HIDDEN)
    assert tokens_per_image(cfg) == grid * grid
    assert dec(tokens, x, t).shape == x.shape


def test_paper_layout_token_count():
    # 256 px image, VAE factor 8 -> 32x32 latent; no U-Net downsampling; 2x2 patches -> (32/2)^2 tokens.
    cfg = ImageIOConfig(latent_size=32, patch_size=2)
    assert cfg.downsample == (False, False)
    assert tokens_per_image(cfg) == (cfg.latent_size // cfg.patch_size) ** 2


@pytest.mark.parametrize("name", CONFIGS)
def test_output_starts_at_zero(name: str):
    # Zero-initialised output layer: the prediction is exactly 0 whatever the input (exact, no tolerance).
    cfg = CONFIGS[name]
    enc, dec = build_image_io(cfg, HIDDEN)
    x, t = make_inputs(cfg)
    assert torch.equal(dec(enc(x, t), x, t), torch.zeros_like(x))


@pytest.mark.parametrize("name", CONFIGS)
def test_gradients_reach_every_parameter(name: str):
    cfg = CONFIGS[name]
    enc, dec = build_image_io(cfg, HIDDEN)
    perturb_output_layer(dec)
    x, t = make_inputs(cfg)
    noise = torch.randn_like(x)
    loss = (dec(enc(x, t), x, t) - noise).pow(2).mean()  # the transformer in between is the identity here
    loss.backward()
    for module_name, module in (("encoder", enc), ("decoder", dec)):
        for pname, p in module.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{module_name}.{pname} got no gradient"


@pytest.mark.parametrize("p", [1, 2, 4])
def test_patchify_unpatchify_are_exact_inverses(p: int):
    channels, grid = 3, 5
    x = torch.randn(2, channels, grid * p, grid * p)
    tokens = patchify(x, p)
    assert tokens.shape == (2, grid * grid, channels * p * p)
    assert torch.equal(unpatchify(tokens, p, channels, grid), x)
    assert torch.equal(patchify(unpatchify(tokens, p, channels, grid), p), tokens)
    # Row-major patch order, features (c, dy, dx): token (row r, col c) holds x[..., r*p:(r+1)*p, c*p:(c+1)*p].
    r, c = 1, 3
    torch.testing.assert_close(tokens[:, r * grid + c], x[:, :, r * p:(r + 1) * p, c * p:(c + 1) * p].reshape(2, -1),
                               atol=0, rtol=0)


@pytest.mark.parametrize("name", CONFIGS)
def test_timestep_changes_the_output(name: str):
    cfg = CONFIGS[name]
    enc, dec = build_image_io(cfg, HIDDEN)
    perturb_output_layer(dec)
    x, _ = make_inputs(cfg, batch=2)
    early, late = torch.zeros(2, dtype=torch.long), torch.full((2,), 999)
    tokens_early, tokens_late = enc(x, early), enc(x, late)
    assert not torch.allclose(tokens_early, tokens_late), "encoder ignores the timestep"
    if cfg.kind == "unet":
        assert not torch.allclose(dec(tokens_early, x, early), dec(tokens_early, x, late)), "decoder ignores t"
    else:
        # The linear kind adds one embedding per image: the difference is the same on every patch.
        diff = tokens_late - tokens_early
        torch.testing.assert_close(diff, diff[:, :1].expand_as(diff), atol=1e-5, rtol=0)  # fp32 rounding of x+e


def test_decoder_uses_the_noisy_latent_skip():
    cfg = CONFIGS["unet_resnet_blocks_downsample"]
    enc, dec = build_image_io(cfg, HIDDEN)
    perturb_output_layer(dec)
    x, t = make_inputs(cfg)
    hidden = torch.randn(x.shape[0], tokens_per_image(cfg), HIDDEN)
    assert not torch.allclose(dec(hidden, x, t), dec(hidden, torch.zeros_like(x), t))


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(latent_size=30, patch_size=4), "latent_size=30"),
    (dict(latent_size=16, downsample=(True, True), patch_size=8), "not divisible by patch_size=8"),
    (dict(block_channels=(24, 32), norm_groups=16), r"norm_groups=16 must divide every block channel; \[24\]"),
    (dict(block_channels=(32,), downsample=(False, False)), "equal length"),
    (dict(kind="vq"), "'vq'"),
    (dict(down_block_type="CrossAttnDownBlock2D"), "CrossAttnDownBlock2D"),
])
def test_config_errors_name_the_bad_value(kwargs: dict, message: str):
    with pytest.raises(ValueError, match=message):
        ImageIOConfig(**kwargs)


def test_wrong_latent_shape_is_rejected():
    cfg = CONFIGS["unet_no_downsample"]
    enc, _ = build_image_io(cfg, HIDDEN)
    x, t = make_inputs(cfg)
    with pytest.raises(ValueError, match="latents must be"):
        enc(x[:, :1], t)
    with pytest.raises(ValueError, match="timesteps must be"):
        enc(x, t[:1])
