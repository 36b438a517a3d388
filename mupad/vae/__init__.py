"""A pathology VAE: a diffusers AutoencoderKL trained from scratch on H&E tiles.

`train_vae` writes `<out>/vae/` in the diffusers folder format (config.json +
diffusion_pytorch_model.safetensors) with `scaling_factor` / `shift_factor` fitted to the
training latents, so `mupad.latents.load_codec(<out>)` gives ~unit-variance latents, and the
same code loads SD-VAE when users have it.
"""

from mupad.vae.config import VAEConfigError, VAETrainConfig
from mupad.vae.metrics import psnr, ssim
from mupad.vae.model import build_autoencoder, vae_preset, vae_preset_names

__all__ = [
    "VAEConfigError",
    "VAETrainConfig",
    "build_autoencoder",
    "psnr",
    "ssim",
    "vae_preset",
    "vae_preset_names",
]
