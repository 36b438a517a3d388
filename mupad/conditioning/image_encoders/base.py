"""The image-encoder family: one API over the Inception default and the pathology ViTs.

Every `ImageEncoder` maps images (float (B, 3, H, W) in [-1, 1], or uint8) to three views of
one forward pass, bundled as `ImageFeatures`:

    global_token  (B, D)        the encoder's own summary token (CLS, or a pooled map)
    patches       (B, h, w, D)  the patch grid, row-major, register tokens removed
    embedding     (B, D_emb)    the encoder's recommended image embedding

and exposes them as

    encode(images)          -> tokens (B, 1 + h*w, D) = [global_token, patches row-major],
                               mask (B, 1 + h*w), all True (image tokens are never padded)
    global_features(images) -> embedding (B, D_emb)   (CLS-token target, evaluation features)
    patch_features(images)  -> patches (B, h, w, D)   (alignment-loss teacher)
    features(images)        -> all three from a single forward pass

`preprocess(images)` applies the encoder's documented `Preprocessing`. Outputs are
computed without gradients (under `torch.no_grad`, not inference mode, so they can serve as
loss targets). Heavy optional libraries are imported only when an encoder is built;
`MissingDependencyError` says what to install.
"""

from __future__ import annotations

import abc
import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from mupad.conditioning.base import ConditionEncoder, EncoderError
from mupad.conditioning.image_encoders.preprocessing import Preprocessing, to_pixels
from mupad.conditions import Modality
from mupad.dtypes import parse_dtype
from mupad.optional import import_or_explain

logger = logging.getLogger(__name__)


class MissingDependencyError(EncoderError):
    """An optional library an encoder needs is not installed; the message says what to install."""


def require(module: str, install_hint: str, needed_for: str) -> ModuleType:
    """Import `module`, or raise MissingDependencyError naming what is missing and how to get it."""

    def explain(missing: str, error: ImportError) -> MissingDependencyError:
        return MissingDependencyError(
            f"{needed_for} needs the Python module {missing!r}, which could not be imported "
            f"({error}). Install it: {install_hint}"
        )

    return import_or_explain(module, explain)


@dataclass(frozen=True)
class ImageFeatures:
    """The outputs of one image-encoder forward pass."""

    global_token: torch.Tensor  # (B, D)
    patches: torch.Tensor  # (B, h, w, D), row-major grid, no register tokens
    embedding: torch.Tensor  # (B, D_emb)

    def tokens(self) -> torch.Tensor:
        """[global_token, patch tokens row-major] -> (B, 1 + h*w, D)."""
        flat = self.patches.flatten(1, 2)  # (B, h*w, D)
        return torch.cat([self.global_token[:, None, :], flat], dim=1)


def split_tokens(
    states: torch.Tensor, num_prefix: int, grid_size: tuple[int, int], name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """ViT states (b, prefix + h*w, D) -> first token (b, D), patch grid (b, h, w, D).

    The prefix is [CLS, register tokens...] (timm order); registers are dropped.
    """
    batch, length, dim = states.shape
    grid_h, grid_w = grid_size
    if length != num_prefix + grid_h * grid_w:
        raise EncoderError(
            f"{name}: the network returned {length} tokens, expected {num_prefix} prefix + "
            f"{grid_h}x{grid_w} patch tokens; the weights do not match the documented layout"
        )
    patches = states[:, num_prefix:].reshape(batch, grid_h, grid_w, dim)  # (b, h, w, D)
    return states[:, 0], patches


class ImageEncoder(ConditionEncoder):
    """Images -> token states (B, 1 + h*w, D): [global token, h x w patch grid row-major].

    Subclasses set `name`, `dim` (token width D), `embedding_dim` (width of
    `global_features`), `grid_size` (h, w), `preprocessing`, `device`, `dtype`, `batch_size`,
    and implement `_forward(inputs)` on preprocessed inputs (b, 3, S, S).
    """

    modality = Modality.IMAGE
    embedding_dim: int
    grid_size: tuple[int, int]
    preprocessing: Preprocessing
    batch_size: int = 32

    @property
    def num_tokens(self) -> int:
        """Tokens per image returned by `encode`: 1 global + h*w patches."""
        return 1 + self.grid_size[0] * self.grid_size[1]

    def preprocess(self, images: Any) -> torch.Tensor:
        """Images (B, 3, H, W) float in [-1, 1] or uint8 -> network input (B, 3, S, S)."""
        return self._prepare(to_pixels(images, self.name))

    def _prepare(self, pixels: torch.Tensor) -> torch.Tensor:
        """Checked pixels (B, 3, H, W) in [-1, 1] -> network input (B, 3, S, S) on device."""
        return self.preprocessing(pixels.to(self.device)).to(self.dtype)

    @abc.abstractmethod
    def _forward(self, inputs: torch.Tensor) -> ImageFeatures:
        """Preprocessed inputs (b, 3, S, S) -> ImageFeatures of b images."""

    @torch.no_grad()
    def features(self, images: Any) -> ImageFeatures:
        """Global token (B, D), patch grid (B, h, w, D) and embedding (B, D_emb) in one pass."""
        pixels = to_pixels(images, self.name)  # (B, 3, H, W)
        if pixels.shape[0] == 0:
            raise EncoderError(f"{self.name}: the image batch is empty")
        parts = []
        for start in range(0, pixels.shape[0], self.batch_size):
            chunk = self._prepare(pixels[start : start + self.batch_size])  # (b, 3, S, S)
            parts.append(self._checked_features(self._forward(chunk), chunk.shape[0]))
        if len(parts) == 1:
            return parts[0]
        return ImageFeatures(
            global_token=torch.cat([p.global_token for p in parts]),
            patches=torch.cat([p.patches for p in parts]),
            embedding=torch.cat([p.embedding for p in parts]),
        )

    def _checked_features(self, out: ImageFeatures, batch: int) -> ImageFeatures:
        grid_h, grid_w = self.grid_size
        expected = {
            "global_token": (batch, self.dim),
            "patches": (batch, grid_h, grid_w, self.dim),
            "embedding": (batch, self.embedding_dim),
        }
        for field, shape in expected.items():
            got = tuple(getattr(out, field).shape)
            if got != shape:
                raise EncoderError(
                    f"{self.name}: the network returned {field} of shape {got}, expected {shape}; "
                    "the loaded weights do not match this encoder's documented layout"
                )
        return out

    def encode(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, 3, H, W) -> (tokens (B, 1 + h*w, D), mask (B, 1 + h*w) all True)."""
        tokens = self.features(batch).tokens()  # (B, 1 + h*w, D)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return tokens, mask

    def global_features(self, images: Any) -> torch.Tensor:
        """Images -> the encoder's image embedding (B, D_emb)."""
        return self.features(images).embedding

    def patch_features(self, images: Any) -> torch.Tensor:
        """Images -> patch grid (B, h, w, D), row-major, register tokens removed."""
        return self.features(images).patches

    def _set_runtime(
        self, device: str | torch.device, dtype: torch.dtype | str, batch_size: int
    ) -> None:
        self.device = torch.device(device)
        self.dtype = parse_dtype(dtype, EncoderError, "dtype")
        if batch_size < 1:
            raise EncoderError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size

    def describe(self) -> str:
        """Token layout and preprocessing, one line each."""
        grid_h, grid_w = self.grid_size
        return (
            f"{self.name}: tokens (B, {self.num_tokens}, {self.dim}) = [global token, "
            f"{grid_h}x{grid_w} patches row-major]; global_features (B, {self.embedding_dim}); "
            f"patch_features (B, {grid_h}, {grid_w}, {self.dim})\n"
            f"input: {self.preprocessing.describe()}"
        )
