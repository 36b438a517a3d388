"""`mupad prepare --coords` (TRIDENT/CLAM patches instead of a grid) and
`--export-features` (features/<encoder>/<slide>.h5) on the CC0 slide."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mupad.conditioning.registry import register_encoder
from mupad.conditions import Modality
from mupad.data.patch_coords import (
    PatchCoords,
    read_patch_features,
    write_patch_coords,
)
from mupad.data.prepare import PrepareConfig, PrepareError, prepare_dataset
from mupad.data.shards import read_shard_records, shard_paths

SHARED_SLIDE = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "package_samples"
    / "cmu_small_region.svs"
)
needs_slide = pytest.mark.skipif(
    not SHARED_SLIDE.is_file(), reason=f"shared CC0 slide missing: {SHARED_SLIDE}"
)
ENCODER = "test-mean-colour"


class _MeanColour:
    """A stand-in image encoder: global token = mean colour, 4 grid tokens (dim 3)."""

    dim = 3
    modality = Modality.IMAGE

    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = pixels.mean(dim=(2, 3))  # (B, 3)
        tokens = mean[:, None].expand(-1, 5, -1).contiguous()  # (B, 5, 3)
        return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool)


register_encoder(ENCODER, lambda weights=None, **_: _MeanColour(), overwrite=True)


@pytest.fixture
def slide_dir(tmp_path) -> Path:
    root = tmp_path / "slides"
    root.mkdir()
    (root / "cmu_small_region.svs").symlink_to(SHARED_SLIDE)
    return root


def _config(**overrides) -> PrepareConfig:
    base = {"tile_size": 32, "shard_size": 64, "progress": False}
    return PrepareConfig(**{**base, **overrides})


@needs_slide
def test_prepare_tiles_at_given_coords_and_exports_features(slide_dir, tmp_path):
    xy = np.array([[0, 0], [500, 700], [1000, 1500]])
    patches = PatchCoords(xy, patch_size=64, patch_size_level0=128, slide_id="cmu_small_region")
    write_patch_coords(tmp_path / "job" / "patches" / "cmu_small_region_patches.h5", patches)
    out, exported = tmp_path / "out", tmp_path / "features"
    summary = prepare_dataset(
        slide_dir,
        out,
        _config(coords=tmp_path / "job", image_encoder=ENCODER, export_features=exported),
    )
    assert summary.written == ["cmu_small_region"] and summary.tiles_total == 3
    records = [r for p in shard_paths(out) for r in read_shard_records(p)]
    assert sorted((r["x"], r["y"]) for r in records) == [tuple(p) for p in xy.tolist()]
    assert all(r["tissue_fraction"] is None for r in records)
    assert records[0]["mpp"] == pytest.approx(0.499 * 128 / 32, rel=1e-2)

    features = read_patch_features(exported / ENCODER / "cmu_small_region.h5")
    assert features.features.shape == (3, 3)
    assert np.array_equal(features.patches.coords, xy)
    assert features.patches.size_level0() == 128 and features.patches.patch_size == 32


def test_coords_options_are_checked(tmp_path):
    with pytest.raises(PrepareError, match="--coords .*no such file"):
        _config(coords=tmp_path / "missing.h5")
    with pytest.raises(PrepareError, match="--export-features needs --image-encoder"):
        _config(export_features=tmp_path / "f")
    tiles = tmp_path / "tiles" / "A"
    tiles.mkdir(parents=True)
    Image.new("RGB", (32, 32), (200, 100, 150)).save(tiles / "t.png")
    with pytest.raises(PrepareError, match="apply to slides"):
        prepare_dataset(tiles.parent, tmp_path / "o", _config(coords=tiles / "t.png"))


@needs_slide
def test_slide_without_its_coords_file_fails_alone(slide_dir, tmp_path):
    (tmp_path / "job").mkdir()
    with pytest.raises(PrepareError, match="no patches file for slide 'cmu_small_region'"):
        prepare_dataset(slide_dir, tmp_path / "o", _config(coords=tmp_path / "job"))


@needs_slide
def test_cli_coords_and_export(slide_dir, tmp_path):
    import typer
    from typer.testing import CliRunner

    from mupad.data.prepare_cli import prepare

    app = typer.Typer()
    app.command("prepare")(prepare)
    app.command("noop")(lambda: None)  # a group, so "prepare" is a subcommand name
    patches = PatchCoords(np.array([[64, 64], [640, 640]]), patch_size=128, slide_id="x")
    coords = write_patch_coords(tmp_path / "cmu_small_region.h5", patches)
    out, exported = tmp_path / "out", tmp_path / "features"
    result = CliRunner().invoke(
        app,
        ["prepare", str(slide_dir), str(out), "--tile-size", "32", "--no-progress",
         "--coords", str(coords), "--image-encoder", ENCODER, "--export-features", str(exported)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    features = read_patch_features(exported / ENCODER / "cmu_small_region.h5")
    assert features.features.shape == (2, 3) and features.patches.size_level0() == 128
