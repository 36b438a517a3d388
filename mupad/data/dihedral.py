"""The 8 flips and quarter turns of a square image: histology has no "up", so every one of
them is an equally valid view of a tile. Defined once here for every training path.

A draw picks, per sample, a horizontal flip (first) and a number of quarter turns (then),
from the step's generator; `apply_dihedral` applies the same draw to any tensor whose two
spatial axes are `dims` (images (B, C, H, W): dims (2, 3); token grids (B, h, w, D): dims
(1, 2)), so an image, its context channels and its teacher feature grid stay aligned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mupad.errors import MupadError


class DihedralError(MupadError, ValueError):
    """A dihedral transform was asked of a tensor it cannot apply to."""


@dataclass(frozen=True)
class DihedralDraw:
    flips: torch.Tensor  # (B,) bool: mirror along the second spatial axis first
    turns: torch.Tensor  # (B,) int64 in [0, 4): quarter turns after the flip

    def __len__(self) -> int:
        return int(self.flips.shape[0])


def draw_dihedral(
    batch_size: int, generator: torch.Generator, turns_allowed: int = 4
) -> DihedralDraw:
    """One uniformly random element per sample (`turns_allowed` 1: flips only, 2: + half turns)."""
    if turns_allowed not in (1, 2, 4):
        raise DihedralError(f"turns_allowed must be 1, 2 or 4, got {turns_allowed}")
    flips = torch.randint(2, (batch_size,), generator=generator).bool()
    turns = torch.randint(turns_allowed, (batch_size,), generator=generator)
    if turns_allowed == 2:
        turns = turns * 2  # half turns keep a non-square grid's shape
    return DihedralDraw(flips=flips, turns=turns)


def apply_dihedral(
    x: torch.Tensor, draw: DihedralDraw, dims: tuple[int, int] = (2, 3)
) -> torch.Tensor:
    """x (B, ...) with sample i flipped along dims[1] (if drawn), then turned turns[i] times in
    the plane `dims`. Quarter turns need equal sides along `dims`."""
    if x.shape[0] != len(draw):
        raise DihedralError(f"{x.shape[0]} samples but a draw for {len(draw)}")
    dims = tuple(d % x.dim() for d in dims)  # type: ignore[assignment]
    if 0 in dims:
        raise DihedralError("dims are spatial axes of each sample, not the batch axis")
    odd_turns = bool((draw.turns % 2).any())
    if odd_turns and x.shape[dims[0]] != x.shape[dims[1]]:
        raise DihedralError(
            f"quarter turns need square samples; got sides {x.shape[dims[0]]} x {x.shape[dims[1]]}"
        )
    out = x.clone()
    codes = draw.flips.long() * 4 + draw.turns  # 8 group elements
    for code in codes.unique().tolist():
        if code == 0:
            continue
        rows = (codes == code).nonzero().flatten()
        part = x[rows]
        if code >= 4:
            part = part.flip(dims[1])
        if code % 4:
            part = torch.rot90(part, code % 4, dims=dims)
        out[rows] = part
    return out
