"""Cell-type fidelity (mupad.evaluation.celltypes) and `mupad evaluate celltypes`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.measure import label
from typer.testing import CliRunner

from mupad.evaluation import celltypes
from mupad.evaluation.celltypes import (
    EPITHELIAL,
    LYMPHOCYTE,
    STROMAL,
    CellTypeError,
    CellTypeModel,
    CellTypeProfile,
    ClassicalConfig,
    Nucleus,
    build_cell_type_model,
    cell_type_model_names,
    compare_profiles,
    profile_images,
    proportion_wasserstein,
    register_cell_type_model,
)
from mupad.evaluation.cli import evaluate_app
from mupad.evaluation.images import read_rgb
from mupad.evaluation.stats import EvaluationError

KATHER = Path(__file__).resolve().parents[2] / "shared" / "data" / "kather2016_crc_texture_samples"
KATHER_MPP = 0.495
NUCLEUS_RGB = (50, 30, 100)  # dark blue-purple: hematoxylin OD ~0.17
EOSIN_RGB = (235, 175, 205)  # pink background: hematoxylin OD 0


def draw(
    shapes: list[tuple[float, float, float, float]], size: int = 128, seed: int = 0
) -> np.ndarray:
    """uint8 (3, size, size): dark ellipses (cy, cx, ry, rx) on pink, with mild noise."""
    yy, xx = np.mgrid[:size, :size]
    image = np.empty((size, size, 3))
    image[:] = EOSIN_RGB
    for cy, cx, ry, rx in shapes:
        image[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0] = NUCLEUS_RGB
    image += np.random.default_rng(seed).normal(0.0, 3.0, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8).transpose(2, 0, 1)


def discs(centres: list[tuple[int, int]], radius: float) -> list[tuple[float, float, float, float]]:
    return [(cy, cx, radius, radius) for cy, cx in centres]


@pytest.fixture(scope="module")
def model() -> CellTypeModel:
    return build_cell_type_model("classical", mpp=0.5)


# --------------------------------------------------------------------------------------
# The classical model on drawn images
# --------------------------------------------------------------------------------------


def test_separated_lymphocyte_sized_discs_are_found_and_typed(model: CellTypeModel) -> None:
    centres = [(18 + 31 * i, 18 + 31 * j) for i in range(4) for j in range(4)]
    nuclei = model.detect(draw(discs(centres, 6.0)))  # 6 px = 3 µm radius: 28 µm²
    assert len(nuclei) == len(centres)
    assert {n.cell_type for n in nuclei} == {LYMPHOCYTE}
    assert all(25 < n.area_um2 < 32 and n.eccentricity < 0.3 for n in nuclei)
    found = sorted((round(n.centroid_yx[0]), round(n.centroid_yx[1])) for n in nuclei)
    assert found == sorted(centres)


def test_watershed_splits_touching_discs(model: CellTypeModel) -> None:
    touching = discs([(64, 59), (64, 69)], 6.0)  # centres 10 px apart, radii 6: overlapping
    image = draw(touching)
    labels = model.segment(image)
    assert label(labels > 0).max() == 1  # one connected foreground blob...
    assert labels.max() == 2  # ...that the watershed cuts in two
    nuclei = model.detect(image)
    assert len(nuclei) == 2 and {n.cell_type for n in nuclei} == {LYMPHOCYTE}
    assert sorted(round(n.centroid_yx[1]) for n in nuclei) == [59, 69]


def test_size_shape_and_pixel_size_drive_the_type(model: CellTypeModel) -> None:
    large = model.detect(draw(discs([(64, 64)], 10.0)))  # 10 px: 79 µm² at 0.5 µm/px
    assert [n.cell_type for n in large] == [EPITHELIAL]
    spindle = model.detect(draw([(64, 64, 3.0, 12.0)]))  # 4:1 ellipse
    assert [n.cell_type for n in spindle] == [STROMAL]
    assert spindle[0].eccentricity > 0.95
    # the same small discs at 1 µm/px are 4x the area: no longer lymphocyte-sized
    coarse = build_cell_type_model("classical", mpp=1.0)
    centres = [(32, 32), (32, 96), (96, 32), (96, 96)]
    typed = {n.cell_type for n in coarse.detect(draw(discs(centres, 6.0)))}
    assert typed == {EPITHELIAL}


def test_blank_and_flat_images_have_no_nuclei(model: CellTypeModel) -> None:
    assert model.detect(draw([])) == []  # noise on pink: the hematoxylin floor holds
    assert model.detect(np.full((3, 64, 64), 255, np.uint8)) == []


# --------------------------------------------------------------------------------------
# Proportions and distances
# --------------------------------------------------------------------------------------


def test_wasserstein_is_zero_for_identical_symmetric_and_grows_with_a_shift() -> None:
    rng = np.random.default_rng(0)
    a = rng.random(30)
    assert proportion_wasserstein(a, a.copy()) == 0.0
    b = np.clip(a + 0.2, 0, 1)
    assert proportion_wasserstein(a, b) == pytest.approx(proportion_wasserstein(b, a))
    assert proportion_wasserstein(a, a + 0.2) == pytest.approx(0.2)  # a pure shift
    assert proportion_wasserstein(a, b) > 0.1


def profile(counts: list[list[int]]) -> CellTypeProfile:
    array = np.asarray(counts, dtype=np.int64)
    return CellTypeProfile(("x", "y"), array, np.full(len(array), 0.01))


def test_compare_profiles_on_known_counts() -> None:
    real = profile([[3, 1], [2, 2], [0, 4], [0, 0]])  # one image without nuclei
    same = compare_profiles(real, real, model="m", mpp=0.5, iterations=50)
    assert all(e.value == 0.0 for e in same.wasserstein.values())
    assert same.num_empty == (1, 1) and same.num_images == (4, 4)
    assert same.mean_proportion_real == pytest.approx({"x": 1.25 / 3, "y": 1.75 / 3})
    shifted = profile([[4, 0], [4, 0], [2, 2]])
    result = compare_profiles(real, shifted, model="m", mpp=0.5, iterations=200, seed=1)
    # x proportions {0.75, 0.5, 0} vs {1, 1, 0.5}: sorted pairwise |diff| mean = 0.4167
    assert result.wasserstein["x"].value == pytest.approx(1.25 / 3)
    assert result.wasserstein["x"].ci_low <= result.wasserstein["x"].value
    assert result.nuclei_per_image_real.value == pytest.approx(3.0)
    assert result.density_wasserstein.value > 0
    json.dumps(result.to_dict(), allow_nan=False)
    with pytest.raises(CellTypeError, match="no nucleus was found"):
        compare_profiles(real, profile([[0, 0], [0, 0]]), model="m", mpp=0.5)
    with pytest.raises(CellTypeError, match="different type sets"):
        other = CellTypeProfile(("x", "z"), real.counts, real.image_area_mm2)
        compare_profiles(real, other, model="m", mpp=0.5)


# --------------------------------------------------------------------------------------
# Registry and bad input
# --------------------------------------------------------------------------------------


class CentreDot:
    """A stand-in model: one 'blob' nucleus at the image centre (tests the plug-in path)."""

    name = "centre-dot"
    cell_types = ("blob",)

    def __init__(self, mpp: float, label: str = "blob") -> None:
        self.mpp = mpp
        self.label = label

    def detect(self, image: np.ndarray) -> list[Nucleus]:
        centre = (image.shape[1] / 2, image.shape[2] / 2)
        return [Nucleus(self.label, centre, 30.0, 0.0, 1.0, 0.2)]


def test_models_plug_in_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    # a private copy of the registry, so the stand-in does not outlive this test
    monkeypatch.setattr(celltypes, "_MODELS", dict(celltypes._MODELS))
    register_cell_type_model("centre-dot", CentreDot)
    assert {"classical", "centre-dot"} <= set(cell_type_model_names())
    plugged = build_cell_type_model("Centre-Dot", mpp=0.25)
    result = profile_images([draw([]), draw([])], plugged)
    assert result.counts.tolist() == [[1], [1]]
    assert result.image_area_mm2 == pytest.approx(np.full(2, (128 * 0.25e-3) ** 2))
    with pytest.raises(CellTypeError, match="outside its cell_types"):
        profile_images([draw([])], build_cell_type_model("centre-dot", mpp=0.25, label="x"))
    with pytest.raises(CellTypeError, match="unknown cell-type model 'hovernet'"):
        build_cell_type_model("hovernet", mpp=0.5)
    with pytest.raises(CellTypeError, match="unknown classical cell-type option"):
        build_cell_type_model("classical", mpp=0.5, threshold=3)
    with pytest.raises(CellTypeError, match="positive"):
        ClassicalConfig(mpp=0.0)


def test_bad_images_raise(model: CellTypeModel) -> None:
    with pytest.raises(CellTypeError, match="no images"):
        profile_images([], model)
    with pytest.raises(CellTypeError, match=r"\(3, H, W\)"):
        profile_images([np.zeros((64, 64, 3), np.uint8)], model)
    with pytest.raises(CellTypeError, match="uint8"):
        profile_images([draw([]).astype(np.float32)], model)
    assert issubclass(CellTypeError, EvaluationError)


# --------------------------------------------------------------------------------------
# Real tiles
# --------------------------------------------------------------------------------------


def kather_class(name: str) -> list[np.ndarray]:
    folder = KATHER / name
    if not folder.is_dir():
        pytest.skip(f"Kather 2016 tiles not found at {folder} (shared data absent)")
    return [read_rgb(p).transpose(2, 0, 1) for p in sorted(folder.glob("*.png"))]


def test_lymphocyte_tiles_hold_more_lymphocyte_like_nuclei_than_adipose_tiles() -> None:
    model = build_cell_type_model("classical", mpp=KATHER_MPP)
    lympho = profile_images(kather_class("04_LYMPHO"), model)
    adipose = profile_images(kather_class("07_ADIPOSE"), model)
    k = model.cell_types.index(LYMPHOCYTE)
    lympho_count, adipose_count = lympho.counts[:, k].mean(), adipose.counts[:, k].mean()
    lympho_share, adipose_share = (
        lympho.proportions()[:, k].mean(),
        adipose.proportions()[:, k].mean(),
    )
    # measured: 51.9 vs 0.1 per tile, proportions 0.70 vs 0.09
    assert lympho_count > 10 * max(adipose_count, 1.0)
    assert lympho_share > 0.5 and adipose_share < 0.25
    assert (lympho.counts[:, k] > adipose.counts[:, k].max()).mean() >= 0.9  # tile by tile
    result = compare_profiles(adipose, lympho, model="classical", mpp=KATHER_MPP, iterations=50)
    assert result.wasserstein[LYMPHOCYTE].value > 0.4


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def write_set(folder: Path, radius: float, count: int) -> None:
    folder.mkdir(parents=True)
    for i in range(count):
        centres = [(20 + 40 * (j // 3), 20 + 40 * (j % 3)) for j in range(3 + i % 4)]
        image = draw(discs(centres, radius), seed=i).transpose(1, 2, 0)
        Image.fromarray(image).save(folder / f"tile{i}.png")


def test_cli_writes_metrics_and_report(tmp_path: Path) -> None:
    write_set(tmp_path / "real", 6.0, 4)  # lymphocyte-like discs
    write_set(tmp_path / "generated", 11.0, 4)  # large discs: epithelial-like
    out = tmp_path / "out"
    args = ["celltypes", str(tmp_path / "generated"), "--real", str(tmp_path / "real")]
    result = CliRunner().invoke(
        evaluate_app, [*args, "--mpp", "0.5", "--out", str(out), "--bootstrap", "30"]
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    section = metrics["sections"]["Cell-type fidelity"]["metrics"]
    assert section["wasserstein_lymphocyte_like"]["value"] == pytest.approx(1.0)
    assert section["wasserstein_epithelial_like"]["value"] == pytest.approx(1.0)
    assert section["num_real"] == section["num_generated"] == 4
    assert metrics["config"]["model"]["mpp"] == 0.5
    assert (out / "report.html").is_file() and (out / "celltype_proportions.png").is_file()

    empty = tmp_path / "empty"
    empty.mkdir()
    failed = CliRunner().invoke(
        evaluate_app,
        ["celltypes", str(empty), "--real", str(tmp_path / "real"), "--out", str(out)],
    )
    assert failed.exit_code == 2 and "no generated images" in failed.output
