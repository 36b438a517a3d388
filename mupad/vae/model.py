"""Named AutoencoderKL shapes, built with diffusers (random init, no download)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from mupad.vae.config import VAEConfigError

if TYPE_CHECKING:
    from diffusers import AutoencoderKL


@dataclass(frozen=True)
class VAEPreset:
    block_out_channels: tuple[int, ...]  # one entry per resolution; downsample = 2**(len-1)
    layers_per_block: int
    latent_channels: int
    norm_num_groups: int

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


_PRESETS: dict[str, VAEPreset] = {
    # tests: ~0.1 M parameters, 8x down
    "tiny": VAEPreset((8, 16, 16, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8),
    # CPU demo: ~4 M parameters, 8x down
    "small": VAEPreset(
        (32, 64, 128, 128), layers_per_block=1, latent_channels=4, norm_num_groups=32
    ),
    # the SD-VAE shape (84 M parameters), 8x down
    "sd": VAEPreset(
        (128, 256, 512, 512), layers_per_block=2, latent_channels=4, norm_num_groups=32
    ),
}


def vae_preset_names() -> tuple[str, ...]:
    return tuple(_PRESETS)


def vae_preset(name: str) -> VAEPreset:
    try:
        return _PRESETS[name]
    except KeyError:
        raise VAEConfigError(
            f"unknown VAE preset {name!r}; choose one of {', '.join(_PRESETS)}"
        ) from None


def build_autoencoder(name: str, sample_size: int = 256) -> AutoencoderKL:
    """A randomly initialised AutoencoderKL of preset `name` (scaling 1, shift 0 until fitted)."""
    from diffusers import AutoencoderKL  # lazy: heavy import

    preset = vae_preset(name)
    depth = len(preset.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * depth,
        up_block_types=("UpDecoderBlock2D",) * depth,
        block_out_channels=preset.block_out_channels,
        layers_per_block=preset.layers_per_block,
        latent_channels=preset.latent_channels,
        norm_num_groups=preset.norm_num_groups,
        sample_size=sample_size,
        scaling_factor=1.0,
        shift_factor=0.0,
    )
