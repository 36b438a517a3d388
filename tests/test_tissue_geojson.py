"""Tissue masks as QuPath GeoJSON: `tissue_annotations` and
`mupad wsi translate --tissue-geojson`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from mupad.applications.wsi_cli import wsi_app
from mupad.data.qupath_geojson import read_geojson
from mupad.data.wsi import open_slide
from mupad.data.wsi.write import write_pyramidal_tiff
from mupad.data.wsi.tissue_geojson import tissue_annotations


def _slide(path: Path) -> Path:
    """Glass with a pink textured block at x 100..300, y 60..180 (level-0 px)."""
    image = np.full((240, 400, 3), 250, dtype=np.uint8)
    rng = np.random.default_rng(0)
    block = rng.integers(0, 60, (120, 200, 3), dtype=np.uint8) + np.array([150, 50, 110])
    image[60:180, 100:300] = block.astype(np.uint8)
    write_pyramidal_tiff(path, image, mpp=0.5, num_levels=2, tile_size_px=64)
    return path


def test_tissue_region_in_level0_px(tmp_path):
    with open_slide(_slide(tmp_path / "s.tif")) as slide:
        regions = tissue_annotations(slide, thumbnail_size=100)  # 4 level-0 px per mask px
    assert len(regions) == 1 and regions[0].name == "Tissue"
    assert regions[0].object_type == "annotation"
    outline = np.array(regions[0].geometry["coordinates"][0])
    assert outline[:, 0].min() == pytest.approx(100, abs=8)
    assert outline[:, 0].max() == pytest.approx(300, abs=8)
    assert outline[:, 1].min() == pytest.approx(60, abs=8)
    assert outline[:, 1].max() == pytest.approx(180, abs=8)


def test_cli_writes_tissue_geojson(tmp_path):
    app = typer.Typer()
    app.add_typer(wsi_app, name="wsi")
    slide = _slide(tmp_path / "s.tif")
    geojson = tmp_path / "tissue.geojson"
    args = ["wsi", "translate", str(slide), "--out", str(tmp_path / "o.ome.tif")]
    args += ["--tile-size", "64", "--overlap", "16", "--no-progress"]
    result = CliRunner().invoke(app, [*args, "--tissue-geojson", str(geojson)])
    assert result.exit_code == 0, result.output
    data = json.loads(geojson.read_text())
    assert data["type"] == "FeatureCollection" and len(data["features"]) == 1
    assert read_geojson(geojson)[0].colour == (80, 160, 80)
    pytest.importorskip("shapely")
    from shapely.geometry import shape

    region = shape(data["features"][0]["geometry"])
    assert region.is_valid and region.area == pytest.approx(200 * 120, rel=0.15)
