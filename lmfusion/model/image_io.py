"""Image latents <-> transformer hidden states, conditioned on the diffusion timestep.

Two kinds (``ImageIOConfig.kind``), each an (encoder, decoder) pair with the same call signatures:

* ``"unet"`` (paper default): latent (b, C, H, W) -> ``conv_in`` -> timestep-conditioned diffusers U-Net down
  blocks -> ``GroupNorm``/SiLU -> 2x2 patchify -> ``Linear`` -> tokens (b, n, hidden). Output: tokens -> ``Linear``
  -> unpatchify -> timestep-conditioned diffusers U-Net up blocks -> ``GroupNorm``/SiLU -> ``conv_out`` -> predicted
  noise (b, C, H, W).
* ``"linear"`` (light option): patchify -> ``Linear`` + timestep embedding added to every patch; output
  ``Linear`` -> unpatchify.

Design choices:

* **Downsampling only as configured.** ``downsample[i]`` says whether down block ``i`` halves the resolution (the up
  block mirroring it doubles it back). The token count is ``(latent_size / 2**sum(downsample) / patch_size)**2``
  (:func:`tokens_per_image`). Paper: 256 px image -> 32x32 latent -> no U-Net downsampling, 2x2 patches -> 256
  tokens, hence ``downsample=(False, False)`` by default.
* **The decoder's skip comes from the input latent, not from encoder activations.** The decoder receives the noisy
  latent ``x_t`` it is denoising and feeds it (average-pooled to each block's resolution, then a 3x3 conv to the
  channels diffusers' up-block resnets expect) as the skip input of every up-block resnet. Why not the encoder's
  activations: with pipeline parallelism the encoder runs on the first stage and the decoder on the last, and
  megatron's pipeline sends one tensor between stages; ``x_t`` and ``t`` are batch data the last stage already has
  (it needs the noise for the loss), so nothing extra crosses stages.
* **Zero-initialised output layer** (``conv_out`` / the linear output projection). The initial prediction is exactly
  0, so the initial diffusion loss is E[eps^2] = 1 whatever the random U-Net weights, and the lambda=5 weighted
  diffusion loss does not push random-decoder noise into the image copies of the pretrained layers at step 0 (the
  ADM/DiT convention). Cost: on the very first backward only the output layer gets a non-zero gradient; the rest of
  the decoder (and, through it, the transformer) gets gradients from the second step on.
* Each module has its own timestep embedding (diffusers ``Timesteps`` + ``TimestepEmbedding``): encoder and decoder
  may live on different pipeline stages, so they share no parameters.
* Token order: patches row-major over the (H/p, W/p) grid; within a patch, features are (channel, dy, dx).
"""

from __future__ import annotations

import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.unets.unet_2d_blocks import get_down_block, get_up_block
from torch import Tensor, nn

from lmfusion.model.image_config import ImageIOConfig, tokens_per_image

__all__ = [
    "ImageIOConfig",
    "tokens_per_image",
    "patchify",
    "unpatchify",
    "UNetImageEncoder",
    "UNetImageDecoder",
    "LinearPatchify",
    "LinearUnpatchify",
    "build_image_io",
]

_RESNET_EPS = 1e-6  # diffusers UNet2DModel default
_ACT = "silu"


def patchify(x: Tensor, p: int) -> Tensor:
    """(b, c, H, W) -> (b, (H/p)*(W/p), c*p*p); patches row-major, features (c, dy, dx)."""
    b, c, h, w = x.shape
    if h % p or w % p:
        raise ValueError(f"spatial size {h}x{w} not divisible by patch size {p}")
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)  # (b, H/p, W/p, c, p, p)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(tokens: Tensor, p: int, channels: int, grid: int) -> Tensor:
    """(b, grid*grid, channels*p*p) -> (b, channels, grid*p, grid*p); exact inverse of :func:`patchify`."""
    b, n, f = tokens.shape
    if n != grid * grid or f != channels * p * p:
        raise ValueError(f"tokens {tuple(tokens.shape)} do not match grid {grid}x{grid} of {channels}x{p}x{p} patches")
    x = tokens.reshape(b, grid, grid, channels, p, p).permute(0, 3, 1, 4, 2, 5)  # (b, c, grid, p, grid, p)
    return x.reshape(b, channels, grid * p, grid * p)


class _TimeEmbedding(nn.Module):
    """t (b,) -> sinusoidal features -> MLP -> (b, out_dim), in the module's parameter dtype."""

    def __init__(self, channels: int, out_dim: int) -> None:
        super().__init__()
        self.proj = Timesteps(channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.mlp = TimestepEmbedding(channels, out_dim)

    def forward(self, t: Tensor) -> Tensor:
        features = self.proj(t)  # (b, channels), float32 whatever the model dtype
        return self.mlp(features.to(self.mlp.linear_1.weight.dtype))


def _check_latent(cfg: ImageIOConfig, x: Tensor, t: Tensor, name: str) -> None:
    expected = (cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    if x.dim() != 4 or tuple(x.shape[1:]) != expected:
        raise ValueError(f"{name} must be (b, {expected[0]}, {expected[1]}, {expected[2]}), got {tuple(x.shape)}")
    if t.shape != (x.shape[0],):
        raise ValueError(f"timesteps must be ({x.shape[0]},) (one per image), got {tuple(t.shape)}")


class UNetImageEncoder(nn.Module):
    """Noisy latent (b, C, H, W) + timestep (b,) -> image tokens (b, n, hidden)."""

    def __init__(self, cfg: ImageIOConfig, hidden_size: int) -> None:
        super().__init__()
        self.cfg = cfg
        c0, temb_dim = cfg.block_channels[0], 4 * cfg.block_channels[0]  # diffusers UNet2DModel convention
        self.time_embedding = _TimeEmbedding(c0, temb_dim)
        self.conv_in = nn.Conv2d(cfg.latent_channels, c0, kernel_size=3, padding=1)
        blocks, in_ch = [], c0
        for out_ch, down in zip(cfg.block_channels, cfg.downsample):
            blocks.append(get_down_block(
                cfg.down_block_type, num_layers=cfg.layers_per_block, in_channels=in_ch, out_channels=out_ch,
                temb_channels=temb_dim, add_downsample=down, resnet_eps=_RESNET_EPS, resnet_act_fn=_ACT,
                resnet_groups=cfg.norm_groups, downsample_padding=1,
                attention_head_dim=out_ch,  # unused by resnet-only blocks; set to silence diffusers' warning
            ))
            in_ch = out_ch
        self.down_blocks = nn.ModuleList(blocks)
        self.norm_out = nn.GroupNorm(cfg.norm_groups, in_ch, eps=_RESNET_EPS)
        self.proj_out = nn.Linear(in_ch * cfg.patch_size**2, hidden_size)

    def forward(self, latents: Tensor, t: Tensor) -> Tensor:
        """latents (b, C, H, W), t (b,) int or float -> (b, tokens_per_image, hidden)."""
        _check_latent(self.cfg, latents, t, "latents")
        temb = self.time_embedding(t)  # (b, 4*c0)
        x = self.conv_in(latents)  # (b, c0, H, W)
        for block in self.down_blocks:
            x, _ = block(x, temb)  # (b, c_i, H_i, W_i); per-resnet states unused (skip comes from x_t)
        x = F.silu(self.norm_out(x))
        return self.proj_out(patchify(x, self.cfg.patch_size))  # (b, n, c_last*p*p) -> (b, n, hidden)


class UNetImageDecoder(nn.Module):
    """Image-token hidden states (b, n, hidden) + noisy latent x_t + timestep -> predicted noise (b, C, H, W)."""

    def __init__(self, cfg: ImageIOConfig, hidden_size: int) -> None:
        super().__init__()
        self.cfg = cfg
        c0, temb_dim = cfg.block_channels[0], 4 * cfg.block_channels[0]
        rev_ch, n = cfg.block_channels[::-1], len(cfg.block_channels)
        self.time_embedding = _TimeEmbedding(c0, temb_dim)
        self.proj_in = nn.Linear(hidden_size, rev_ch[0] * cfg.patch_size**2)
        blocks, skips, pools = [], [], []
        prev_ch, level = rev_ch[0], sum(cfg.downsample)  # level: halvings below the latent resolution
        for j in range(n):
            out_ch, skip_in_ch, up = rev_ch[j], rev_ch[min(j + 1, n - 1)], cfg.downsample[n - 1 - j]
            blocks.append(get_up_block(
                cfg.up_block_type, num_layers=cfg.layers_per_block, in_channels=skip_in_ch, out_channels=out_ch,
                prev_output_channel=prev_ch, temb_channels=temb_dim, add_upsample=up, resnet_eps=_RESNET_EPS,
                resnet_act_fn=_ACT, resnet_groups=cfg.norm_groups, resolution_idx=j,
                attention_head_dim=out_ch,  # unused by resnet-only blocks; set to silence diffusers' warning
            ))
            # diffusers up blocks concatenate one skip per resnet: resnet i expects `out_ch` channels, the last
            # one `in_channels` (UpBlock2D/ResnetUpsampleBlock2D.__init__).
            slot_ch = [skip_in_ch if i == cfg.layers_per_block - 1 else out_ch for i in range(cfg.layers_per_block)]
            skips.append(nn.ModuleList(
                nn.Conv2d(cfg.latent_channels, c, kernel_size=3, padding=1) for c in slot_ch))
            pools.append(2**level)
            prev_ch, level = out_ch, level - int(up)
        self.up_blocks = nn.ModuleList(blocks)
        self.skip_convs = nn.ModuleList(skips)
        self.skip_pool = pools
        self.norm_out = nn.GroupNorm(cfg.norm_groups, c0, eps=_RESNET_EPS)
        self.conv_out = nn.Conv2d(c0, cfg.latent_channels, kernel_size=3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # prediction starts at 0: see module docstring
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, hidden: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """hidden (b, n, hidden), x_t (b, C, H, W) noisy latent, t (b,) -> predicted noise (b, C, H, W)."""
        cfg = self.cfg
        _check_latent(cfg, x_t, t, "x_t")
        temb = self.time_embedding(t)  # (b, 4*c0)
        x = unpatchify(self.proj_in(hidden), cfg.patch_size, cfg.block_channels[-1], cfg.grid_size)  # (b, c, h', w')
        for block, convs, pool in zip(self.up_blocks, self.skip_convs, self.skip_pool):
            src = F.avg_pool2d(x_t, pool) if pool > 1 else x_t  # x_t at this block's input resolution
            # diffusers pops skips from the end: the first resnet takes the last element.
            res = tuple(conv(src) for conv in convs)[::-1]
            x = block(x, res, temb)
        return self.conv_out(F.silu(self.norm_out(x)))  # (b, C, H, W)


class LinearPatchify(nn.Module):
    """Latent (b, C, H, W) + t (b,) -> patchify -> Linear, plus a timestep embedding on every patch."""

    def __init__(self, cfg: ImageIOConfig, hidden_size: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.proj = nn.Linear(cfg.latent_channels * cfg.patch_size**2, hidden_size)
        self.time_embedding = _TimeEmbedding(cfg.linear_time_channels, hidden_size)

    def forward(self, latents: Tensor, t: Tensor) -> Tensor:
        """latents (b, C, H, W), t (b,) -> (b, n, hidden)."""
        _check_latent(self.cfg, latents, t, "latents")
        tokens = self.proj(patchify(latents, self.cfg.patch_size))  # (b, n, hidden)
        return tokens + self.time_embedding(t)[:, None, :]  # same embedding on each patch of an image


class LinearUnpatchify(nn.Module):
    """Hidden (b, n, hidden) -> Linear -> unpatchify -> predicted noise (b, C, H, W)."""

    def __init__(self, cfg: ImageIOConfig, hidden_size: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.proj = nn.Linear(hidden_size, cfg.latent_channels * cfg.patch_size**2)
        nn.init.zeros_(self.proj.weight)  # prediction starts at 0: see module docstring
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Same signature as :class:`UNetImageDecoder`; ``x_t`` is only shape-checked and ``t`` is unused (the
        linear head is unconditioned, as in Transfusion)."""
        _check_latent(self.cfg, x_t, t, "x_t")
        cfg = self.cfg
        return unpatchify(self.proj(hidden), cfg.patch_size, cfg.latent_channels, cfg.grid_size)


def build_image_io(cfg: ImageIOConfig, hidden_size: int) -> tuple[nn.Module, nn.Module]:
    """(encoder, decoder) of ``cfg.kind``: encoder(latents, t) -> tokens; decoder(hidden, x_t, t) -> noise."""
    if cfg.kind == "unet":
        return UNetImageEncoder(cfg, hidden_size), UNetImageDecoder(cfg, hidden_size)
    return LinearPatchify(cfg, hidden_size), LinearUnpatchify(cfg, hidden_size)
