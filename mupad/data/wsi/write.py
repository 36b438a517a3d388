"""Write an RGB array as a tiled pyramidal TIFF (SubIFD levels, resolution tags) with tifffile.

Used to turn a large plain image into a slide with random access, and by the tests and the
tiling benchmark to make slides whose pixels are known exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mupad.data.wsi.errors import SlideError


def halve(level: np.ndarray) -> np.ndarray:
    """uint8 (h, w, 3) -> (h // 2, w // 2, 3) by 2x2 means (odd last row/column dropped)."""
    h, w = level.shape[0] // 2 * 2, level.shape[1] // 2 * 2
    blocks = level[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).astype(np.uint16)
    return ((blocks.sum(axis=(1, 3)) + 2) // 4).astype(np.uint8)


def write_pyramidal_tiff(
    path: str | Path,
    level0: np.ndarray,
    mpp: float | None,
    num_levels: int = 3,
    tile_size_px: int = 256,
    compression: str | None = "zlib",
) -> list[np.ndarray]:
    """Write `level0` (uint8 (H, W, 3)) and `num_levels - 1` halvings; returns the levels written.

    `mpp` (µm/px of level 0) goes into the X/YResolution tags in centimetre units; None
    writes no resolution (a slide that needs --mpp). Lossless `compression` ("zlib",
    None) keeps the pixels exact; "jpeg" needs imagecodecs.
    """
    import tifffile

    if level0.dtype != np.uint8 or level0.ndim != 3 or level0.shape[2] != 3:
        raise SlideError(f"level0 must be uint8 (H, W, 3), got {level0.dtype} {level0.shape}")
    if tile_size_px % 16:
        raise SlideError(f"TIFF tiles must be a multiple of 16 px, got {tile_size_px}")
    levels = [level0]
    for _ in range(num_levels - 1):
        levels.append(halve(levels[-1]))
    with tifffile.TiffWriter(path, bigtiff=level0.nbytes > 2**31) as tif:
        for index, level in enumerate(levels):
            extra = {}
            if mpp is not None:
                px_per_cm = 1e4 / (mpp * 2**index)
                extra = {"resolution": (px_per_cm, px_per_cm), "resolutionunit": "CENTIMETER"}
            tif.write(
                level,
                photometric="rgb",
                tile=(tile_size_px, tile_size_px),
                compression=compression,
                subifds=num_levels - 1 if index == 0 else None,
                subfiletype=1 if index else 0,
                metadata=None,
                **extra,
            )
    return levels
