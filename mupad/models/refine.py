"""A convolutional output head that computes neighbouring tokens' pixels together.

A linear unpatchify gives every token its own p x p block of output pixels; nothing ties a
block's edge to its neighbour's, and a briefly trained model shows the token grid as a
mosaic. Here the last linear layer emits `channels` features per pixel instead, and two
3x3 convolutions over the whole image turn them into the output, so every output pixel
near a token border sees both tokens' features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RefineHead(nn.Module):
    """(B, R, H, W) per-pixel features -> (B, C_out, H, W)."""

    def __init__(self, channels: int, out_channels: int) -> None:
        super().__init__()
        self.mix = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.out = nn.Conv2d(channels, out_channels, kernel_size=3, padding=1)
        self.skip = nn.Conv2d(channels, out_channels, kernel_size=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # The 1x1 skip keeps a direct linear path (the unpatchify the head replaces); the 3x3
        # branch adds what the neighbourhood says.
        return self.skip(features) + self.out(F.gelu(self.mix(features)))  # (B, C_out, H, W)
