"""A slide's tissue mask as QuPath GeoJSON annotations (one per tissue region, level-0 px):
what the tiler and the whole-slide translators treat as tissue, for review in QuPath."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mupad.data.qupath_geojson import QuPathObject, label_map_annotations, write_geojson
from mupad.data.wsi.open import open_slide
from mupad.data.wsi.slide import Slide
from mupad.data.wsi.tissue import tissue_mask

TISSUE_CLASS = "Tissue"
TISSUE_COLOUR = (80, 160, 80)


def tissue_annotations(slide: Slide, thumbnail_size: int = 2048) -> list[QuPathObject]:
    """One "Tissue" annotation per connected region of the slide's thumbnail tissue mask."""
    mask, scale = tissue_mask(slide, thumbnail_size)  # (h, w) bool, thumbnail px per level-0 px
    return label_map_annotations(
        mask.astype(np.uint8), {1: TISSUE_CLASS}, 1.0 / scale, colours={1: TISSUE_COLOUR}
    )


def write_tissue_geojson(
    slide_path: str | Path, out: str | Path, slide_mpp: float | None = None,
    thumbnail_size: int = 2048,
) -> Path:  # fmt: skip
    """Write the tissue regions of the slide at `slide_path` as QuPath GeoJSON to `out`."""
    with open_slide(slide_path, mpp=slide_mpp) as slide:
        return write_geojson(out, tissue_annotations(slide, thumbnail_size))
