"""Pyramidal TIFF / OME-TIFF (and SVS without OpenSlide) via tifffile, without zarr.

Levels are the first series' pyramid levels (SubIFDs, OME or SVS pyramids); a plain
multi-page TIFF whose later pages are reduced copies of the first is read as a pyramid too.
A region is decoded from only the tiles (or strips) that it touches, so memory stays in
proportion to the region, not the level. Pages stored planar (RRR...GGG...BBB) are read whole
(documented limitation: fine for small slides, avoid it for big ones).
µm/px comes from OME PhysicalSizeX, Aperio "MPP = " in ImageDescription, or the
X/YResolution tags with a centimetre or inch unit (implausible values such as 72 dpi are
ignored; see PLAUSIBLE_MPP_RANGE).
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from mupad.data.wsi.errors import SlideError
from mupad.data.wsi.slide import Slide, check_mpp, missing_mpp_error, plausible_mpp

_APERIO_MPP = re.compile(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)")
_OME_UNITS_UM = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6, "Å": 1e-4}
# Decoded tiles kept per open slide (least recently used dropped first).
SEGMENT_CACHE_BYTES = 64 * 2**20
# Exceptions a decoder may raise on a damaged segment (imagecodecs errors are RuntimeErrors).
_DECODE_ERRORS = (ValueError, RuntimeError, OSError, IndexError, KeyError)


def _import_tifffile() -> Any:
    import tifffile

    return tifffile


class TiffSlide(Slide):
    def __init__(self, path: Path, mpp: float | None = None):
        tifffile = _import_tifffile()
        try:
            self._tif = tifffile.TiffFile(path)
        except (tifffile.TiffFileError, *_DECODE_ERRORS) as err:
            raise SlideError(f"{path}: not a readable TIFF (corrupt or truncated): {err}") from err
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cache_bytes = 0
        try:
            self._pages = self._level_pages(path)
            self._check_complete(path)
            resolved = check_mpp(mpp, path) if mpp is not None else self._file_mpp(path)
            dims = [(int(p.imagewidth), int(p.imagelength)) for p in self._pages]
            self._init_common(path, resolved, dims)
        except BaseException:
            self._tif.close()
            raise

    # ----------------------------------------------------------------- opening
    def _level_pages(self, path: Path) -> list[Any]:
        if not self._tif.series:
            raise SlideError(
                f"{path}: the TIFF holds no readable image (empty, truncated or corrupt)"
            )
        series = self._tif.series[0]
        levels = list(series.levels) if getattr(series, "levels", None) else [series]
        pages = [self._single_page(path, level) for level in levels]
        if len(pages) == 1 and not (self._tif.is_svs or self._tif.is_ome):
            pages += self._reduced_pages(pages[0])
        for page in pages:
            self._check_pixels(path, page)
        return pages

    @staticmethod
    def _single_page(path: Path, level: Any) -> Any:
        level_pages = [p for p in level.pages if p is not None]
        if len(level_pages) != 1:
            raise SlideError(
                f"{path}: a pyramid level spans {len(level_pages)} pages (z-stack or "
                "time series?); expected one RGB plane per level"
            )
        return _as_page(level_pages[0])

    def _reduced_pages(self, base: Any) -> list[Any]:
        """Later top-level pages that are shrunk copies of `base` (a pyramid without SubIFDs)."""
        found = []
        aspect = base.imagewidth / base.imagelength
        for page in self._tif.pages[1:]:
            page = _as_page(page)
            if page.imagewidth >= (found[-1] if found else base).imagewidth:
                continue
            if abs(page.imagewidth / page.imagelength - aspect) > 0.02 * aspect:
                continue
            if page.dtype != np.uint8 or page.samplesperpixel != 3:
                continue
            found.append(page)
        return found

    @staticmethod
    def _check_pixels(path: Path, page: Any) -> None:
        samples = int(page.samplesperpixel)
        if samples in (2, 4):
            raise SlideError(
                f"{path} has an alpha channel ({samples} samples per pixel); slides must be "
                "RGB. Drop the alpha channel, e.g. `vips im_extract_bands in.tif out.tif 0 3`"
            )
        if page.dtype != np.uint8:
            raise SlideError(
                f"{path} is not 8 bits per channel (dtype {page.dtype}); slides must be 8-bit "
                "RGB. Convert it first, choosing the intensity scaling yourself (e.g. "
                "`np.round(img / 257).astype('uint8')` for full-range 16-bit)"
            )
        if samples != 3 or page.imagedepth != 1:
            raise SlideError(
                f"{path} has {samples} sample(s) per pixel and depth {page.imagedepth}; "
                "slides must be one RGB plane per level (grayscale and fluorescence stacks "
                "are not H&E)"
            )

    def _check_complete(self, path: Path) -> None:
        """A truncated file ends before the last tile; say so now, not mid-tiling."""
        size = self._tif.filehandle.size
        for page in self._pages:
            ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts) if n]
            if ends and max(ends) > size:
                raise SlideError(
                    f"{path}: the file is truncated ({size} bytes, but level "
                    f"{page.imagewidth}x{page.imagelength} needs {max(ends)}); copy it again"
                )

    def _file_mpp(self, path: Path) -> float:
        tif = self._tif
        if tif.is_ome and tif.ome_metadata:
            match = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tif.ome_metadata)
            if match:
                unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', tif.ome_metadata)
                factor = _OME_UNITS_UM.get(unit.group(1) if unit else "µm")
                if factor is not None:
                    found = plausible_mpp(float(match.group(1)) * factor)
                    if found is not None:
                        return found
        description = self._pages[0].description or ""
        match = _APERIO_MPP.search(description)
        if match:
            found = plausible_mpp(float(match.group(1)))
            if found is not None:
                return found
        found = self._resolution_mpp(self._pages[0])
        if found is not None:
            return found
        raise missing_mpp_error(
            path, "OME PhysicalSizeX, Aperio 'MPP =' and the X/YResolution tags"
        )

    @staticmethod
    def _resolution_mpp(page: Any) -> float | None:
        tags = page.tags
        unit_tag, res_tag = tags.get("ResolutionUnit"), tags.get("XResolution")
        if unit_tag is None or res_tag is None:
            return None
        um_per_unit = {2: 25400.0, 3: 10000.0}.get(int(unit_tag.value))
        numerator, denominator = res_tag.value
        if um_per_unit is None or not numerator or not denominator:
            return None
        return plausible_mpp(um_per_unit * denominator / numerator)

    # ----------------------------------------------------------------- reading
    def _read_level(self, level: int, left: int, top: int, width: int, height: int) -> np.ndarray:
        page = self._pages[level]
        try:
            if page.planarconfig != 1 or not page.dataoffsets:
                # Planar or unusual layout: decode the whole page (small slides only).
                return self._whole(page)[top : top + height, left : left + width]
            return self._segments(level, page, left, top, width, height)
        except _DECODE_ERRORS as err:
            raise SlideError(
                f"{self.path}: cannot decode level {level} (file truncated or corrupt): {err}"
            ) from err

    def _whole(self, page: Any) -> np.ndarray:
        array = page.asarray()
        if array.ndim == 3 and array.shape[0] == 3 and array.shape[-1] != 3:
            array = np.moveaxis(array, 0, -1)  # planar (3, H, W) -> (H, W, 3)
        return array

    def _segment(self, level: int, page: Any, index: int) -> np.ndarray | None:
        """Decoded tile/strip `index` of `level` (uint8 (seg_h, seg_w, 3), None if absent).

        Recently decoded segments are kept (LRU, SEGMENT_CACHE_BYTES in all): neighbouring
        tiles of a grid that is not aligned with the file's tiles share segments.
        """
        key = (level, index)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        offset, count = page.dataoffsets[index], page.databytecounts[index]
        if not count:
            return None
        fh = self._tif.filehandle
        with fh.lock:
            fh.seek(offset)
            data = fh.read(count)
        if len(data) != count:
            raise OSError(f"tile {index} is cut short ({len(data)} of {count} bytes)")
        jpegtables = getattr(page, "jpegtables", None)
        segment, _, _ = page.decode(data, index, jpegtables=jpegtables, _fullsize=True)
        if segment is None:
            return None
        pixels = segment.reshape(segment.shape[-3:])  # (seg_h, seg_w, 3)
        self._cache[key] = pixels
        self._cache_bytes += pixels.nbytes
        while self._cache_bytes > SEGMENT_CACHE_BYTES and len(self._cache) > 1:
            _, evicted = self._cache.popitem(last=False)
            self._cache_bytes -= evicted.nbytes
        return pixels

    def _segments(
        self, level: int, page: Any, left: int, top: int, width: int, height: int
    ) -> np.ndarray:
        """Decode only the tiles/strips that overlap the box; (height, width, 3) uint8."""
        if page.is_tiled:
            seg_w, seg_h = int(page.tilewidth), int(page.tilelength)
        else:
            seg_w, seg_h = int(page.imagewidth), int(page.rowsperstrip or page.imagelength)
            seg_h = min(seg_h, int(page.imagelength))
        across = math.ceil(page.imagewidth / seg_w)
        out = np.empty((height, width, 3), dtype=np.uint8)  # (h, w, 3)
        for row in range(top // seg_h, (top + height - 1) // seg_h + 1):
            for col in range(left // seg_w, (left + width - 1) // seg_w + 1):
                segment = self._segment(level, page, row * across + col)  # (seg_h, seg_w, 3)
                x0, y0 = col * seg_w, row * seg_h
                # Overlap of the segment [x0, x0+seg_w) x [y0, y0+seg_h) with the box.
                ox0, oy0 = max(x0, left), max(y0, top)
                ox1, oy1 = min(x0 + seg_w, left + width), min(y0 + seg_h, top + height)
                if segment is None:  # sparse file: a missing tile is empty glass
                    out[oy0 - top : oy1 - top, ox0 - left : ox1 - left] = 255
                    continue
                out[oy0 - top : oy1 - top, ox0 - left : ox1 - left] = segment[
                    oy0 - y0 : oy1 - y0, ox0 - x0 : ox1 - x0
                ]
        return out

    def close(self) -> None:
        self._cache.clear()
        self._cache_bytes = 0
        self._tif.close()


def _as_page(page: Any) -> Any:
    """A full TiffPage (a TiffFrame shares its keyframe's tags but has its own data offsets)."""
    return page.aspage() if hasattr(page, "aspage") else page
