"""Time and position embeddings for the SiT backbone.

* Time: t in [0, 1] is scaled by 1000 (the range DiT's frequencies were chosen for), mapped
  to sinusoidal features and passed through a two-layer MLP.
* Position: fixed 2-D sine-cosine features computed for the actual token grid (h, w), so any
  input whose sides are multiples of the patch size works. They are cached per grid size,
  device and dtype because they never change and the forward pass is called thousands of
  times per sampled image.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mupad.config import ConfigError

TIME_SCALE = 1000.0  # t in [0, 1] -> [0, 1000], where the sinusoid frequencies are well spread


def sinusoidal_features(
    values: torch.Tensor, dim: int, max_period: float = 10_000.0
) -> torch.Tensor:
    """(B,) float -> (B, dim) float32 features [cos(v*w_i), sin(v*w_i)], w_i geometric.

    Computed in float32 even under autocast: bf16 cannot resolve t*1000 to better than a few
    units, which would collapse neighbouring timesteps onto the same embedding.
    """
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=values.device) / half
    freqs = torch.exp(-math.log(max_period) * exponent)  # (half,)
    angles = values.float()[:, None] * freqs[None, :]  # (B, half)
    features = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # (B, 2*half)
    if dim % 2:  # odd widths get one zero column so the output is exactly `dim` wide
        features = torch.nn.functional.pad(features, (0, 1))
    return features


class TimestepEmbedder(nn.Module):
    """t in [0, 1], shape (B,) -> conditioning vector (B, hidden)."""

    def __init__(self, hidden_size: int, frequency_dim: int = 256) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(
            nn.Linear(frequency_dim, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = sinusoidal_features(t * TIME_SCALE, self.frequency_dim)  # (B, F) float32
        # Cast to the weights' dtype (a no-op for fp32 weights, which autocast handles).
        return self.mlp(features.to(self.mlp[0].weight.dtype))  # (B, D)


def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(L,) float64 positions -> (L, dim) [sin(p*w_i), cos(p*w_i)] with w_i = 10000^(-2i/dim)."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / (10_000.0**omega)  # (dim/2,)
    angles = positions[:, None] * omega[None, :]  # (L, dim/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)  # (L, dim)


def sincos_2d_position_embedding(dim: int, height: int, width: int) -> torch.Tensor:
    """Fixed 2-D position features for an (height x width) token grid, row-major order.

    Returns (height*width, dim) float64: the first half of the channels encodes the row,
    the second half the column.
    """
    if dim % 4:
        raise ConfigError(
            f"hidden_size {dim} must be a multiple of 4 for 2-D sine-cosine position embeddings"
        )
    rows = torch.arange(height, dtype=torch.float64)
    cols = torch.arange(width, dtype=torch.float64)
    row_emb = _sincos_1d(dim // 2, rows)  # (h, dim/2)
    col_emb = _sincos_1d(dim // 2, cols)  # (w, dim/2)
    grid = torch.cat(
        [
            row_emb[:, None, :].expand(height, width, dim // 2),
            col_emb[None, :, :].expand(height, width, dim // 2),
        ],
        dim=-1,
    )  # (h, w, dim)
    return grid.reshape(height * width, dim)


class PositionEmbedding2D(nn.Module):
    """Cached fixed position embeddings; no parameters and nothing in the state dict."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim % 4:
            raise ConfigError(
                f"hidden_size {dim} must be a multiple of 4 for 2-D sine-cosine position embeddings"
            )
        self.dim = dim
        self._cache: dict[tuple[int, int, torch.device, torch.dtype], torch.Tensor] = {}

    def forward(
        self, height: int, width: int, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        """(1, height*width, dim) on `device` in `dtype`."""
        key = (height, width, torch.device(device), dtype)
        cached = self._cache.get(key)
        if cached is None:
            table = sincos_2d_position_embedding(self.dim, height, width)
            cached = table.to(device=device, dtype=dtype)[None]  # (1, N, D)
            self._cache[key] = cached
        return cached
