"""Whole-slide translation (mupad.applications.wsi): blending, streaming, pyramidal (OME-)TIFF."""

from __future__ import annotations

import math
import re
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from mupad.applications.wsi import (
    IdentityTranslator,
    TileGrid,
    TranslatorOptions,
    TranslatorOutputError,
    UnknownTranslatorError,
    WsiTranslationError,
    build_translator,
    grid_window_sum,
    ramp_up,
    register_translator,
    resolve_translator_factory,
    translate_slide,
    translator_names,
    window_1d,
)
from mupad.applications.wsi_cli import wsi_app
from mupad.data.wsi import MissingMppError, SlideError, open_slide
from mupad.data.wsi.openslide_backend import openslide_available
from mupad.data.wsi.pyramid_writer import (
    PyramidWriteError,
    StreamingPyramidWriter,
    halve_rows,
    pyramid_level_sizes,
)
from mupad.data.wsi.slide import Slide
from mupad.data.wsi.write import write_pyramidal_tiff

torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CMU_SLIDE = SHARED_DATA / "package_samples" / "cmu_small_region.svs"
needs_cmu = pytest.mark.skipif(
    not CMU_SLIDE.is_file(), reason=f"CC0 slide cmu_small_region.svs not found at {CMU_SLIDE}"
)
needs_openslide = pytest.mark.skipif(
    not openslide_available(), reason="openslide-python / openslide-bin not installed"
)

PINK = np.array([212, 120, 180], dtype=np.uint8)


# --------------------------------------------------------------------------- test translators
@dataclass
class ChannelPermutation:
    """RGB -> BGR, uint8 out; counts the tiles it sees."""

    tile_size: int = 64
    mpp: float | None = 0.5
    batch_size: int = 4
    output_channels: int = 3
    seen: int = 0

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        assert tiles.dtype == np.uint8 and tiles.shape[1:] == (self.tile_size, self.tile_size, 3)
        self.seen += len(tiles)
        return tiles[..., ::-1]


@dataclass
class LinearMap:
    """Per-pixel linear map of RGB (0-1) to `output_channels` float intensities (an mIF stand-in)."""

    matrix: np.ndarray
    tile_size: int = 64
    mpp: float | None = 0.5
    batch_size: int = 3
    channel_names: list[str] | None = None

    @property
    def output_channels(self) -> int:
        return self.matrix.shape[1]

    def __call__(self, tiles: np.ndarray) -> torch.Tensor:
        rgb = torch.from_numpy(tiles).float() / 255.0  # (B, S, S, 3)
        return rgb @ torch.from_numpy(self.matrix).float()  # (B, S, S, C), a tensor on purpose


@dataclass
class TileOffset:
    """Constant input + a different offset per tile, like independent samples of a generative
    model: without blending the offsets show as steps at tile borders."""

    tile_size: int = 64
    mpp: float | None = 0.5
    batch_size: int = 5
    output_channels: int = 3
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        offsets = self.rng.uniform(-40, 40, size=(len(tiles), 1, 1, 1))
        return np.clip(tiles.astype(np.float32) / 255 + offsets / 255, 0, 1)


@dataclass
class FailingTranslator:
    tile_size: int = 64
    mpp: float | None = 0.5
    batch_size: int = 2
    output_channels: int = 3
    fail_after_calls: int = 3
    calls: int = 0

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self.calls > self.fail_after_calls:
            raise RuntimeError("GPU fell off the bus")
        return tiles


# --------------------------------------------------------------------------- slides
def write_slide(path: Path, level0: np.ndarray, mpp: float | None = 0.5, levels: int = 1) -> Path:
    write_pyramidal_tiff(path, level0, mpp=mpp, num_levels=levels, tile_size_px=64)
    return path


def tissue_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Glass with a textured pink rectangle in the middle (uint8 (h, w, 3))."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), 250, dtype=np.uint8)
    top, left = height // 4, width // 4
    patch = rng.integers(0, 60, (height // 2, width // 2, 3), dtype=np.uint8)
    image[top : top + height // 2, left : left + width // 2] = patch + np.array(
        [150, 50, 110], dtype=np.uint8
    )
    return image


class ProceduralSlide(Slide):
    """A slide whose pixels are computed on demand (no file): a horizontal colour ramp."""

    def __init__(self, width: int, height: int, mpp: float = 0.5):
        self._init_common(Path("procedural.svs"), mpp, [(width, height)])

    def _read_level(self, level: int, left: int, top: int, width: int, height: int) -> np.ndarray:
        x = np.arange(left, left + width) % 256
        row = np.stack([x, 255 - x, np.full_like(x, 128)], axis=-1).astype(np.uint8)
        return np.broadcast_to(row, (height, width, 3)).copy()

    def close(self) -> None:
        pass


def read_levels(path: Path) -> tuple[tifffile.TiffFile, list[np.ndarray]]:
    tif = tifffile.TiffFile(path)
    return tif, [level.asarray() for level in tif.series[0].levels]


# --------------------------------------------------------------------------- blending maths
@pytest.mark.parametrize(("size", "overlap"), [(64, 16), (64, 32), (50, 7), (8, 0), (33, 16)])
def test_ramps_and_windows_are_a_partition_of_unity(size: int, overlap: int) -> None:
    if overlap:
        up = ramp_up(overlap)
        assert np.all(np.diff(up) > 0) and 0 < up[0] < up[-1] < 1
        np.testing.assert_allclose(up + up[::-1], 1.0, atol=1e-15)
    for width, height in [(size, size), (3 * size + 5, 2 * size - 1), (7, 500), (401, 263)]:
        grid = TileGrid(width, height, size, overlap)
        total = grid_window_sum(grid)
        assert total.shape[1] >= width and total.shape[0] >= height
        np.testing.assert_allclose(total, 1.0, atol=1e-6)  # float32 windows
        window = window_1d(size, overlap, before=True, after=True)
        assert window.min() > 0 and (window.max() == 1.0 or 2 * overlap == size)


def test_overlap_must_stay_between_neighbours() -> None:
    with pytest.raises(WsiTranslationError, match="tile_size / 2"):
        TileGrid(100, 100, 64, 33)
    with pytest.raises(WsiTranslationError, match="tile_size / 2"):
        TileGrid(100, 100, 64, -1)


# --------------------------------------------------------------------------- seams
def test_constant_input_gives_constant_output_without_seams(tmp_path: Path) -> None:
    slide = write_slide(tmp_path / "pink.tif", np.broadcast_to(PINK, (301, 413, 3)).copy())
    translator = ChannelPermutation(tile_size=64)
    out = translate_slide(slide, translator, tmp_path / "out.ome.tif", overlap=16, progress=False)
    tif, levels = read_levels(out)
    with tif:
        assert levels[0].shape == (301, 413, 3)
        for level in levels:  # every level, every pixel, including all tile borders
            assert np.abs(level.astype(int) - PINK[::-1]).max() == 0
    assert translator.seen == TileGrid(413, 301, 64, 16).rows * TileGrid(413, 301, 64, 16).cols


def test_overlap_blending_hides_tile_to_tile_differences(tmp_path: Path) -> None:
    slide = write_slide(tmp_path / "pink.tif", np.broadcast_to(PINK, (256, 320, 3)).copy())
    steps = {}
    for overlap in (0, 32):
        out = translate_slide(
            slide, TileOffset(), tmp_path / f"o{overlap}.ome.tif", overlap=overlap, progress=False
        )
        image = tifffile.imread(out).astype(np.float64)
        steps[overlap] = max(
            np.abs(np.diff(image, axis=0)).max(), np.abs(np.diff(image, axis=1)).max()
        )
    # Offsets of up to 80 levels between tiles: hard steps without overlap; with a 32-px
    # raised-cosine ramp the largest step is about 80 * pi / (2 * 32) ~ 4 levels.
    assert steps[0] > 20
    assert steps[32] <= 80 * math.pi / 64 + 1


# --------------------------------------------------------------------------- outputs
def test_identity_copies_a_slide_exactly_into_a_pyramid(tmp_path: Path) -> None:
    level0 = tissue_image(530, 700)
    slide = write_slide(tmp_path / "s.tif", level0, mpp=0.25, levels=2)
    translator = IdentityTranslator(tile_size=96, batch_size=3)
    out = translate_slide(
        slide,
        translator,
        tmp_path / "copy.ome.tif",
        overlap=24,
        tissue_only=False,
        tiff_tile_px=128,
        progress=False,
    )
    tif, levels = read_levels(out)
    with tif:
        assert tif.is_ome and tif.series[0].axes == "YXS"
        assert [lv.shape for lv in levels] == [
            (530, 700, 3),
            (265, 350, 3),
            (133, 175, 3),
            (67, 88, 3),
        ]
        assert all(lv.dtype == np.uint8 for lv in levels)
        np.testing.assert_array_equal(levels[0], level0)
        np.testing.assert_array_equal(levels[1], halve_rows(level0))
        np.testing.assert_array_equal(levels[3], halve_rows(halve_rows(levels[1])))
        page = tif.series[0].levels[0].pages[0]
        assert page.is_tiled and (page.tilewidth, page.tilelength) == (128, 128)
        assert page.compression == 8  # deflate
        assert 'PhysicalSizeX="0.25"' in tif.ome_metadata
    with open_slide(out) as reopened:  # the project's own reader, every level
        assert reopened.mpp == pytest.approx(0.25)
        assert reopened.level_downsamples[:3] == pytest.approx((1.0, 2.0, 4.0), rel=0.01)
        np.testing.assert_array_equal(
            reopened.read_region(64, 32, 1, 40, 30), levels[1][16:46, 32:72]
        )


def test_resampled_to_the_translator_mpp_and_background_skipped(tmp_path: Path) -> None:
    level0 = tissue_image(512, 640, seed=3)
    slide = write_slide(tmp_path / "s.tif", level0, mpp=0.25, levels=1)
    translator = ChannelPermutation(tile_size=64, mpp=0.4)  # 0.625x: resampled from level 0
    out = translate_slide(slide, translator, tmp_path / "t.ome.tif", overlap=16, progress=False)
    grid = TileGrid(400, 320, 64, 16)
    assert 0 < translator.seen < grid.rows * grid.cols  # glass tiles never reach the model
    tif, levels = read_levels(out)
    with tif:
        assert levels[0].shape == (320, 400, 3)
        assert 'PhysicalSizeX="0.4"' in tif.ome_metadata
        expected = np.asarray(Image.fromarray(level0).resize((400, 320), Image.Resampling.LANCZOS))
        expected = expected[..., ::-1].astype(int)
        centre = (slice(100, 220), slice(120, 280))  # tissue, away from its edges
        assert np.abs(levels[0][centre].astype(int) - expected[centre]).mean() < 1.0
        assert (levels[0][:40] == 255).all()  # glass rows: background white, no model


def test_multichannel_output_is_an_ome_channel_stack(tmp_path: Path) -> None:
    slide = write_slide(tmp_path / "s.tif", tissue_image(300, 260))
    rng = np.random.default_rng(1)
    matrix = rng.uniform(0, 0.5, (3, 5)).astype(np.float32)
    names = ["DAPI", "CD3", "CD8", "PanCK", "CD20"]
    translator = LinearMap(matrix, channel_names=names)
    out = translate_slide(
        slide,
        translator,
        tmp_path / "mif.ome.tif",
        overlap=8,
        out_dtype="uint16",
        tissue_only=False,
        progress=False,
    )
    tif, levels = read_levels(out)
    with tif:
        assert tif.series[0].axes == "CYX"
        assert [lv.shape for lv in levels] == [(5, 300, 260), (5, 150, 130)]
        assert levels[0].dtype == np.uint16
        for name in names:
            assert f'Name="{name}"' in tif.ome_metadata
        expected = np.clip(tissue_image(300, 260) / 255.0 @ matrix, 0, 1) * 65535
        assert np.abs(levels[0].astype(float) - np.moveaxis(expected, -1, 0)).max() <= 1.0
    with pytest.raises(WsiTranslationError, match="RGB uint8 only"):
        translate_slide(slide, translator, tmp_path / "mif.tif", progress=False)


@needs_openslide
def test_openslide_opens_the_outputs(tmp_path: Path) -> None:
    import openslide

    level0 = tissue_image(600, 700, seed=5)
    slide = write_slide(tmp_path / "s.tif", level0, mpp=0.5)
    translator = IdentityTranslator(tile_size=128, mpp=0.5)
    generic = translate_slide(
        slide,
        translator,
        tmp_path / "g.tif",
        overlap=32,
        tissue_only=False,
        tiff_tile_px=128,
        progress=False,
    )
    ome = translate_slide(
        slide,
        translator,
        tmp_path / "g.ome.tif",
        overlap=32,
        tissue_only=False,
        tiff_tile_px=128,
        progress=False,
    )
    with tifffile.TiffFile(generic) as tif:
        levels = [lv.asarray() for lv in tif.series[0].levels]
    assert len(levels) == 4
    with openslide.OpenSlide(str(generic)) as handle:  # generic tiled TIFF: every level
        assert handle.properties["openslide.vendor"] == "generic-tiff"
        assert handle.level_dimensions == tuple((lv.shape[1], lv.shape[0]) for lv in levels)
        assert float(handle.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        for index, level in enumerate(levels):
            scale = round(handle.level_downsamples[index])
            region = np.asarray(handle.read_region((0, 0), index, level.shape[1::-1]))
            np.testing.assert_array_equal(region[..., :3], level)
            assert scale == 2**index
    with openslide.OpenSlide(str(ome)) as handle:  # OME: OpenSlide sees level 0 only
        assert handle.level_dimensions == ((700, 600),)
        np.testing.assert_array_equal(
            np.asarray(handle.read_region((0, 0), 0, (700, 600)))[..., :3], level0
        )


@needs_cmu
def test_cmu_svs_translated_at_1_um_per_px(tmp_path: Path) -> None:
    translator = ChannelPermutation(tile_size=128, mpp=1.0, batch_size=8)
    out = translate_slide(CMU_SLIDE, translator, tmp_path / "cmu.tif", overlap=32, progress=False)
    with open_slide(CMU_SLIDE) as slide:
        width = round(slide.width * slide.mpp / 1.0)
        height = round(slide.height * slide.mpp / 1.0)
        scale = 1.0 / slide.mpp  # level-0 px per output px
        level0 = slide.read_region(0, 0, 0, slide.width + 8, slide.height + 8)  # white margin
    with open_slide(out) as result:
        assert (result.width, result.height) == (width, height)
        assert result.mpp == pytest.approx(1.0)
        assert result.level_count == 4
        image = result.read_region(0, 0, 0, width, height)
    # One Lanczos resize of the whole slide, same geometry as the tiles' exact boxes.
    expected = Image.fromarray(level0).resize(
        (width, height), Image.Resampling.LANCZOS, box=(0, 0, width * scale, height * scale)
    )
    expected = np.asarray(expected).astype(int)
    translated = image[..., ::-1].astype(int)  # undo the BGR permutation
    tissue = expected.min(axis=-1) < 200
    assert tissue.mean() > 0.1
    # Tiles blended across overlaps reproduce the global resize (up to rounding at borders).
    assert np.abs(translated - expected)[tissue].mean() < 0.5


# --------------------------------------------------------------------------- bad input
def test_failure_mid_slide_leaves_nothing(tmp_path: Path) -> None:
    slide = write_slide(tmp_path / "s.tif", tissue_image(400, 400))
    out = tmp_path / "out.ome.tif"
    out.write_bytes(b"previous result")
    before = sorted(p.name for p in tmp_path.iterdir())
    translator = FailingTranslator()
    with pytest.raises(RuntimeError, match="fell off"):
        translate_slide(
            slide, translator, out, overlap=16, tissue_only=False, progress=False, overwrite=True
        )
    assert translator.calls == 4  # it did fail mid-slide
    assert out.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temporary left


def test_wrong_translator_output_is_a_clear_error(tmp_path: Path) -> None:
    slide = write_slide(tmp_path / "s.tif", tissue_image(200, 200))

    @dataclass
    class WrongShape(ChannelPermutation):
        def __call__(self, tiles: np.ndarray) -> np.ndarray:
            return tiles[:, ::2, ::2]

    @dataclass
    class NaNs(ChannelPermutation):
        def __call__(self, tiles: np.ndarray) -> np.ndarray:
            return np.full(tiles.shape, np.nan, dtype=np.float32)

    with pytest.raises(TranslatorOutputError, match=r"returned shape \(4, 32, 32, 3\)"):
        translate_slide(slide, WrongShape(), tmp_path / "a.ome.tif", progress=False, overlap=8)
    with pytest.raises(TranslatorOutputError, match="NaN"):
        translate_slide(slide, NaNs(), tmp_path / "b.ome.tif", progress=False, overlap=8)
    with pytest.raises(WsiTranslationError, match="not a TileTranslator"):
        translate_slide(slide, object(), tmp_path / "c.ome.tif", progress=False)  # type: ignore[arg-type]
    with pytest.raises(WsiTranslationError, match="must end in"):
        translate_slide(slide, ChannelPermutation(), tmp_path / "d.png", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.tif"]


def test_missing_and_implausible_mpp(tmp_path: Path) -> None:
    png = tmp_path / "section.png"
    Image.fromarray(tissue_image(160, 200)).save(png)
    with pytest.raises(MissingMppError, match="--slide-mpp"):
        translate_slide(png, ChannelPermutation(), tmp_path / "x.ome.tif", overlap=8)
    out = translate_slide(
        png,
        ChannelPermutation(),
        tmp_path / "x.ome.tif",
        slide_mpp=0.5,
        overlap=8,
        progress=False,
    )
    assert tifffile.imread(out).shape == (160, 200, 3)
    # A 2 µm/px scan for a 0.5 µm/px model would need a 4x enlargement: refused.
    coarse = write_slide(tmp_path / "coarse.tif", tissue_image(200, 200), mpp=2.0)
    with pytest.raises(SlideError, match=r"4.00x coarser"):
        translate_slide(coarse, ChannelPermutation(), tmp_path / "y.ome.tif", overlap=8)
    assert not (tmp_path / "y.ome.tif").exists()


def test_slide_smaller_than_a_tile(tmp_path: Path) -> None:
    slide = write_slide(tmp_path / "tiny.tif", np.broadcast_to(PINK, (20, 30, 3)).copy())
    out = translate_slide(
        slide, ChannelPermutation(), tmp_path / "tiny.ome.tif", overlap=16, progress=False
    )
    assert (tifffile.imread(out) == PINK[::-1]).all()


# --------------------------------------------------------------------------- streaming
def test_memory_stays_bounded_by_a_band_of_tiles(tmp_path: Path) -> None:
    """Peak traced memory does not grow with the slide: 4x taller -> same peak."""
    translator = IdentityTranslator(tile_size=128, batch_size=4)
    peaks = {}
    for height in (3_000, 12_000):  # RGB level 0: 4.6 MB and 18 MB (24 MB with the pyramid)
        slide = ProceduralSlide(512, height)
        tracemalloc.start()
        try:
            out = translate_slide(
                slide,
                translator,
                tmp_path / f"tall{height}.ome.tif",
                overlap=32,
                tissue_only=False,
                progress=False,
            )
            peaks[height] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    # Bands (256 rows per level, blending rows), a batch of float tiles, encoder buffers.
    assert peaks[12_000] < 1.25 * peaks[3_000], peaks
    assert peaks[12_000] < 10 * 2**20, peaks
    with tifffile.TiffFile(out) as tif:
        level0 = tif.series[0].levels[0]
        assert level0.shape == (12_000, 512, 3)
        np.testing.assert_array_equal(
            level0.asarray()[5000:5003], slide.read_region(0, 5000, 0, 512, 3)
        )


def test_writer_refuses_incomplete_images_and_bad_layouts(tmp_path: Path) -> None:
    out = tmp_path / "w.ome.tif"
    writer = StreamingPyramidWriter(out, 100, 80, mpp=0.5)
    writer.write_rows(np.zeros((50, 100, 3), np.uint8))
    with pytest.raises(PyramidWriteError, match="incomplete"):
        writer.close()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(PyramidWriteError, match="RGB uint8 only"):
        StreamingPyramidWriter(tmp_path / "w.tif", 10, 10, mpp=0.5, channels=4)
    assert pyramid_level_sizes(1000, 300, 256) == [(1000, 300), (500, 150), (250, 75)]
    assert pyramid_level_sizes(5, 3, 256, num_levels=5) == [(5, 3), (3, 2), (2, 1), (1, 1)]


# --------------------------------------------------------------------------- registry + CLI
def test_registry_resolves_every_name() -> None:
    assert "identity" in translator_names()
    for name in translator_names():  # every CLI choice imports and is a factory
        assert callable(resolve_translator_factory(name))
    translator = build_translator("identity", options=TranslatorOptions(mpp=0.5, tile_size=64))
    assert (translator.mpp, translator.tile_size) == (0.5, 64)
    with pytest.raises(UnknownTranslatorError, match="available: .*identity"):
        build_translator("he2nothing")
    with pytest.raises(WsiTranslationError, match="no checkpoint"):
        build_translator("identity", checkpoint="model.safetensors")
    with pytest.raises(WsiTranslationError, match="already registered"):
        register_translator("identity", lambda checkpoint, options: IdentityTranslator())


def test_cli_translate(tmp_path: Path) -> None:
    app = typer.Typer()
    app.add_typer(wsi_app, name="wsi")
    slide = write_slide(tmp_path / "s.tif", tissue_image(300, 340), mpp=0.25)
    out = tmp_path / "cli.ome.tif"
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "wsi",
            "translate",
            str(slide),
            "--translator",
            "identity",
            "--out",
            str(out),
            "--mpp",
            "0.5",
            "--tile-size",
            "64",
            "--overlap",
            "16",
            "--batch-size",
            "2",
            "--all-tiles",
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    assert tifffile.imread(out).shape == (150, 170, 3)
    result = runner.invoke(
        app,
        [
            "wsi",
            "translate",
            str(slide),
            "--translator",
            "nope",
            "--out",
            str(tmp_path / "n.ome.tif"),
        ],
    )
    assert result.exit_code == 2 and "unknown translator" in result.output
    png = tmp_path / "p.png"
    Image.fromarray(tissue_image(64, 64)).save(png)
    result = runner.invoke(
        app, ["wsi", "translate", str(png), "--out", str(tmp_path / "p.ome.tif")]
    )
    assert result.exit_code == 2 and "--slide-mpp" in re.sub(r"\s+", " ", result.output)
    result = runner.invoke(app, ["wsi", "translators"])
    assert result.exit_code == 0 and "identity" in result.output
