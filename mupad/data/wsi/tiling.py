"""Tiles at a target resolution: plan a grid on tissue, then read each tile from the best level.

A tile of `tile_size` px at `target_mpp` µm/px covers `tile_size * target_mpp` µm, i.e.
`size_level0 = round(tile_size * target_mpp / slide.mpp)` level-0 px. The grid starts at
(0, 0) with that stride and keeps only whole tiles inside the slide. Each tile is read from
the coarsest level that is still at least as fine as the target and resampled (Lanczos) to
`tile_size`; when that level already has the target resolution the pixels are returned
untouched.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from mupad.data.wsi.errors import EmptyTissueError, SlideError
from mupad.data.wsi.slide import Slide
from mupad.data.wsi.tissue import tissue_mask

logger = logging.getLogger(__name__)

DEFAULT_TILE_SIZE_PX = 256
DEFAULT_TARGET_MPP = 0.5  # ≈ 20x
DEFAULT_MIN_TISSUE = 0.5


@dataclass(frozen=True)
class TileCoord:
    """Where a tile lies: top-left (x, y) and side in level-0 px, the level it is read from."""

    x: int
    y: int
    size_level0: int
    level: int
    tissue_fraction: float


def tile_size_level0(slide: Slide, tile_size: int, target_mpp: float) -> int:
    """Side of a `tile_size`-px tile at `target_mpp`, in level-0 px."""
    if tile_size <= 0:
        raise SlideError(f"tile_size must be positive, got {tile_size}")
    if not (math.isfinite(target_mpp) and target_mpp > 0):
        raise SlideError(f"target_mpp must be a positive number of µm/px, got {target_mpp!r}")
    return max(1, round(tile_size * target_mpp / slide.mpp))


def plan_tiles(
    slide: Slide,
    tile_size: int = DEFAULT_TILE_SIZE_PX,
    target_mpp: float = DEFAULT_TARGET_MPP,
    min_tissue: float = DEFAULT_MIN_TISSUE,
    thumbnail_size: int = 2048,
) -> list[TileCoord]:
    """Grid tiles whose tissue fraction (from the thumbnail mask) is >= `min_tissue`.

    Raises EmptyTissueError when the mask is empty or no tile reaches `min_tissue`.
    """
    size = tile_size_level0(slide, tile_size, target_mpp)
    if size > min(slide.width, slide.height):
        raise SlideError(
            f"{slide.path}: a {tile_size}-px tile at {target_mpp} µm/px ({size} level-0 px) "
            f"does not fit in the {slide.width}x{slide.height} px slide; use smaller tiles"
        )
    if target_mpp < slide.mpp * 0.999:
        logger.warning(
            "%s: target %.3g µm/px is finer than the scan (%.3g µm/px); tiles are upsampled",
            slide.path,
            target_mpp,
            slide.mpp,
        )
    mask, scale = tissue_mask(slide, thumbnail_size)  # (h, w) bool
    if not mask.any():
        raise EmptyTissueError(
            f"{slide.path}: the tissue mask is empty (no stained pixels found on the "
            f"thumbnail: saturation Otsu threshold); the slide looks blank"
        )
    level = slide.best_level_for_downsample(target_mpp / slide.mpp)
    # Summed-area table: tissue pixels in any box in O(1).
    table = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    table[1:, 1:] = mask.cumsum(0).cumsum(1)
    xs = np.arange(0, slide.width - size + 1, size)
    ys = np.arange(0, slide.height - size + 1, size)
    coords = []
    for y in ys:
        top = min(int(y * scale), mask.shape[0] - 1)
        bottom = max(top + 1, min(math.ceil((y + size) * scale), mask.shape[0]))
        for x in xs:
            left = min(int(x * scale), mask.shape[1] - 1)
            right = max(left + 1, min(math.ceil((x + size) * scale), mask.shape[1]))
            inside = (
                table[bottom, right] - table[top, right] - table[bottom, left] + table[top, left]
            )
            fraction = float(inside) / ((bottom - top) * (right - left))
            if fraction >= min_tissue:
                coords.append(TileCoord(int(x), int(y), size, level, fraction))
    if not coords:
        raise EmptyTissueError(
            f"{slide.path}: tissue was found ({mask.mean():.1%} of the thumbnail) but no "
            f"{tile_size}-px tile at {target_mpp} µm/px is >= {min_tissue:.0%} tissue; lower "
            "min_tissue or the tile size"
        )
    return coords


def read_tile(slide: Slide, coord: TileCoord, tile_size: int = DEFAULT_TILE_SIZE_PX) -> np.ndarray:
    """The tile's pixels, uint8 (tile_size, tile_size, 3), resampled from `coord.level`."""
    downsample = slide.level_downsamples[coord.level]
    side = max(1, round(coord.size_level0 / downsample))  # level px
    region = slide.read_region(coord.x, coord.y, coord.level, side, side)  # (side, side, 3)
    if side == tile_size:
        return region
    image = Image.fromarray(region, "RGB").resize((tile_size, tile_size), Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.uint8)


def iter_tiles(
    slide: Slide,
    tile_size: int = DEFAULT_TILE_SIZE_PX,
    target_mpp: float = DEFAULT_TARGET_MPP,
    min_tissue: float = DEFAULT_MIN_TISSUE,
    progress: bool = False,
) -> Iterator[tuple[TileCoord, np.ndarray]]:
    """Plan the tissue tiles, then yield (coord, uint8 (tile_size, tile_size, 3)) in row order."""
    coords = plan_tiles(slide, tile_size, target_mpp, min_tissue)
    for coord in tqdm(coords, desc=slide.slide_id, unit="tile", disable=not progress):
        yield coord, read_tile(slide, coord, tile_size)
