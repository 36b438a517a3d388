"""Whole-slide reading and tiling (mupad.data.wsi) on a real CC0 slide and synthetic slides."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from mupad.data.wsi import (
    SLIDE_SUFFIXES,
    EmptyTissueError,
    MissingMppError,
    SlideBackendMissingError,
    SlideError,
    TileCoord,
    iter_tiles,
    open_slide,
    plan_tiles,
    read_tile,
    tissue_mask,
)
from mupad.data.wsi.openslide_backend import openslide_available
from mupad.data.wsi.tiff_backend import TiffSlide
from mupad.data.wsi.write import halve, write_pyramidal_tiff

torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CMU_SLIDE = SHARED_DATA / "package_samples" / "cmu_small_region.svs"
HER2ST_IMAGES = SHARED_DATA / "her2st_he_spatial_expression_6sections" / "images"

needs_cmu = pytest.mark.skipif(
    not CMU_SLIDE.is_file(), reason=f"CC0 slide cmu_small_region.svs not found at {CMU_SLIDE}"
)


def saturation(rgb: np.ndarray) -> float:
    """Mean HSV saturation (0-255) of uint8 (h, w, 3)."""
    return float(np.asarray(Image.fromarray(rgb, "RGB").convert("HSV"))[..., 1].mean())


def synthetic_level0(height: int = 1024, width: int = 1280, seed: int = 0) -> np.ndarray:
    """White glass with a pink 'tissue' rectangle of random texture -> uint8 (h, w, 3)."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), 255, dtype=np.uint8)
    tissue = rng.integers(0, 96, (height // 2, width // 2, 3), dtype=np.uint8)
    image[height // 4 : height // 4 + height // 2, width // 4 : width // 4 + width // 2] = (
        tissue + np.array([150, 40, 120], dtype=np.uint8)
    )
    return image


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[np.ndarray]]:
    path = tmp_path_factory.mktemp("wsi") / "pyramid.tif"
    levels = write_pyramidal_tiff(
        path, synthetic_level0(), mpp=0.25, num_levels=3, tile_size_px=128
    )
    return path, levels


# --------------------------------------------------------------------- real CC0 slide
@needs_cmu
def test_cmu_slide_metadata() -> None:
    with open_slide(CMU_SLIDE) as slide:
        assert (slide.width, slide.height) == (2220, 2967)
        assert slide.mpp == pytest.approx(0.499, abs=1e-3)
        assert slide.slide_id == "cmu_small_region"
        assert slide.level_count == len(slide.level_downsamples) >= 1
        assert slide.level_downsamples[0] == 1.0
        thumb = slide.thumbnail(512)
        assert thumb.dtype == np.uint8 and max(thumb.shape[:2]) == 512 and thumb.shape[2] == 3


@needs_cmu
def test_cmu_tiles_at_20x_land_on_tissue() -> None:
    with open_slide(CMU_SLIDE) as slide:
        coords = plan_tiles(slide, tile_size=256, target_mpp=0.5, min_tissue=0.5)
        size = coords[0].size_level0
        # 256 px at 0.5 µm/px = 128 µm = 256.5 level-0 px at 0.499 µm/px.
        assert abs(size * slide.mpp - 128.0) <= slide.mpp / 2
        grid = (slide.width // size) * (slide.height // size)
        # The skin section covers about a third of the slide.
        assert 0.15 * grid <= len(coords) <= 0.6 * grid
        tiles = [read_tile(slide, coord, 256) for coord in coords]
        for coord in coords:
            assert coord.x % size == 0 and coord.y % size == 0
            assert coord.x + size <= slide.width and coord.y + size <= slide.height
            assert coord.level == 0 and coord.tissue_fraction >= 0.5
        stack = np.stack(tiles)  # (N, 256, 256, 3)
        assert stack.shape == (len(coords), 256, 256, 3) and stack.dtype == np.uint8
        non_white = (stack.min(axis=-1) < 200).mean(axis=(1, 2))  # (N,)
        assert non_white.mean() > 0.6
        assert np.mean([saturation(t) for t in tiles]) > 60
        # The top-left corner is glass: not planned, and it reads as background.
        kept = {(c.x, c.y) for c in coords}
        assert (0, 0) not in kept
        corner = slide.read_region(0, 0, 0, size, size)
        assert saturation(corner) < 20 and (corner.min(axis=-1) < 200).mean() < 0.05


@needs_cmu
def test_cmu_tiles_at_10x_are_resampled() -> None:
    with open_slide(CMU_SLIDE) as slide:
        coords_20x = plan_tiles(slide, 256, 0.5)
        coords_10x = plan_tiles(slide, 256, 1.0)
        size = coords_10x[0].size_level0
        assert abs(size * slide.mpp - 256.0) <= slide.mpp / 2  # twice the µm per tile
        assert 0.15 * len(coords_20x) <= len(coords_10x) <= 0.45 * len(coords_20x)
        coord = coords_10x[len(coords_10x) // 2]
        tile = read_tile(slide, coord, 256)  # (256, 256, 3)
        full = slide.read_region(coord.x, coord.y, 0, size, size)  # (513, 513, 3)
        expected = np.asarray(Image.fromarray(full).resize((256, 256), Image.Resampling.BOX))
        assert tile.shape == (256, 256, 3)
        assert np.abs(tile.astype(int) - expected.astype(int)).mean() < 6


@needs_cmu
@pytest.mark.skipif(not openslide_available(), reason="openslide-python/openslide-bin missing")
def test_cmu_tifffile_backend_matches_openslide() -> None:
    with open_slide(CMU_SLIDE) as by_openslide, TiffSlide(CMU_SLIDE) as by_tifffile:
        assert by_tifffile.mpp == pytest.approx(by_openslide.mpp)
        for x, y, w, h in [(0, 0, 300, 200), (1000, 1234, 517, 260), (2100, 2900, 200, 200)]:
            a = by_openslide.read_region(x, y, 0, w, h)
            b = by_tifffile.read_region(x, y, 0, w, h)
            assert np.abs(a.astype(int) - b.astype(int)).max() <= 2


@needs_cmu
def test_truncated_svs_is_a_slide_error(tmp_path: Path) -> None:
    data = CMU_SLIDE.read_bytes()
    broken = tmp_path / "truncated.svs"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(SlideError, match="truncated|corrupt"), open_slide(broken) as slide:
        for _ in iter_tiles(slide):
            pass


@needs_cmu
@pytest.mark.parametrize("backend", ["default", "tifffile"])
def test_corrupt_tile_data_is_a_slide_error(tmp_path: Path, backend: str) -> None:
    data = bytearray(CMU_SLIDE.read_bytes())
    start, stop = int(len(data) * 0.3), int(len(data) * 0.5)
    data[start:stop] = bytes(stop - start)  # zeroed JPEG tiles, directories intact
    broken = tmp_path / "zeroed.svs"
    broken.write_bytes(bytes(data))
    opener = open_slide if backend == "default" else TiffSlide
    with pytest.raises(SlideError, match="truncated or corrupt"), opener(broken) as slide:
        for _ in iter_tiles(slide):
            pass


# --------------------------------------------------------------------- synthetic pyramid
def test_pyramid_read_region_is_exact(pyramid: tuple[Path, list[np.ndarray]]) -> None:
    path, levels = pyramid
    with open_slide(path) as slide:
        assert slide.mpp == pytest.approx(0.25)
        assert slide.level_downsamples == (1.0, 2.0, 4.0)
        assert slide.level_dimensions == ((1280, 1024), (640, 512), (320, 256))
        for level, array in enumerate(levels):
            scale = 2**level
            # Crosses tile boundaries (128-px tiles), odd sizes.
            region = slide.read_region(70 * scale, 45 * scale, level, 201, 133)
            np.testing.assert_array_equal(region, array[45:178, 70:271])
        # Outside the slide is white glass.
        region = slide.read_region(1200, -10, 0, 100, 30)
        assert (region[:10] == 255).all() and (region[:, 80:] == 255).all()
        np.testing.assert_array_equal(region[10:, :80], levels[0][:20, 1200:1280])


@pytest.mark.parametrize(("target_mpp", "level"), [(0.25, 0), (0.5, 1), (1.0, 2)])
def test_pyramid_tiles_are_exact(
    pyramid: tuple[Path, list[np.ndarray]], target_mpp: float, level: int
) -> None:
    path, levels = pyramid
    with open_slide(path) as slide:
        coords = plan_tiles(slide, tile_size=64, target_mpp=target_mpp)
        scale = 2**level
        assert {c.level for c in coords} == {level}
        assert {c.size_level0 for c in coords} == {64 * scale}
        # Tissue is the central rectangle [256, 768) x [320, 960) of level 0.
        for coord in coords:
            assert 256 - 64 * scale < coord.y < 768 and 320 - 64 * scale < coord.x < 960
        assert len(coords) >= (512 * 640) // (64 * scale) ** 2 * 0.8
        for coord, tile in iter_tiles(slide, tile_size=64, target_mpp=target_mpp):
            top, left = coord.y // scale, coord.x // scale
            np.testing.assert_array_equal(tile, levels[level][top : top + 64, left : left + 64])


def test_pyramid_resampled_between_levels(pyramid: tuple[Path, list[np.ndarray]]) -> None:
    path, levels = pyramid
    with open_slide(path) as slide:
        coord = TileCoord(x=512, y=384, size_level0=192, level=0, tissue_fraction=1.0)
        tile = read_tile(slide, coord, 128)  # 0.375 µm/px from level 0
        assert tile.shape == (128, 128, 3)
        source = levels[0][384:576, 512:704]
        expected = np.asarray(Image.fromarray(source).resize((128, 128), Image.Resampling.LANCZOS))
        np.testing.assert_array_equal(tile, expected)


def test_tissue_mask_scale(pyramid: tuple[Path, list[np.ndarray]]) -> None:
    path, _ = pyramid
    with open_slide(path) as slide:
        mask, scale = tissue_mask(slide, thumbnail_size=320)
        assert mask.shape == (256, 320) and scale == pytest.approx(0.25)
        assert mask[64:192, 80:240].mean() > 0.95 and mask[:60].mean() < 0.01


def test_thumbnail_of_a_single_level_slide(tmp_path: Path) -> None:
    level0 = synthetic_level0(1000, 1300)
    path = tmp_path / "flat.tif"
    tifffile.imwrite(
        path,
        level0,
        photometric="rgb",
        tile=(64, 64),
        compression="zlib",
        resolution=(4e4, 4e4),
        resolutionunit="CENTIMETER",
    )
    with open_slide(path) as slide:
        assert slide.level_count == 1 and slide.mpp == pytest.approx(0.25)
        thumb = slide.thumbnail(200)  # 6x6 box means, then a small resize
        assert thumb.shape == (154, 200, 3)
        expected = np.asarray(Image.fromarray(level0).resize((200, 154), Image.Resampling.BOX))
        assert np.abs(thumb.astype(int) - expected.astype(int)).mean() < 3


def test_ome_tiff_and_page_pyramids(tmp_path: Path) -> None:
    level0 = synthetic_level0(512, 640)
    ome = tmp_path / "section.ome.tif"
    quarter = halve(halve(level0))
    with tifffile.TiffWriter(ome) as tif:  # OME pyramid: levels in SubIFDs
        metadata = {"axes": "YXS", "PhysicalSizeX": 0.4, "PhysicalSizeXUnit": "µm"}
        tif.write(level0, photometric="rgb", tile=(128, 128), subifds=2, metadata=metadata)
        tif.write(halve(level0), photometric="rgb", tile=(128, 128), subfiletype=1)
        tif.write(quarter, photometric="rgb", tile=(128, 128), subfiletype=1)
    with open_slide(ome) as slide:
        assert slide.slide_id == "section" and slide.mpp == pytest.approx(0.4)
        assert slide.level_downsamples == (1.0, 2.0, 4.0)
        np.testing.assert_array_equal(
            slide.read_region(10, 20, 0, 300, 200), level0[20:220, 10:310]
        )
        np.testing.assert_array_equal(slide.read_region(40, 80, 2, 50, 30), quarter[20:50, 10:60])
    # A pyramid stored as consecutive pages (no SubIFDs), strips instead of tiles.
    pages = tmp_path / "pages.tif"
    half = level0[::2, ::2].copy()
    with tifffile.TiffWriter(pages) as tif:
        for index, array in enumerate([level0, half]):
            px_per_inch = 25400 / (0.5 * 2**index)
            tif.write(
                array,
                photometric="rgb",
                rowsperstrip=37,
                compression="zlib",
                resolution=(px_per_inch, px_per_inch),
                resolutionunit="INCH",
                metadata=None,
                subfiletype=1 if index else 0,
            )
    with open_slide(pages) as slide:
        assert slide.mpp == pytest.approx(0.5) and slide.level_downsamples == (1.0, 2.0)
        np.testing.assert_array_equal(slide.read_region(100, 60, 1, 90, 70), half[30:100, 50:140])


# --------------------------------------------------------------------- plain images
def test_plain_png(tmp_path: Path) -> None:
    level0 = synthetic_level0(512, 640)
    path = tmp_path / "tile.png"
    Image.fromarray(level0).save(path)
    with open_slide(path, mpp=0.5) as slide:
        assert (slide.width, slide.height, slide.level_count) == (640, 512, 1)
        np.testing.assert_array_equal(slide.read_region(5, 7, 0, 50, 60), level0[7:67, 5:55])
        # Tissue is [128, 384) x [160, 480): 4 rows of 4 whole + 2 half-covered tiles.
        assert len(plan_tiles(slide, tile_size=64, target_mpp=0.5, min_tissue=0.75)) == 16
        assert len(plan_tiles(slide, tile_size=64, target_mpp=0.5, min_tissue=0.4)) == 24
        coord, tile = next(iter_tiles(slide, tile_size=64, target_mpp=0.5, progress=True))
        np.testing.assert_array_equal(tile, level0[coord.y : coord.y + 64, coord.x : coord.x + 64])
    with pytest.raises(MissingMppError, match="--slide-mpp"):
        open_slide(path)


@pytest.mark.skipif(
    not HER2ST_IMAGES.is_dir(), reason=f"HER2ST images not found at {HER2ST_IMAGES}"
)
def test_her2st_section_jpeg() -> None:
    path = min(HER2ST_IMAGES.glob("*.jpg"))
    with open_slide(path, mpp=1.0) as slide:  # 72 dpi in the file is not a resolution
        assert slide.width > 9000 and slide.height > 9000
        coords = plan_tiles(slide, tile_size=256, target_mpp=2.0)
        assert 50 < len(coords) < (slide.width // 512) * (slide.height // 512)
        tile = read_tile(slide, coords[len(coords) // 2], 256)
        assert tile.shape == (256, 256, 3) and saturation(tile) > 30
    with pytest.raises(MissingMppError, match="--slide-mpp"):
        open_slide(path)


# --------------------------------------------------------------------- bad input
@pytest.mark.parametrize("suffix", [".svs", ".tif", ".png", ".jpg"])
def test_garbage_file_is_a_slide_error(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"garbage{suffix}"
    path.write_bytes(b"this is not a slide" * 100)
    with pytest.raises(SlideError):
        open_slide(path, mpp=0.5)


def test_truncated_files_are_slide_errors(
    tmp_path: Path, pyramid: tuple[Path, list[np.ndarray]]
) -> None:
    data = pyramid[0].read_bytes()
    tif = tmp_path / "cut.tif"
    tif.write_bytes(data[: int(len(data) * 0.6)])
    with pytest.raises(SlideError, match="truncated"):
        open_slide(tif)
    png = tmp_path / "cut.png"
    Image.fromarray(synthetic_level0(256, 256)).save(png)
    png.write_bytes(png.read_bytes()[:5000])
    with pytest.raises(SlideError, match="truncated|corrupt"), open_slide(png, mpp=0.5) as slide:
        slide.read_region(0, 0, 0, 10, 10)


def test_missing_file_is_a_slide_error(tmp_path: Path) -> None:
    with pytest.raises(SlideError, match="does not exist"):
        open_slide(tmp_path / "nope.svs")


def test_missing_mpp_asks_for_it(tmp_path: Path) -> None:
    path = tmp_path / "nores.tif"
    write_pyramidal_tiff(path, synthetic_level0(256, 256), mpp=None, num_levels=2, tile_size_px=64)
    with pytest.raises(MissingMppError, match="--slide-mpp"):
        open_slide(path)
    with open_slide(path, mpp=0.5) as slide:
        assert slide.mpp == 0.5
    dpi72 = tmp_path / "dpi72.tif"
    tifffile.imwrite(
        dpi72,
        synthetic_level0(128, 128),
        photometric="rgb",
        resolution=(72, 72),
        resolutionunit="INCH",
    )
    with pytest.raises(MissingMppError, match="--slide-mpp"):
        open_slide(dpi72)
    with pytest.raises(SlideError, match="positive"):
        open_slide(path, mpp=-1.0)


def test_blank_slide_has_no_tissue(tmp_path: Path) -> None:
    path = tmp_path / "blank.tif"
    glass = np.full((512, 512, 3), 245, dtype=np.uint8)
    glass += np.random.default_rng(0).integers(0, 6, glass.shape, dtype=np.uint8)
    write_pyramidal_tiff(path, glass, mpp=0.5, num_levels=2, tile_size_px=128)
    with open_slide(path) as slide, pytest.raises(EmptyTissueError, match="mask is empty"):
        plan_tiles(slide, tile_size=64)


def test_tiles_below_min_tissue_say_so(tmp_path: Path) -> None:
    image = np.full((512, 512, 3), 255, dtype=np.uint8)
    image[200:230, 200:230] = (180, 60, 140)  # a speck smaller than any tile
    path = tmp_path / "speck.png"
    Image.fromarray(image).save(path)
    with open_slide(path, mpp=0.5) as slide, pytest.raises(EmptyTissueError, match="min_tissue"):
        plan_tiles(slide, tile_size=128, min_tissue=0.5)


def test_alpha_and_16bit_images_are_refused(tmp_path: Path) -> None:
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (64, 64), (200, 100, 150, 255)).save(rgba)
    with pytest.raises(SlideError, match="alpha"):
        open_slide(rgba, mpp=0.5)
    deep = tmp_path / "deep.png"
    Image.fromarray(np.full((64, 64), 40000, dtype=np.uint16)).save(deep)
    with pytest.raises(SlideError, match="8 bits"):
        open_slide(deep, mpp=0.5)
    rgba_tif = tmp_path / "rgba.tif"
    tifffile.imwrite(rgba_tif, np.zeros((64, 64, 4), np.uint8), photometric="rgb", extrasamples=[2])
    with pytest.raises(SlideError, match="alpha"):
        open_slide(rgba_tif, mpp=0.5)
    deep_tif = tmp_path / "deep.tif"
    tifffile.imwrite(deep_tif, np.zeros((64, 64, 3), np.uint16), photometric="rgb")
    with pytest.raises(SlideError, match="8 bits"):
        open_slide(deep_tif, mpp=0.5)


def test_unsupported_suffix_and_missing_openslide(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = tmp_path / "slide.xyz"
    other.write_bytes(b"x")
    with pytest.raises(SlideError, match="unsupported"):
        open_slide(other)
    ndpi = tmp_path / "slide.ndpi"
    ndpi.write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "openslide", None)  # import openslide -> ImportError
    with pytest.raises(SlideBackendMissingError, match="pip install openslide-python"):
        open_slide(ndpi)


@needs_cmu
def test_svs_without_openslide_uses_tifffile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = tmp_path / "copy.svs"
    shutil.copy(CMU_SLIDE, copy)
    monkeypatch.setitem(sys.modules, "openslide", None)
    with open_slide(copy) as slide:
        assert isinstance(slide, TiffSlide) and slide.mpp == pytest.approx(0.499, abs=1e-3)


def test_slide_suffixes() -> None:
    assert {".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".png", ".jpg", ".jpeg"} <= SLIDE_SUFFIXES
    assert all(s.startswith(".") and s == s.lower() for s in SLIDE_SUFFIXES)
