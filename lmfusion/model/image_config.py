"""The image input/output configuration, apart from the modules so that reading a config imports no diffusers.

See :mod:`lmfusion.model.image_io` for what the fields mean to the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from lmfusion.errors import UserError

__all__ = ["ImageIOConfig", "tokens_per_image"]

ImageIOKind = Literal["unet", "linear"]
DownBlock = Literal["DownBlock2D", "ResnetDownsampleBlock2D"]  # diffusers' resnet-only blocks
UpBlock = Literal["UpBlock2D", "ResnetUpsampleBlock2D"]
_RESNET_EPS = 1e-6  # diffusers UNet2DModel default
_ACT = "silu"


@dataclass
class ImageIOConfig:
    """Image input/output layers. Latents are square: (latent_channels, latent_size, latent_size)."""

    latent_channels: int = 4
    """Channels of the VAE latent."""
    latent_size: int = 32
    """Height = width of the latent (image size / VAE factor)."""
    patch_size: int = 2
    """Side of the square patch that becomes one token."""
    kind: ImageIOKind = "unet"
    """"unet": U-Net down/up blocks around the patchify; "linear": linear patchify only."""
    block_channels: tuple[int, ...] = (128, 256)
    """Output channels of each U-Net down block (up blocks mirror them)."""
    downsample: tuple[bool, ...] = (False, False)
    """Whether each down block halves the resolution (its mirrored up block doubles it)."""
    layers_per_block: int = 2
    """Resnets per U-Net block."""
    norm_groups: int = 32
    """GroupNorm groups in the U-Net; must divide every block's channels."""
    down_block_type: DownBlock = "DownBlock2D"
    """diffusers down block (resnet-only): DownBlock2D or ResnetDownsampleBlock2D."""
    up_block_type: UpBlock = "UpBlock2D"
    """diffusers up block (resnet-only): UpBlock2D or ResnetUpsampleBlock2D."""
    linear_time_channels: int = 256
    """Sinusoidal timestep features of the linear kind (projected to hidden by TimestepEmbedding)."""

    def __post_init__(self) -> None:
        self.block_channels = tuple(self.block_channels)
        self.downsample = tuple(bool(d) for d in self.downsample)
        if self.kind not in get_args(ImageIOKind):
            raise UserError(f"image_io kind must be 'unet' or 'linear', got {self.kind!r}")
        for name in ("latent_channels", "latent_size", "patch_size", "layers_per_block", "norm_groups"):
            if getattr(self, name) < 1:
                raise UserError(f"image_io {name} must be >= 1, got {getattr(self, name)}")
        if self.kind == "unet":
            if not self.block_channels or len(self.block_channels) != len(self.downsample):
                raise UserError(f"block_channels {self.block_channels} and downsample {self.downsample} must be "
                                f"non-empty and of equal length")
            bad = [c for c in self.block_channels if c % self.norm_groups]
            if bad:
                raise UserError(f"norm_groups={self.norm_groups} must divide every block channel; {bad} do not")
            if self.down_block_type not in get_args(DownBlock) or self.up_block_type not in get_args(UpBlock):
                raise UserError(f"block types must be in {get_args(DownBlock)} / {get_args(UpBlock)}; got "
                                f"{self.down_block_type!r} / {self.up_block_type!r}")
        if self.latent_size % self.downsample_factor:
            raise UserError(f"latent_size={self.latent_size} not divisible by the U-Net downsampling factor "
                            f"{self.downsample_factor}")
        reduced = self.latent_size // self.downsample_factor
        if reduced % self.patch_size:
            raise UserError(f"latent_size={self.latent_size} / downsampling {self.downsample_factor} = {reduced} "
                            f"not divisible by patch_size={self.patch_size}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** sum(self.downsample) if self.kind == "unet" else 1

    @property
    def grid_size(self) -> int:
        """Patches per side: tokens form a (grid_size, grid_size) grid."""
        return self.latent_size // self.downsample_factor // self.patch_size


def tokens_per_image(cfg: ImageIOConfig) -> int:
    """Tokens one image occupies in the sequence (between <boi> and <eoi>)."""
    return cfg.grid_size**2
