"""Per-set measures of what a pathologist sees first in generated tiles.

- `border_ratio`: how visible the token grid is. The mean absolute difference between
  neighbouring pixels that sit on either side of a token border, divided by the same for
  neighbours inside a token. Real tissue knows nothing of the grid, so real crops score ~1.0;
  a mosaic of independently drawn blocks scores well above 1.
- `colour_moments`: per-channel mean and standard deviation of the pixels, in [0, 255],
  to compare against the real tiles' (guidance drifts colours out of the stain range).
- `nearest_distances`: each tile's Euclidean distance to its nearest training tile in a
  feature space. Generated tiles much closer to the training set than held-out real tiles
  are (the reference set's own nearest distances) are copies, not new tissue.
"""

from __future__ import annotations

import numpy as np
import torch

from mupad.evaluation.stats import EvaluationError


def _checked_uint8(images: torch.Tensor) -> torch.Tensor:
    if images.dim() != 4 or images.shape[1] != 3:
        raise EvaluationError(f"expected RGB images (N, 3, H, W), got {tuple(images.shape)}")
    return images.float()


def border_ratio(images: torch.Tensor, period: int, offset: int = 0) -> float:
    """Mean |pixel difference| across token borders / the same inside tokens.

    images: (N, 3, H, W), any scale; period: the token side in pixels (patch size x the
    latent downsampling); offset: where the first border sits (0: borders between pixel
    columns period-1 and period, 2*period-1 and 2*period, ...).
    """
    x = _checked_uint8(images)
    if period < 2:
        raise EvaluationError(f"the token period must be >= 2 pixels, got {period}")
    if min(x.shape[2:]) <= period:
        raise EvaluationError(
            f"images of {tuple(x.shape[2:])} px hold no token border at period {period}"
        )
    across = inside = 0.0
    n_across = n_inside = 0
    for dim in (2, 3):  # rows, then columns
        diff = (x.narrow(dim, 1, x.shape[dim] - 1) - x.narrow(dim, 0, x.shape[dim] - 1)).abs()
        position = torch.arange(x.shape[dim] - 1)  # difference j is between pixels j and j+1
        on_border = (position + 1 - offset) % period == 0
        shape = [1, 1, 1, 1]
        shape[dim] = -1
        mask = on_border.view(shape).expand_as(diff)
        across += float(diff[mask].sum())
        n_across += int(mask.sum())
        inside += float(diff[~mask].sum())
        n_inside += int((~mask).sum())
    inside_mean = inside / n_inside
    if inside_mean == 0.0:
        raise EvaluationError("the images are flat inside every token; the ratio is undefined")
    return (across / n_across) / inside_mean


def colour_moments(images: torch.Tensor) -> dict[str, list[float]]:
    """{"mean": [R, G, B], "std": [R, G, B]} of the pixels of (N, 3, H, W) uint8 images."""
    x = _checked_uint8(images).transpose(0, 1).reshape(3, -1)  # (3, N*H*W)
    return {"mean": x.mean(1).tolist(), "std": x.std(1).tolist()}


def colour_distance(generated: dict[str, list[float]], real: dict[str, list[float]]) -> float:
    """Mean absolute difference of the six colour moments, in grey levels (0-255)."""
    a = np.array(generated["mean"] + generated["std"])
    b = np.array(real["mean"] + real["std"])
    return float(np.abs(a - b).mean())


def nearest_distances(queries: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """(N,) Euclidean distance of each query row (N, D) to its nearest reference row (M, D)."""
    queries = np.asarray(queries, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if queries.ndim != 2 or reference.ndim != 2 or queries.shape[1] != reference.shape[1]:
        raise EvaluationError(
            f"feature sets must be (N, D) and (M, D), got {queries.shape} and {reference.shape}"
        )
    squared = (
        (queries**2).sum(1)[:, None] - 2.0 * queries @ reference.T + (reference**2).sum(1)[None]
    )  # (N, M)
    return np.sqrt(np.clip(squared.min(axis=1), 0.0, None))


__all__ = ["border_ratio", "colour_distance", "colour_moments", "nearest_distances"]
