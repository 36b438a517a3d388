"""Bundled tiles, random crops and the encoder-free image statistics."""

import pytest
import torch
from PIL import Image

from mupad.data.tiles import (
    TileFolderError,
    bundled_kather_dir,
    load_tile_folder,
    random_crops,
    to_uint8,
    to_unit_range,
)
from mupad.evaluation.pixel_stats import class_consistency, sliced_wasserstein_rgb


@pytest.fixture(scope="module")
def tiles():
    return load_tile_folder(bundled_kather_dir())


def test_bundled_kather_tiles_load_with_attribution(tiles):
    root = bundled_kather_dir()
    assert (root / "ATTRIBUTION.md").read_text().count("CC BY 4.0") >= 1
    assert tiles.images.shape == (96, 3, 150, 150) and tiles.images.dtype == torch.uint8
    assert len(tiles.class_names) == 8
    assert torch.bincount(tiles.labels).tolist() == [12] * 8


def test_random_crops_are_deterministic_and_in_range(tiles):
    a, ia = random_crops(tiles, 64, 6, torch.Generator().manual_seed(1))
    b, ib = random_crops(tiles, 64, 6, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and torch.equal(ia, ib)
    assert a.shape == (6, 3, 64, 64) and a.min() >= -1 and a.max() <= 1
    with pytest.raises(TileFolderError, match="larger"):
        random_crops(tiles, 200, 1, torch.Generator())


def test_unit_range_round_trip():
    images = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    assert torch.equal(to_uint8(to_unit_range(images)), images)


def test_tile_folder_errors(tmp_path):
    with pytest.raises(TileFolderError, match="does not exist"):
        load_tile_folder(tmp_path / "nope")
    with pytest.raises(TileFolderError, match="class subfolders"):
        load_tile_folder(tmp_path)
    (tmp_path / "a").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "x.png")
    Image.new("RGB", (9, 9)).save(tmp_path / "a" / "y.png")
    with pytest.raises(TileFolderError, match="different sizes"):
        load_tile_folder(tmp_path)
    assert load_tile_folder(tmp_path, size=8).images.shape == (2, 3, 8, 8)


def test_sliced_wasserstein_separates_real_tiles_from_noise(tiles):
    real = tiles.images[::2]
    other_real = tiles.images[1::2]
    noise = torch.randint(0, 256, real.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert sliced_wasserstein_rgb(real[:2], real[:2]) == pytest.approx(0.0, abs=1e-7)
    assert sliced_wasserstein_rgb(real, other_real) < 0.25 * sliced_wasserstein_rgb(noise, other_real)


def test_class_consistency_of_real_tiles_beats_chance(tiles):
    score = class_consistency(tiles.images[::2], tiles.labels[::2], tiles.images[1::2], tiles.labels[1::2])
    assert score > 2 / 8
    shuffled = tiles.labels[::2][torch.randperm(48, generator=torch.Generator().manual_seed(0))]
    assert class_consistency(tiles.images[::2], shuffled, tiles.images[1::2], tiles.labels[1::2]) < score


def test_unreadable_tiles_are_named_up_front_or_skipped(tmp_path):
    """Issue 15: a truncated PNG is named before any training, or skipped when asked."""
    from mupad.data.tiles import BadTilesError

    (tmp_path / "a").mkdir()
    for name in ("x.png", "y.png", "z.png"):
        Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / "a" / name)
    whole = (tmp_path / "a" / "y.png").read_bytes()
    (tmp_path / "a" / "y.png").write_bytes(whole[:40])
    with pytest.raises(BadTilesError, match=r"1 unreadable image.*y\.png.*--skip-bad-tiles"):
        load_tile_folder(tmp_path)
    tiles = load_tile_folder(tmp_path, skip_bad=True)
    assert len(tiles) == 2 and [p.name for p in tiles.skipped] == ["y.png"]
    assert [p.name for p in tiles.paths] == ["x.png", "z.png"]
