"""Projectors from the backbone's hidden tokens to a frozen teacher's patch features.

Both map hidden states (B, h*w, D) on the model's token grid to (B, th*tw, D_teacher) on the
teacher's patch grid, where the alignment loss compares them patch by patch:

- `CNNProjector` (MUPAD): convolutions on the token grid, so each projected patch sees its
  neighbours (3x3 receptive field twice), then a 1x1 to the teacher width.
- `MLPProjector` (REPA, the ablation baseline): the same three-layer MLP applied to every
  token independently.

When the grids differ (e.g. a 16x16 token grid against the Inception teacher's 8x8 map)
the projected map is average-pooled (or bilinearly upsampled) to the teacher grid. The
projectors exist only during training; checkpoints keep them beside the model so a run
resumes exactly, and `SiT.from_pretrained` never sees them.
"""

from __future__ import annotations

import enum

import torch
import torch.nn.functional as F
from torch import nn

from mupad.config import Objective, parse_enum
from mupad.models.errors import ModelInputError

MLP_DEFAULT_WIDTH = 2048  # REPA's projector width


class ProjectorKind(str, enum.Enum):
    CNN = "cnn"
    MLP = "mlp"


def projector_kind(objective: Objective | str) -> ProjectorKind | None:
    """The projector an objective trains with (None for plain SiT)."""
    objective = parse_enum(Objective, objective)
    return {Objective.REPA: ProjectorKind.MLP, Objective.MUPAD: ProjectorKind.CNN}.get(objective)


def match_grid(features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, th, tw): exact average pooling when the teacher grid divides the
    token grid, area pooling for other shrinks, bilinear interpolation to grow."""
    height, width = features.shape[-2:]
    if (height, width) == tuple(grid):
        return features
    if height >= grid[0] and width >= grid[1]:
        return F.adaptive_avg_pool2d(features, grid)
    return F.interpolate(features, size=grid, mode="bilinear", align_corners=False)


def _to_grid(hidden: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, h*w, D) row-major tokens -> (B, D, h, w)."""
    batch, tokens, dim = hidden.shape
    if tokens != grid[0] * grid[1]:
        raise ModelInputError(
            f"{tokens} hidden tokens do not fill the {grid[0]}x{grid[1]} token grid"
        )
    return hidden.transpose(1, 2).reshape(batch, dim, grid[0], grid[1])


class CNNProjector(nn.Module):
    """Conv3x3 -> SiLU -> Conv3x3 -> SiLU -> Conv1x1 on the token grid."""

    def __init__(self, hidden_size: int, teacher_dim: int, width: int = 0) -> None:
        super().__init__()
        width = width or hidden_size
        self.net = nn.Sequential(
            nn.Conv2d(hidden_size, width, kernel_size=3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, width, kernel_size=3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, teacher_dim, kernel_size=1),
        )

    def forward(
        self, hidden: torch.Tensor, grid: tuple[int, int], teacher_grid: tuple[int, int]
    ) -> torch.Tensor:
        """hidden (B, h*w, D) -> (B, th*tw, D_teacher)."""
        out = match_grid(self.net(_to_grid(hidden, grid)), teacher_grid)  # (B, Dt, th, tw)
        return out.flatten(2).transpose(1, 2)


class MLPProjector(nn.Module):
    """REPA's per-token Linear -> SiLU -> Linear -> SiLU -> Linear."""

    def __init__(self, hidden_size: int, teacher_dim: int, width: int = 0) -> None:
        super().__init__()
        width = width or MLP_DEFAULT_WIDTH
        self.net = nn.Sequential(
            nn.Linear(hidden_size, width),
            nn.SiLU(),
            nn.Linear(width, width),
            nn.SiLU(),
            nn.Linear(width, teacher_dim),
        )

    def forward(
        self, hidden: torch.Tensor, grid: tuple[int, int], teacher_grid: tuple[int, int]
    ) -> torch.Tensor:
        """hidden (B, h*w, D) -> (B, th*tw, D_teacher)."""
        out = self.net(hidden)  # (B, h*w, Dt)
        if tuple(grid) == tuple(teacher_grid):
            return out
        return match_grid(_to_grid(out, grid), teacher_grid).flatten(2).transpose(1, 2)


def build_projector(
    kind: ProjectorKind | str, hidden_size: int, teacher_dim: int, width: int = 0
) -> CNNProjector | MLPProjector:
    kind = parse_enum(ProjectorKind, kind)
    cls = CNNProjector if kind is ProjectorKind.CNN else MLPProjector
    return cls(hidden_size, teacher_dim, width)
