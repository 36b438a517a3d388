"""`mupad evaluate generator`: FID/KID with reference points and class-conditioning accuracy of
a tiny text-conditioned pixel-space run, per checkpoint, on the bundled Kather 2016 tiles
split into training and held-out folders (weight-free colour features, few sampler steps)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mupad.config import model_preset
from mupad.data.tiles import bundled_kather_dir
from mupad.evaluation.cli import evaluate_app
from mupad.evaluation.generator_fidelity import fit_class_classifier, select_checkpoints
from mupad.evaluation.stats import EvaluationError
from mupad.models import SiT
from mupad.training.captioned_tiles import default_caption
from mupad.training.checkpoint import CheckpointContents, save_checkpoint

runner = CliRunner()
CLASSES = sorted(p.name for p in bundled_kather_dir().iterdir() if p.is_dir())
TRAIN_PER_CLASS = 8  # of the 12 bundled tiles per class; the other 4 are held out


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed: int, **streams) -> SiT:
    torch.manual_seed(seed)
    model = SiT(model_preset("tiny", in_channels=3, sample_size=16, **streams))
    with torch.no_grad():  # "trained-looking": the zero-initialised gates open
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A text-conditioned run with checkpoints at steps 1 and 2 (EMA weights differ from the
    raw ones) and the captions a tile run records."""
    run = tmp_path_factory.mktemp("run") / "run"
    metadata = {
        "latents": "identity",
        "text_encoder": "minilm",
        "class_names": CLASSES,
        "captions": [default_caption(c) for c in CLASSES],
    }
    for step in (1, 2):
        raw, ema = tiny_model(step, text_dim=384), tiny_model(10 + step, text_dim=384)
        contents = CheckpointContents(
            step=step, model=raw.state_dict(), ema=ema.state_dict(),
            optimizer={"state": {}, "param_groups": []}, modules={}, rng={},
            state={"extra": metadata},
        )  # fmt: skip
        save_checkpoint(run, contents, raw.config, keep=0)
    return run


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> tuple[Path, Path]:
    """The bundled tiles split per class: first 8 -> train/, last 4 -> heldout/."""
    root = tmp_path_factory.mktemp("kather")
    for name in CLASSES:
        files = sorted((bundled_kather_dir() / name).glob("*.png"))
        for part, chosen in (
            ("train", files[:TRAIN_PER_CLASS]),
            ("heldout", files[TRAIN_PER_CLASS:]),
        ):
            (root / part / name).mkdir(parents=True)
            for path in chosen:
                shutil.copy(path, root / part / name / path.name)
    return root / "train", root / "heldout"


def evaluate(checkpoint: Path, real: Path, train: Path, out: Path, *extra) -> object:
    args = [
        "generator", "--checkpoint", checkpoint, "--real", real, "--train-real", train,
        "--out", out, "--features", "colour", "--per-class", 2, "--steps", 2,
        "--bootstrap", 5, "--kid-subsets", 5, "--cache-dir", out.parent / "cache",
        "--device", "cpu", "--no-progress", *extra,
    ]  # fmt: skip
    return runner.invoke(evaluate_app, [str(a) for a in args])


def test_all_checkpoints_give_one_entry_each_a_plot_and_an_honest_classifier(
    tmp_path, run_dir, split
):
    train, heldout = split
    out = tmp_path / "eval"
    result = evaluate(run_dir, heldout, train, out, "--checkpoints", "all")
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    sections = metrics["sections"]
    assert {"Setup", "Reference points", "Over training"} <= set(sections)
    for step in (1, 2):
        entry = sections[f"Checkpoint step-{step:07d}"]["metrics"]
        assert entry["step"] == step and entry["num_generated"] == 2 * len(CLASSES)
        for name in ("fid", "kid", "class_accuracy"):
            estimate = entry[name]
            assert estimate["ci_low"] <= estimate["value"] <= estimate["ci_high"] or name == "kid"
            assert estimate["n"]
        assert entry["chance_level"]["value"] == pytest.approx(1 / len(CLASSES))
        # Real tissue shows no token grid; the measure is there for every checkpoint.
        assert 0.8 < entry["border_ratio_real_heldout"] < 1.2
        assert entry["border_ratio"] > 0 and entry["colour_distance"] >= 0
        assert (out / f"step-{step:07d}" / "samples.png").is_file()
        table = sections[f"Checkpoint step-{step:07d}"]["table"]
        assert [row["class"] for row in table] == CLASSES
        assert all(row["n_generated"] == 2 and row["n_real"] == 4 for row in table)
    assert (out / "over_training.png").is_file() and (out / "report.html").is_file()
    assert [row["step"] for row in sections["Over training"]["table"]] == [1, 2]

    # The reference points order as they must: noise is far worse than blurring.
    reference = sections["Reference points"]["metrics"]
    assert reference["fid_real_vs_noise"]["value"] > 5 * reference["fid_real_vs_blurred"]["value"]
    # Held-out tiles of the same classes sit far closer to the training tiles than noise does.
    assert reference["kid_real_vs_train"]["value"] < reference["kid_real_vs_noise"]["value"] / 3
    assert reference["fid_real_vs_train"]["n"] == [4 * len(CLASSES), TRAIN_PER_CLASS * len(CLASSES)]

    # Real data: the colour classifier fitted on the training tiles recognises held-out real
    # tiles far above chance (8 classes: 12.5 %), so it can judge conditioning.
    ceiling = sections["Classifier ceiling (held-out real tiles)"]["metrics"]
    assert ceiling["class_accuracy_real_heldout"]["value"] >= 0.5
    assert ceiling["class_accuracy_real_heldout"]["n"] == [4 * len(CLASSES)]

    config = metrics["config"]
    evaluated = config["checkpoints_evaluated"]
    assert [c["step"] for c in evaluated] == [1, 2]
    assert all(c["ema"] and c["model_dir"].endswith("ema") for c in evaluated)
    assert config["captions"]["01_TUMOR"] == default_caption("01_TUMOR")  # from the run
    assert config["sample_config"]["num_steps"] == 2 and config["features"] == "colour"
    assert config["extractor_identity"]["extractor"] == "colour"

    # Generation is deterministic per seed: the last checkpoint alone, evaluated again into
    # another folder, gives byte-identical tiles; another seed gives other tiles.
    again = evaluate(run_dir, heldout, train, tmp_path / "again", "--checkpoints", "2")
    assert again.exit_code == 0, again.output
    name = Path("step-0000002") / "generated" / "01_TUMOR" / "0001.png"
    assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes()
    again_metrics = json.loads((tmp_path / "again" / "metrics.json").read_text())["sections"]
    assert (
        again_metrics["Checkpoint step-0000002"]["metrics"]["fid"]
        == sections["Checkpoint step-0000002"]["metrics"]["fid"]
    )
    other = evaluate(
        run_dir, heldout, train, tmp_path / "seed1", "--checkpoints", "last", "--seed", 1
    )
    assert other.exit_code == 0, other.output
    assert (tmp_path / "seed1" / name).read_bytes() != (out / name).read_bytes()


def said(result) -> str:
    """The command's output with rich's line wrapping undone."""
    return " ".join(result.output.split())


def test_bad_inputs_end_with_one_clear_error(tmp_path, run_dir, split):
    train, heldout = split
    no_text = tiny_model(0, image_dim=2048).save_pretrained(tmp_path / "image_only")
    result = evaluate(no_text, heldout, train, tmp_path / "a")
    assert result.exit_code == 2 and "no text stream" in said(result)

    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({"01_TUMOR": "H&E: tumour"}))
    result = evaluate(run_dir, heldout, train, tmp_path / "b", "--captions", captions)
    assert result.exit_code == 2 and "no caption" in said(result) and "02_STROMA" in said(result)

    bare = tiny_model(0, text_dim=384).save_pretrained(tmp_path / "bare")  # records no captions
    result = evaluate(bare, heldout, train, tmp_path / "c")
    assert result.exit_code == 2 and "--captions" in said(result)

    (tmp_path / "empty").mkdir()
    result = evaluate(run_dir, tmp_path / "empty", train, tmp_path / "d")
    assert result.exit_code == 2 and "no held-out real tiles" in said(result)

    result = evaluate(bare, heldout, train, tmp_path / "e", "--checkpoints", "all")
    assert result.exit_code == 2 and "run folder" in said(result)
    assert not (tmp_path / "a").exists()  # nothing written before the inputs were checked


def test_checkpoint_selection_and_the_classifier_on_separable_data(run_dir):
    assert [r.step for r in select_checkpoints(run_dir, "all")] == [1, 2]
    assert [r.step for r in select_checkpoints(run_dir, "last")] == [2]
    assert [r.step for r in select_checkpoints(run_dir, "step-0000001,2")] == [1, 2]
    with pytest.raises(EvaluationError, match="no checkpoint at step 3"):
        select_checkpoints(run_dir, "3")

    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
    labels = np.repeat(np.arange(3), 30)
    features = centres[labels] + rng.normal(size=(90, 2))
    classifier = fit_class_classifier(features, labels, ["a", "b", "c"])
    assert (classifier.predict(features) == labels).mean() > 0.9
    assert (classifier.predict(centres) == np.arange(3)).all()
    with pytest.raises(EvaluationError, match="every class"):
        fit_class_classifier(features[:30], labels[:30], ["a", "b", "c"])
