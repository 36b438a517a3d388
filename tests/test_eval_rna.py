"""RNA/ST spot matching (`mupad.evaluation.spot_matching`, `mupad evaluate rna`): the matching
statistics on constructed distance matrices, the distance builders, the held-out pairs reader,
and the command end to end on a tiny RNA-conditioned model with bundled tiles as spot patches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from mupad.config import model_preset
from mupad.data.tiles import bundled_kather_dir
from mupad.evaluation.celltypes import CellTypeProfile
from mupad.evaluation.cli import evaluate_app
from mupad.evaluation.spot_matching import (
    cell_distances,
    feature_distances,
    nearest_expression_patches,
    read_spot_pairs,
    spot_matching,
)
from mupad.evaluation.stats import EvaluationError
from mupad.models import SiT

runner = CliRunner()
PATHWAYS = 6


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------ matching statistics


def test_a_generator_that_ignores_the_rna_scores_a_win_rate_of_exactly_one_half():
    # D[i, j] = c_j: every spot's patches are equally far from real patch j, whatever i is.
    c = np.random.default_rng(0).permutation(30).astype(float)
    result = spot_matching(np.tile(c, (30, 1)), iterations=5, permutation_draws=200)
    assert result.win_rate.value == pytest.approx(0.5, abs=1e-12)
    assert result.gap.value == pytest.approx(0.0, abs=1e-12)
    assert result.matched.value == pytest.approx(result.other.value)


def test_own_spot_nearest_everywhere_wins_every_comparison_and_beats_every_permutation():
    rng = np.random.default_rng(1)
    distances = rng.uniform(1.0, 2.0, size=(20, 20))
    np.fill_diagonal(distances, rng.uniform(0.0, 0.5, size=20))
    result = spot_matching(distances, top_k=(1, 5), iterations=5, permutation_draws=500)
    assert result.win_rate.value == 1.0
    assert result.top_k[1].value == 1.0 and result.top_k[5].value == 1.0
    assert result.permutation_p == pytest.approx(1 / 501)
    assert result.gap.value > 0.5 and result.gap.ci_low > 0
    metrics = result.metrics("features_")
    assert metrics["features_top5_chance"] == pytest.approx(5 / 20)
    assert metrics["features_win_rate_chance"] == 0.5


def test_noise_distances_give_chance_level_statistics_and_intervals_that_cover_it():
    results = [
        spot_matching(
            np.random.default_rng(seed).uniform(size=(60, 60)),
            top_k=(1,),
            iterations=200,
            permutation_draws=200,
            seed=seed,
        )
        for seed in range(20)
    ]
    wins = [r.win_rate for r in results]
    assert abs(np.mean([w.value for w in wins]) - 0.5) < 0.02
    assert sum(w.ci_low < 0.5 < w.ci_high for w in wins) >= 16  # ~95 % coverage
    assert np.mean([r.top_k[1].value for r in results]) < 0.05  # chance 1/60
    assert sum(r.permutation_p < 0.05 for r in results) <= 3  # ~5 % false positives


def test_ties_count_half_and_rank_pessimistically():
    distances = np.ones((4, 4))  # everything tied
    result = spot_matching(distances, top_k=(1, 4), iterations=3, permutation_draws=10)
    assert result.win_rate.value == 0.5
    assert result.top_k[1].value == 0.0 and result.top_k[4].value == 1.0


@pytest.mark.parametrize(
    ("matrix", "message"),
    [
        (np.ones((3, 4)), "square"),
        (np.ones((1, 1)), "at least 2 spots"),
        (np.array([[0.0, np.nan], [1.0, 0.0]]), "NaN"),
    ],
)
def test_bad_distance_matrices_are_refused(matrix, message):
    with pytest.raises(EvaluationError, match=message):
        spot_matching(matrix, iterations=3)


# ------------------------------------------------------------ distance builders


def test_feature_distances_average_each_spots_patches_and_are_cosine():
    real = np.array([[1.0, 0.0], [0.0, 1.0]])
    generated = np.array([[2.0, 0.0], [0.0, 3.0], [0.0, 1.0], [0.0, 5.0]])  # 2 spots x 2
    distances = feature_distances(generated, real, per_spot=2)
    assert distances == pytest.approx(np.array([[0.5, 0.5], [1.0, 0.0]]))
    with pytest.raises(EvaluationError, match="do not split"):
        feature_distances(generated[:3], real, per_spot=2)
    with pytest.raises(EvaluationError, match="all zeros"):
        feature_distances(np.zeros((2, 2)), real)


def test_cell_distances_pool_generated_nuclei_and_leave_out_empty_spots():
    types = ("a", "b")
    area = np.full(2, 0.01)
    real = CellTypeProfile(types, np.array([[3, 1], [0, 0]]), area)  # spot 1: no nuclei
    generated = CellTypeProfile(
        types, np.array([[1, 1], [1, 1], [2, 0], [0, 0]]), np.full(4, 0.01)
    )  # spot 0 pooled (2, 2); spot 1 pooled (2, 0)
    distances = cell_distances(generated, real, per_spot=2)
    assert distances.kept.tolist() == [0]
    assert distances.proportions == pytest.approx(np.array([[0.25]]))  # |0.5-0.75| (TV)
    density_g = np.log1p(np.array([4, 2]) / 0.02)
    density_r = np.log1p(np.array([4, 0]) / 0.01)
    assert distances.density == pytest.approx(np.abs(density_g[:, None] - density_r[None, :]))
    assert distances.generated_nuclei.tolist() == [2.0, 1.0]


# ------------------------------------------------------------ held-out pairs


def write_pairs(
    root: Path,
    count: int,
    seed: int = 0,
    tiles: list[Path] | None = None,
    scores=None,
    name: str = "pairs_val.csv",
) -> Path:
    """A paired-files CSV: bundled tiles as spot patches, random pathway scores."""
    tiles = tiles or sorted(bundled_kather_dir().rglob("*.png"))[::12][:count]
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(count, PATHWAYS)) if scores is None else scores
    table = pd.DataFrame(
        {
            "image": [str(p) for p in tiles],
            **{f"rna_{k:03d}": scores[:, k] for k in range(PATHWAYS)},
        }
    )
    path = root / name
    table.to_csv(path, index=False)
    return path


def write_reference_copies(root: Path, heldout: Path) -> Path:
    """Training pairs holding a pixel copy of every held-out patch (under another name) with
    scores near its spot's, shuffled, among as many unrelated spots with far-off scores."""
    pairs = pd.read_csv(heldout)
    scores = pairs[[c for c in pairs.columns if c.startswith("rna_")]].to_numpy()
    copies = root / "train_patches"
    copies.mkdir()
    tiles = []
    for i, source in enumerate(pairs["image"]):
        tiles.append(copies / f"copy{i}.png")
        tiles[-1].write_bytes(Path(source).read_bytes())
    unrelated = sorted(bundled_kather_dir().rglob("*.png"))[5::12][: len(tiles)]
    order = np.random.default_rng(3).permutation(2 * len(tiles))
    rng = np.random.default_rng(4)
    all_scores = np.concatenate(
        [scores + 0.01 * rng.normal(size=scores.shape), 50.0 + rng.normal(size=scores.shape)]
    )
    all_tiles = tiles + unrelated
    return write_pairs(
        root,
        len(order),
        tiles=[all_tiles[i] for i in order],
        scores=all_scores[order],
        name="pairs_train.csv",
    )


def test_pairs_reader_keeps_order_and_names_what_is_wrong(tmp_path):
    path = write_pairs(tmp_path, 5)
    pairs = read_spot_pairs(path, max_spots=3)
    assert len(pairs) == 3 and pairs.scores.shape == (3, PATHWAYS)
    assert list(pairs.scores.columns) == [f"rna_{k:03d}" for k in range(PATHWAYS)]
    assert pairs.images[0].is_file()

    table = pd.read_csv(path)
    table.drop(columns=[c for c in table.columns if c.startswith("rna_")]).to_csv(
        tmp_path / "no_rna.csv", index=False
    )
    with pytest.raises(EvaluationError, match="rna_"):
        read_spot_pairs(tmp_path / "no_rna.csv")
    table.assign(image="missing.png").iloc[:2].to_csv(tmp_path / "gone.csv", index=False)
    with pytest.raises(EvaluationError, match="lists a patch twice"):
        read_spot_pairs(tmp_path / "gone.csv")
    table.assign(image=[f"missing{i}.png" for i in range(5)]).to_csv(
        tmp_path / "gone2.csv", index=False
    )
    with pytest.raises(EvaluationError, match="do not exist"):
        read_spot_pairs(tmp_path / "gone2.csv")
    with pytest.raises(EvaluationError, match="does not exist"):
        read_spot_pairs(tmp_path / "absent.csv")


def test_nearest_expression_patches_pick_the_training_spot_with_the_closest_scores(tmp_path):
    heldout_csv = write_pairs(tmp_path, 5)
    heldout = read_spot_pairs(heldout_csv)
    reference = read_spot_pairs(write_reference_copies(tmp_path, heldout_csv))
    picked = nearest_expression_patches(heldout, reference)
    assert [p.name for p in picked] == [f"copy{i}.png" for i in range(5)]

    with pytest.raises(EvaluationError, match="disjoint"):
        nearest_expression_patches(heldout, heldout)
    renamed = read_spot_pairs(heldout_csv)
    renamed.scores.columns = [f"rna_other{k}" for k in range(PATHWAYS)]
    with pytest.raises(EvaluationError, match="share no rna_"):
        nearest_expression_patches(heldout, renamed)


# ------------------------------------------------------------ the command


def tiny_model(**streams) -> SiT:
    torch.manual_seed(0)
    model = SiT(model_preset("tiny", in_channels=3, sample_size=16, **streams))
    with torch.no_grad():  # "trained-looking": the zero-initialised gates open
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


def evaluate(checkpoint: Path, pairs: Path, out: Path, *extra):
    args = [
        "rna", "--checkpoint", checkpoint, "--pairs", pairs, "--out", out, "--features",
        "colour", "--per-spot", 2, "--steps", 2, "--sampler", "euler", "--bootstrap", 5,
        "--permutations", 50, "--mpp", 2.0, "--cache-dir", out.parent / "cache",
        "--device", "cpu", "--no-progress", *extra,
    ]  # fmt: skip
    return runner.invoke(evaluate_app, [str(a) for a in args])


def test_command_writes_matching_metrics_figures_and_reuses_its_samples(tmp_path):
    model_dir = tiny_model(rna_dim=16, rna_pathways=PATHWAYS).save_pretrained(tmp_path / "sit")
    pairs = write_pairs(tmp_path, 6)
    out = tmp_path / "eval"
    result = evaluate(model_dir, pairs, out)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    flat = {k: v for s in metrics["sections"].values() for k, v in s["metrics"].items()}
    win = flat["features_win_rate"]
    assert 0.0 <= win["value"] <= 1.0 and win["ci_low"] <= win["value"] <= win["ci_high"]
    assert flat["features_num_spots"] == 6 and flat["features_top1_chance"] == pytest.approx(1 / 6)
    assert "density_win_rate" in flat
    for name in ("report.html", "pairs.png", "distances.png", "generated/spot_scores.csv"):
        assert (out / name).is_file(), name
    pngs = sorted((out / "generated").rglob("*.png"))
    assert len(pngs) == 12  # 6 spots x 2
    sidecar = json.loads(pngs[0].with_suffix(".json").read_text())
    assert sidecar["inputs"]["rna"]["pathways_scored"] == PATHWAYS
    assert set(sidecar["inputs"]) == {"rna"}  # the RNA condition alone

    before = {p: p.stat().st_mtime_ns for p in pngs}
    again = evaluate(model_dir, pairs, tmp_path / "eval", "--no-cells")
    assert again.exit_code == 0, again.output
    assert {p: p.stat().st_mtime_ns for p in pngs} == before  # same request: reused
    summary = json.loads(again.stdout.strip().splitlines()[-1])
    assert summary["features"]["win_rate"]["value"] == win["value"]  # same samples, same score


def test_command_scores_the_nearest_expression_reference_arm(tmp_path):
    model_dir = tiny_model(rna_dim=16, rna_pathways=PATHWAYS).save_pretrained(tmp_path / "sit")
    pairs = write_pairs(tmp_path, 6)
    reference = write_reference_copies(tmp_path, pairs)
    result = evaluate(model_dir, pairs, tmp_path / "eval", "--reference-pairs", reference)
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    flat = {k: v for s in metrics["sections"].values() for k, v in s["metrics"].items()}
    # The reference retrieves a pixel copy of each spot's own patch: distance 0, every win.
    assert flat["nearest_expression_features_matched_distance"]["value"] == pytest.approx(0.0)
    assert flat["nearest_expression_features_win_rate"]["value"] == 1.0
    assert flat["nearest_expression_density_win_rate"]["value"] >= 0.5
    assert "features_win_rate" in flat  # the generator's arm is still there, unprefixed
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["nearest_expression"]["features"]["top1_retrieval"]["value"] == 1.0


def test_command_refuses_a_model_without_an_rna_stream(tmp_path):
    model_dir = tiny_model(text_dim=384).save_pretrained(tmp_path / "sit")
    result = evaluate(model_dir, write_pairs(tmp_path, 3), tmp_path / "eval")
    assert result.exit_code != 0
    assert "has no RNA stream" in " ".join(result.output.split())
