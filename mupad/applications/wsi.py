"""Whole-slide translation: run a tile translator (H&E->IHC, H&E->mIF, FF->FFPE, ...) over a
whole slide in overlapping tiles, blend the overlaps without seams, and stream the result into a
pyramidal (OME-)TIFF.

    translator = build_translator("identity", options=TranslatorOptions(mpp=0.5))
    translate_slide("slide.svs", translator, "slide.ome.tif", overlap=64)

Geometry. The slide is read at the translator's µm/px: from the coarsest pyramid level that is
still at least as fine, resampled (Lanczos, with sub-pixel exact boxes so that overlapping tiles
see the same pixels) unless that level is within `mpp_rtol` of the target, in which case its
pixels are used as they are and the output records the level's true µm/px. Tiles of
`tile_size` px sit on a grid of stride `tile_size - overlap` from (0, 0); the last row/column
may overhang the slide (read as white glass) and is cropped from the output.

Blending. Every tile is multiplied by a separable window w(y, x) = wy(y) wx(x) that is 1 inside
and falls along each side that has a neighbour as a raised-cosine ramp over the `overlap` px:
up = sin^2(pi/2 (j + 1/2) / overlap), down = 1 - up. Where two tiles overlap one ramps down
exactly as the other ramps up, so the windows of the grid sum to 1 at every pixel (partition of
unity, see `grid_window_sum`): a constant input gives a constant output, and tile-to-tile
differences of a generative model fade over the overlap instead of showing as a seam. Sides on
the slide border keep weight 1. Requires overlap <= tile_size / 2 (only neighbours overlap).

Streaming. Tiles are translated in row-major order (batches may span rows) and consumed in that
order by `_OverlapBlender`, which finalises each tile's own block at once: it keeps only the
float carries a later tile still adds to (the previous row's bottom overlap and the left
neighbour's right overlap, O(width x overlap x channels)) and the current band of final rows
(O(width x tile_size x channels) in the output dtype), which goes to `StreamingPyramidWriter`
as soon as the row is done. Levels are halved from level 0 band by band; the file is assembled
from pre-encoded tiles under a temporary name and renamed only when complete.

Background. With `tissue_only=True`, tiles whose tissue fraction (thumbnail mask, Otsu on
saturation) is below `min_tissue` are filled with `background` and never reach the model.

Outputs: RGB (3 channels, no channel names) as 8-bit RGB; anything else (mIF marker
intensities) as one grey page per channel with channel names, OME layout only. OpenSlide reads
RGB only: the generic layout (a `.tif` name) opens in OpenSlide at every level; an `.ome.tif`
opens in OpenSlide as its full-resolution level only, in QuPath/Bio-Formats/tifffile at every
level.
"""

from __future__ import annotations

import importlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from mupad.data.wsi.errors import MissingMppError, SlideError
from mupad.data.wsi.open import open_slide
from mupad.data.wsi.pyramid_writer import (
    DEFAULT_TIFF_TILE_PX,
    PyramidLayout,
    PyramidWriteError,
    StreamingPyramidWriter,
    TiffCompression,
    layout_for_path,
)
from mupad.data.wsi.slide import Slide
from mupad.data.wsi.tissue import tissue_mask
from mupad.errors import MupadError

logger = logging.getLogger(__name__)

DEFAULT_OVERLAP_PX = 64
DEFAULT_MIN_TISSUE = 0.01
DEFAULT_MPP_RTOL = 0.02  # a level within 2% of the target µm/px is used as it is
DEFAULT_MAX_UPSAMPLE = 2.0  # refuse to enlarge a coarse scan more than 2x
_LANCZOS_SUPPORT = 3  # source px each side of an output pixel (per unit of scale)


class WsiTranslationError(MupadError, ValueError):
    """Arguments or a translator that cannot work; the message says what to change."""


class TranslatorOutputError(WsiTranslationError):
    """A translator returned tiles of the wrong shape, dtype or with non-finite values."""


class UnknownTranslatorError(WsiTranslationError):
    """No translator of that name is registered."""


class OutputDtype(StrEnum):
    UINT8 = "uint8"
    UINT16 = "uint16"
    FLOAT32 = "float32"


# --------------------------------------------------------------------------- the protocol
@runtime_checkable
class TileTranslator(Protocol):
    """Translates batches of RGB tiles; H&E->IHC, FF->FFPE and H&E->mIF implement this.

    `__call__(tiles)`: uint8 (B, S, S, 3) RGB (S = tile_size) -> (B, S, S, output_channels),
    either uint8 (0-255) or float (0-1 intensities; float32 outputs keep values as given).
    A torch tensor is accepted too (moved to the CPU).

    Attributes: `tile_size` (S, px), `output_channels` (3 for IHC/FFPE RGB, the number of
    markers for mIF), `mpp` (µm/px the translator works at; None = the slide's own level-0
    resolution, for resolution-agnostic translators such as `identity`), `batch_size` (tiles
    per call). Optional: `channel_names` (a sequence of `output_channels` names: the output is
    then written as named grey channels, e.g. mIF markers, even when there are 3), `name`.
    """

    tile_size: int
    output_channels: int
    mpp: float | None
    batch_size: int

    def __call__(self, tiles: np.ndarray) -> Any: ...


@dataclass
class IdentityTranslator:
    """Returns its input: converts any slide into a pyramidal (OME-)TIFF at a chosen µm/px."""

    tile_size: int = 512
    mpp: float | None = None
    batch_size: int = 8
    output_channels: int = 3
    name: str = "identity"

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        return tiles  # uint8 (B, S, S, 3)


# --------------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class TranslatorOptions:
    """What the CLI hands a translator factory (None: the translator's own default)."""

    device: str = "auto"
    batch_size: int | None = None
    tile_size: int | None = None
    mpp: float | None = None
    extra: Mapping[str, str] = field(default_factory=dict)  # --option KEY=VALUE, per translator

    def __post_init__(self) -> None:
        for name in ("batch_size", "tile_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                option = "--" + name.replace("_", "-")
                raise WsiTranslationError(
                    f"{option} must be >= 1, got {value}; leave it out for the translator's own"
                )
        if self.mpp is not None and not (math.isfinite(self.mpp) and self.mpp > 0):
            raise WsiTranslationError(f"--mpp must be a positive µm/px, got {self.mpp}")


TranslatorFactory = Callable[[Path | None, TranslatorOptions], TileTranslator]


def translator_extras(
    options: TranslatorOptions,
    name: str,
    allowed: Sequence[str],
    error: type[Exception] = WsiTranslationError,
) -> dict[str, str]:
    """`options.extra` (--option KEY=VALUE) checked against the keys translator `name`
    accepts; an unknown key raises `error` listing the accepted ones."""
    extra = dict(getattr(options, "extra", {}) or {})
    unknown = sorted(set(extra) - set(allowed))
    if unknown:
        raise error(f"unknown {name} option(s) {unknown}; choose from {', '.join(allowed)}")
    return extra


# name -> factory, or "module:attribute" of a factory (imported only when used, so that the CLI
# starts fast). Translations register here with one line each.
_TRANSLATORS: dict[str, str | TranslatorFactory] = {
    "identity": "mupad.applications.wsi:identity_translator",
    "he2mif": "mupad.applications.he2mif:wsi_translator",
    "he2ihc": "mupad.applications.he2ihc:wsi_translator",
    "ff2ffpe": "mupad.applications.ff2ffpe:wsi_translator",
}


def register_translator(
    name: str, factory: str | TranslatorFactory, *, replace: bool = False
) -> None:
    """Add a translator factory (or its "module:attribute" path) under `name`."""
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise WsiTranslationError(f"translator names are letters, digits, - and _; got {name!r}")
    if name in _TRANSLATORS and not replace:
        raise WsiTranslationError(f"a translator named {name!r} is already registered")
    _TRANSLATORS[name] = factory


def translator_names() -> list[str]:
    return sorted(_TRANSLATORS)


def resolve_translator_factory(name: str) -> TranslatorFactory:
    """The factory registered under `name` (importing its module if needed)."""
    try:
        entry = _TRANSLATORS[name]
    except KeyError:
        raise UnknownTranslatorError(
            f"unknown translator {name!r}; available: {', '.join(translator_names())}"
        ) from None
    if isinstance(entry, str):
        module_name, _, attribute = entry.partition(":")
        entry = getattr(importlib.import_module(module_name), attribute)
    if not callable(entry):
        raise UnknownTranslatorError(f"translator {name!r} is registered to a non-callable")
    return entry


def build_translator(
    name: str, checkpoint: str | Path | None = None, options: TranslatorOptions | None = None
) -> TileTranslator:
    """Resolve `name` and build its translator from `checkpoint` and `options`."""
    factory = resolve_translator_factory(name)
    translator = factory(
        None if checkpoint is None else Path(checkpoint), options or TranslatorOptions()
    )
    check_translator(translator)
    return translator


def identity_translator(checkpoint: Path | None, options: TranslatorOptions) -> IdentityTranslator:
    """Factory of `identity`: no checkpoint; options tile_size, batch_size, mpp."""
    if checkpoint is not None:
        raise WsiTranslationError("the identity translator takes no checkpoint")
    if options.extra:
        raise WsiTranslationError(
            f"the identity translator takes no --option (got {', '.join(options.extra)})"
        )
    return IdentityTranslator(
        tile_size=options.tile_size or 512, mpp=options.mpp, batch_size=options.batch_size or 8
    )


def check_translator(translator: Any) -> None:
    """Raise WsiTranslationError unless `translator` has the TileTranslator attributes."""
    problems = []
    for attribute in ("tile_size", "output_channels", "batch_size"):
        value = getattr(translator, attribute, None)
        if not isinstance(value, int | np.integer) or value < 1:
            problems.append(f"{attribute} must be a positive integer (got {value!r})")
    mpp = getattr(translator, "mpp", "missing")
    if mpp is not None and not (
        isinstance(mpp, int | float | np.floating) and math.isfinite(mpp) and mpp > 0
    ):
        problems.append(f"mpp must be a positive number of µm/px or None (got {mpp!r})")
    if not callable(translator):
        problems.append("it must be callable on uint8 (B, S, S, 3) tiles")
    names = getattr(translator, "channel_names", None)
    channels = getattr(translator, "output_channels", None)
    if names is not None and len(list(names)) != channels:
        problems.append(f"{len(list(names))} channel_names for {channels} output_channels")
    if problems:
        raise WsiTranslationError(
            f"{type(translator).__name__} is not a TileTranslator: " + "; ".join(problems)
        )


# --------------------------------------------------------------------------- blending windows
def ramp_up(overlap: int) -> np.ndarray:
    """Raised-cosine ramp over `overlap` px, float64 (overlap,): sin^2(pi/2 (j + 1/2) / overlap).

    ramp_up(o) + ramp_up(o)[::-1] == 1: the falling ramp of one tile and the rising ramp of its
    neighbour sum to one at every pixel of their overlap.
    """
    j = np.arange(overlap, dtype=np.float64)
    return np.sin(0.5 * np.pi * (j + 0.5) / overlap) ** 2


def window_1d(size: int, overlap: int, *, before: bool, after: bool) -> np.ndarray:
    """Weights float64 (size,) of a tile: ramps at the sides that have a neighbour, else 1."""
    weights = np.ones(size, dtype=np.float64)
    if overlap:
        up = ramp_up(overlap)
        if before:
            weights[:overlap] = up
        if after:
            weights[size - overlap :] = up[::-1]  # == 1 - up
    return weights


@dataclass(frozen=True)
class TileGrid:
    """Tiles of `tile_size` px every `stride` px covering a `width` x `height` px image."""

    width: int
    height: int
    tile_size: int
    overlap: int

    def __post_init__(self) -> None:
        self.check_overlap(self.tile_size, self.overlap)
        if self.width < 1 or self.height < 1:
            raise WsiTranslationError(
                f"image size must be positive, got {self.width}x{self.height}"
            )

    @staticmethod
    def check_overlap(tile_size: int, overlap: int) -> None:
        if tile_size < 1:
            raise WsiTranslationError(f"tile_size must be positive, got {tile_size}")
        if not 0 <= overlap <= tile_size // 2:
            raise WsiTranslationError(
                f"overlap must be between 0 and tile_size / 2 = {tile_size // 2} px (only "
                f"neighbouring tiles may overlap), got {overlap}"
            )

    @property
    def stride(self) -> int:
        return self.tile_size - self.overlap

    @property
    def cols(self) -> int:
        return max(1, math.ceil((self.width - self.overlap) / self.stride))

    @property
    def rows(self) -> int:
        return max(1, math.ceil((self.height - self.overlap) / self.stride))

    @property
    def padded_width(self) -> int:
        """Width the grid covers (>= width; the overhang is cropped)."""
        return self.cols * self.stride + self.overlap

    def origin(self, row: int, col: int) -> tuple[int, int]:
        """Top-left (x, y) of tile (row, col), output px."""
        return col * self.stride, row * self.stride

    def window(self, row: int, col: int) -> np.ndarray:
        """float32 (tile_size, tile_size) blending weights of tile (row, col)."""
        wy = window_1d(self.tile_size, self.overlap, before=row > 0, after=row < self.rows - 1)
        wx = window_1d(self.tile_size, self.overlap, before=col > 0, after=col < self.cols - 1)
        return np.outer(wy, wx).astype(np.float32)


def grid_window_sum(grid: TileGrid) -> np.ndarray:
    """Sum of all tile windows over the covered area, float64 (rows covered, padded_width).

    Equals 1 everywhere (partition of unity); tests check it. Memory O(image): for tests only.
    """
    height = grid.rows * grid.stride + grid.overlap
    total = np.zeros((height, grid.padded_width), dtype=np.float64)
    for row in range(grid.rows):
        for col in range(grid.cols):
            x, y = grid.origin(row, col)
            total[y : y + grid.tile_size, x : x + grid.tile_size] += grid.window(row, col)
    return total


class _OverlapBlender:
    """Blends weighted tiles given in row-major order; hands final full-width bands to `sink`.

    Each tile finalises its own block (rows [0, stride) x cols [0, stride) of it; the whole
    remaining extent for the last row/column). What it shares with tiles still to come is
    carried: its right overlap to the next tile of the row (`left_carry`), its bottom overlap
    to the next row (`next_carry`, full width). Every contribution is added exactly once.
    """

    def __init__(
        self,
        grid: TileGrid,
        channels: int,
        to_output: Callable[[np.ndarray], np.ndarray],
        sink: Callable[[np.ndarray], None],
        out_dtype: np.dtype,
    ):
        self.grid, self.channels = grid, channels
        self.to_output, self.sink, self.out_dtype = to_output, sink, out_dtype
        size, overlap, width = grid.tile_size, grid.overlap, grid.padded_width
        self.top_carry = np.zeros((overlap, width, channels), dtype=np.float32)
        self.next_carry = np.zeros((overlap, width, channels), dtype=np.float32)
        self.left_carry: np.ndarray | None = None  # (final_h, overlap, C)
        self.band: np.ndarray | None = None  # (final_h, width, C) output dtype
        self.expected = (0, 0)
        self._windows: dict[tuple[bool, bool, bool, bool], np.ndarray] = {}
        self._size = size

    def _window(self, row: int, col: int) -> np.ndarray:
        grid = self.grid
        key = (row > 0, row < grid.rows - 1, col > 0, col < grid.cols - 1)
        if key not in self._windows:
            self._windows[key] = grid.window(row, col)[..., None]  # (S, S, 1)
        return self._windows[key]

    def add(self, row: int, col: int, values: np.ndarray) -> None:
        """values: float32 (S, S, C) in output units."""
        if (row, col) != self.expected:
            raise RuntimeError(f"tile {(row, col)} out of order, expected {self.expected}")
        grid, size, overlap, stride = self.grid, self._size, self.grid.overlap, self.grid.stride
        last_row, last_col = row == grid.rows - 1, col == grid.cols - 1
        final_h = size if last_row else stride
        final_w = size if last_col else stride
        x, _ = grid.origin(row, col)
        if col == 0:
            self.band = np.empty((final_h, grid.padded_width, self.channels), self.out_dtype)
        weighted = values * self._window(row, col)  # (S, S, C) float32
        if col > 0 and overlap:
            weighted[:final_h, :overlap] += self.left_carry
        if row > 0 and overlap:
            weighted[:overlap, :final_w] += self.top_carry[:, x : x + final_w]
        assert self.band is not None
        self.band[:, x : x + final_w] = self.to_output(weighted[:final_h, :final_w])
        if not last_col:
            self.left_carry = weighted[:final_h, stride:].copy()
        if not last_row and overlap:
            self.next_carry[:, x : x + size] += weighted[stride:]
        if last_col:
            self.sink(self.band)
            self.band = None
            self.top_carry, self.next_carry = self.next_carry, self.top_carry
            self.next_carry.fill(0.0)
            self.expected = (row + 1, 0)
        else:
            self.expected = (row, col + 1)


# --------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class SourcePlan:
    """Where output pixels come from: `level` of the slide, `scale` level px per output px."""

    level: int
    scale: float
    resample: bool
    mpp: float  # µm/px of the output
    width: int  # output px
    height: int


def plan_source(
    slide: Slide,
    target_mpp: float | None,
    *,
    mpp_rtol: float = DEFAULT_MPP_RTOL,
    max_upsample: float = DEFAULT_MAX_UPSAMPLE,
) -> SourcePlan:
    """Pick the pyramid level to read and whether to resample it to `target_mpp`."""
    if target_mpp is None:
        return SourcePlan(0, 1.0, False, slide.mpp, slide.width, slide.height)
    downsample = target_mpp / slide.mpp
    level = slide.best_level_for_downsample(downsample * (1 + mpp_rtol))
    level_mpp = slide.mpp * slide.level_downsamples[level]
    scale = target_mpp / level_mpp
    if abs(scale - 1) <= mpp_rtol:
        width, height = slide.level_dimensions[level]
        return SourcePlan(level, 1.0, False, level_mpp, width, height)
    if scale < 1:
        if 1 / scale > max_upsample:
            raise SlideError(
                f"{slide.path}: the slide is scanned at {slide.mpp:.4g} µm/px, {1 / scale:.2f}x "
                f"coarser than the translator's {target_mpp:.4g} µm/px (at most "
                f"{max_upsample:g}x enlargement is allowed). Use a translator trained at a "
                "coarser resolution, or pass --slide-mpp if the file's µm/px is wrong"
            )
        logger.warning(
            "%s: %.4g µm/px is coarser than the translator's %.4g µm/px; tiles are enlarged %.2fx",
            slide.path,
            slide.mpp,
            target_mpp,
            1 / scale,
        )
    width = max(1, round(slide.width * slide.mpp / target_mpp))
    height = max(1, round(slide.height * slide.mpp / target_mpp))
    return SourcePlan(level, scale, True, float(target_mpp), width, height)


def _read_level_box(
    slide: Slide, level: int, left: int, top: int, width: int, height: int
) -> np.ndarray:
    """A box of `level` in that level's px -> uint8 (height, width, 3); outside is white glass."""
    level_w, level_h = slide.level_dimensions[level]
    out = np.full((height, width, 3), 255, dtype=np.uint8)
    x0, y0 = max(left, 0), max(top, 0)
    x1, y1 = min(left + width, level_w), min(top + height, level_h)
    if x1 > x0 and y1 > y0:
        # Slide._read_level reads a box inside the level in level px (no level-0 rounding).
        out[y0 - top : y1 - top, x0 - left : x1 - left] = slide._read_level(
            level, x0, y0, x1 - x0, y1 - y0
        )
    return out


def read_output_tile(slide: Slide, plan: SourcePlan, x: int, y: int, size: int) -> np.ndarray:
    """The `size` px tile whose top-left is output px (x, y) -> uint8 (size, size, 3).

    Resampling uses the exact (fractional) source box of the tile, so two overlapping tiles
    compute the same pixels where they overlap.
    """
    if not plan.resample:
        return _read_level_box(slide, plan.level, x, y, size, size)
    g = plan.scale
    x0, y0, x1, y1 = x * g, y * g, (x + size) * g, (y + size) * g
    margin = math.ceil(_LANCZOS_SUPPORT * max(g, 1.0)) + 2
    left, top = math.floor(x0) - margin, math.floor(y0) - margin
    right, bottom = math.ceil(x1) + margin, math.ceil(y1) + margin
    region = _read_level_box(slide, plan.level, left, top, right - left, bottom - top)
    image = Image.fromarray(region, "RGB").resize(
        (size, size), Image.Resampling.LANCZOS, box=(x0 - left, y0 - top, x1 - left, y1 - top)
    )
    return np.asarray(image, dtype=np.uint8)


def tissue_fractions(
    slide: Slide, grid: TileGrid, plan: SourcePlan, thumbnail_size: int = 2048
) -> np.ndarray:
    """Tissue fraction of every grid tile, float64 (rows, cols), from the thumbnail mask."""
    mask, scale = tissue_mask(slide, thumbnail_size)  # (h, w) bool, thumbnail px per level-0 px
    table = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    table[1:, 1:] = mask.cumsum(0).cumsum(1)
    level0_per_output = plan.mpp / slide.mpp

    def spans(count: int, limit: int) -> tuple[np.ndarray, np.ndarray]:
        starts = np.arange(count) * grid.stride * level0_per_output * scale
        ends = starts + grid.tile_size * level0_per_output * scale
        low = np.clip(np.floor(starts).astype(np.int64), 0, limit)
        high = np.clip(np.ceil(ends).astype(np.int64), 0, limit)
        return low, np.maximum(high, np.minimum(low + 1, limit))

    top, bottom = spans(grid.rows, mask.shape[0])
    left, right = spans(grid.cols, mask.shape[1])
    inside = (
        table[bottom[:, None], right[None, :]]
        - table[top[:, None], right[None, :]]
        - table[bottom[:, None], left[None, :]]
        + table[top[:, None], left[None, :]]
    )
    area = (bottom - top)[:, None] * (right - left)[None, :]  # thumbnail px of each box
    return np.clip(inside / area, 0.0, 1.0)


# --------------------------------------------------------------------------- translation
def _units_converter(out_dtype: OutputDtype) -> Callable[[np.ndarray], np.ndarray]:
    """Translator output (uint8 0-255 or float 0-1) -> float32 in output units."""
    u8_scale = {OutputDtype.UINT8: 1.0, OutputDtype.UINT16: 257.0, OutputDtype.FLOAT32: 1 / 255}
    float_scale = {OutputDtype.UINT8: 255.0, OutputDtype.UINT16: 65535.0}

    def convert(tiles: np.ndarray) -> np.ndarray:
        values = tiles.astype(np.float32)  # a fresh array: scaled in place below
        if tiles.dtype == np.uint8:
            if out_dtype is not OutputDtype.UINT8:
                values *= np.float32(u8_scale[out_dtype])
        elif out_dtype is not OutputDtype.FLOAT32:
            np.clip(values, 0.0, 1.0, out=values)
            values *= np.float32(float_scale[out_dtype])
        return values

    return convert


def _output_converter(out_dtype: OutputDtype) -> Callable[[np.ndarray], np.ndarray]:
    """Blended float32 in output units -> the output dtype."""
    if out_dtype is OutputDtype.FLOAT32:
        return lambda values: values.astype(np.float32, copy=False)
    top = 255.0 if out_dtype is OutputDtype.UINT8 else 65535.0
    dtype = np.dtype(out_dtype.value)
    return lambda values: np.clip(np.rint(values), 0.0, top).astype(dtype)


def _as_numpy(output: Any) -> np.ndarray:
    if hasattr(output, "detach"):  # a torch tensor
        output = output.detach().to("cpu")
        if output.dtype.is_floating_point:
            output = output.float()
        return output.numpy()
    return np.asarray(output)


def _translate_batch(translator: TileTranslator, tiles: np.ndarray) -> np.ndarray:
    """uint8 (B, S, S, 3) -> (B, S, S, C) uint8 or float, checked."""
    output = _as_numpy(translator(tiles))
    expected = (len(tiles), translator.tile_size, translator.tile_size, translator.output_channels)
    name = getattr(translator, "name", type(translator).__name__)
    if output.shape != expected:
        raise TranslatorOutputError(
            f"translator {name!r} returned shape {output.shape} for {len(tiles)} tiles; expected "
            f"{expected} (B, S, S, output_channels)"
        )
    if output.dtype != np.uint8 and output.dtype.kind != "f":
        raise TranslatorOutputError(
            f"translator {name!r} returned {output.dtype}; expected uint8 (0-255) or float (0-1)"
        )
    if output.dtype.kind == "f" and not np.isfinite(output).all():
        raise TranslatorOutputError(f"translator {name!r} returned NaN or infinite values")
    return output


def _translated_tiles(
    slide: Slide,
    translator: TileTranslator,
    grid: TileGrid,
    plan: SourcePlan,
    is_tissue: np.ndarray,
    background_tile: np.ndarray,
    convert: Callable[[np.ndarray], np.ndarray],
) -> Iterator[tuple[int, int, np.ndarray]]:
    """(row, col, float32 (S, S, C) in output units) in row-major order; tissue tiles go through
    the model in batches that may span rows, background tiles are `background_tile`. Outputs
    are converted to float one tile at a time (a batch stays in the translator's dtype)."""
    order: list[tuple[int, int, int | None]] = []  # (row, col, index in batch or None)
    batch: list[np.ndarray] = []

    def flush() -> Iterator[tuple[int, int, np.ndarray]]:
        outputs = _translate_batch(translator, np.stack(batch)) if batch else None
        for row, col, index in order:
            yield row, col, background_tile if index is None else convert(outputs[index])
        order.clear()
        batch.clear()

    for row in range(grid.rows):
        for col in range(grid.cols):
            if is_tissue[row, col]:
                x, y = grid.origin(row, col)
                order.append((row, col, len(batch)))
                batch.append(read_output_tile(slide, plan, x, y, grid.tile_size))
                if len(batch) == translator.batch_size:
                    yield from flush()
            else:
                order.append((row, col, None))
                if not batch:  # nothing waits for the model: pass background on at once
                    yield from flush()
    yield from flush()


def _background_values(
    background: float | Sequence[float] | None, channels: int, rgb: bool, out_dtype: OutputDtype
) -> np.ndarray:
    if background is None:
        white = {OutputDtype.UINT8: 255.0, OutputDtype.UINT16: 65535.0, OutputDtype.FLOAT32: 1.0}
        value = white[out_dtype] if rgb else 0.0
        return np.full(channels, value, dtype=np.float32)
    values = np.atleast_1d(np.asarray(background, dtype=np.float32))
    if values.size == 1:
        values = np.repeat(values, channels)
    if values.shape != (channels,) or not np.isfinite(values).all():
        raise WsiTranslationError(
            f"background must be one value or {channels} values (output units), got {background!r}"
        )
    return values


def translate_slide(
    slide_path: str | Path | Slide,
    translator: TileTranslator,
    out_path: str | Path,
    *,
    overlap: int = DEFAULT_OVERLAP_PX,
    tissue_only: bool = True,
    min_tissue: float = DEFAULT_MIN_TISSUE,
    background: float | Sequence[float] | None = None,
    slide_mpp: float | None = None,
    mpp_rtol: float = DEFAULT_MPP_RTOL,
    max_upsample: float = DEFAULT_MAX_UPSAMPLE,
    out_dtype: OutputDtype | str = OutputDtype.UINT8,
    layout: PyramidLayout | str | None = None,
    compression: TiffCompression | str = TiffCompression.ZLIB,
    tiff_tile_px: int = DEFAULT_TIFF_TILE_PX,
    num_levels: int | None = None,
    thumbnail_size: int = 2048,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Translate a whole slide tile by tile into a pyramidal (OME-)TIFF at `out_path`.

    `overlap` is in px at the translator's µm/px (0 <= overlap <= tile_size / 2). `slide_mpp`
    overrides (or supplies) the slide's level-0 µm/px. `background` (output units: 0-255 for
    uint8) fills tiles below `min_tissue` tissue when `tissue_only`; default white for RGB, 0
    for channel outputs. `layout`: None picks OME for `*.ome.tif`, the OpenSlide generic layout
    for other `.tif` names (RGB uint8 only). The file appears only when complete; on any
    error nothing is left at `out_path` (an existing file there is kept). An existing
    `out_path` is refused unless `overwrite`.

    Raises WsiTranslationError (bad arguments, TranslatorOutputError), SlideError (unreadable
    slide, MissingMppError when no µm/px is known), PyramidWriteError (output not writable).
    """
    check_translator(translator)
    out_path = Path(out_path)
    check_output(out_path, overwrite)
    out_dtype = OutputDtype(out_dtype)
    channels = int(translator.output_channels)
    names = getattr(translator, "channel_names", None)
    rgb = names is None and channels == 3
    layout = layout_for_path(out_path) if layout is None else PyramidLayout(layout)
    if out_path.suffix.lower() not in (".tif", ".tiff"):
        raise WsiTranslationError(f"{out_path}: the output name must end in .ome.tif or .tif")
    if layout is PyramidLayout.GENERIC and not (rgb and out_dtype is OutputDtype.UINT8):
        raise WsiTranslationError(
            f"{out_path}: the generic (OpenSlide) TIFF layout holds RGB uint8 only; name the "
            f"output *.ome.tif for {channels}-channel {out_dtype.value} translations"
        )
    if not 0.0 <= min_tissue <= 1.0:
        raise WsiTranslationError(f"min_tissue is a fraction in [0, 1], got {min_tissue}")
    background_values = _background_values(background, channels, rgb, out_dtype)
    TileGrid.check_overlap(int(translator.tile_size), int(overlap))

    own_slide = not isinstance(slide_path, Slide)
    slide = _open(slide_path, slide_mpp) if own_slide else slide_path
    try:
        if own_slide and out_path.resolve() == slide.path.resolve():
            raise WsiTranslationError(f"{out_path}: the output would overwrite the slide")
        return _translate_open_slide(
            slide,
            translator,
            out_path,
            overlap=int(overlap),
            tissue_only=tissue_only,
            min_tissue=min_tissue,
            background_values=background_values,
            mpp_rtol=mpp_rtol,
            max_upsample=max_upsample,
            out_dtype=out_dtype,
            rgb=rgb,
            channel_names=None if names is None else [str(n) for n in names],
            layout=layout,
            compression=TiffCompression(compression),
            tiff_tile_px=tiff_tile_px,
            num_levels=num_levels,
            thumbnail_size=thumbnail_size,
            progress=progress,
        )
    finally:
        if own_slide:
            slide.close()


def check_output(out_path: str | Path, overwrite: bool) -> None:
    """Refuse to replace an existing output unless asked to (`--overwrite`)."""
    out_path = Path(out_path)
    if out_path.is_dir():
        raise WsiTranslationError(f"--out {out_path} is a folder; name the output .tif file")
    if out_path.exists() and not overwrite:
        raise WsiTranslationError(
            f"--out {out_path} already exists; pass --overwrite to replace it, or choose "
            "another name"
        )


def _open(path: str | Path, slide_mpp: float | None) -> Slide:
    try:
        return open_slide(path, mpp=slide_mpp)
    except MissingMppError as err:
        raise MissingMppError(
            f"{err}; for a whole-slide translation it decides how the slide is resampled to "
            "the translator's resolution (translate_slide(..., slide_mpp=...))"
        ) from err


def _translate_open_slide(
    slide: Slide,
    translator: TileTranslator,
    out_path: Path,
    *,
    overlap: int,
    tissue_only: bool,
    min_tissue: float,
    background_values: np.ndarray,
    mpp_rtol: float,
    max_upsample: float,
    out_dtype: OutputDtype,
    rgb: bool,
    channel_names: list[str] | None,
    layout: PyramidLayout,
    compression: TiffCompression,
    tiff_tile_px: int,
    num_levels: int | None,
    thumbnail_size: int,
    progress: bool,
) -> Path:
    started = time.perf_counter()
    channels, size = int(translator.output_channels), int(translator.tile_size)
    plan = plan_source(slide, translator.mpp, mpp_rtol=mpp_rtol, max_upsample=max_upsample)
    grid = TileGrid(plan.width, plan.height, size, overlap)
    if tissue_only:
        is_tissue = tissue_fractions(slide, grid, plan, thumbnail_size) >= max(min_tissue, 1e-9)
        if not is_tissue.any():
            logger.warning(
                "%s: no tissue found (thumbnail mask empty); the output is all background",
                slide.path,
            )
    else:
        is_tissue = np.ones((grid.rows, grid.cols), dtype=bool)
    background_tile = np.broadcast_to(background_values, (size, size, channels))
    logger.info(
        "%s -> %s: %dx%d px at %.4g µm/px (level %d%s), %d x %d tiles of %d px, overlap %d, "
        "%d with tissue",
        slide.path,
        out_path,
        plan.width,
        plan.height,
        plan.mpp,
        plan.level,
        ", resampled" if plan.resample else "",
        grid.rows,
        grid.cols,
        size,
        overlap,
        int(is_tissue.sum()),
    )
    name = getattr(translator, "name", type(translator).__name__)
    with StreamingPyramidWriter(
        out_path,
        plan.width,
        plan.height,
        mpp=plan.mpp,
        channels=channels,
        dtype=np.dtype(out_dtype.value),
        rgb=rgb,
        channel_names=channel_names,
        layout=layout,
        compression=compression,
        tile_px=tiff_tile_px,
        num_levels=num_levels,
        image_name=f"{slide.slide_id} ({name})",
    ) as writer:
        blender = _OverlapBlender(
            grid,
            channels,
            _output_converter(out_dtype),
            writer.write_rows,
            np.dtype(out_dtype.value),
        )
        tiles = _translated_tiles(
            slide, translator, grid, plan, is_tissue, background_tile, _units_converter(out_dtype)
        )
        with tqdm(
            total=grid.rows * grid.cols, desc=slide.slide_id, unit="tile", disable=not progress
        ) as bar:
            for row, col, values in tiles:
                blender.add(row, col, values)
                bar.update(1)
        if writer.rows_written != plan.height:  # cannot happen: the grid covers the image
            raise PyramidWriteError(f"{out_path}: {writer.rows_written}/{plan.height} rows blended")
    logger.info(
        "%s: wrote %s (%d levels) in %.1f s",
        slide.path,
        out_path,
        len(writer.level_sizes),
        time.perf_counter() - started,
    )
    return out_path
