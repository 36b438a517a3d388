"""`mupad study quality` at a toy budget on real Kather tiles: every arm is trained to its
calibrated step count, scored, the best one swept over guidance, and a rerun resumes."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from mupad.cli import app
from mupad.data.tiles import bundled_kather_dir
from mupad.experiments.quality import (
    GUIDANCE,
    StudyError,
    StudySettings,
    resolve_arms,
    run_quality_study,
)

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = StudySettings(budget_s=0.01, per_class=2, sample_steps=2, bootstrap=5, features="colour")


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """Two training and one held-out tile per class, copied from the bundled tiles."""
    root = tmp_path_factory.mktemp("kather")
    for folder in sorted(p for p in bundled_kather_dir().iterdir() if p.is_dir()):
        tiles = sorted(folder.glob("*.png"))
        for name, chosen in (("train", tiles[:2]), ("heldout", tiles[2:3])):
            (root / name / folder.name).mkdir(parents=True)
            for tile in chosen:
                shutil.copy(tile, root / name / folder.name / tile.name)
    return root / "train", root / "heldout"


@pytest.fixture(scope="module")
def study(split, tmp_path_factory):
    train, heldout = split
    out = tmp_path_factory.mktemp("study") / "out"
    arms = resolve_arms(["p8", "p8_x_refine"])
    records = run_quality_study(out, arms, heldout, data=train, settings=SETTINGS)
    return out, records


def test_every_arm_is_trained_scored_and_the_best_swept_over_guidance(study):
    out, records = study
    for name in ("p8", "p8_x_refine"):
        entry = records["arms"][name]
        assert entry["steps"] == SETTINGS.calibration_steps  # the budget is below one window
        scores = entry["scores"]
        assert scores["border_ratio"] > 0 and 0 <= scores["class_accuracy"]["value"] <= 1
        assert len(scores["colour"]["mean"]) == 3 and scores["nearest_train_median"] >= 0
        assert len(list((out / "samples" / name).glob("*/*.png"))) == 8 * SETTINGS.per_class
        assert (out / f"grid_{name}.png").is_file()
    best = min(records["arms"], key=lambda n: records["arms"][n]["scores"]["kid"]["value"])
    assert records["guidance"]["arm"] == best
    assert set(records["guidance"]["scores"]) == set(GUIDANCE)
    table = (out / "study.md").read_text()
    assert "| p8 |" in table and "| p8_x_refine |" in table and "Guidance on" in table
    assert (out / "study.png").is_file()
    assert 0.8 < records["real"]["border_ratio_heldout_p8"] < 1.2


def test_a_rerun_resumes_without_retraining_and_other_settings_are_refused(study, split):
    out, records = study
    train, heldout = split
    checkpoint = next((out / "arms" / "p8" / "checkpoints").iterdir())
    before = checkpoint.stat().st_mtime_ns
    again = run_quality_study(out, resolve_arms(["p8"]), heldout, data=train, settings=SETTINGS)
    assert again["arms"]["p8"]["scores"] == records["arms"]["p8"]["scores"]
    assert checkpoint.stat().st_mtime_ns == before
    other = StudySettings(budget_s=5, per_class=2, sample_steps=2, bootstrap=5, features="colour")
    with pytest.raises(StudyError, match="other settings"):
        run_quality_study(out, resolve_arms(["p8"]), heldout, data=train, settings=other)


def test_unknown_arms_and_bad_settings_are_one_line_errors(tmp_path, split):
    with pytest.raises(StudyError, match="p8_refine"):
        resolve_arms(["p16"])
    with pytest.raises(StudyError, match="guidance"):
        StudySettings(guidance="huge")
    result = CliRunner().invoke(
        app, ["study", "quality", "--heldout", str(split[1]), "--out", str(tmp_path / "s"),
              "--arms", "p8,nope"],
    )  # fmt: skip
    assert result.exit_code == 2 and "nope" in result.output
    assert json.dumps(result.output).count("\\n") <= 2  # one line (plus a trailing newline)
