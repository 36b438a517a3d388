"""`mupad ablate`: every arm is trained on the same data and scored on one fixed held-out set
at each evaluation step; re-running resumes without retraining; bad inputs fail early."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mupad.applications import ablate
from mupad.applications.ablate import (
    ARM_SETS,
    AblationError,
    Arm,
    ArmSet,
    build_eval_set,
    evaluate_checkpoint,
    read_records,
    resolve_arms,
    resolve_metrics,
    run_ablation,
)
from mupad.cli import app
from mupad.config import (
    ConfigError,
    CrossAttentionKind,
    LRScheduleKind,
    Objective,
    Precision,
    TrainConfig,
)
from mupad.data.shards import ShardWriter, pad_tokens, write_manifest
from mupad.data.streaming import ShardedDataset
from mupad.training.checkpoint import checkpoint_dir

torch.set_num_threads(1)

T, D_TEXT, D_TEACHER = 4, 8, 12  # text tokens, text width, teacher width (2x2 patch grid)
STEPS, EVAL_EVERY = 4, 2


def write_shards(root: Path, count: int, offset: int, *, conditions: bool = True) -> Path:
    with ShardWriter(root, "r0", shard_size=4) as writer:
        for i in range(offset, offset + count):
            g = torch.Generator().manual_seed(i)
            record = {"image": torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8, generator=g)}
            if conditions:
                tokens, mask = pad_tokens(torch.randn(1 + i % T, D_TEXT, generator=g), T)
                record.update(
                    image_tokens=torch.randn(1 + 2 * 2, D_TEACHER, generator=g),
                    text_tokens=tokens,
                    text_mask=mask,
                )
            writer.add(record)
    write_manifest(root)
    return root


def template(**overrides) -> TrainConfig:
    base = {
        "steps": STEPS,
        "batch_size": 4,
        "learning_rate": 1e-3,
        "ema_decay": 0.5,
        "precision": Precision.FP32,
        "condition_dropout": 0.1,
        "seed": 3,
        "log_every": 1,
        "checkpoint_every": 100,
    }
    base.update(overrides)
    return TrainConfig(**base)


def ablation(train: Path, val: Path, out: Path, **overrides) -> ablate.AblationResult:
    options = {
        "arms": ArmSet.OBJECTIVES,
        "preset": "tiny",
        "train_config": template(),
        "eval_every": EVAL_EVERY,
        "eval_records": 6,
        "eval_batch_size": 4,  # two batches, the last one partial
        "progress": False,
    }
    options.update(overrides)
    return run_ablation(train, val, out, **options)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ablate")
    return {
        "root": root,
        "train": write_shards(root / "train", 8, offset=0),
        "val": write_shards(root / "val", 7, offset=100),
        "plain_train": write_shards(root / "plain_train", 8, offset=0, conditions=False),
        "plain_val": write_shards(root / "plain_val", 4, offset=100, conditions=False),
    }


@pytest.fixture(scope="module")
def objectives(data) -> ablate.AblationResult:
    return ablation(data["train"], data["val"], data["root"] / "objectives")


# ------------------------------------------------------------------------------ arms


@pytest.mark.parametrize("arm_set", list(ArmSet))
def test_every_arm_set_resolves(arm_set):
    arms = resolve_arms(arm_set.value)
    assert arms == ARM_SETS[arm_set]
    assert len({(a.objective, a.cross_attention) for a in arms}) == len(arms)


def test_arm_sets_hold_the_papers_arms():
    objectives = {a.name: (a.objective, a.cross_attention) for a in ARM_SETS[ArmSet.OBJECTIVES]}
    assert objectives == {
        "sit": (Objective.SIT, CrossAttentionKind.DECOUPLED),
        "repa": (Objective.REPA, CrossAttentionKind.DECOUPLED),
        "mupad": (Objective.MUPAD, CrossAttentionKind.DECOUPLED),
    }
    attention = {a.name: a.cross_attention for a in ARM_SETS[ArmSet.ATTENTION]}
    assert attention == {
        "decoupled": CrossAttentionKind.DECOUPLED,
        "shared": CrossAttentionKind.SHARED,
    }
    assert {a.objective for a in ARM_SETS[ArmSet.ATTENTION]} == {Objective.SIT}
    # "all": the sit + decoupled arm once.
    assert [a.name for a in ARM_SETS[ArmSet.ALL]] == ["sit", "repa", "mupad", "shared"]


def test_unknown_arm_set_is_a_clear_error(data, tmp_path):
    with pytest.raises(ConfigError, match="objectives, attention, all"):
        ablation(data["train"], data["val"], tmp_path / "out", arms="objective")
    with pytest.raises(AblationError, match="unique"):
        resolve_arms([Arm("a", "sit", "decoupled"), Arm("a", "repa", "decoupled")])
    with pytest.raises(AblationError, match="unknown metric"):
        resolve_metrics(["fid"])
    assert not (tmp_path / "out").exists()


def test_attention_arms_need_a_condition_stream(data, tmp_path):
    for arms, modalities in (("attention", None), ("all", None)):
        with pytest.raises(AblationError, match="no condition stream"):
            ablation(
                data["plain_train"],
                data["plain_val"],
                tmp_path / "o",
                arms=arms,
                modalities=modalities,
            )
    with pytest.raises(AblationError, match="no condition stream"):  # conditions switched off
        ablation(data["train"], data["val"], tmp_path / "o", arms="attention", modalities=[])
    assert not (tmp_path / "o").exists()


def test_other_bad_inputs_fail_before_training(data, tmp_path):
    with pytest.raises(AblationError, match="constant"):
        ablation(
            data["train"],
            data["val"],
            tmp_path / "o",
            train_config=template(lr_schedule=LRScheduleKind.COSINE),
        )
    # The mupad arm's CLS input needs the held-out images' teacher tokens.
    with pytest.raises(AblationError, match="image_tokens"):
        ablation(data["train"], data["plain_val"], tmp_path / "o", modalities=[])
    with pytest.raises(AblationError, match="eval_every"):
        ablation(data["train"], data["val"], tmp_path / "o", eval_every=0)
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------ runs


def test_every_arm_is_scored_at_every_eval_step(objectives):
    records = objectives.records
    assert {(r["arm"], r["step"]) for r in records} == {
        (arm, step) for arm in ("sit", "repa", "mupad") for step in (2, 4)
    }
    for record in records:
        assert set(record["metrics"]) == {"velocity_mse_ema", "velocity_mse_raw"}
        assert all(math.isfinite(v) and v > 0 for v in record["metrics"].values())
        assert record["train_s"] > 0 and record["eval_s"] > 0
    by_arm = {}
    for record in records:
        by_arm.setdefault(record["arm"], []).append(record["train_s"])
    assert all(times == sorted(times) for times in by_arm.values())  # cumulative
    table = objectives.table
    assert table.arms == ["sit", "repa", "mupad"] and table.steps == [2, 4]
    _step, value = table.best("velocity_mse_ema", "sit")
    assert value == min(table.values["velocity_mse_ema"]["sit"].values())
    # Arms differ in training (different models), not in the held-out set.
    mupad_ema = table.values["velocity_mse_ema"]["mupad"]
    assert mupad_ema != table.values["velocity_mse_ema"]["sit"]


def test_outputs_are_written(objectives):
    out = objectives.out
    for name in ("jsonl", "csv", "md", "png", "json"):
        assert objectives.files[name].is_file() and objectives.files[name].stat().st_size > 0
    lines = (out / "ablation.jsonl").read_text().splitlines()
    assert len(lines) == 6
    csv_lines = (out / "ablation.csv").read_text().splitlines()
    assert csv_lines[0].startswith("arm,objective,cross_attention,step,velocity_mse_ema")
    assert len(csv_lines) == 7
    markdown = (out / "ablation.md").read_text()
    assert "## velocity_mse_ema (lower is better)" in markdown
    assert "| arm | step 2 | step 4 | best |" in markdown
    assert all(f"| {arm} |" in markdown for arm in ("sit", "repa", "mupad"))
    assert "4 steps" in markdown and "seed 3" in markdown and "first 6 records" in markdown
    assert "mupad = mupad objective, decoupled cross-attention" in markdown
    assert (out / "ablation.png").read_bytes()[:4] == b"\x89PNG"
    for arm in ("sit", "repa", "mupad"):
        assert (checkpoint_dir(out / arm, 4) / "ema" / "model.safetensors").is_file()
    mupad_config = json.loads((checkpoint_dir(out / "mupad", 4) / "config.json").read_text())
    assert mupad_config["cls_dim"] == D_TEACHER


def test_rerun_neither_retrains_nor_duplicates(objectives, data, monkeypatch):
    out = objectives.out
    before = (out / "ablation.jsonl").read_text()

    def no_training(*args, **kwargs):
        raise AssertionError("an evaluated step was trained again")

    monkeypatch.setattr(ablate, "train_on_shards", no_training)
    again = ablation(data["train"], data["val"], out)
    assert (out / "ablation.jsonl").read_text() == before
    assert again.records == objectives.records
    # Another held-out set in the same folder would make the numbers incomparable.
    with pytest.raises(AblationError, match="eval_seed"):
        ablation(data["train"], data["val"], out, eval_seed=1)


def test_more_steps_continue_the_runs(objectives, data, tmp_path):
    # A copy of the sit arm so the module fixture stays as it is.
    import shutil

    out = tmp_path / "grow"
    shutil.copytree(objectives.out, out)
    sit = [a for a in ARM_SETS[ArmSet.OBJECTIVES] if a.name == "sit"]
    grown = ablation(data["train"], data["val"], out, arms=sit, train_config=template(steps=6))
    assert [r["step"] for r in grown.records] == [2, 4, 6]
    assert grown.records[:2] == [r for r in objectives.records if r["arm"] == "sit"]
    assert (out / "ablation.jsonl").read_text().count('"arm": "sit"') == 3


def test_same_seed_gives_the_same_numbers(objectives, data, tmp_path):
    sit = [a for a in ARM_SETS[ArmSet.OBJECTIVES] if a.name == "sit"]
    twin = ablation(data["train"], data["val"], tmp_path / "twin", arms=sit)
    first = [r["metrics"] for r in objectives.records if r["arm"] == "sit"]
    assert [r["metrics"] for r in twin.records] == first


def test_training_in_chunks_equals_training_straight_through(objectives, data, tmp_path):
    sit = [a for a in ARM_SETS[ArmSet.OBJECTIVES] if a.name == "sit"]
    straight = ablation(data["train"], data["val"], tmp_path / "one", arms=sit, eval_every=STEPS)
    chunked = next(r for r in objectives.records if (r["arm"], r["step"]) == ("sit", STEPS))
    assert [r["step"] for r in straight.records] == [STEPS]
    assert straight.records[0]["metrics"] == chunked["metrics"]


def test_heldout_set_is_fixed_and_batching_does_not_change_the_metric(objectives, data):
    schema = ShardedDataset(data["train"]).schema
    mupad = dataclasses.replace(
        template().alignment, objective=Objective.MUPAD
    )  # the CLS input on the training path
    options = {
        "eval_records": 6,
        "modalities": None,
        "use_latents": True,
        "cls_alignment": mupad,
        "seed": 0,
        "device": torch.device("cpu"),
    }
    small = build_eval_set(data["val"], schema, batch_size=4, **options)
    whole = build_eval_set(data["val"], schema, batch_size=64, **options)
    plain = build_eval_set(data["val"], schema, batch_size=4, **{**options, "cls_alignment": None})
    assert small.num_records == 6 and small.cls_t.shape == (6, D_TEACHER)
    assert plain.cls_t is None
    # The image part is the same whether or not a CLS input is drawn.
    assert torch.equal(plain.x_t, small.x_t) and torch.equal(plain.t, small.t)
    assert set(small.cond.streams) == {"text", "image"}
    assert bool(small.cond.get("text").present.all())  # no condition dropout
    checkpoint = checkpoint_dir(objectives.out / "mupad", 4)
    metrics = resolve_metrics(["velocity_mse"])
    a = evaluate_checkpoint(checkpoint, small, metrics)
    b = evaluate_checkpoint(checkpoint, whole, metrics)
    assert a.keys() == b.keys()
    assert all(a[k] == pytest.approx(b[k], rel=1e-5) for k in a)
    recorded = next(r for r in objectives.records if (r["arm"], r["step"]) == ("mupad", 4))
    assert a == pytest.approx(recorded["metrics"], rel=1e-6)
    # A CLS model cannot be scored without the teacher's CLS tokens.
    with pytest.raises(AblationError, match="CLS"):
        evaluate_checkpoint(checkpoint, plain, metrics)


def test_modality_subset_metrics_drop_the_other_streams(objectives, data, tmp_path):
    schema = ShardedDataset(data["train"]).schema
    options = {"eval_records": 6, "use_latents": True, "cls_alignment": None, "seed": 0,
               "batch_size": 4, "device": torch.device("cpu")}  # fmt: skip
    both = build_eval_set(data["val"], schema, modalities=None, **options)
    text = build_eval_set(data["val"], schema, modalities=["text"], **options)
    bare = build_eval_set(data["val"], schema, modalities=[], **options)
    assert bare.cond is None
    model = ablate.load_weights(checkpoint_dir(objectives.out / "sit", 4), "ema", both.device)
    metric = {m.name: m.fn for m in resolve_metrics(
        ["velocity_mse", "velocity_mse_text_only", "velocity_mse_image_only",
         "velocity_mse_unconditional"]
    )}  # fmt: skip
    values = {name: fn(model, both) for name, fn in metric.items()}
    # Text alone on the text+image set = the full metric on a set that only holds text; no
    # stream at all = the model run without conditions (decoupled gates at 0 are exact).
    assert values["velocity_mse_text_only"] == pytest.approx(
        metric["velocity_mse"](model, text), rel=1e-6
    )
    assert values["velocity_mse_unconditional"] == pytest.approx(
        metric["velocity_mse"](model, bare), rel=1e-6
    )
    assert len({round(v, 9) for v in values.values()}) == 4  # each subset is another input
    with pytest.raises(AblationError, match="needs the image condition"):
        metric["velocity_mse_image_only"](model, text)
    with pytest.raises(AblationError, match="needs the image condition"):  # before training
        ablation(data["train"], data["val"], tmp_path / "no", modalities=["text"],
                 metrics=["velocity_mse_image_only"])  # fmt: skip
    assert not (tmp_path / "no").exists()

    # Added to a finished run, the new metrics are scored on its checkpoints, no retraining.
    import shutil

    out = tmp_path / "more"
    shutil.copytree(objectives.out, out)
    sit = [a for a in ARM_SETS[ArmSet.OBJECTIVES] if a.name == "sit"]
    more = ablation(
        data["train"], data["val"], out, arms=sit,
        metrics=["velocity_mse", "velocity_mse_unconditional"],
    )  # fmt: skip
    last = next(r for r in reversed(more.records) if (r["arm"], r["step"]) == ("sit", 4))
    old = next(r for r in objectives.records if (r["arm"], r["step"]) == ("sit", 4))
    assert last["metrics"]["velocity_mse_ema"] == old["metrics"]["velocity_mse_ema"]
    assert last["metrics"]["velocity_mse_unconditional_ema"] == pytest.approx(
        values["velocity_mse_unconditional"], rel=1e-6
    )
    assert last["train_s"] == old["train_s"]
    markdown = (out / "ablation.md").read_text()
    assert "## velocity_mse_unconditional_ema (lower is better)" in markdown


def test_ablate_command(data, tmp_path):
    out = tmp_path / "cli"
    args = [
        "ablate", "--shards", str(data["train"]), "--val-shards", str(data["val"]),
        "--out", str(out), "--arms", "attention", "--preset", "tiny", "--steps", "2",
        "--eval-every", "2", "--batch-size", "4", "--lr", "1e-3", "--precision", "fp32",
        "--conditions", "text", "--eval-records", "4", "--seed", "1", "--device", "cpu",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "decoupled" in result.output and "shared" in result.output
    records = read_records(out)
    assert [(r["arm"], r["step"]) for r in records] == [("decoupled", 2), ("shared", 2)]
    shared = json.loads((checkpoint_dir(out / "shared", 2) / "config.json").read_text())
    assert shared["cross_attention"] == "shared" and shared["image_dim"] == 0
    bad = CliRunner().invoke(app, [*args[:8], "everything", *args[9:]])
    assert bad.exit_code != 0
    unknown = CliRunner().invoke(app, [*args, "--metrics", "velocity_mse,fid"])
    assert unknown.exit_code != 0 and "unknown metric" in unknown.output


def test_train_backbone_options_override_the_preset(data, tmp_path):
    run = tmp_path / "run"
    args = [
        "train", "--shards", data["train"], "--out", run, "--preset", "tiny", "--hidden-size",
        32, "--depth", 1, "--num-heads", 4, "--steps", 1, "--batch-size", 4, "--precision",
        "fp32", "--device", "cpu",
    ]  # fmt: skip
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    config = json.loads((checkpoint_dir(run, 1) / "config.json").read_text())
    assert (config["hidden_size"], config["depth"], config["num_heads"]) == (32, 1, 4)
    assert config["patch_size"] == 2  # the rest is still the preset's
    args[args.index(run)] = tmp_path / "bad"
    bad = CliRunner().invoke(app, [str(a) for a in [*args, "--num-heads", 5]])
    assert bad.exit_code != 0  # 32 is not divisible by 5 heads: refused by the config
    assert "num_heads" in str(bad.exception) or "num_heads" in bad.output
