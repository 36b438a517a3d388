"""Vendor whole-slide formats (Aperio .svs, Hamamatsu .ndpi, MIRAX, Leica, ...) via OpenSlide.

Needs `openslide-python` and the `openslide-bin` wheel (the C library); imported lazily so
that the rest of mupad works without them.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import numpy as np

from mupad.data.wsi.errors import SlideBackendMissingError, SlideError
from mupad.data.wsi.slide import Slide, check_mpp, missing_mpp_error, plausible_mpp


def import_openslide() -> ModuleType:
    try:
        import openslide
    except ImportError as err:  # includes the C library failing to load
        raise SlideBackendMissingError(
            f"reading this slide format needs OpenSlide: pip install openslide-python "
            f"openslide-bin ({err})"
        ) from err
    return openslide


def openslide_available() -> bool:
    try:
        import_openslide()
    except SlideBackendMissingError:
        return False
    return True


def detect_vendor(path: Path) -> str | None:
    """OpenSlide's vendor name for `path` ("aperio", "generic-tiff", ...) or None."""
    if not openslide_available():
        return None
    return import_openslide().OpenSlide.detect_format(str(path))


class OpenSlideSlide(Slide):
    def __init__(self, path: Path, mpp: float | None = None):
        openslide = import_openslide()
        try:
            self._handle = openslide.OpenSlide(str(path))
        except (openslide.OpenSlideError, OSError) as err:
            raise SlideError(
                f"{path}: OpenSlide cannot open it (corrupt or unsupported): {err}"
            ) from err
        self._closed = False
        self._errors: tuple[type[BaseException], ...] = (openslide.OpenSlideError, OSError)
        try:
            if mpp is not None:
                resolved = check_mpp(mpp, path)
            else:
                props = self._handle.properties
                found = [
                    plausible_mpp(_as_float(props.get(key)))
                    for key in (openslide.PROPERTY_NAME_MPP_X, openslide.PROPERTY_NAME_MPP_Y)
                ]
                values = [v for v in found if v is not None]
                if not values:
                    raise missing_mpp_error(path, "the openslide.mpp-x/mpp-y properties")
                resolved = float(np.mean(values))
            self._init_common(path, resolved, list(self._handle.level_dimensions))
            # OpenSlide's own downsamples account for the vendor's rounding of level sizes.
            self.level_downsamples = tuple(float(d) for d in self._handle.level_downsamples)
        except BaseException:
            self._handle.close()
            raise

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        if not 0 <= level < self.level_count:
            raise SlideError(
                f"{self.path}: level {level} does not exist (the slide has {self.level_count})"
            )
        if width <= 0 or height <= 0:
            raise SlideError(f"{self.path}: region size must be positive, got {width}x{height}")
        try:
            rgba = np.asarray(self._handle.read_region((int(x), int(y)), level, (width, height)))
        except self._errors as err:
            raise SlideError(
                f"{self.path}: cannot decode a region (file truncated or corrupt): {err}"
            ) from err
        return _over_white(rgba)

    def _read_level(self, level: int, left: int, top: int, width: int, height: int) -> np.ndarray:
        downsample = self.level_downsamples[level]
        return self.read_region(
            round(left * downsample), round(top * downsample), level, width, height
        )

    def close(self) -> None:
        if not self._closed:  # OpenSlide refuses a second close
            self._handle.close()
            self._closed = True


def _over_white(rgba: np.ndarray) -> np.ndarray:
    """(h, w, 4) non-premultiplied RGBA -> (h, w, 3) RGB composited onto white."""
    alpha = rgba[..., 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgba[..., :3])
    rgb = rgba[..., :3].astype(np.uint16)
    blended = (rgb * alpha + 255 * (255 - alpha.astype(np.uint16)) + 127) // 255
    return blended.astype(np.uint8)


def _as_float(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
