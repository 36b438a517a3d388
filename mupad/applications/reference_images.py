"""Reference images for the image condition: any file -> an 8-bit RGB tile at the model's scale.

Conversions (each one is reported in `ReferenceImage.conversions` and in the sidecar):

    grayscale (L, 1-bit, 16-bit gray)   replicated into R = G = B
    alpha (RGBA, LA, palette + alpha)   composited onto white (the slide background)
    16-bit per channel (PNG, TIFF)      scaled to 8 bits as round(v / 257) (full range)
    palette, CMYK, YCbCr, LAB, HSV      converted to RGB by Pillow
    32-bit float or > 16-bit integers   rejected (the intensity scale is unknown)

Scale: the model generates `tile_px` x `tile_px` pixels at `model_mpp` µm/px. When the
input's µm/px (`mpp`) is given, the image is resampled (Lanczos) by mpp / model_mpp first;
without it the image is taken to be at the model's scale already. The centre
`tile_px` x `tile_px` square is then cut out (never stretched), and an image smaller than
that is an error that says how large it must be.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import tifffile
import torch
from PIL import Image

from mupad.errors import MupadError

TIFF_SUFFIXES = (".tif", ".tiff")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PILLOW_TO_RGB = ("CMYK", "YCbCr", "LAB", "HSV", "RGBX")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
_SCALE_TOLERANCE = 1e-3  # |mpp / model_mpp - 1| below this is "same scale": no resampling
_FLOAT_MESSAGE = (
    "{path} is a floating-point image; its intensity scale is unknown, so it is not "
    "converted. Save it as 8-bit RGB (e.g. np.clip(img * 255, 0, 255).astype('uint8'))"
)


class ReferenceImageError(MupadError, ValueError):
    """A reference image cannot be used; the message says why and how to fix it."""


@dataclasses.dataclass(frozen=True)
class ReferenceImage:
    pixels: torch.Tensor  # (3, tile_px, tile_px) uint8
    source_size: tuple[int, int]  # (width, height) of the file
    source_mode: str  # e.g. "RGB", "RGBA", "I;16", "RGB;16"
    conversions: tuple[str, ...]  # what was done to it, in order


def _bits_per_sample(path: Path) -> int:
    """Bits per channel from a PNG header or TIFF tags; 8 for anything else."""
    suffix = path.suffix.lower()
    if suffix == ".png":
        with open(path, "rb") as handle:
            head = handle.read(26)
        if head[:8] == _PNG_SIGNATURE and len(head) >= 25:
            return int(head[24])  # IHDR bit depth
        return 8
    if suffix in TIFF_SUFFIXES:
        try:
            with tifffile.TiffFile(path) as tif:
                return int(tif.pages[0].bitspersample)
        except (OSError, ValueError, tifffile.TiffFileError):
            return 8
    return 8


def _decode_deep(path: Path) -> np.ndarray:
    """A >8-bit PNG/TIFF as its native array (H, W) or (H, W, C) (uint16, float32, ...)."""
    if path.suffix.lower() in TIFF_SUFFIXES:
        return np.asarray(tifffile.imread(path))
    import imagecodecs

    return np.asarray(imagecodecs.png_decode(path.read_bytes()))


def open_image_array(path: Path) -> tuple[np.ndarray, str, tuple[int, int]]:
    """(array (H, W) or (H, W, C), source mode, (width, height)) of an image file."""
    if not path.is_file():
        raise ReferenceImageError(f"reference image {path} does not exist")
    try:
        if _bits_per_sample(path) > 8:
            array = _decode_deep(path)
            kind = "float" if array.dtype.kind == "f" else "int"
            mode = f"{_channels_name(array)};{kind}{array.dtype.itemsize * 8}"
            return array, mode, (int(array.shape[1]), int(array.shape[0]))
        with Image.open(path) as image:
            mode, size = image.mode, image.size
            if mode == "F":
                raise ReferenceImageError(_FLOAT_MESSAGE.format(path=path))
            if mode == "P":
                image = image.convert("RGBA" if "transparency" in image.info else "RGB")
            elif mode == "1":
                image = image.convert("L")
            elif mode in _PILLOW_TO_RGB:
                image = image.convert("RGB")
            return np.asarray(image), mode, size
    except ReferenceImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ReferenceImageError(f"cannot read reference image {path}: {error}") from None


def _channels_name(array: np.ndarray) -> str:
    channels = 1 if array.ndim == 2 else array.shape[2]
    return {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}.get(channels, f"{channels}ch")


def _header(path: Path) -> tuple[str, tuple[int, int]]:
    """(mode, (width, height)) without decoding pixels (TIFFs Pillow cannot open: tifffile)."""
    try:
        with Image.open(path) as image:
            return image.mode, image.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        if path.suffix.lower() in TIFF_SUFFIXES:
            try:
                with tifffile.TiffFile(path) as tif:
                    page = tif.pages[0]
                    mode = "F" if np.dtype(page.dtype).kind == "f" else f"{page.bitspersample}-bit"
                    return mode, (int(page.imagewidth), int(page.imagelength))
            except (OSError, ValueError, tifffile.TiffFileError):
                pass
        raise ReferenceImageError(f"cannot read reference image {path}: {error}") from None


def to_rgb8(array: np.ndarray, what: str = "image") -> tuple[np.ndarray, list[str]]:
    """Any gray/gray+alpha/RGB/RGBA array of 8 or 16 bits -> (H, W, 3) uint8 + notes."""
    notes: list[str] = []
    if array.dtype.kind == "f":
        raise ReferenceImageError(_FLOAT_MESSAGE.format(path=what))
    if array.dtype == np.uint8:
        pass
    elif array.dtype.kind in "ui" and (
        array.size == 0 or (int(array.min()) >= 0 and int(array.max()) <= 65535)
    ):
        array = np.round(array.astype(np.float64) / 257.0).astype(np.uint8)
        notes.append("16-bit scaled to 8-bit as round(v / 257)")
    else:
        raise ReferenceImageError(
            f"{what} has {array.dtype} pixels outside 0..65535; only 8- and 16-bit integer "
            "images are converted. Save it as 8-bit RGB"
        )
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 2, 3, 4):
        raise ReferenceImageError(
            f"{what} has shape {array.shape}; expected (H, W) gray or (H, W, C) with C = 1 "
            "(gray), 2 (gray + alpha), 3 (RGB) or 4 (RGBA)"
        )
    channels = array.shape[2]
    if channels in (2, 4):
        color = array[:, :, :-1].astype(np.float64)
        alpha = array[:, :, -1:].astype(np.float64) / 255.0
        array = np.round(color * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
        notes.append("alpha composited onto white")
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
        notes.append("grayscale replicated to RGB")
    return np.ascontiguousarray(array), notes


def required_source_px(tile_px: int, mpp: float | None, model_mpp: float | None) -> float:
    """Smallest input side (px) that covers one tile after resampling to the model's scale."""
    return tile_px if mpp is None else tile_px * model_mpp / mpp  # type: ignore[operator]


def check_scale(mpp: float | None, model_mpp: float | None, path: Path | str) -> None:
    if mpp is None:
        return
    if not (math.isfinite(mpp) and mpp > 0):
        raise ReferenceImageError(f"µm/px of {path} must be a positive number, got {mpp}")
    if model_mpp is None:
        raise ReferenceImageError(
            f"the µm/px of {path} was given ({mpp}) but the model's training µm/px is unknown "
            "(its checkpoint does not record target_mpp); pass the model's µm/px as "
            "--model-mpp, or drop the image's µm/px if it is already at the model's scale"
        )


def _too_small(path: Path, size: tuple[int, int], tile_px: int, mpp, model_mpp) -> str:
    width, height = size
    need = required_source_px(tile_px, mpp, model_mpp)
    if mpp is None:
        return (
            f"reference image {path} is {width}x{height} px, smaller than the model's "
            f"{tile_px}x{tile_px} px tile. Use a larger image, or give its µm/px (--image-mpp "
            "/ column image_mpp) so it is resampled to the model's scale"
        )
    return (
        f"reference image {path} is {width}x{height} px at {mpp:g} µm/px = "
        f"{width * mpp:.1f}x{height * mpp:.1f} µm; the model's tile is {tile_px} px at "
        f"{model_mpp:g} µm/px = {tile_px * model_mpp:.1f} µm, so the image needs at least "
        f"{math.ceil(need)}x{math.ceil(need)} px"
    )


def inspect_reference_image(
    path: str | Path, tile_px: int, *, mpp: float | None = None, model_mpp: float | None = None
) -> None:
    """The cheap checks of `load_reference_image` (header only): readable, convertible
    mode, large enough. Raises ReferenceImageError."""
    path = Path(path)
    check_scale(mpp, model_mpp, path)
    if not path.is_file():
        raise ReferenceImageError(f"reference image {path} does not exist")
    mode, size = _header(path)
    if mode == "F":
        raise ReferenceImageError(_FLOAT_MESSAGE.format(path=path))
    need = required_source_px(tile_px, mpp, model_mpp)
    if min(size) + 1e-6 < need - 0.5:
        raise ReferenceImageError(_too_small(path, size, tile_px, mpp, model_mpp))


def load_reference_image(
    path: str | Path, tile_px: int, *, mpp: float | None = None, model_mpp: float | None = None
) -> ReferenceImage:
    """Read, convert to 8-bit RGB, resample to the model's µm/px, centre-crop to tile_px."""
    path = Path(path)
    check_scale(mpp, model_mpp, path)
    raw, mode, size = open_image_array(path)
    rgb, notes = to_rgb8(raw, str(path))
    height, width = rgb.shape[:2]
    if mpp is not None and abs(mpp / model_mpp - 1.0) > _SCALE_TOLERANCE:  # type: ignore[operator]
        factor = mpp / model_mpp  # type: ignore[operator]
        new_size = (max(1, round(width * factor)), max(1, round(height * factor)))
        rgb = np.asarray(Image.fromarray(rgb).resize(new_size, Image.Resampling.LANCZOS))
        notes.append(
            f"resampled {width}x{height} -> {new_size[0]}x{new_size[1]} px "
            f"({mpp:g} -> {model_mpp:g} µm/px)"
        )
        height, width = rgb.shape[:2]
    if min(height, width) < tile_px:
        raise ReferenceImageError(_too_small(path, size, tile_px, mpp, model_mpp))
    if (height, width) != (tile_px, tile_px):
        top, left = (height - tile_px) // 2, (width - tile_px) // 2
        rgb = rgb[top : top + tile_px, left : left + tile_px]
        notes.append(f"centre {tile_px}x{tile_px} px cut from {width}x{height}")
    pixels = torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).contiguous()
    return ReferenceImage(
        pixels=pixels, source_size=size, source_mode=mode, conversions=tuple(notes)
    )
