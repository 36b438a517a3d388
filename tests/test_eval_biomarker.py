"""Biomarker AUC from virtual IHC (mupad.evaluation.biomarker) and `mupad evaluate biomarker`."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.color import rgb2hed
from typer.testing import CliRunner

from mupad.evaluation.biomarker import (
    BiomarkerError,
    Label,
    biomarker_auc,
    dab_positive_fraction,
    match_labels,
    parse_label,
    read_labels,
    roc_auc,
    roc_curve,
    youden_point,
)
from mupad.evaluation.cli import evaluate_app
from mupad.evaluation.images import read_rgb
from mupad.evaluation.stains import Stain, stain_density, stain_range, tissue_mask
from mupad.evaluation.stats import EvaluationError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SKIMAGE_IHC = SHARED / "package_samples" / "skimage_ihc.png"
CIMA = SHARED / "cima_anhir_mouse_lung_serial_he_ihc" / "images"

DAB_BROWN = (150, 95, 45)
HEMATOXYLIN_BLUE = (110, 120, 190)
BACKGROUND = (245, 245, 245)


def brute_force_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    positives, negatives = scores[labels == 1], scores[labels == 0]
    wins = [
        1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(positives, negatives)
    ]
    return float(np.mean(wins))


# --------------------------------------------------------------------------------------
# Stains
# --------------------------------------------------------------------------------------


def test_stain_densities_equal_rgb2hed_and_stay_in_their_range() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(1, 256, (2, 3, 16, 16), dtype=np.uint8)
    for stain in Stain:
        ours = stain_density(image, stain)
        reference = np.stack([rgb2hed(x.transpose(1, 2, 0))[..., stain.value] for x in image])
        np.testing.assert_allclose(ours, reference, atol=1e-12)
    extremes = np.zeros((1, 3, 2, 4), np.uint8)  # black pixels count as 1 of 255
    extremes[0, :, 1] = 255
    for stain in Stain:
        assert 0.0 <= stain_density(extremes, stain).max() <= stain_range(stain)
    assert tissue_mask(extremes)[0].tolist() == [[True] * 4, [False] * 4]


# --------------------------------------------------------------------------------------
# AUC
# --------------------------------------------------------------------------------------


def test_auc_matches_brute_force_pairs_with_ties() -> None:
    rng = np.random.default_rng(1)
    for trial in range(5):
        scores = rng.integers(0, 6, 40).astype(float)  # many ties
        labels = (rng.random(40) < 0.4).astype(int)
        labels[:2] = [0, 1]
        assert roc_auc(scores, labels) == pytest.approx(brute_force_auc(scores, labels))


def test_auc_extremes_and_chance() -> None:
    labels = np.array([0] * 5 + [1] * 5)
    scores = np.arange(10.0)
    assert roc_auc(scores, labels) == 1.0
    assert roc_auc(-scores, labels) == 0.0
    assert roc_auc(np.ones(10), labels) == 0.5  # all tied
    rng = np.random.default_rng(2)
    random_labels = rng.integers(0, 2, 2000)
    assert roc_auc(rng.random(2000), random_labels) == pytest.approx(0.5, abs=0.04)


def test_roc_curve_and_youden_threshold() -> None:
    scores = np.array([0.1, 0.2, 0.3, 0.35, 0.6, 0.8])
    labels = np.array([0, 0, 1, 0, 1, 1])
    curve = roc_curve(scores, labels)
    assert curve.false_positive_rate[0] == curve.true_positive_rate[0] == 0.0
    assert curve.false_positive_rate[-1] == curve.true_positive_rate[-1] == 1.0
    # trapezoid area of the curve equals the rank AUC
    area = np.trapezoid(curve.true_positive_rate, curve.false_positive_rate)
    assert area == pytest.approx(roc_auc(scores, labels))
    best = youden_point(curve)  # >= 0.3: sensitivity 1, specificity 2/3
    assert (best.threshold, best.sensitivity) == (0.3, 1.0)
    assert best.specificity == pytest.approx(2 / 3)


def test_equivocal_cases_are_excluded_on_request_and_counted() -> None:
    her2 = ["0", "1+", "2+", "3+", "3+", "2+", "0", "3+"]
    labels = [parse_label(s) for s in her2]
    scores = np.array([0.01, 0.05, 0.2, 0.4, 0.5, 0.3, 0.02, 0.1])
    result = biomarker_auc(scores, labels, exclude_equivocal=True, iterations=200)
    assert result.num_excluded_equivocal == 2
    assert (result.num_positive, result.num_negative) == (3, 3)
    assert result.auc.n == (3, 3) and result.auc.value == 1.0
    assert result.auc.ci_low <= result.auc.value <= result.auc.ci_high
    json.dumps(result.to_dict(), allow_nan=False)
    with pytest.raises(BiomarkerError, match="2 case.*equivocal.*--exclude-equivocal"):
        biomarker_auc(scores, labels)
    assert [parse_label(w) for w in ("Positive", "neg", "EQUIVOCAL", "1")] == [
        Label.POSITIVE, Label.NEGATIVE, Label.EQUIVOCAL, Label.POSITIVE,
    ]  # fmt: skip


def test_auc_is_undefined_with_one_class_and_other_bad_input() -> None:
    with pytest.raises(BiomarkerError, match="both classes.*0 negative"):
        roc_auc([0.1, 0.2], [1, 1])
    with pytest.raises(BiomarkerError, match="both classes"):
        biomarker_auc([0.1, 0.2, 0.3], ["negative", "negative", "2+"], exclude_equivocal=True)
    with pytest.raises(BiomarkerError, match="equally long"):
        roc_auc([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(BiomarkerError, match="binary"):
        roc_auc([0.1, 0.2, 0.3], [0, 1, 2])
    with pytest.raises(BiomarkerError, match="NaN"):
        roc_auc([0.1, np.nan], [0, 1])
    with pytest.raises(BiomarkerError, match="unknown label 'maybe'"):
        parse_label("maybe")
    with pytest.raises(BiomarkerError, match="have no label.*b"):
        match_labels(["a", "b"], {"a": Label.POSITIVE})
    assert issubclass(BiomarkerError, EvaluationError)


def test_read_labels(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text("image,label,site\ncase1.png,positive,x\ncase2,3+,y\ncase3.tif,2+,z\n")
    assert read_labels(path) == {
        "case1": Label.POSITIVE, "case2": Label.POSITIVE, "case3": Label.EQUIVOCAL,
    }  # fmt: skip
    path.write_text("name,class\na,positive\n")
    with pytest.raises(BiomarkerError, match="columns 'image' and 'label'"):
        read_labels(path)
    path.write_text("image,label\na,positive\na.png,negative\n")
    with pytest.raises(BiomarkerError, match="labelled twice"):
        read_labels(path)
    path.write_text("image,label\na,weird\n")
    with pytest.raises(BiomarkerError, match=r"labels.csv:2: unknown label"):
        read_labels(path)
    with pytest.raises(BiomarkerError, match="does not exist"):
        read_labels(tmp_path / "missing.csv")


# --------------------------------------------------------------------------------------
# DAB fraction
# --------------------------------------------------------------------------------------


def stained(share_brown: float, size: int = 64, seed: int = 0) -> np.ndarray:
    """uint8 (3, size, size): left half tissue (blue counterstain with `share_brown` of its
    rows DAB brown), right half background; mild noise."""
    image = np.empty((size, size, 3))
    image[:] = BACKGROUND
    image[:, : size // 2] = HEMATOXYLIN_BLUE
    image[: round(share_brown * size), : size // 2] = DAB_BROWN
    image += np.random.default_rng(seed).normal(0.0, 2.0, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8).transpose(2, 0, 1)


def test_dab_fraction_counts_brown_tissue_pixels_only() -> None:
    fractions = dab_positive_fraction(np.stack([stained(0.0), stained(0.25), stained(1.0)]))
    np.testing.assert_allclose(fractions, [0.0, 0.25, 1.0], atol=0.01)  # of tissue, not image
    with pytest.raises(BiomarkerError, match=r"image\(s\) \[0\] hold no tissue"):
        dab_positive_fraction(np.full((1, 3, 8, 8), 250, np.uint8))
    with pytest.raises(BiomarkerError, match="uint8"):
        dab_positive_fraction(stained(0.5).astype(np.float32))


def test_dab_fraction_of_real_ihc_exceeds_mostly_counterstained_sections() -> None:
    if not SKIMAGE_IHC.is_file() or not CIMA.is_dir():
        pytest.skip(f"real IHC images not found under {SHARED} (shared data absent)")
    strong = dab_positive_fraction(read_rgb(SKIMAGE_IHC).transpose(2, 0, 1))[0]
    # CIMA Cc10 / proSPC serial sections: hematoxylin counterstain, sparse brown (measured
    # 0.000 and 0.0002; the IHC image of scikit-image: 0.61)
    weak = [
        dab_positive_fraction(read_rgb(next(CIMA.glob(f"*{stain}*"))).transpose(2, 0, 1))[0]
        for stain in ("Cc10", "proSPC")
    ]
    assert strong > 0.4 and max(weak) < 0.01


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def test_cli_writes_metrics_roc_and_report(tmp_path: Path) -> None:
    folder = tmp_path / "ihc"
    folder.mkdir()
    cases = {"p1": 0.6, "p2": 0.4, "p3": 0.3, "n1": 0.05, "n2": 0.0, "n3": 0.35, "e1": 0.9}
    for stem, share in cases.items():
        Image.fromarray(stained(share).transpose(1, 2, 0)).save(folder / f"{stem}.png")
    labels = tmp_path / "labels.csv"
    rows = [f"{s}.png,{'positive' if s[0] == 'p' else 'negative'}" for s in cases if s[0] != "e"]
    labels.write_text("image,label\n" + "\n".join([*rows, "e1.png,2+"]) + "\n")
    out = tmp_path / "out"
    args = ["biomarker", str(folder), "--labels", str(labels), "--out", str(out)]
    result = CliRunner().invoke(evaluate_app, [*args, "--exclude-equivocal", "--bootstrap", "50"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())["sections"]["Biomarker AUC"]
    # positives 0.6, 0.4, 0.3 vs negatives 0.05, 0, 0.35: 8 of 9 pairs ranked right
    assert metrics["metrics"]["auc"]["value"] == pytest.approx(8 / 9)
    assert metrics["metrics"]["num_excluded_equivocal"] == 1
    assert len(metrics["table"]) == 7
    assert (out / "report.html").is_file() and (out / "roc.png").is_file()

    failed = CliRunner().invoke(evaluate_app, args)  # equivocal present, not excluded
    assert failed.exit_code == 2 and "equivocal" in failed.output
    labels.write_text("image,label\np1,positive\n")
    failed = CliRunner().invoke(evaluate_app, args)
    assert failed.exit_code == 2 and "have no label" in failed.output
    empty = tmp_path / "empty"
    empty.mkdir()
    failed = CliRunner().invoke(evaluate_app, ["biomarker", str(empty), *args[2:]])
    assert failed.exit_code == 2 and "no IHC images" in failed.output
