"""Stream an image, rows top to bottom, into a tiled pyramidal (OME-)TIFF: bounded memory, atomic.

    with StreamingPyramidWriter("out.ome.tif", width, height, mpp=0.5) as writer:
        for band in bands:                      # uint8 (h, W, 3), top to bottom
            writer.write_rows(band)
    # out.ome.tif appears only here, complete

Rows arrive in full-width bands. Every completed band of `tile_px` rows is cut into tiles that
are encoded at once (zlib + horizontal predictor by default) and appended to an anonymous
scratch file beside the output; the band is then halved (2x2 mean) into the next level's band,
and so on down the pyramid. Memory is one `tile_px`-row band per level, never a whole level.
After the last row the file is assembled from the pre-encoded tiles (no re-encoding) by
tifffile under a temporary name and renamed. On any error the temporary file is removed (the
scratch file is unlinked from the start, so even a killed process leaves none) and an existing
file at the destination is left untouched.

Layouts (`PyramidLayout`):
- OME: OME-TIFF whose reduced levels are SubIFDs of the full-resolution page (the OME-TIFF 6
  pyramid specification): QuPath / Bio-Formats, tifffile, napari read every level. OpenSlide
  does not read SubIFDs (nor OME metadata): it opens an RGB OME output as a single-level
  "generic-tiff".
- GENERIC: OpenSlide's "generic tiled TIFF": each level a top-level directory, the reduced ones
  marked reduced-resolution, µm/px in X/YResolution. RGB uint8 only. OpenSlide (hence QuPath's
  OpenSlide reader), libvips and tifffile read every level.
Multi-channel images (e.g. mIF marker intensities) are OME only: one grey page per channel
(axes CYX), each with its own SubIFD pyramid, channel names in the OME-XML.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import numpy as np

from mupad.errors import MupadError
from mupad.fileio import atomic_file, make_parent, output_error

logger = logging.getLogger(__name__)

DEFAULT_TIFF_TILE_PX = 256
DEFAULT_JPEG_QUALITY = 90
_ZLIB_LEVEL = 6
_SUPPORTED_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32))
# Classic TIFF addresses 4 GiB; above half of that (raw size) write BigTIFF to be safe.
_BIGTIFF_RAW_BYTES = 2**31


class PyramidWriteError(MupadError, ValueError):
    """The image cannot be written as asked (bad size, dtype, layout or row count)."""


class PyramidLayout(StrEnum):
    OME = "ome"
    GENERIC = "generic"


class TiffCompression(StrEnum):
    ZLIB = "zlib"  # lossless (Adobe deflate + predictor)
    JPEG = "jpeg"  # lossy, RGB uint8 only (YCbCr 4:2:0, like most scanners)
    NONE = "none"


def layout_for_path(path: str | Path) -> PyramidLayout:
    """OME for `*.ome.tif(f)`, GENERIC (OpenSlide) for any other `.tif(f)` name."""
    name = Path(path).name.lower()
    return PyramidLayout.OME if name.endswith((".ome.tif", ".ome.tiff")) else PyramidLayout.GENERIC


def pyramid_level_sizes(
    width: int, height: int, tile_px: int = DEFAULT_TIFF_TILE_PX, num_levels: int | None = None
) -> list[tuple[int, int]]:
    """(width, height) per level: each level halves the previous one (rounding up).

    `num_levels=None` halves until the level fits in one `tile_px` x `tile_px` tile.
    """
    sizes = [(int(width), int(height))]
    while (num_levels is None and max(sizes[-1]) > tile_px) or (
        num_levels is not None and len(sizes) < num_levels
    ):
        w, h = sizes[-1]
        if w == 1 and h == 1:
            break
        sizes.append(((w + 1) // 2, (h + 1) // 2))
    return sizes


def halve_rows(band: np.ndarray) -> np.ndarray:
    """(h, w, c) -> (ceil(h/2), ceil(w/2), c) by 2x2 means; an odd last row/column is repeated.

    Integers are rounded to nearest; a constant band stays exactly constant.
    """
    h, w = band.shape[:2]
    if h % 2 or w % 2:
        band = np.pad(band, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    if band.dtype.kind == "f":
        rows = band[0::2].astype(np.float64) + band[1::2]
        return ((rows[:, 0::2] + rows[:, 1::2]) * 0.25).astype(band.dtype)
    wide = np.uint16 if band.dtype.itemsize == 1 else np.uint64  # 4 x max fits
    rows = band[0::2].astype(wide) + band[1::2]
    sums = rows[:, 0::2] + rows[:, 1::2]
    return ((sums + 2) >> 2).astype(band.dtype)


class _Level:
    """One pyramid level: its band buffer and, per page, the (offset, size) of each encoded tile."""

    def __init__(
        self,
        index: int,
        width: int,
        height: int,
        channels: int,
        dtype: np.dtype,
        tile_px: int,
        num_pages: int,
    ):
        self.index = index
        self.width, self.height = width, height
        self.tiles_across = math.ceil(width / tile_px)
        self.tiles_down = math.ceil(height / tile_px)
        # Padded to whole tiles; edge tiles are padded by repetition (no JPEG ringing).
        self.band = np.zeros((tile_px, self.tiles_across * tile_px, channels), dtype=dtype)
        self.fill = 0  # rows of the current band filled
        self.rows_in = 0  # rows of this level received so far
        self.tiles: list[list[tuple[int, int]]] = [[] for _ in range(num_pages)]


class StreamingPyramidWriter:
    """Write a `height` x `width` x `channels` image given as bands of rows, top to bottom.

    `rgb=True` stores 3 interleaved samples (photometric RGB); `rgb=False` stores one grey page
    per channel (OME layout only). `mpp` (µm/px of level 0) goes into the OME PhysicalSizeX/Y
    and the X/YResolution tags. Use as a context manager: leaving the block without an error
    finishes the file (and raises if rows are missing); an error discards everything.
    """

    def __init__(
        self,
        path: str | Path,
        width: int,
        height: int,
        *,
        mpp: float,
        channels: int = 3,
        dtype: np.dtype | type | str = np.uint8,
        rgb: bool | None = None,
        channel_names: Sequence[str] | None = None,
        layout: PyramidLayout | str | None = None,
        compression: TiffCompression | str = TiffCompression.ZLIB,
        jpeg_quality: int = DEFAULT_JPEG_QUALITY,
        tile_px: int = DEFAULT_TIFF_TILE_PX,
        num_levels: int | None = None,
        image_name: str | None = None,
        encode_workers: int | None = None,
    ):
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.channels = int(channels)
        self.rgb = (self.channels == 3 and channel_names is None) if rgb is None else bool(rgb)
        self.layout = layout_for_path(self.path) if layout is None else PyramidLayout(layout)
        self.compression = TiffCompression(compression)
        self.mpp = float(mpp)
        self.tile_px = int(tile_px)
        self.jpeg_quality = int(jpeg_quality)
        self.image_name = image_name
        self._validate(width, height, num_levels)
        self.channel_names = (
            None if self.rgb else list(channel_names or [f"channel {i}" for i in range(channels)])
        )
        if self.channel_names is not None and len(self.channel_names) != self.channels:
            raise PyramidWriteError(
                f"{len(self.channel_names)} channel names for {self.channels} channels"
            )
        self.level_sizes = pyramid_level_sizes(width, height, self.tile_px, num_levels)
        self._pages = 1 if self.rgb else self.channels
        self._levels = [
            _Level(i, w, h, self.channels, self.dtype, self.tile_px, self._pages)
            for i, (w, h) in enumerate(self.level_sizes)
        ]
        self._encode = self._encoder()
        workers = min(4, os.cpu_count() or 1) if encode_workers is None else encode_workers
        self._pool = ThreadPoolExecutor(workers) if workers > 1 else None
        make_parent(self.path)
        for stale in self.path.parent.glob(f".{self.path.name}.tmp-*"):
            stale.unlink(missing_ok=True)  # left by a killed earlier run
        # Anonymous (already unlinked) scratch file: nothing to clean up, whatever happens.
        # Closed in _release (close/abort/__exit__), hence no `with`.
        try:
            self._scratch = tempfile.TemporaryFile(  # noqa: SIM115
                dir=self.path.parent, prefix=f".{self.path.name}."
            )
        except OSError as error:
            raise output_error(error, self.path) from error
        self._scratch_size = 0
        self._closed = False

    # ----------------------------------------------------------------- checks
    def _validate(self, width: int, height: int, num_levels: int | None) -> None:
        if width < 1 or height < 1 or max(width, height) >= 2**31:
            raise PyramidWriteError(f"image size {width}x{height} px is not writable")
        if self.dtype not in _SUPPORTED_DTYPES:
            raise PyramidWriteError(
                f"dtype {self.dtype} is not supported; use one of "
                f"{', '.join(str(d) for d in _SUPPORTED_DTYPES)}"
            )
        if self.channels < 1:
            raise PyramidWriteError(f"channels must be >= 1, got {self.channels}")
        if self.rgb and self.channels != 3:
            raise PyramidWriteError(f"an RGB image has 3 channels, got {self.channels}")
        if self.tile_px < 16 or self.tile_px % 16:
            raise PyramidWriteError(f"TIFF tiles must be a multiple of 16 px, got {self.tile_px}")
        if not (math.isfinite(self.mpp) and self.mpp > 0):
            raise PyramidWriteError(f"mpp must be a positive number of µm/px, got {self.mpp!r}")
        if num_levels is not None and num_levels < 1:
            raise PyramidWriteError(f"num_levels must be >= 1, got {num_levels}")
        if self.path.suffix.lower() not in (".tif", ".tiff"):
            raise PyramidWriteError(f"{self.path}: the output name must end in .tif or .tiff")
        if self.layout is PyramidLayout.GENERIC and not (self.rgb and self.dtype == np.uint8):
            raise PyramidWriteError(
                f"{self.path}: the generic (OpenSlide) TIFF layout holds RGB uint8 only; write "
                f"{self.channels}-channel {self.dtype} images as OME-TIFF (name ending .ome.tif)"
            )
        if self.compression is TiffCompression.JPEG and not (self.rgb and self.dtype == np.uint8):
            raise PyramidWriteError("JPEG compression needs RGB uint8; use zlib")

    # ----------------------------------------------------------------- input
    @property
    def rows_written(self) -> int:
        return self._levels[0].rows_in

    def write_rows(self, rows: np.ndarray) -> None:
        """Append rows (h, w >= width, channels) of level 0; columns beyond `width` and rows
        beyond `height` are dropped (callers may hand in a padded grid)."""
        if self._closed:
            raise PyramidWriteError(f"{self.path}: the writer is closed")
        if rows.ndim != 3 or rows.shape[2] != self.channels or rows.shape[1] < self.width:
            raise PyramidWriteError(
                f"rows must be (h, >= {self.width}, {self.channels}), got {rows.shape}"
            )
        if rows.dtype != self.dtype:
            raise PyramidWriteError(f"rows must be {self.dtype}, got {rows.dtype}")
        try:
            self._push(0, rows)
        except OSError as error:  # the scratch file beside `path`: a full or read-only disk
            raise output_error(error, self.path) from error

    @property
    def width(self) -> int:
        return self.level_sizes[0][0]

    @property
    def height(self) -> int:
        return self.level_sizes[0][1]

    def _push(self, index: int, rows: np.ndarray) -> None:
        level = self._levels[index]
        rows = rows[: level.height - level.rows_in, : level.width]
        while len(rows):
            take = min(self.tile_px - level.fill, len(rows))
            level.band[level.fill : level.fill + take, : level.width] = rows[:take]
            level.fill += take
            level.rows_in += take
            rows = rows[take:]
            if level.fill == self.tile_px or level.rows_in == level.height:
                self._emit_band(level)

    def _emit_band(self, level: _Level) -> None:
        """Encode the filled band's tiles, then pass its halving on to the next level."""
        band = level.band
        filled = band[: level.fill, : level.width]
        # Pad by repetition to whole tiles (right columns, bottom rows).
        band[: level.fill, level.width :] = filled[:, -1:]
        band[level.fill :] = band[level.fill - 1 : level.fill]
        tiles = [
            band[:, col * self.tile_px : (col + 1) * self.tile_px]
            for col in range(level.tiles_across)
        ]  # (T, T, C) views
        for page in range(self._pages):
            chunks = tiles if self.rgb else [tile[..., page : page + 1] for tile in tiles]
            encoded = (
                self._pool.map(self._encode, chunks) if self._pool else map(self._encode, chunks)
            )
            for data in encoded:
                self._scratch.write(data)
                level.tiles[page].append((self._scratch_size, len(data)))
                self._scratch_size += len(data)
        if level.index + 1 < len(self._levels):
            half = halve_rows(filled)
            level.fill = 0
            self._push(level.index + 1, half)
        else:
            level.fill = 0

    # ----------------------------------------------------------------- encoding
    def _encoder(self) -> Callable[[np.ndarray], bytes]:
        from tifffile import TIFF

        if self.compression is TiffCompression.NONE:
            return lambda tile: np.ascontiguousarray(tile).tobytes()
        if self.compression is TiffCompression.JPEG:
            jpeg = TIFF.COMPRESSORS[7]
            quality = self.jpeg_quality
            return lambda tile: jpeg(
                np.ascontiguousarray(tile),
                level=quality,
                colorspace="RGB",
                outcolorspace="YCBCR",
                subsampling=(2, 2),
            )
        deflate = TIFF.COMPRESSORS[8]
        predict = TIFF.PREDICTORS[self._predictor()]
        # Tiles are (T, T, samples): the predictor differences along x (axis -2), per sample.
        return lambda tile: deflate(predict(np.ascontiguousarray(tile), axis=-2), level=_ZLIB_LEVEL)

    def _predictor(self) -> int:
        return 3 if self.dtype.kind == "f" else 2  # floating-point / horizontal differencing

    # ----------------------------------------------------------------- output
    def close(self) -> Path:
        """Assemble the TIFF under a temporary name and rename it to `path`; returns `path`."""
        if self._closed:
            return self.path
        try:
            missing = [
                f"level {lvl.index}: {lvl.rows_in}/{lvl.height} rows"
                for lvl in self._levels
                if lvl.rows_in != lvl.height
            ]
            if missing:
                raise PyramidWriteError(
                    f"{self.path}: the image is incomplete ({'; '.join(missing)}); nothing written"
                )
            self._scratch.flush()
            with atomic_file(self.path) as tmp:
                self._assemble(tmp)
        finally:
            self._release()
        return self.path

    def abort(self) -> None:
        """Discard everything (the destination is not touched)."""
        self._release()

    def _release(self) -> None:
        if not self._closed:
            self._closed = True
            if self._pool is not None:
                self._pool.shutdown(wait=True)
            self._scratch.close()
            for level in self._levels:
                level.band = np.zeros((0, 0, 0), dtype=self.dtype)

    def _tile_bytes(self, level: _Level) -> Iterator[bytes]:
        for page_tiles in level.tiles:
            for offset, size in page_tiles:
                self._scratch.seek(offset)
                yield self._scratch.read(size)

    def _assemble(self, tmp: Path) -> None:
        import tifffile

        raw_bytes = sum(w * h for w, h in self.level_sizes) * self.channels * self.dtype.itemsize
        ome = self.layout is PyramidLayout.OME
        common: dict[str, Any] = {
            "dtype": self.dtype,
            "photometric": "rgb" if self.rgb else "minisblack",
            "planarconfig": "contig" if self.rgb else None,
            "tile": (self.tile_px, self.tile_px),
            "resolutionunit": "CENTIMETER",
        }
        if self.compression is TiffCompression.ZLIB:
            common.update(compression="zlib", predictor=self._predictor())
        elif self.compression is TiffCompression.JPEG:
            common.update(compression="jpeg", subsampling=(2, 2))
        with tifffile.TiffWriter(tmp, bigtiff=raw_bytes > _BIGTIFF_RAW_BYTES, ome=ome) as tif:
            for level, (width, height) in zip(self._levels, self.level_sizes, strict=True):
                shape = (height, width, 3) if self.rgb else (self.channels, height, width)
                px_per_cm = 1e4 / (self.mpp * 2**level.index)
                options = dict(common, shape=shape, resolution=(px_per_cm, px_per_cm))
                if level.index == 0:
                    if ome and len(self._levels) > 1:
                        options["subifds"] = len(self._levels) - 1
                    options["metadata"] = self._ome_metadata() if ome else None
                else:
                    options["subfiletype"] = 1  # reduced-resolution image
                    if not ome:
                        options["metadata"] = None
                tif.write(self._tile_bytes(level), **options)

    def _ome_metadata(self) -> dict[str, Any]:
        metadata: dict[str, Any] = {
            "axes": "YXS" if self.rgb else "CYX",
            "PhysicalSizeX": self.mpp,
            "PhysicalSizeXUnit": "µm",
            "PhysicalSizeY": self.mpp,
            "PhysicalSizeYUnit": "µm",
        }
        if self.channel_names is not None:
            metadata["Channel"] = {"Name": list(self.channel_names)}
        if self.image_name:
            metadata["Name"] = self.image_name
        return metadata

    # ----------------------------------------------------------------- context
    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
