"""mIF marker correlation (mupad.evaluation.pcc) and `mupad evaluate mif`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from typer.testing import CliRunner

from mupad.applications.he2mif import mean_patch_pcc, patch_pcc, write_mif_tiff
from mupad.evaluation.cli import evaluate_app
from mupad.evaluation.mif_cli import slide_ids
from mupad.evaluation.pcc import (
    PCCError,
    marker_correlation,
    paired_permutation_test,
    patch_correlations,
    per_patch_scores,
    slide_correlations,
)
from mupad.evaluation.stats import EvaluationError

MARKERS = ["CD3", "CD8", "PanCK"]


def random_maps(n: int = 5, m: int = 3, size: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, m, size, size))


# --------------------------------------------------------------------------------------
# Patch level
# --------------------------------------------------------------------------------------


def test_patch_pcc_equals_numpy_corrcoef() -> None:
    real = random_maps(seed=1)
    predicted = real + 0.8 * random_maps(seed=2)  # correlated, not perfectly
    correlations = patch_correlations(predicted, real, MARKERS)
    assert correlations.defined.all()
    for n in range(real.shape[0]):
        for m in range(real.shape[1]):
            expected = np.corrcoef(predicted[n, m].ravel(), real[n, m].ravel())[0, 1]
            assert correlations.values[n, m] == pytest.approx(expected, abs=1e-12)
    assert 0.3 < correlations.values.mean() < 0.95


def test_patch_pcc_is_invariant_to_affine_changes_and_one_for_perfect_prediction() -> None:
    real = random_maps(seed=3)
    predicted = real + random_maps(seed=4)
    base = patch_correlations(predicted, real).values
    scaled = patch_correlations(3.7 * predicted + 11.0, real).values
    np.testing.assert_allclose(scaled, base, atol=1e-12)
    perfect = patch_correlations(real, real)
    np.testing.assert_allclose(perfect.values, 1.0, atol=1e-12)
    np.testing.assert_allclose(patch_correlations(-real, real).values, -1.0, atol=1e-12)


def test_constant_maps_are_undefined_counted_and_left_out_of_means() -> None:
    real = random_maps(n=4, m=2, seed=5)
    predicted = real.copy()
    predicted[0, 1] = 0.25  # a flat prediction
    predicted[2, 1] = 0.0
    real[:, 0] = 0.5  # marker 0 absent from every true patch
    correlations = patch_correlations(predicted, real, ["a", "b"])
    assert not correlations.defined[:, 0].any()
    assert correlations.defined[:, 1].tolist() == [False, True, False, True]
    assert np.all(correlations.values[~correlations.defined] == 0.0)  # never NaN
    assert correlations.num_undefined() == {"a": 4, "b": 2}
    assert correlations.marker_means() == {"a": None, "b": pytest.approx(1.0)}
    report = marker_correlation(predicted, real, ["a", "b"], iterations=20)
    assert report.patch["a"] is None and report.patch_undefined == {"a": 4, "b": 2}
    assert report.patch_mean.value == pytest.approx(1.0)  # only marker b enters
    json.dumps(report.to_dict(), allow_nan=False)  # undefined entries are null, not NaN
    # he2mif keeps its public behaviour (NaN for an undefined entry) on top of this module
    predicted_t, real_t = torch.from_numpy(predicted), torch.from_numpy(real)
    legacy = patch_pcc(predicted_t, real_t)
    assert torch.isnan(legacy[0, 1]) and float(legacy[1, 1]) == pytest.approx(1.0)
    assert mean_patch_pcc(predicted_t, real_t, ["a", "b"])["num_undefined"] == {"a": 4, "b": 2}


def test_bootstrap_intervals_bracket_the_value_and_are_seeded() -> None:
    real = random_maps(n=30, seed=6)
    predicted = real + random_maps(n=30, seed=7)
    first = marker_correlation(predicted, real, MARKERS, iterations=200, seed=3)
    again = marker_correlation(predicted, real, MARKERS, iterations=200, seed=3)
    assert first.to_dict() == again.to_dict()
    for estimate in [*first.patch.values(), first.patch_mean]:
        assert estimate.ci_low <= estimate.value <= estimate.ci_high
        assert estimate.ci_high - estimate.ci_low > 0
    expected = np.mean([first.patch[m].value for m in MARKERS])
    assert first.patch_mean.value == pytest.approx(expected)


def test_a_rarely_defined_marker_does_not_break_the_intervals() -> None:
    real = random_maps(n=30, m=2, seed=10)
    predicted = real + random_maps(n=30, m=2, seed=11)
    real[1:, 1] = 0.0  # marker 1 is present in one patch only
    report = marker_correlation(predicted, real, ["a", "b"], iterations=300, seed=0)
    assert report.patch_undefined == {"a": 0, "b": 29}
    assert report.patch["b"].n == (1,) and "no interval" in report.patch["b"].method
    overall = report.patch_mean
    assert overall.value == pytest.approx((report.patch["a"].value + report.patch["b"].value) / 2)
    assert overall.ci_low < overall.value < overall.ci_high


# --------------------------------------------------------------------------------------
# Slide level
# --------------------------------------------------------------------------------------


def maps_with_means(means: list[float], seed: int) -> np.ndarray:
    """(N, 1, 4, 4) maps with exactly the given per-patch means (non-constant inside)."""
    pattern = np.random.default_rng(seed).random((4, 4))
    pattern -= pattern.mean()
    return np.stack([[mean + 0.1 * pattern] for mean in means])


def test_slide_level_correlates_patch_means_within_each_slide() -> None:
    real = maps_with_means([1, 2, 3, 4, 1, 2, 3, 4, 5, 6], seed=0)
    predicted = maps_with_means([2, 4, 6, 8, 4, 3, 2, 1, 0, 0], seed=1)
    slides = ["s1"] * 4 + ["s2"] * 4 + ["s3"] * 2  # s3 has too few patches
    result = slide_correlations(predicted, real, slides, ["CD3"])
    assert result.slide_ids == ("s1", "s2") and result.too_small == ("s3",)
    np.testing.assert_allclose(result.correlations.values[:, 0], [1.0, -1.0], atol=1e-12)
    report = marker_correlation(predicted, real, ["CD3"], slides, iterations=20)
    assert report.slide["CD3"].value == pytest.approx(0.0, abs=1e-12)  # mean over slides
    assert report.slide["CD3"].n == (2,) and report.slides_too_small == ("s3",)

    # one slide (no ids): the correlation of all the per-patch means
    pooled = slide_correlations(predicted, real, None, ["CD3"]).correlations.values[0, 0]
    expected = np.corrcoef(predicted.mean(axis=(1, 2, 3)), real.mean(axis=(1, 2, 3)))[0, 1]
    assert pooled == pytest.approx(expected)


def test_slide_level_flags_constant_means_and_small_sets() -> None:
    real = maps_with_means([1, 2, 3], seed=2)
    flat = maps_with_means([5, 5, 5], seed=3)  # the prediction's means do not vary
    result = slide_correlations(flat, real)
    assert not result.correlations.defined.any()
    assert result.correlations.num_undefined() == {"marker_0": 1}
    report = marker_correlation(real[:2], real[:2], ["CD3"], iterations=20)
    assert report.slide_mean is None and report.slides_too_small == ("all",)
    with pytest.raises(PCCError, match="no slide has 3 or more"):
        slide_correlations(real[:2], real[:2])


def test_slide_ids_from_a_pattern() -> None:
    stems = ["caseA_x0_y0", "caseA_x1_y0", "caseB_x0_y0"]
    assert slide_ids(stems, r"^(.+)_x\d+_y\d+$") == ["caseA", "caseA", "caseB"]
    assert slide_ids(stems, None) is None
    with pytest.raises(EvaluationError, match="does not match"):
        slide_ids(stems + ["odd"], r"^(.+)_x\d+")
    with pytest.raises(EvaluationError, match="needs a group"):
        slide_ids(stems, r"case")


# --------------------------------------------------------------------------------------
# Paired permutation test
# --------------------------------------------------------------------------------------


def test_permutation_test_exact_enumeration_matches_hand_computation() -> None:
    # d = (1, 2, 3): |sum| of +-1 +-2 +-3 reaches 6 only for all + and all -: p = 2/8
    result = paired_permutation_test([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    assert (result.p_value, result.n, result.num_permutations, result.exact) == (0.25, 3, 8, True)
    assert result.mean_difference == pytest.approx(2.0)
    # d = (1, -1, 2): sums 2, -2, 4, 0, 0, -4, 2, -2 -> |sum| >= 2 in 6 of 8 patterns
    assert paired_permutation_test([1.0, -1.0, 2.0], [0.0, 0.0, 0.0]).p_value == 0.75


def test_permutation_test_is_two_sided_and_null_for_identical_methods() -> None:
    rng = np.random.default_rng(0)
    a = rng.random(40)
    same = paired_permutation_test(a, a.copy(), seed=1)
    assert same.p_value == 1.0 and same.mean_difference == 0.0
    b = a - 0.2 + 0.05 * rng.standard_normal(40)  # a is clearly better
    better = paired_permutation_test(a, b, num_permutations=5000, seed=1)
    worse = paired_permutation_test(b, a, num_permutations=5000, seed=1)
    assert better.p_value == worse.p_value == pytest.approx(1 / 5001)  # the +1 floor
    assert better.mean_difference > 0 and worse.mean_difference == -better.mean_difference
    assert not better.exact
    close = a - 0.01 + 0.1 * rng.standard_normal(40)  # a small effect: p in the middle
    forward = paired_permutation_test(a, close, num_permutations=2000, seed=2)
    backward = paired_permutation_test(close, a, num_permutations=2000, seed=2)
    assert 0.01 < forward.p_value < 1.0 and forward.p_value == backward.p_value


def test_permutation_test_is_seeded_and_monte_carlo_agrees_with_exact() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.random(10), rng.random(10)
    exact = paired_permutation_test(a, b, num_permutations=1024)
    assert exact.exact and exact.num_permutations == 1024
    sampled = paired_permutation_test(a, b, num_permutations=1000, seed=7)
    assert not sampled.exact
    assert sampled == paired_permutation_test(a, b, num_permutations=1000, seed=7)
    assert sampled.p_value == pytest.approx(exact.p_value, abs=0.05)


def test_per_patch_scores_use_markers_defined_for_both_methods() -> None:
    real = random_maps(n=3, m=2, seed=8)
    ours, theirs = real.copy(), real + random_maps(n=3, m=2, seed=9)
    theirs[0, 1] = 1.0  # undefined for them in patch 0, marker 1
    theirs[1] = 0.0  # undefined for both markers in patch 1: dropped
    a, b = per_patch_scores(patch_correlations(ours, real), patch_correlations(theirs, real))
    assert a.shape == b.shape == (2,)
    np.testing.assert_allclose(a, 1.0)
    expected_0 = np.corrcoef(theirs[0, 0].ravel(), real[0, 0].ravel())[0, 1]
    assert b[0] == pytest.approx(expected_0)


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------


def test_bad_inputs_raise_evaluation_errors() -> None:
    maps = random_maps()
    with pytest.raises(PCCError, match=r"\(N, M, H, W\)"):
        patch_correlations(maps[0], maps[0])
    with pytest.raises(PCCError, match="same"):
        patch_correlations(maps, maps[:, :2])
    with pytest.raises(PCCError, match="3 marker channels but 2 marker names"):
        patch_correlations(maps, maps, ["a", "b"])
    with pytest.raises(PCCError, match="unique"):
        patch_correlations(maps, maps, ["a", "a", "b"])
    bad = maps.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(PCCError, match="NaN"):
        patch_correlations(bad, maps)
    with pytest.raises(PCCError, match="no patches"):
        patch_correlations(maps[:0], maps[:0])
    with pytest.raises(PCCError, match="slide ids"):
        slide_correlations(maps, maps, ["s"] * 4)
    with pytest.raises(PCCError, match="equal length"):
        paired_permutation_test([1.0, 2.0], [1.0])
    with pytest.raises(PCCError, match="NaN"):
        paired_permutation_test([1.0, np.nan], [1.0, 2.0])
    with pytest.raises(PCCError, match="no paired scores"):
        paired_permutation_test([], [])
    assert issubclass(PCCError, EvaluationError)


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def write_folders(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Real uint16 stacks in the `mif train --data` layout; a good and a noisy method."""
    rng = np.random.default_rng(0)
    real_root, good, noisy = tmp_path / "data", tmp_path / "good", tmp_path / "noisy"
    (real_root / "mif").mkdir(parents=True)
    for slide in ("A", "B"):
        for i in range(4):
            stem = f"{slide}_x{i}"
            unit = rng.random((3, 16, 16)).astype(np.float32)  # (K, H, W) in [0, 1]
            tifffile.imwrite(
                real_root / "mif" / f"{stem}.tif",
                (unit * 60000).astype(np.uint16),
                photometric="minisblack",
            )
            write_mif_tiff(good / f"{stem}.tif", 0.9 * unit + 0.05, MARKERS)
            noise = np.clip(unit + 0.6 * rng.standard_normal(unit.shape), 0, 1)
            write_mif_tiff(noisy / f"{stem}.tif", noise.astype(np.float32), MARKERS)
            sidecar = {"markers": MARKERS, "intensity_scales": [65535.0] * 3}
            (good / f"{stem}.json").write_text(json.dumps(sidecar))
    return real_root, good, noisy


def test_cli_writes_metrics_report_and_figure(tmp_path: Path) -> None:
    real_root, good, noisy = write_folders(tmp_path)
    out = tmp_path / "out"
    args = ["mif", str(good), str(real_root), "--markers", ",".join(MARKERS), "--out", str(out)]
    result = CliRunner().invoke(
        evaluate_app,
        [*args, "--compare", str(noisy), "--slide-pattern", r"^(\w)_x", "--bootstrap", "50"],
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert (out / "report.html").is_file() and (out / "pcc_per_marker.png").is_file()
    patch = metrics["sections"]["Patch-level PCC"]["metrics"]
    assert patch["mean_over_markers"]["value"] > 0.99  # uint8-free: 60000/65535 scaling only
    slide = metrics["sections"]["Slide-level PCC"]["metrics"]
    assert slide["num_slides"] == 2 and slide["pcc_CD3"]["value"] > 0.99
    test = metrics["sections"]["Paired permutation test"]["metrics"]
    assert test["num_pairs"] == 8 and test["p_value"] < 0.01 and test["mean_difference"] > 0
    assert metrics["config"]["markers"] == MARKERS
    assert "mIF marker correlation" in (out / "report.html").read_text()


def test_cli_rejects_bad_folders(tmp_path: Path) -> None:
    real_root, good, _ = write_folders(tmp_path)
    app, runner = evaluate_app, CliRunner()
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(
        app, ["mif", str(empty), str(real_root), "--markers", "CD3", "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2 and "no mIF stacks" in result.output
    result = runner.invoke(
        app,
        ["mif", str(good), str(real_root), "--markers", "CD3,CD8", "--out", str(tmp_path / "o")],
    )
    assert result.exit_code == 2 and "--markers" in result.output  # sidecars name 3 markers
