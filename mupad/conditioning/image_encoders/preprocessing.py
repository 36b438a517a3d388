"""Image inputs -> the tensor an image encoder's network expects.

Every image encoder accepts mupad pixels: float (B, 3, H, W) in [-1, 1] (see `mupad.latents`),
or uint8 (B, 3, H, W) / (B, H, W, 3) in [0, 255], which is converted first. Each encoder then
declares one `Preprocessing` (next to the encoder's code) that says how those pixels become
network input: the square input size, how to resize (stretch, or shorter side + centre
crop), the interpolation, and the per-channel mean/std applied to RGB in [0, 1].

Resizing is done on tensors with `torch.nn.functional.interpolate`, so results differ by
rounding from reference pipelines that resize uint8 PIL images; feed tiles at the encoder's
native size (and magnification) to avoid resizing altogether.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from mupad.conditioning.base import EncoderError
from mupad.latents import LatentsError, uint8_to_pixels, validate_pixels

# Per-channel statistics of RGB in [0, 1].
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF_MEAN = (0.5, 0.5, 0.5)  # "Inception" normalisation of timm / BEiT: RGB -> [-1, 1]
HALF_STD = (0.5, 0.5, 0.5)


class ImageInputError(EncoderError):
    """The images given to an image encoder are malformed; the message says how to fix them."""


class Interpolation(str, enum.Enum):
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"


def parse_interpolation(value: str | Interpolation) -> Interpolation:
    """A config string ("bicubic", "bilinear") -> Interpolation, with a clear error."""
    try:
        return Interpolation(str(getattr(value, "value", value)).lower())
    except ValueError:
        choices = ", ".join(mode.value for mode in Interpolation)
        raise EncoderError(
            f"unsupported interpolation {value!r}; choose one of: {choices}"
        ) from None


@dataclass(frozen=True)
class Preprocessing:
    """How pixels become network input (B, 3, size, size).

    size: side of the square network input.
    center_crop: True resizes the shorter side to `size / crop_pct` (aspect kept) and crops
        the centre `size` x `size` square; False stretches the image to `size` x `size`.
    crop_pct: timm's crop fraction (1.0 = no margin); only used with center_crop.
    interpolation, antialias: the resize filter (antialias matters only when shrinking).
    mean, std: per-channel statistics applied to RGB in [0, 1] after resizing.
    """

    size: int
    interpolation: Interpolation = Interpolation.BICUBIC
    antialias: bool = True
    center_crop: bool = True
    crop_pct: float = 1.0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.size < 1:
            raise EncoderError(f"preprocessing size must be >= 1, got {self.size}")
        if not 0.0 < self.crop_pct <= 1.0:
            raise EncoderError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise EncoderError(
                f"mean and std need 3 values each (RGB) and std > 0, got {self.mean}, {self.std}"
            )
        object.__setattr__(self, "interpolation", parse_interpolation(self.interpolation))

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """Valid float pixels (B, 3, H, W) in [-1, 1] -> network input (B, 3, size, size)."""
        rgb = pixels.float().add(1.0).mul(0.5)  # (B, 3, H, W) in [0, 1]
        rgb = self._resize(rgb).clamp(0.0, 1.0)  # (B, 3, size, size)
        mean = torch.tensor(self.mean, dtype=rgb.dtype, device=rgb.device)[:, None, None]
        std = torch.tensor(self.std, dtype=rgb.dtype, device=rgb.device)[:, None, None]
        return (rgb - mean) / std

    def _resize(self, rgb: torch.Tensor) -> torch.Tensor:
        height, width = rgb.shape[-2:]
        if not self.center_crop:
            return self._interpolate(rgb, (self.size, self.size))
        short_side = math.floor(self.size / self.crop_pct) if self.crop_pct < 1 else self.size
        if height <= width:
            new_size = (short_side, max(short_side, int(short_side * width / height)))
        else:
            new_size = (max(short_side, int(short_side * height / width)), short_side)
        rgb = self._interpolate(rgb, new_size)  # (B, 3, h', w'), shorter side = short_side
        top = round((new_size[0] - self.size) / 2.0)
        left = round((new_size[1] - self.size) / 2.0)
        return rgb[..., top : top + self.size, left : left + self.size]

    def _interpolate(self, rgb: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(rgb.shape[-2:]) == size:
            return rgb
        return F.interpolate(
            rgb,
            size=size,
            mode=self.interpolation.value,
            align_corners=False,
            antialias=self.antialias,
        )

    def describe(self) -> str:
        """One line for logs and error messages."""
        resize = (
            f"shorter side -> {math.floor(self.size / self.crop_pct)}, centre crop {self.size}"
            if self.center_crop
            else f"stretch to {self.size}x{self.size}"
        )
        return (
            f"{resize} ({self.interpolation.value}, antialias={self.antialias}); "
            f"RGB in [0, 1] normalised with mean {self.mean}, std {self.std}"
        )


def to_pixels(images: Any, encoder_name: str = "image encoder") -> torch.Tensor:
    """Float (B, 3, H, W) in [-1, 1] (checked) or uint8 images -> float pixels (B, 3, H, W)."""
    if not isinstance(images, torch.Tensor):
        raise ImageInputError(
            f"{encoder_name}: images must be a torch.Tensor (B, 3, H, W) (float in [-1, 1] or "
            f"uint8), got {type(images).__name__}"
        )
    if images.dtype == torch.uint8:
        if images.dim() != 4 or 3 not in (images.shape[1], images.shape[-1]):
            hint = " (add a batch axis with x[None])" if images.dim() == 3 else ""
            raise ImageInputError(
                f"{encoder_name}: uint8 images must be (B, 3, H, W) or (B, H, W, 3), got shape "
                f"{tuple(images.shape)}{hint}"
            )
        images = uint8_to_pixels(images)  # (B, 3, H, W) in [-1, 1]
    elif not images.is_floating_point():
        raise ImageInputError(
            f"{encoder_name}: images must be float in [-1, 1] or uint8 in [0, 255], got "
            f"{images.dtype}; convert with images.to(torch.uint8) or images.float() / 127.5 - 1"
        )
    try:
        validate_pixels(images)
    except LatentsError as exc:
        raise ImageInputError(f"{encoder_name}: {exc}") from exc
    return images
