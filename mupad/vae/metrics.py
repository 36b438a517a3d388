"""Reconstruction metrics on images in [0, 1]: PSNR and SSIM (Wang et al. 2004).

SSIM uses an 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, population
statistics, "valid" filtering (no padding) and averages over channels and positions; this
equals scikit-image's `structural_similarity(..., gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=1, channel_axis=...)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mupad.errors import MupadError

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


class MetricError(MupadError, ValueError):
    """Images given to a metric are unusable; the message says why."""


def _check_pair(a: torch.Tensor, b: torch.Tensor, min_side: int = 1) -> None:
    if a.shape != b.shape or a.dim() != 4:
        raise MetricError(
            f"expected two (B, C, H, W) tensors of the same shape, got {tuple(a.shape)} and "
            f"{tuple(b.shape)}"
        )
    if min(a.shape[-2:]) < min_side:
        raise MetricError(f"images must be at least {min_side}x{min_side}, got {tuple(a.shape)}")


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB (B,); +inf where the images are identical."""
    _check_pair(a, b)
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)  # (B,)
    return (10.0 * torch.log10(data_range**2 / mse)).float()  # mse 0 -> inf


def _gaussian_window(device: torch.device) -> torch.Tensor:
    coords = torch.arange(SSIM_WINDOW, dtype=torch.float64, device=device) - SSIM_WINDOW // 2
    g = torch.exp(-(coords**2) / (2 * SSIM_SIGMA**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]  # (11, 11)


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image mean SSIM (B,), averaged over channels and all valid window positions."""
    _check_pair(a, b, SSIM_WINDOW)
    a, b = a.double(), b.double()
    channels = a.shape[1]
    window = _gaussian_window(a.device).expand(channels, 1, SSIM_WINDOW, SSIM_WINDOW)

    def blur(x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H-10, W-10)
        return F.conv2d(x, window, groups=channels)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    return ssim_map.flatten(1).mean(1).float()  # (B,)
