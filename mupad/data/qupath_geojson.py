"""QuPath GeoJSON: cell detections and tissue-class maps that QuPath imports by drag-and-drop.

    objects = [detection_circle(x, y, radius, "Lymphocyte")] + label_map_annotations(
        labels, {1: "Tumour", 2: "Stroma"}, level0_per_px=16.0)
    write_geojson("slide.geojson", objects)

A file is one GeoJSON FeatureCollection. Every Feature carries QuPath's properties:
`objectType` ("detection" for cells, "annotation" for regions) and `classification`
{name, color: [r, g, b]}; `measurements` (name -> number) are optional. Coordinates are
level-0 pixels of the slide (x right, y down), QuPath's own frame. Plain `json` suffices: the
geometry is made here (polygons traced from label maps with scikit-image) and every GeoJSON
reader (shapely, QuPath) reads the result.
"""

from __future__ import annotations

import colorsys
import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mupad.errors import MupadError

__all__ = [
    "ANNOTATION",
    "DETECTION",
    "GeoJsonError",
    "QuPathObject",
    "class_colour",
    "detection_circle",
    "feature_collection",
    "label_map_annotations",
    "read_geojson",
    "write_geojson",
]

DETECTION = "detection"
ANNOTATION = "annotation"
_OBJECT_TYPES = (DETECTION, ANNOTATION)
_CIRCLE_VERTICES = 16


class GeoJsonError(MupadError):
    """A QuPath GeoJSON object or file is malformed."""


@dataclass(frozen=True)
class QuPathObject:
    """One QuPath object: a GeoJSON geometry (level-0 px) with a class and a type."""

    geometry: dict[str, Any]  # GeoJSON geometry: Polygon, MultiPolygon or Point
    name: str  # classification name
    object_type: str = DETECTION
    colour: tuple[int, int, int] | None = None  # None: a stable colour from the name
    measurements: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.object_type not in _OBJECT_TYPES:
            raise GeoJsonError(
                f"objectType must be one of {', '.join(_OBJECT_TYPES)}, got {self.object_type!r}"
            )
        if "type" not in self.geometry or "coordinates" not in self.geometry:
            raise GeoJsonError(
                f"object {self.name!r}: a GeoJSON geometry needs `type` and `coordinates`"
            )

    def to_feature(self) -> dict[str, Any]:
        colour = self.colour if self.colour is not None else class_colour(self.name)
        properties: dict[str, Any] = {
            "objectType": self.object_type,
            "classification": {"name": self.name, "color": [int(c) for c in colour]},
        }
        if self.measurements:
            properties["measurements"] = {k: float(v) for k, v in self.measurements.items()}
        return {"type": "Feature", "geometry": self.geometry, "properties": properties}


def class_colour(name: str) -> tuple[int, int, int]:
    """A stable, saturated RGB colour for a class name (same name, same colour)."""
    hue = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 0.9)
    return round(r * 255), round(g * 255), round(b * 255)


def feature_collection(objects: Iterable[QuPathObject]) -> dict[str, Any]:
    return {"type": "FeatureCollection", "features": [o.to_feature() for o in objects]}


def write_geojson(path: str | Path, objects: Iterable[QuPathObject]) -> Path:
    """Write the objects as one FeatureCollection (parent folders are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(feature_collection(objects)))
    return path


def read_geojson(path: str | Path) -> list[QuPathObject]:
    """Read a QuPath GeoJSON file (a FeatureCollection, a list of Features or one Feature)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise GeoJsonError(f"{path}: not a readable GeoJSON file ({exc}); export it again") from exc
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features", [])
    elif isinstance(data, list):
        features = data
    else:
        features = [data]
    objects = []
    for i, feature in enumerate(features):
        if not isinstance(feature, dict) or feature.get("type") != "Feature":
            raise GeoJsonError(f"{path}: item {i} is not a GeoJSON Feature")
        properties = feature.get("properties") or {}
        classification = properties.get("classification") or {}
        colour = classification.get("color")
        objects.append(
            QuPathObject(
                geometry=feature.get("geometry") or {},
                name=str(classification.get("name", "")),
                object_type=str(properties.get("objectType", ANNOTATION)),
                colour=None if colour is None else tuple(int(c) for c in colour[:3]),
                measurements=dict(properties.get("measurements") or {}),
            )
        )
    return objects


def detection_circle(
    x: float,
    y: float,
    radius: float,
    name: str,
    measurements: Mapping[str, float] | None = None,
) -> QuPathObject:
    """A cell detection drawn as a polygonal circle around (x, y), level-0 px."""
    if not radius > 0:
        raise GeoJsonError(f"a detection radius must be positive, got {radius}")
    angles = np.linspace(0.0, 2 * math.pi, _CIRCLE_VERTICES, endpoint=False)
    ring = [[float(x + radius * math.cos(a)), float(y + radius * math.sin(a))] for a in angles]
    return QuPathObject(
        {"type": "Polygon", "coordinates": [ring + [ring[0]]]},
        name,
        DETECTION,
        measurements=dict(measurements or {}),
    )


def _signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))


def _oriented(ring: np.ndarray, exterior: bool) -> list[list[float]]:
    """RFC 7946: exterior rings counter-clockwise, holes clockwise."""
    if (_signed_area(ring) > 0) != exterior:
        ring = ring[::-1]
    return ring.tolist()


def _region_polygon(component: np.ndarray, level0_per_px: float, origin: tuple[float, float]):
    """Polygon rings (level-0 px) of one 8-connected region: its outline and its holes."""
    from skimage.measure import find_contours

    padded = np.pad(component.astype(np.float32), 1)
    rings = []
    for contour in find_contours(padded, 0.5, fully_connected="high"):  # (K, 2) row, col
        xy = np.stack([contour[:, 1] - 0.5, contour[:, 0] - 0.5], axis=1)  # mask px, centres
        xy = xy * level0_per_px + np.asarray(origin)
        if len(xy) >= 4:
            rings.append(xy)
    if not rings:
        return None
    rings.sort(key=lambda r: abs(_signed_area(r)), reverse=True)  # the outline encloses all
    return [_oriented(rings[0], True)] + [_oriented(r, False) for r in rings[1:]]


def label_map_annotations(
    labels: np.ndarray,
    names: Mapping[int, str],
    level0_per_px: float,
    origin: tuple[float, float] = (0.0, 0.0),
    colours: Mapping[int, tuple[int, int, int]] | None = None,
) -> list[QuPathObject]:
    """One annotation per connected region of each named label of an (h, w) class map.

    `level0_per_px`: level-0 px per map px (a thumbnail's downsample); `origin`: level-0
    (x, y) of the map's top-left corner. Labels absent from `names` (e.g. 0 = glass) are
    skipped. Each region becomes a Polygon (with holes) tracing its pixel centres.
    """
    from scipy import ndimage

    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise GeoJsonError(f"a class map must be 2-D (h, w), got shape {labels.shape}")
    if not level0_per_px > 0:
        raise GeoJsonError(f"level0_per_px must be positive, got {level0_per_px}")
    objects = []
    for value, name in names.items():
        regions, count = ndimage.label(labels == value, structure=np.ones((3, 3)))
        for index, box in enumerate(ndimage.find_objects(regions), start=1):
            if box is None:
                continue
            component = regions[box] == index
            corner = (
                origin[0] + box[1].start * level0_per_px,
                origin[1] + box[0].start * level0_per_px,
            )
            rings = _region_polygon(component, level0_per_px, corner)
            if rings is None:
                continue
            area = float(component.sum()) * level0_per_px**2
            objects.append(
                QuPathObject(
                    {"type": "Polygon", "coordinates": rings},
                    name,
                    ANNOTATION,
                    colour=None if colours is None else colours.get(value),
                    measurements={"Area px^2": area},
                )
            )
    return objects
