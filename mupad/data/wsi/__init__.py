"""Whole-slide reading and tiling: OpenSlide formats, (OME-)TIFF pyramids, plain JPEG/PNG.

    with open_slide("slide.svs") as slide:            # or open_slide(path, mpp=0.25)
        for coord, tile in iter_tiles(slide, tile_size=256, target_mpp=0.5):
            ...                                       # tile: uint8 (256, 256, 3)

Errors: SlideError (corrupt/unsupported; skip the slide), MissingMppError (pass --slide-mpp),
EmptyTissueError (nothing to tile), SlideBackendMissingError (install OpenSlide).
"""

from mupad.data.wsi.errors import (
    EmptyTissueError,
    MissingMppError,
    SlideBackendMissingError,
    SlideError,
)
from mupad.data.wsi.open import SLIDE_SUFFIXES, looks_like_slide, open_slide
from mupad.data.wsi.slide import Slide
from mupad.data.wsi.tiling import TileCoord, iter_tiles, plan_tiles, read_tile, tile_size_level0
from mupad.data.wsi.tissue import tissue_mask

__all__ = [
    "SLIDE_SUFFIXES",
    "EmptyTissueError",
    "MissingMppError",
    "Slide",
    "SlideBackendMissingError",
    "SlideError",
    "TileCoord",
    "iter_tiles",
    "looks_like_slide",
    "open_slide",
    "plan_tiles",
    "read_tile",
    "tile_size_level0",
    "tissue_mask",
]
