"""Pathway scores -> RNA condition tokens, one token per pathway.

    token_p = ValueMLP(score_p) + identity_p        (B, P, 1) -> (B, P, D)

The value MLP (1 -> D -> D, SiLU) is shared by all pathways and embeds the scalar score; the
learned identity embedding (P, D) tells cross-attention which pathway a token is, so it can
attend to individual pathways (scores alone carry no order information for attention).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mupad.models.errors import ModelInputError

IDENTITY_INIT_STD = 0.02


class PathwayTokenizer(nn.Module):
    """(B, P, 1) pathway scores -> (B, P, dim) tokens (value embedding + pathway identity)."""

    def __init__(self, num_pathways: int, dim: int) -> None:
        super().__init__()
        if num_pathways < 1 or dim < 1:
            raise ValueError(
                f"PathwayTokenizer needs num_pathways >= 1 and dim >= 1, got {num_pathways}, {dim}"
            )
        self.num_pathways = num_pathways
        self.dim = dim
        self.value_in = nn.Linear(1, dim)
        self.value_out = nn.Linear(dim, dim)
        self.identity = nn.Parameter(torch.empty(num_pathways, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.identity, std=IDENTITY_INIT_STD)

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        """scores (B, P, 1) -> tokens (B, P, dim)."""
        if scores.dim() != 3 or scores.shape[1:] != (self.num_pathways, 1):
            raise ModelInputError(
                f"pathway scores must be (batch, {self.num_pathways}, 1), got {tuple(scores.shape)}"
            )
        values = self.value_out(F.silu(self.value_in(scores)))  # (B, P, D)
        return values + self.identity.to(values.dtype)  # (B, P, D)

    def extra_repr(self) -> str:
        return f"num_pathways={self.num_pathways}, dim={self.dim}"
