"""`open_slide`: pick the reader for a file by its format."""

from __future__ import annotations

from pathlib import Path

from mupad.data.wsi.errors import SlideError
from mupad.data.wsi.openslide_backend import (
    OpenSlideSlide,
    detect_vendor,
    import_openslide,
    openslide_available,
)
from mupad.data.wsi.plain_backend import PLAIN_SUFFIXES, PlainImageSlide
from mupad.data.wsi.slide import Slide
from mupad.data.wsi.tiff_backend import TiffSlide

TIFF_SUFFIXES = frozenset({".tif", ".tiff"})
# TIFF-based Aperio files: OpenSlide when installed, otherwise tifffile reads them too.
APERIO_SUFFIXES = frozenset({".svs"})
# Formats only OpenSlide reads (.mrxs/.vms keep pixel data in side files). DICOM (.dcm) is
# left out on purpose: one slide is a folder of .dcm files, so a glob would open it repeatedly.
OPENSLIDE_ONLY_SUFFIXES = frozenset({".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif"})
SLIDE_SUFFIXES: frozenset[str] = (
    TIFF_SUFFIXES | APERIO_SUFFIXES | OPENSLIDE_ONLY_SUFFIXES | PLAIN_SUFFIXES
)


def open_slide(path: str | Path, mpp: float | None = None) -> Slide:
    """Open a whole-slide image; `mpp` (µm/px at level 0) overrides what the file says.

    Raises SlideError for corrupt, truncated or unsupported files, MissingMppError when
    neither the file nor the caller gives µm/px, SlideBackendMissingError when the format
    needs OpenSlide and it is not installed.
    """
    path = Path(path)
    if not path.is_file():
        raise SlideError(f"slide {path} does not exist or is not a file")
    suffix = path.suffix.lower()
    if suffix in PLAIN_SUFFIXES:
        return PlainImageSlide(path, mpp)
    if suffix in TIFF_SUFFIXES:
        vendor = detect_vendor(path)
        # Vendor TIFF flavours (Philips, Ventana, ...) need OpenSlide's interpretation;
        # generic and OME pyramids are read directly (OpenSlide does not read OME).
        if vendor is not None and vendor != "generic-tiff" and not _is_ome(path):
            return OpenSlideSlide(path, mpp)
        return TiffSlide(path, mpp)
    if suffix in APERIO_SUFFIXES:
        return OpenSlideSlide(path, mpp) if openslide_available() else TiffSlide(path, mpp)
    if suffix in OPENSLIDE_ONLY_SUFFIXES:
        import_openslide()  # a clear SlideBackendMissingError when it is not installed
        return OpenSlideSlide(path, mpp)
    raise SlideError(
        f"{path}: unsupported slide format {suffix!r}; supported: {', '.join(sorted(SLIDE_SUFFIXES))}"
    )


def _is_ome(path: Path) -> bool:
    return path.name.lower().endswith((".ome.tif", ".ome.tiff"))


# A TIFF with a side this long is a slide, not a tile, even without a pyramid.
LARGE_TIFF_SIDE_PX = 4096


def looks_like_slide(path: str | Path) -> bool:
    """Whether `path` is a whole-slide image rather than a tile: a format only slide
    scanners write (.svs, .ndpi, ...), a TIFF that is pyramidal, OME, tiled or at least
    LARGE_TIFF_SIDE_PX on a side, or any file OpenSlide recognises as a slide.

    Plain PNG/JPEG files are tiles here (they have no pyramid); an unreadable TIFF is not
    a slide (it will fail, named, wherever it is read).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in APERIO_SUFFIXES | OPENSLIDE_ONLY_SUFFIXES:
        return True
    if suffix not in TIFF_SUFFIXES or not path.is_file():
        return False
    if _tiff_is_slide(path):
        return True
    return detect_vendor(path) is not None


def _tiff_is_slide(path: Path) -> bool:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.series:
                return False
            series = tif.series[0]
            page = series.pages[0] if series.pages else None
            if tif.is_ome or tif.is_svs or len(getattr(series, "levels", [])) > 1:
                return True
            if len(tif.pages) > 1 and tif.pages[1].shape[:2] < tif.pages[0].shape[:2]:
                return True  # a pyramid of reduced top-level pages
            if page is None:
                return False
            return bool(page.is_tiled) or max(page.imagewidth, page.imagelength) >= (
                LARGE_TIFF_SIDE_PX
            )
    except (tifffile.TiffFileError, ValueError, OSError, IndexError, KeyError):
        return False
