"""Open a tissue image strictly (8-bit RGB only) and cut physically sized patches from it.

Alpha channels and 16-bit (or float) images are **rejected** with an error that says how to
convert them, not silently converted: dropping alpha can expose undefined colour under
transparent pixels, and 16 -> 8 bit needs a choice of scaling that we should not guess.

JPEG/PNG are opened lazily with PIL (the header is checked before any pixel is decoded);
TIFFs with tifffile, memory-mapped when uncompressed, so only the patches are touched.
Pixel coordinates are pixel indices (the centre of pixel i is at i), so a spot at
(x, y) covers the continuous box centred on (x + 0.5, y + 0.5).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mupad.omics.spatial.errors import MissingSpatialFileError, SpotImageError

TIFF_SUFFIXES = (".tif", ".tiff")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
DEEP_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")

_TO_RGB_HINT = (
    'convert it to 8-bit RGB first, e.g. `python -c "from PIL import Image; '
    "Image.open('{src}').convert('RGB').save('{dst}')\"`"
)
_DEPTH_HINT = (
    "convert it to 8-bit RGB first, scaling the intensities yourself (e.g. "
    "`np.round(img / 257).astype('uint8')` for full-range 16-bit), or "
    "`magick '{src}' -depth 8 -alpha off '{dst}'`"
)


def _rgb_name(path: Path) -> str:
    return str(
        path.with_name(f"{path.stem}_rgb8{'.png' if path.suffix.lower() != '.jpg' else '.jpg'}")
    )


def alpha_error(path: Path, what: str) -> SpotImageError:
    return SpotImageError(
        f"{path} has an alpha channel ({what}); H&E patches need plain RGB. Drop the alpha: "
        + _TO_RGB_HINT.format(src=path, dst=_rgb_name(path))
    )


def depth_error(path: Path, what: str) -> SpotImageError:
    return SpotImageError(
        f"{path} is not 8 bits per channel ({what}); patches are cut from 8-bit RGB. "
        + _DEPTH_HINT.format(src=path, dst=_rgb_name(path))
    )


class TissueImage:
    """An opened 8-bit RGB image; `region` returns integer-box crops as PIL RGB images."""

    def __init__(self, path: Path, pil: Image.Image | None = None, array: np.ndarray | None = None):
        self.path = path
        self._pil = pil
        self._array = array  # (H, W, 3) uint8, possibly a memory map
        if pil is not None:
            self.width, self.height = pil.size
        elif array is not None:
            self.height, self.width = array.shape[:2]
        else:  # pragma: no cover - constructor misuse
            raise ValueError("TissueImage needs a PIL image or an array")

    def region(self, left: int, top: int, right: int, bottom: int) -> Image.Image:
        if self._pil is not None:
            return self._pil.crop((left, top, right, bottom))
        assert self._array is not None
        return Image.fromarray(np.ascontiguousarray(self._array[top:bottom, left:right]), "RGB")


@contextlib.contextmanager
def _no_pixel_limit() -> Iterator[None]:
    """Whole-slide-sized H&E images trip PIL's decompression-bomb guard; trust our own input."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _check_pil(image: Image.Image, path: Path) -> None:
    mode = image.mode
    if mode in ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        raise alpha_error(path, f"PIL mode {mode}")
    if mode in DEEP_MODES or any(";16" in str(tile[-1]) for tile in getattr(image, "tile", [])):
        raise depth_error(path, f"PIL mode {mode}")
    if mode not in ("RGB", "P"):
        raise SpotImageError(
            f"{path} is {mode}, not RGB (grayscale, CMYK, ...); H&E patches need colour: "
            + _TO_RGB_HINT.format(src=path, dst=_rgb_name(path))
        )


def _check_tiff(path: Path) -> tuple[Any, Any]:
    """Open a TIFF and check its first series is 8-bit RGB -> (TiffFile, level 0 series)."""
    import tifffile

    try:
        tif = tifffile.TiffFile(path)
    except (tifffile.TiffFileError, OSError) as err:
        raise SpotImageError(f"{path} is not a readable TIFF: {err}") from err
    series = tif.series[0]
    level = series.levels[0] if getattr(series, "levels", None) else series
    shape, dtype, axes = tuple(level.shape), np.dtype(level.dtype), level.axes
    channels = (
        shape[axes.index("S")] if "S" in axes else (shape[axes.index("C")] if "C" in axes else 1)
    )
    if channels in (2, 4):
        tif.close()
        raise alpha_error(path, f"{channels} samples per pixel")
    if dtype != np.uint8:
        tif.close()
        raise depth_error(path, f"dtype {dtype}")
    if channels != 3 or len(shape) != 3:
        tif.close()
        raise SpotImageError(
            f"{path} has shape {shape} (axes {axes}); expected one RGB plane (H, W, 3). "
            + _TO_RGB_HINT.format(src=path, dst=_rgb_name(path))
        )
    return tif, level


def check_image(path: str | Path) -> tuple[int, int]:
    """Validate that `path` is 8-bit RGB without decoding pixels; returns (width, height)."""
    with open_tissue_image(path) as image:
        return image.width, image.height


@contextlib.contextmanager
def open_tissue_image(path: str | Path) -> Iterator[TissueImage]:
    """Open (lazily where the format allows) an 8-bit RGB image; raise SpotImageError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise MissingSpatialFileError(f"image {path} does not exist")
    if path.suffix.lower() in TIFF_SUFFIXES:
        import tifffile

        tif, level = _check_tiff(path)
        try:
            axes = level.axes
            try:
                array = tifffile.memmap(path, mode="r") if len(tif.series) == 1 else None
            except ValueError:  # compressed or not contiguous
                array = None
            if array is None or array.shape != tuple(level.shape):
                array = level.asarray()
            if axes.index("S" if "S" in axes else "C") == 0:
                array = np.moveaxis(array, 0, -1)  # planar (3, H, W) -> (H, W, 3)
            yield TissueImage(path, array=array)
        finally:
            tif.close()
        return
    try:
        with _no_pixel_limit():
            pil = Image.open(path)
    except (OSError, Image.UnidentifiedImageError) as err:
        raise SpotImageError(f"cannot open image {path}: {err}") from err
    with pil:
        _check_pil(pil, path)
        if pil.mode == "P":
            pil = pil.convert("RGB")
        yield TissueImage(path, pil=pil)


@dataclass(frozen=True)
class PatchBox:
    """Where one patch lies in image pixels (continuous coordinates, right/bottom exclusive)."""

    left: float
    top: float
    right: float
    bottom: float

    def inside(self, width: int, height: int) -> bool:
        return self.left >= 0 and self.top >= 0 and self.right <= width and self.bottom <= height


def patch_box(x_px: float, y_px: float, side_px: float) -> PatchBox:
    """The square of side `side_px` centred on the pixel-index centre (x_px, y_px)."""
    cx, cy, half = x_px + 0.5, y_px + 0.5, side_px / 2
    return PatchBox(cx - half, cy - half, cx + half, cy + half)


def cut_patch(image: TissueImage, box: PatchBox, size: int) -> Image.Image:
    """Resample `box` to size x size (Lanczos: antialiased when shrinking, smooth when enlarging)."""
    left = max(0, math.floor(box.left) - 2)
    top = max(0, math.floor(box.top) - 2)
    right = min(image.width, math.ceil(box.right) + 2)
    bottom = min(image.height, math.ceil(box.bottom) + 2)
    region = image.region(left, top, right, bottom)
    relative = (box.left - left, box.top - top, box.right - left, box.bottom - top)
    return region.resize((size, size), Image.Resampling.LANCZOS, box=relative)
