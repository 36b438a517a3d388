"""Cell-type detections as QuPath GeoJSON: one file per image, cells as detections drawn as
circles of the nucleus's area, classified by type, in the image's pixels (level 0)."""

from __future__ import annotations

import math
from pathlib import Path

from mupad.data.qupath_geojson import QuPathObject, detection_circle, write_geojson
from mupad.evaluation.celltypes import Nucleus


def nucleus_objects(nuclei: list[Nucleus], mpp: float) -> list[QuPathObject]:
    """QuPath detections of `nuclei` found at `mpp` µm/px (coordinates in image px)."""
    objects = []
    for nucleus in nuclei:
        y, x = nucleus.centroid_yx
        radius_px = max(math.sqrt(nucleus.area_um2 / math.pi) / mpp, 0.5)
        measurements = {
            "Nucleus: Area µm^2": nucleus.area_um2,
            "Nucleus: Eccentricity": nucleus.eccentricity,
            "Nucleus: Solidity": nucleus.solidity,
            "Nucleus: Hematoxylin OD mean": nucleus.mean_hematoxylin,
        }
        objects.append(detection_circle(x, y, radius_px, nucleus.cell_type, measurements))
    return objects


class DetectionWriter:
    """`profile_images(..., on_detect=DetectionWriter(files, root, out, mpp))`: writes
    out/<file relative to root, suffix .geojson> for every image as it is analysed."""

    def __init__(self, files: list[Path], root: Path, out: Path, mpp: float) -> None:
        self.files, self.root, self.out, self.mpp = files, root, out, mpp
        self.written: list[Path] = []

    def __call__(self, index: int, nuclei: list[Nucleus]) -> None:
        relative = self.files[index].relative_to(self.root).with_suffix(".geojson")
        path = write_geojson(self.out / relative, nucleus_objects(nuclei, self.mpp))
        self.written.append(path)
