"""The frozen teacher of the alignment and CLS losses: its features of the clean image.

A teacher gives, per image, one global embedding (the CLS-token target) and a grid of patch
features (the alignment target). They come either from the shards, cached by
`mupad prepare --image-encoder NAME` as tokens [global, h*w patches row-major] (the default:
no teacher forward pass during training), or online from any image encoder in the registry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mupad.config import AlignmentConfig, TeacherSource
from mupad.errors import MupadError


class TeacherError(MupadError, ValueError):
    """Teacher features are missing or malformed; the message says how to provide them."""


@dataclass(frozen=True)
class TeacherSpec:
    dim: int  # feature width of the global token and of every patch
    grid: tuple[int, int]  # patch grid (h, w)


@dataclass(frozen=True)
class TeacherFeatures:
    cls: torch.Tensor  # (B, D) global embedding of the clean image
    patches: torch.Tensor  # (B, h*w, D) patch features, row-major over `grid`
    grid: tuple[int, int]

    @property
    def spec(self) -> TeacherSpec:
        return TeacherSpec(dim=self.cls.shape[-1], grid=self.grid)

    def rows(self, start: int, stop: int) -> TeacherFeatures:
        return TeacherFeatures(self.cls[start:stop], self.patches[start:stop], self.grid)

    def to(self, device: torch.device | str) -> TeacherFeatures:
        return TeacherFeatures(self.cls.to(device), self.patches.to(device), self.grid)


def square_grid(num_patches: int) -> tuple[int, int]:
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise TeacherError(
            f"{num_patches} cached teacher patch tokens do not form a square grid; cache the "
            "teacher with `mupad prepare --image-encoder NAME` (tokens = [global, h*w patches])"
        )
    return side, side


def spec_from_token_shape(shape: tuple[int, ...] | list[int]) -> TeacherSpec:
    """The teacher spec of cached tokens shaped (1 + h*w, D) (the shard schema's shape)."""
    if len(shape) != 2 or shape[0] < 2:
        raise TeacherError(
            f"cached teacher tokens must be (1 + h*w, D) per record, got {tuple(shape)}"
        )
    return TeacherSpec(dim=int(shape[1]), grid=square_grid(int(shape[0]) - 1))


def split_tokens(tokens: torch.Tensor) -> TeacherFeatures:
    """Cached tokens (B, 1 + h*w, D) = [global, patches] -> TeacherFeatures (fp32)."""
    if tokens.dim() != 3:
        raise TeacherError(f"teacher tokens must be (B, 1 + h*w, D), got {tuple(tokens.shape)}")
    tokens = tokens.float()
    grid = square_grid(tokens.shape[1] - 1)
    return TeacherFeatures(cls=tokens[:, 0], patches=tokens[:, 1:], grid=grid)


class OnlineTeacher:
    """An image encoder run on each clean training image (frozen, no gradients)."""

    def __init__(self, name: str, device: torch.device | str = "cpu", **options) -> None:
        from mupad.conditioning.image import get_image_encoder

        self.name = name
        self.encoder = get_image_encoder(name, device=device, **options)
        self.spec = TeacherSpec(dim=self.encoder.dim, grid=tuple(self.encoder.grid_size))

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> TeacherFeatures:
        """pixels (B, 3, H, W) in [-1, 1] -> TeacherFeatures."""
        features = self.encoder.features(pixels)
        patches = features.patches.float()  # (B, h, w, D)
        batch, height, width, dim = patches.shape
        return TeacherFeatures(
            cls=features.global_token.float(),
            patches=patches.reshape(batch, height * width, dim),
            grid=(height, width),
        )


def online_teacher(config: AlignmentConfig, device: torch.device | str) -> OnlineTeacher | None:
    """The online teacher the config asks for (None when features come from the shards)."""
    if not config.uses_teacher or config.teacher_source is not TeacherSource.ONLINE:
        return None
    return OnlineTeacher(config.teacher, device=device)
