"""QuPath GeoJSON: detections and class-map annotations load back with json and shapely,
round-trip, and sit in level-0 pixels."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mupad.data.qupath_geojson import (
    GeoJsonError,
    QuPathObject,
    class_colour,
    detection_circle,
    label_map_annotations,
    read_geojson,
    write_geojson,
)


def _class_map() -> np.ndarray:
    labels = np.zeros((20, 30), dtype=np.int64)
    labels[2:12, 3:15] = 1  # tumour block with a stroma island inside
    labels[5:8, 6:9] = 2
    labels[15:18, 20:28] = 2  # a second stroma region
    return labels


def test_detections_round_trip(tmp_path):
    cell = detection_circle(100.0, 50.0, 4.0, "Lymphocyte", {"Area µm^2": 12.5})
    path = write_geojson(tmp_path / "cells.geojson", [cell])
    data = json.loads(path.read_text())
    assert data["type"] == "FeatureCollection"
    props = data["features"][0]["properties"]
    assert props["objectType"] == "detection"
    colour = list(class_colour("Lymphocyte"))
    assert props["classification"] == {"name": "Lymphocyte", "color": colour}
    ring = np.array(data["features"][0]["geometry"]["coordinates"][0])
    assert np.allclose(ring.mean(axis=0), [100.0, 50.0], atol=0.5)
    assert np.allclose(ring[0], ring[-1])  # closed
    assert read_geojson(path) == [
        QuPathObject(cell.geometry, "Lymphocyte", "detection", class_colour("Lymphocyte"),
                     {"Area µm^2": 12.5})
    ]


def test_class_map_polygons_are_valid_and_in_level0_px(tmp_path):
    objects = label_map_annotations(_class_map(), {1: "Tumour", 2: "Stroma"}, 16.0, (1000, 0))
    assert [(o.name, o.object_type) for o in objects] == [
        ("Tumour", "annotation"), ("Stroma", "annotation"), ("Stroma", "annotation")
    ]
    tumour = objects[0].geometry["coordinates"]
    assert len(tumour) == 2  # outline + the hole the island makes
    outline = np.array(tumour[0])
    # pixel centres of columns 3..14, rows 2..11 at 16 level-0 px per map px, shifted by x=1000
    assert outline[:, 0].min() == pytest.approx(1000 + 3.5 * 16, abs=8)
    assert outline[:, 0].max() == pytest.approx(1000 + 14.5 * 16, abs=8)
    assert outline[:, 1].min() == pytest.approx(2.5 * 16, abs=8)
    path = write_geojson(tmp_path / "tissue.geojson", objects)
    assert read_geojson(path)[1:] == [
        QuPathObject(o.geometry, "Stroma", "annotation", class_colour("Stroma"), o.measurements)
        for o in objects[1:]
    ]

    shapely = pytest.importorskip("shapely")
    from shapely.geometry import shape

    shapes = [shape(f["geometry"]) for f in json.loads(path.read_text())["features"]]
    assert all(s.is_valid for s in shapes)
    assert shapes[0].area == pytest.approx((12 * 10 - 3 * 3) * 16**2, rel=0.2)
    assert shapely.intersection(shapes[0], shapes[1]).area == pytest.approx(0.0, abs=1e-6)


def test_bad_objects_and_files(tmp_path):
    with pytest.raises(GeoJsonError, match="objectType"):
        QuPathObject({"type": "Point", "coordinates": [0, 0]}, "x", "cell")
    with pytest.raises(GeoJsonError, match="2-D"):
        label_map_annotations(np.zeros(3), {1: "x"}, 1.0)
    (tmp_path / "bad.geojson").write_text("{")
    with pytest.raises(GeoJsonError, match="not a readable GeoJSON"):
        read_geojson(tmp_path / "bad.geojson")
