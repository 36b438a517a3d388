"""Colour deconvolution of 8-bit RGB into hematoxylin, eosin and DAB optical densities.

Defined once here, for every metric that looks at one stain: the hematoxylin SSIM of
FF -> FFPE translation, nucleus segmentation (`celltypes`) and the DAB-positive fraction
of virtual IHC (`biomarker`).

The maths is scikit-image's `rgb2hed` (Ruifrok & Johnston colour deconvolution with the
`hed_from_rgb` stain matrix), written out so that a batch is one matrix product:

    od_c    = log(I_c / 255) / log(1e-6)              per RGB channel, I_c clamped to >= 1
    stain_s = max(0, sum_c od_c * hed_from_rgb[c, s])

so the values are in rgb2hed's units (base-10 optical density divided by 6) and equal
`rgb2hed(image / 255)` for every pixel whose channels are all >= 1. Channels of 0 count as
1: rgb2hed clamps at 1e-6 instead, which would give a black pixel an optical density
about 2.5 times that of the darkest representable colour. With the clamp every stain has
a fixed maximum for 8-bit input, `stain_range(stain)` — the data range to use when stain
maps of different images are compared (SSIM, thresholds).

Limits worth knowing: the stain vectors are fixed (not estimated per slide), so stain
variation between labs shifts the values; in H&E, dense eosin + hematoxylin overlap
projects partly onto the DAB vector (DAB values of dark H&E tissue reach 0.05-0.1), so the
DAB channel is meaningful on hematoxylin-DAB (IHC) images only.
"""

from __future__ import annotations

import enum
from typing import Any

import numpy as np
import torch
from skimage.color import hed_from_rgb

from mupad.evaluation.stats import EvaluationError

_LOG_ADJUST = float(np.log(1e-6))  # rgb2hed's normalisation of log intensities
_MAX_CHANNEL_OD = float(np.log(1.0 / 255.0) / _LOG_ADJUST)  # a channel of 1 (of 255)


class Stain(enum.Enum):
    """A stain of the H/E/DAB deconvolution; the value is its column in hed_from_rgb."""

    HEMATOXYLIN = 0
    EOSIN = 1
    DAB = 2


class StainError(EvaluationError):
    """Images cannot be colour-deconvolved (not 8-bit RGB)."""


def channels_last_uint8(images: Any, what: str = "images") -> np.ndarray:
    """uint8 RGB (B, 3, H, W) or (3, H, W), numpy or torch -> numpy (B, H, W, 3)."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    array = np.asarray(images)
    if array.dtype != np.uint8:
        raise StainError(
            f"{what} must be uint8 images (0-255) for colour deconvolution, got {array.dtype}"
        )
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[1] != 3:
        raise StainError(f"{what} must be uint8 (B, 3, H, W) or (3, H, W), got {array.shape}")
    return np.ascontiguousarray(array.transpose(0, 2, 3, 1))


def rgb_optical_density(images: Any) -> np.ndarray:
    """Per-channel optical density in rgb2hed units: uint8 (B, 3, H, W) -> (B, H, W, 3)
    float64 in [0, log(255) / log(1e6)]; 0 for white."""
    rgb = channels_last_uint8(images)
    return np.log(np.maximum(rgb, 1).astype(np.float64) / 255.0) / _LOG_ADJUST


def stain_density(images: Any, stain: Stain) -> np.ndarray:
    """One stain's optical density: uint8 (B, 3, H, W) -> (B, H, W) float64 in
    [0, stain_range(stain)]; a single (3, H, W) image gives (1, H, W)."""
    column = np.asarray(hed_from_rgb, dtype=np.float64)[:, stain.value]  # (3,)
    return np.maximum(rgb_optical_density(images) @ column, 0.0)


def stain_range(stain: Stain) -> float:
    """The largest value `stain_density` can return for 8-bit input: every channel with a
    positive weight in the stain's column at its darkest (1 of 255), the others white."""
    column = np.asarray(hed_from_rgb, dtype=np.float64)[:, stain.value]
    return float(_MAX_CHANNEL_OD * column[column > 0].sum())


def tissue_mask(images: Any, min_optical_density: float = 0.03) -> np.ndarray:
    """Pixels that hold stained tissue: (B, 3, H, W) uint8 -> (B, H, W) bool.

    A pixel is tissue when the sum of its three channel optical densities (rgb2hed units)
    exceeds `min_optical_density`. The default 0.03 (a base-10 OD sum of 0.18; a grey of
    RGB 222 sits on it) keeps pale eosin and hematoxylin counterstain and drops white
    background and glass (RGB 240 gives 0.013).
    """
    if min_optical_density < 0:
        raise StainError(f"min_optical_density must be >= 0, got {min_optical_density}")
    return rgb_optical_density(images).sum(axis=-1) > min_optical_density


__all__ = [
    "Stain",
    "StainError",
    "channels_last_uint8",
    "rgb_optical_density",
    "stain_density",
    "stain_range",
    "tissue_mask",
]
