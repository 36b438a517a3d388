"""Tissue detection at thumbnail scale: Otsu's threshold on HSV saturation.

Stained tissue is coloured, glass is white or grey (low saturation), so a threshold on
saturation separates them regardless of stain intensity. A floor on the threshold keeps a
blank slide (all glass, where Otsu would split noise) from producing a mask.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage

from mupad.data.wsi.slide import Slide

# Saturation (0-255) below which a pixel is never tissue, whatever Otsu says.
MIN_TISSUE_SATURATION = 20
# Very dark pixels (pen marks, scanner borders) are not tissue either.
MAX_DARK_VALUE = 30


def otsu_threshold(values: np.ndarray) -> int:
    """Otsu's threshold of uint8 values: t maximising the between-class variance of v <= t / v > t."""
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)  # (256,)
    total = hist.sum()
    if total == 0:
        return 0
    levels = np.arange(256, dtype=np.float64)
    weight_low = np.cumsum(hist)  # (256,)
    weight_high = total - weight_low
    mean_low_sum = np.cumsum(hist * levels)
    mean_low = mean_low_sum / np.maximum(weight_low, 1)
    mean_high = (mean_low_sum[-1] - mean_low_sum) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return int(np.argmax(between))


def tissue_mask_from_rgb(rgb: np.ndarray) -> np.ndarray:
    """uint8 (h, w, 3) RGB -> bool (h, w) tissue mask."""
    hsv = np.asarray(Image.fromarray(rgb, "RGB").convert("HSV"))  # (h, w, 3)
    saturation, value = hsv[..., 1], hsv[..., 2]
    threshold = max(otsu_threshold(saturation), MIN_TISSUE_SATURATION)
    mask = (saturation > threshold) & (value > MAX_DARK_VALUE)
    # Close gaps, fill enclosed holes (pale stroma, fat, lumens: tissue context the
    # tiles should keep), then drop isolated specks (dust).
    # Edge padding keeps tissue that touches the border from being eroded away.
    pad = 3
    padded = np.pad(mask, pad, mode="edge")
    padded = ndimage.binary_closing(padded, structure=np.ones((3, 3), bool), iterations=2)
    padded = ndimage.binary_fill_holes(padded)
    padded = ndimage.binary_opening(padded, structure=np.ones((3, 3), bool), iterations=1)
    return padded[pad:-pad, pad:-pad]


def tissue_mask(slide: Slide, thumbnail_size: int = 2048) -> tuple[np.ndarray, float]:
    """Tissue mask at thumbnail scale -> (bool (h, w), thumbnail px per level-0 px).

    The mask may be empty (a blank slide); `plan_tiles` turns that into EmptyTissueError.
    """
    thumb = slide.thumbnail(thumbnail_size)  # (h, w, 3)
    scale = thumb.shape[1] / slide.width
    return tissue_mask_from_rgb(thumb), scale
