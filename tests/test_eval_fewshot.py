"""Few-shot benchmark: ResNet-18, shot selection, the augmented arm, end to end on Kather tiles.

The augmented folders here are real files in the layout `mupad augment` writes (index.csv +
<class>/<stem>_aug<k>.png), made from the bundled Kather tiles by flips and a colour shift,
so every check runs the real reading and training code.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from mupad.data.tiles import bundled_kather_dir
from mupad.evaluation.cli import evaluate_app
from mupad.evaluation.fewshot import (
    Arm,
    FewShotConfig,
    image_key,
    load_fewshot_data,
    paired_gain,
    predict,
    random_dihedral,
    read_augmented,
    run_fewshot,
    select_shots,
    split_holdout,
    synthetic_for_shots,
    train_classifier,
)
from mupad.evaluation.images import load_image_set
from mupad.evaluation.resnet import CompactResNet18, classifier_backend, resnet18
from mupad.evaluation.stats import EvaluationError

KATHER = bundled_kather_dir()  # 8 classes x 12 tiles, 150 px
SHARED_KATHER = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "kather2016_crc_texture_samples"
)
SIZE = 32
VARIATIONS = 2


def _write_augmented(tiles: list[Path], out: Path, rename_class: str | None = None) -> Path:
    """An augment-style folder: VARIATIONS edited copies of every tile + index.csv; each tile
    keeps its class folder's name unless `rename_class` is given."""
    rows = []
    for tile in tiles:
        class_name = rename_class or tile.parent.name
        rgb = np.asarray(Image.open(tile).convert("RGB"))
        for k in range(VARIATIONS):
            edited = np.ascontiguousarray(np.rot90(rgb, k + 1))
            edited = np.clip(edited.astype(np.int16) + 6 * (k + 1), 0, 255).astype(np.uint8)
            target = out / class_name / f"{tile.stem}_aug{k}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(edited).save(target)
            rows.append(
                {
                    "path": target.relative_to(out).as_posix(),
                    "class": class_name,
                    "kind": "synthetic",
                    "source": str(tile.resolve()),
                    "seed": 1000 + k,
                    "k": k,
                    "caption": f"H&E histology: {class_name}",
                }
            )
        rows.append(
            {
                "path": f"{class_name}/{tile.name}", "class": class_name, "kind": "real",
                "source": str(tile.resolve()), "seed": "", "k": "", "caption": "",
            }
        )  # fmt: skip
    pd.DataFrame(rows).to_csv(out / "index.csv", index=False)
    return out


@pytest.fixture(scope="module")
def augmented(tmp_path_factory) -> Path:
    return _write_augmented(sorted(KATHER.glob("*/*.png")), tmp_path_factory.mktemp("augmented"))


@pytest.fixture(scope="module")
def data(augmented):
    return load_fewshot_data(KATHER, None, augmented, image_size=SIZE, test_per_class=4)


# ----------------------------------------------------------------------------- ResNet-18


def test_compact_resnet18_has_the_standard_parameter_count_and_takes_small_inputs():
    # torchvision's resnet18(num_classes=1000): 11,689,512 parameters.
    model = CompactResNet18(1000)
    assert sum(p.numel() for p in model.parameters()) == 11_689_512
    small = CompactResNet18(8).eval()
    with torch.no_grad():
        assert small(torch.randn(2, 3, 64, 64)).shape == (2, 8)
        assert small(torch.randn(2, 3, 32, 32)).shape == (2, 8)
    # 8 classes: the 1000-way head (512*1000 + 1000) becomes 512*8 + 8.
    assert sum(p.numel() for p in small.parameters()) == 11_689_512 - 513_000 + 4_104


def test_resnet18_backend_follows_torchvision_availability():
    try:
        import torchvision  # noqa: F401
    except ImportError:
        assert classifier_backend() == "mupad"
        assert isinstance(resnet18(8), CompactResNet18)
        return
    assert classifier_backend() == "torchvision"
    model = resnet18(8)
    assert type(model).__module__.startswith("torchvision")
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in CompactResNet18(8).parameters()
    )


@pytest.mark.skipif(classifier_backend() != "torchvision", reason="torchvision is not installed")
def test_compact_resnet18_has_torchvisions_state_dict_layout():
    from torchvision.models import resnet18 as torchvision_resnet18

    ours = {k: v.shape for k, v in CompactResNet18(10).state_dict().items()}
    theirs = {k: v.shape for k, v in torchvision_resnet18(num_classes=10).state_dict().items()}
    assert ours == theirs


def test_random_dihedral_only_flips_and_rotates():
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    out = random_dihedral(images.repeat(16, 1, 1, 1), torch.Generator().manual_seed(0))
    group = [torch.rot90(images, k, dims=(2, 3)) for k in range(4)]
    group += [g.flip(3) for g in group]
    for row in range(out.shape[0]):
        assert any(torch.equal(out[row], g[row % 2]) for g in group)
    assert len({tuple(out[r].flatten().tolist()) for r in range(0, 32, 2)}) > 1


# ----------------------------------------------------------------------------- shots


def test_holdout_split_is_balanced_disjoint_and_fixed():
    images = load_image_set(KATHER, SIZE)
    pool, test = split_holdout(images, per_class=4, seed=0)
    assert len(test) == 32 and len(pool) == 64
    assert torch.bincount(test.labels).tolist() == [4] * 8
    assert not set(pool.paths) & set(test.paths)
    assert set(pool.paths) | set(test.paths) == set(images.paths)
    again, _ = split_holdout(images, per_class=4, seed=0)
    assert again.paths == pool.paths


def test_shots_are_deterministic_balanced_nested_and_never_test_images(data):
    shots = select_shots(data.pool, 3, seed=1)
    assert np.array_equal(shots, select_shots(data.pool, 3, seed=1))
    assert torch.bincount(data.pool.labels[shots]).tolist() == [3] * 8
    assert set(shots) <= set(select_shots(data.pool, 5, seed=1))  # k=3 shots within k=5's
    assert not np.array_equal(shots, select_shots(data.pool, 3, seed=2))
    chosen = {data.pool.paths[i] for i in shots}
    assert not chosen & set(data.test.paths)


def test_augmented_arm_adds_exactly_the_variations_of_the_chosen_shots(data, augmented):
    rows = select_shots(data.pool, 2, seed=0)
    keys = [image_key(data.pool, int(r)) for r in rows]
    files, labels = synthetic_for_shots(data.synthetic, keys, data.pool.labels[rows])
    expected = {augmented / c / f"{Path(name).stem}_aug{k}.png" for c, name in keys for k in (0, 1)}
    assert set(files) == expected and len(files) == len(expected) == 2 * 16
    assert [f.parent.name for f in files] == [data.pool.class_names[int(i)] for i in labels]
    test_stems = {p.stem for p in data.test.paths}
    assert not any(f.stem.rsplit("_aug", 1)[0] in test_stems for f in files)
    capped, _ = synthetic_for_shots(data.synthetic, keys, data.pool.labels[rows], cap=1)
    assert {f.name.rsplit("_aug", 1)[1] for f in capped} == {"0.png"} and len(capped) == 16


# ----------------------------------------------------------------------------- bad input


def test_too_many_shots_names_the_class(data):
    with pytest.raises(EvaluationError, match=r"class '01_TUMOR' has 8 image\(s\).*k=9"):
        select_shots(data.pool, 9, seed=0)


def test_unknown_class_in_the_augmented_folder_is_an_error(tmp_path, data):
    tiles = sorted((KATHER / "04_LYMPHO").glob("*.png"))
    folder = _write_augmented(tiles, tmp_path / "aug", rename_class="09_MUSCLE")
    with pytest.raises(EvaluationError, match="09_MUSCLE"):
        read_augmented(folder, data.pool.class_names)


def test_a_shot_without_variations_is_an_error(tmp_path, data):
    tiles = sorted((KATHER / "04_LYMPHO").glob("*.png"))
    folder = _write_augmented(tiles, tmp_path / "aug")  # variations of one class only
    index = read_augmented(folder, data.pool.class_names)
    rows = select_shots(data.pool, 1, seed=0)
    keys = [image_key(data.pool, int(r)) for r in rows]
    with pytest.raises(EvaluationError, match="no variation of the shot 01_TUMOR/"):
        synthetic_for_shots(index, keys, data.pool.labels[rows])


def test_empty_and_unlabelled_folders_and_overlapping_test_sets_are_errors(tmp_path):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(EvaluationError, match="no training images"):
        load_fewshot_data(tmp_path / "empty", image_size=SIZE)
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(next(KATHER.glob("01_TUMOR/*.png")), flat / "a.png")
    with pytest.raises(EvaluationError, match="<class>/<image>"):
        load_fewshot_data(flat, image_size=SIZE)
    with pytest.raises(EvaluationError, match="no index.csv"):
        load_fewshot_data(KATHER, None, tmp_path, image_size=SIZE)
    test = tmp_path / "test"
    for folder in sorted(p for p in KATHER.iterdir() if p.is_dir()):
        (test / folder.name).mkdir(parents=True)
        tile = min(folder.glob("*.png"))
        shutil.copy(tile, test / folder.name / f"copy_{tile.name}")
    with pytest.raises(EvaluationError, match="also in the training pool"):
        load_fewshot_data(KATHER, test, image_size=SIZE)


def test_too_large_holdout_is_an_error():
    with pytest.raises(EvaluationError, match="leaves no training pool"):
        load_fewshot_data(KATHER, image_size=SIZE, test_per_class=12)


# ----------------------------------------------------------------------------- training


def test_training_is_reproducible_per_seed(data):
    rows = select_shots(data.pool, 1, seed=0)
    config = FewShotConfig(epochs=1, image_size=SIZE, batch_size=8)
    images, labels = data.pool.images[rows], data.pool.labels[rows]
    first, second, other = (
        train_classifier(images, labels, 8, config, seed=seed) for seed in (3, 3, 4)
    )
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)
    assert not torch.equal(first.fc.weight, other.fc.weight)
    assert predict(first, data.test.images, config).shape == (32,)


def test_paired_gain_statistics():
    gain = paired_gain(5, [0.5, 0.4, 0.6, 0.5, 0.45], [0.6, 0.5, 0.7, 0.55, 0.5])
    assert gain.gain.value == pytest.approx(0.08)
    assert gain.gain.ci_low < 0.08 < gain.gain.ci_high
    assert gain.wins == 5 and gain.ties == 0
    assert gain.p_value == pytest.approx(2 / 32)  # every difference positive: 2 of 2^5 patterns
    assert gain.relative_gain == pytest.approx(0.57 / 0.49 - 1)


def test_benchmark_runs_end_to_end_on_the_kather_tiles(data):
    config = FewShotConfig(shots=(2,), num_seeds=2, epochs=2, image_size=SIZE, batch_size=16)
    result = run_fewshot(data, config, progress=False)
    assert [(r.shots, r.arm, r.seed) for r in result.runs] == [
        (2, arm, seed) for seed in (0, 1) for arm in (Arm.REAL, Arm.AUGMENTED)
    ]
    for real, aug in zip(result.runs[::2], result.runs[1::2]):
        assert real.shot_files == aug.shot_files and real.num_real == aug.num_real == 16
        assert real.num_synthetic == 0 and aug.num_synthetic == VARIATIONS * aug.num_real
        assert set(aug.per_class_accuracy) == set(result.class_names)
        assert 0.0 <= aug.accuracy <= 1.0
    assert result.runs[0].shot_files != result.runs[2].shot_files  # seeds draw other shots
    assert result.summary(2, Arm.REAL).accuracies == (
        result.runs[0].accuracy,
        result.runs[2].accuracy,
    )
    assert [g.shots for g in result.gains] == [2] and result.gains[0].gain.n == (2,)
    json.dumps(result.to_dict(), allow_nan=False)


def test_cli_writes_metrics_report_and_figure(tmp_path, augmented):
    out = tmp_path / "out"
    args = [
        "fewshot", "--train", str(KATHER), "--augmented", str(augmented), "--shots", "1",
        "--seeds", "1", "--epochs", "1", "--size", str(SIZE), "--batch-size", "8",
        "--out", str(out), "--no-progress",
    ]  # fmt: skip
    result = CliRunner().invoke(evaluate_app, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    section = metrics["sections"]["Few-shot accuracy"]
    assert set(section["metrics"]) >= {"accuracy_k1_real_mean", "accuracy_k1_augmented_std"}
    assert section["metrics"]["gain_k1"]["ci_low"] is None  # no interval from one seed
    assert metrics["config"]["epochs"] == 1 and metrics["config"]["test_per_class"] == 4
    assert (out / "accuracy.png").is_file() and "accuracy.png" in (out / "report.html").read_text()
    assert len(json.loads((out / "fewshot.json").read_text())["runs"]) == 2
    bad = CliRunner().invoke(
        evaluate_app, ["fewshot", "--train", str(KATHER), "--out", str(out), "--shots", "20"]
    )
    assert bad.exit_code == 2 and "fewer than k=20" in bad.output


@pytest.mark.slow
def test_classifier_learns_well_above_chance_on_kather():
    if not SHARED_KATHER.is_dir():
        pytest.skip(f"real-data folder {SHARED_KATHER} is absent (expected <repo>/../shared/data)")
    data = load_fewshot_data(SHARED_KATHER, image_size=SIZE, test_per_class=4)
    config = FewShotConfig(shots=(10,), num_seeds=1, epochs=30, image_size=SIZE)
    result = run_fewshot(data, config, progress=False)
    assert result.summary(10, Arm.REAL).mean > 0.35  # chance: 1/8
