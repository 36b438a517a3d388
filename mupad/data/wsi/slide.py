"""The `Slide` interface shared by all readers, and helpers the readers have in common.

A slide is a pyramid of levels; level 0 is the full resolution with `mpp` µm/px and level
k is `level_downsamples[k]` times coarser. Pixels come back as uint8 (h, w, 3) RGB arrays.
Coordinates passed to `read_region` are level-0 pixels (OpenSlide's convention); the part of
a region that falls outside the slide is filled with white (255), like empty glass.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from pathlib import Path
from types import TracebackType
from typing import Self

import numpy as np
from PIL import Image

from mupad.data.wsi.errors import MissingMppError, SlideError

# µm/px outside this range is not a microscope scan: TIFF/PNG/JPEG files commonly carry
# default 72/96/300 dpi tags (85-353 µm/px), which must not be mistaken for a resolution.
PLAUSIBLE_MPP_RANGE = (0.05, 20.0)
# Bytes of RGB decoded at a time while building a thumbnail from a large level (bounded
# memory: a 100k-px-wide level is read in bands of ~200 rows).
_THUMBNAIL_BAND_BYTES = 64 * 2**20


def check_mpp(mpp: float, path: Path) -> float:
    """Validate a µm/px value given by the user."""
    if not (math.isfinite(mpp) and mpp > 0):
        raise SlideError(f"{path}: mpp must be a positive number of µm per pixel, got {mpp!r}")
    return float(mpp)


def plausible_mpp(mpp: float | None) -> float | None:
    """`mpp` if it looks like a microscope resolution, else None (see PLAUSIBLE_MPP_RANGE)."""
    if mpp is None or not math.isfinite(mpp):
        return None
    low, high = PLAUSIBLE_MPP_RANGE
    return float(mpp) if low <= mpp <= high else None


def missing_mpp_error(path: Path, looked_at: str) -> MissingMppError:
    return MissingMppError(
        f"{path}: the file does not record its resolution in µm per pixel (looked at "
        f"{looked_at}); pass it with --slide-mpp (e.g. --slide-mpp 0.5 for a 20x scan, "
        "--slide-mpp 0.25 for 40x), or open_slide(path, mpp=...) from Python"
    )


class Slide(ABC):
    """A whole-slide image opened for reading; use as a context manager or call `close()`.

    Not thread-safe (file position, decoded-tile cache): open one Slide per worker thread
    or process. Subclasses set the attributes in `__init__` and implement `_read_level` (and may
    override `read_region` / `thumbnail` where their library does better).
    """

    path: Path
    slide_id: str
    width: int  # level 0, px
    height: int  # level 0, px
    mpp: float  # level 0, µm/px
    level_dimensions: tuple[tuple[int, int], ...]  # (width, height) per level
    level_downsamples: tuple[float, ...]

    def _init_common(self, path: Path, mpp: float, level_dimensions: list[tuple[int, int]]) -> None:
        self.path = path
        stem = path.stem
        self.slide_id = stem[:-4] if stem.lower().endswith(".ome") else stem  # x.ome.tif -> x
        self.mpp = mpp
        self.level_dimensions = tuple((int(w), int(h)) for w, h in level_dimensions)
        self.width, self.height = self.level_dimensions[0]
        # The mean of the x and y ratios, like OpenSlide (levels are rounded in size).
        self.level_downsamples = tuple(
            (self.width / w + self.height / h) / 2 for w, h in self.level_dimensions
        )

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level that is still at least as fine as `downsample` (0.1% slack)."""
        best = 0
        for level, level_downsample in enumerate(self.level_downsamples):
            if (
                level_downsample <= downsample * 1.001
                and level_downsample >= self.level_downsamples[best]
            ):
                best = level
        return best

    @abstractmethod
    def _read_level(self, level: int, left: int, top: int, width: int, height: int) -> np.ndarray:
        """Pixels of a box that lies inside `level` (level px) -> uint8 (height, width, 3)."""

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """A `width` x `height` box of `level` whose top-left is (x, y) in level-0 px.

        Returns uint8 (height, width, 3) RGB; outside the slide the box is white.
        """
        if not 0 <= level < self.level_count:
            raise SlideError(
                f"{self.path}: level {level} does not exist (the slide has {self.level_count})"
            )
        if width <= 0 or height <= 0:
            raise SlideError(f"{self.path}: region size must be positive, got {width}x{height}")
        downsample = self.level_downsamples[level]
        level_w, level_h = self.level_dimensions[level]
        left, top = math.floor(x / downsample), math.floor(y / downsample)
        out = np.full((height, width, 3), 255, dtype=np.uint8)  # (h, w, 3)
        x0, y0 = max(left, 0), max(top, 0)
        x1, y1 = min(left + width, level_w), min(top + height, level_h)
        if x1 > x0 and y1 > y0:
            out[y0 - top : y1 - top, x0 - left : x1 - left] = self._read_level(
                level, x0, y0, x1 - x0, y1 - y0
            )
        return out

    def thumbnail_size(self, max_size: int) -> tuple[int, int]:
        """(width, height) of the thumbnail that fits in max_size x max_size (never enlarged)."""
        scale = min(1.0, max_size / max(self.width, self.height))
        return max(1, round(self.width * scale)), max(1, round(self.height * scale))

    def thumbnail(self, max_size: int) -> np.ndarray:
        """The whole slide shrunk to fit in max_size x max_size -> uint8 (h, w, 3).

        Reads the coarsest level that is still at least as fine as the thumbnail, in bands of
        rows that are box-averaged as they come, so memory stays bounded for huge levels.
        """
        thumb_w, thumb_h = self.thumbnail_size(max_size)
        level = self.best_level_for_downsample(self.width / thumb_w)
        level_w, level_h = self.level_dimensions[level]
        factor = max(1, min(level_w // thumb_w, level_h // thumb_h))  # integer pre-shrink
        rows = max(factor, _THUMBNAIL_BAND_BYTES // (3 * level_w) // factor * factor)
        bands = []
        for top in range(0, level_h, rows):
            band = self._read_level(level, 0, top, level_w, min(rows, level_h - top))
            bands.append(_box_reduce(band, factor))
        reduced = np.concatenate(bands, axis=0)  # (level_h / factor, level_w / factor, 3)
        image = Image.fromarray(reduced, "RGB")
        if image.size != (thumb_w, thumb_h):
            image = image.resize((thumb_w, thumb_h), Image.Resampling.BOX)  # area mean
        return np.asarray(image, dtype=np.uint8)

    @abstractmethod
    def close(self) -> None:
        """Release the file handle (idempotent)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({str(self.path)!r}, {self.width}x{self.height} px, "
            f"{self.mpp:.4g} µm/px, {self.level_count} levels)"
        )


def _box_reduce(band: np.ndarray, factor: int) -> np.ndarray:
    """Mean over factor x factor blocks of uint8 (h, w, 3); edges are padded by repetition."""
    if factor == 1:
        return band
    h, w = band.shape[:2]
    out_h, out_w = -(-h // factor), -(-w // factor)
    padded_h, padded_w = out_h * factor, out_w * factor
    if (padded_h, padded_w) != (h, w):
        band = np.pad(band, ((0, padded_h - h), (0, padded_w - w), (0, 0)), mode="edge")
    blocks = band.reshape(out_h, factor, out_w, factor, 3)  # a view, no copy
    sums = blocks.sum(axis=(1, 3), dtype=np.uint32)  # (out_h, out_w, 3)
    return ((sums + factor * factor // 2) // (factor * factor)).astype(np.uint8)
