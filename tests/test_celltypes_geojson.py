"""`mupad evaluate celltypes --geojson`: every image's typed cells as QuPath detections."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from mupad.data.qupath_geojson import read_geojson
from mupad.evaluation.cli import evaluate_app

CENTRES_XY = [(20, 30), (90, 30), (60, 100)]  # x != y so a swap would show


def _write(folder: Path, radius: float) -> None:
    folder.mkdir(parents=True)
    yy, xx = np.mgrid[:128, :128]
    image = np.empty((128, 128, 3))
    image[:] = (235, 175, 205)  # eosin pink
    for x, y in CENTRES_XY:
        image[(yy - y) ** 2 + (xx - x) ** 2 <= radius**2] = (50, 30, 100)  # hematoxylin
    image += np.random.default_rng(0).normal(0.0, 3.0, image.shape)
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / "tile.png")


def test_geojson_detections_in_image_pixels(tmp_path):
    _write(tmp_path / "real", 6.0)
    _write(tmp_path / "generated", 11.0)
    out, geojson = tmp_path / "out", tmp_path / "qupath"
    args = ["celltypes", str(tmp_path / "generated"), "--real", str(tmp_path / "real")]
    result = CliRunner().invoke(
        evaluate_app,
        [*args, "--out", str(out), "--bootstrap", "10", "--geojson", str(geojson)],
    )
    assert result.exit_code == 0, result.output
    for what in ("real", "generated"):
        path = geojson / what / "tile.geojson"
        assert json.loads(path.read_text())["type"] == "FeatureCollection"
        cells = read_geojson(path)
        assert len(cells) == len(CENTRES_XY)
        assert {c.object_type for c in cells} == {"detection"}
        centres = sorted(
            tuple(np.array(c.geometry["coordinates"][0][:-1]).mean(axis=0)) for c in cells
        )
        assert np.allclose(centres, sorted(CENTRES_XY), atol=1.5)
        assert all(c.measurements["Nucleus: Area µm^2"] > 0 for c in cells)
    small = read_geojson(geojson / "real" / "tile.geojson")
    large = read_geojson(geojson / "generated" / "tile.geojson")
    assert {c.name for c in small} != {c.name for c in large}  # typed by size
    pytest.importorskip("shapely")
    from shapely.geometry import shape

    data = json.loads((geojson / "real" / "tile.geojson").read_text())
    assert all(shape(f["geometry"]).is_valid for f in data["features"])
