"""Plain JPEG / PNG images as one-level slides, read with PIL.

These formats have no random access, so the first region read decodes the whole image and
keeps it in memory (3 bytes/px: a 10k x 10k section is 300 MB). Thumbnails of JPEGs use
PIL's draft mode (DCT scaling), so tissue detection does not pay for the full decode.
Images larger than PLAIN_IMAGE_MAX_PIXELS are refused with advice to convert them to a
pyramidal TIFF. Alpha and 16-bit images are rejected with the strict checks of
`mupad.omics.spatial.images`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from mupad.data.wsi.errors import SlideError
from mupad.data.wsi.slide import Slide, check_mpp, missing_mpp_error, plausible_mpp
from mupad.omics.spatial.errors import SpotImageError
from mupad.omics.spatial.images import _check_pil, _no_pixel_limit

PLAIN_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
# 50k x 50k px (7.5 GB decoded) — beyond that, a pyramidal TIFF is the right container.
PLAIN_IMAGE_MAX_PIXELS = 50_000 * 50_000


class PlainImageSlide(Slide):
    def __init__(self, path: Path, mpp: float | None = None):
        try:
            with _no_pixel_limit():
                image = Image.open(path)
        except (OSError, Image.UnidentifiedImageError) as err:
            raise SlideError(f"{path}: not a readable image (corrupt or truncated): {err}") from err
        self._image: Image.Image | None = image
        self._pixels: np.ndarray | None = None  # (H, W, 3) uint8 once decoded
        try:
            try:
                _check_pil(image, path)
            except SpotImageError as err:
                raise SlideError(str(err)) from err
            width, height = image.size
            if width * height > PLAIN_IMAGE_MAX_PIXELS:
                raise SlideError(
                    f"{path} is {width}x{height} px, too large to decode whole as "
                    f"{image.format}; convert it to a tiled pyramidal TIFF first, e.g. "
                    f"`vips tiffsave '{path}' out.tif --tile --pyramid --compression jpeg`"
                )
            if mpp is not None:
                resolved = check_mpp(mpp, path)
            else:
                dpi = image.info.get("dpi")
                found = plausible_mpp(25400.0 / float(dpi[0])) if dpi and dpi[0] else None
                if found is None:
                    raise missing_mpp_error(path, "the image's dpi / pHYs metadata")
                resolved = found
            self._init_common(path, resolved, [(width, height)])
        except BaseException:
            image.close()
            raise

    def _decoded(self) -> np.ndarray:
        if self._pixels is None:
            if self._image is None:
                raise SlideError(f"{self.path}: the slide is closed")
            try:
                with _no_pixel_limit():
                    self._image.load()
                    rgb = self._image if self._image.mode == "RGB" else self._image.convert("RGB")
                    self._pixels = np.asarray(rgb, dtype=np.uint8)  # (H, W, 3)
            except (OSError, ValueError, SyntaxError) as err:
                raise SlideError(
                    f"{self.path}: cannot decode the image (file truncated or corrupt): {err}"
                ) from err
        return self._pixels

    def _read_level(self, level: int, left: int, top: int, width: int, height: int) -> np.ndarray:
        return self._decoded()[top : top + height, left : left + width]

    def thumbnail(self, max_size: int) -> np.ndarray:
        thumb_w, thumb_h = self.thumbnail_size(max_size)
        if self._pixels is None and self._image is not None and self._image.format == "JPEG":
            try:
                with _no_pixel_limit(), Image.open(self.path) as draft:
                    draft.draft("RGB", (thumb_w, thumb_h))  # decode at 1/2, 1/4 or 1/8 scale
                    small = draft.convert("RGB").resize(
                        (thumb_w, thumb_h), Image.Resampling.LANCZOS
                    )
                    return np.asarray(small, dtype=np.uint8)
            except (OSError, ValueError, SyntaxError) as err:
                raise SlideError(
                    f"{self.path}: cannot decode the image (file truncated or corrupt): {err}"
                ) from err
        return super().thumbnail(max_size)

    def close(self) -> None:
        if self._image is not None:
            self._image.close()
        self._image = None
        self._pixels = None
