"""Cheap, encoder-free statistics of generated images (no pretrained weights needed).

They cannot replace FID on a pathology encoder, but they tell, on any machine, whether a
model produces the colour distribution of H&E at all and whether its output follows the
condition.
"""

from __future__ import annotations

import torch


def _pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float pixels (B*H*W, 3) in [0, 1]."""
    return images.float().div(255.0).permute(0, 2, 3, 1).reshape(-1, 3)


def sliced_wasserstein_rgb(
    images_a: torch.Tensor,
    images_b: torch.Tensor,
    num_projections: int = 64,
    max_pixels: int = 50_000,
    seed: int = 0,
) -> float:
    """Sliced 1-Wasserstein distance between the RGB pixel distributions of two image sets."""
    generator = torch.Generator().manual_seed(seed)
    a, b = _pixels(images_a), _pixels(images_b)
    n = min(a.shape[0], b.shape[0], max_pixels)
    a = a[torch.randperm(a.shape[0], generator=generator)[:n]]
    b = b[torch.randperm(b.shape[0], generator=generator)[:n]]
    directions = torch.randn(3, num_projections, generator=generator)
    directions = directions / directions.norm(dim=0, keepdim=True)  # (3, P)
    proj_a = (a @ directions).sort(dim=0).values  # (n, P)
    proj_b = (b @ directions).sort(dim=0).values
    return float((proj_a - proj_b).abs().mean())


def colour_features(images: torch.Tensor) -> torch.Tensor:
    """Per-image colour statistics: mean, std and 10/50/90 % quantiles per channel (B, 15)."""
    x = images.float().div(255.0).flatten(2)  # (B, 3, HW)
    quantiles = torch.quantile(x, torch.tensor([0.1, 0.5, 0.9]), dim=2)  # (3q, B, 3)
    return torch.cat([x.mean(2), x.std(2), quantiles.permute(1, 0, 2).flatten(1)], dim=1)


def class_consistency(
    generated: torch.Tensor,
    generated_labels: torch.Tensor,
    real: torch.Tensor,
    real_labels: torch.Tensor,
) -> float:
    """Fraction of generated images whose nearest real-class centroid is their own class.

    Features are colour statistics standardised on the real set; chance is 1 / classes.
    """
    real_features = colour_features(real)
    mean, std = real_features.mean(0), real_features.std(0).clamp_min(1e-6)
    real_features = (real_features - mean) / std
    generated_features = (colour_features(generated) - mean) / std
    classes = torch.unique(real_labels)
    centroids = torch.stack([real_features[real_labels == c].mean(0) for c in classes])
    nearest = classes[torch.cdist(generated_features, centroids).argmin(dim=1)]
    return float((nearest == generated_labels).float().mean())
