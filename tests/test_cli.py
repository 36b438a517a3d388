"""Every command-line choice resolves to an implementation; train -> sample works end to end."""

import json

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from mupad.cli import app
from mupad.conditioning import encoder_names, get_encoder
from mupad.conditions import Conditions
from mupad.config import (
    ConfigError,
    CrossAttentionKind,
    GuidanceConfig,
    GuidanceMode,
    GuidanceScheduleKind,
    ModelConfig,
    Precision,
    SamplerKind,
    model_preset,
    model_preset_names,
    parse_enum,
)
from mupad.models import SiT
from mupad.training.loop import autocast_context
from mupad.transport.guidance import GuidanceSchedule, guided
from mupad.transport.samplers import SAMPLERS

runner = CliRunner()


def test_every_sampler_choice_has_a_sampler():
    assert set(SAMPLERS) == set(SamplerKind)


@pytest.mark.parametrize("kind", list(GuidanceScheduleKind))
def test_every_guidance_schedule_evaluates(kind):
    schedule = GuidanceSchedule.from_config(GuidanceConfig(schedule=kind, start=2.0, end=0.5))
    assert all(isinstance(schedule(t), float) for t in (0.0, 0.5, 1.0))


@pytest.mark.parametrize("mode", list(GuidanceMode))
def test_every_guidance_mode_runs(mode):
    fn = guided(lambda x, t, c: x * 0 + 1, GuidanceConfig(mode=mode, schedule="constant", start=1.0))
    cond = Conditions.build(text=torch.ones(2, 1, 3), rna=torch.ones(2, 1, 4))
    assert fn(torch.zeros(2, 3), torch.full((2,), 0.5), cond).shape == (2, 3)


@pytest.mark.parametrize("precision", list(Precision))
def test_every_precision_has_a_context(precision):
    with autocast_context(precision, torch.device("cpu")):
        pass


@pytest.mark.parametrize("kind", list(CrossAttentionKind))
def test_every_cross_attention_kind_builds_and_runs(kind):
    model = SiT(ModelConfig(in_channels=3, patch_size=2, hidden_size=16, depth=1, num_heads=2,
                            text_dim=4, cross_attention=kind, sample_size=4))
    cond = None if kind is CrossAttentionKind.NONE else Conditions.build(text=torch.randn(2, 3, 4))
    assert model(torch.randn(2, 3, 4, 4), torch.rand(2), cond).velocity.shape == (2, 3, 4, 4)


@pytest.mark.parametrize("name", model_preset_names())
def test_every_model_preset_resolves(name):
    config = model_preset(name)
    assert config.hidden_size % config.num_heads == 0


def test_unknown_choices_are_rejected_with_the_list_of_choices():
    with pytest.raises(ConfigError, match="euler, heun, sde"):
        parse_enum(SamplerKind, "ddim")
    with pytest.raises(ConfigError, match="S/2"):
        model_preset("M/3")


def test_every_registered_encoder_name_is_known_and_the_default_builds():
    assert "minilm" in encoder_names()
    assert get_encoder("minilm").dim == 384


def test_presets_command_lists_every_preset():
    result = runner.invoke(app, ["presets"])
    assert result.exit_code == 0, result.output
    assert "XL/8" in result.output and "tiny" in result.output


def test_train_then_sample_from_the_command_line(tmp_path):
    data = tmp_path / "tiles"
    generator = torch.Generator().manual_seed(0)
    for name, colour in (("01_pink_stroma", (230, 150, 200)), ("02_purple_nuclei", (90, 40, 140))):
        (data / name).mkdir(parents=True)
        for i in range(3):
            noise = torch.randint(-20, 20, (24, 24, 3), generator=generator)
            array = (torch.tensor(colour) + noise).clamp(0, 255).to(torch.uint8).numpy()
            Image.fromarray(array).save(data / name / f"{i}.png")
    run = tmp_path / "run"
    captions = {"01_pink_stroma": "pink stroma", "02_purple_nuclei": "purple nuclei"}
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    args = ["train", "--data", str(data), "--out", str(run), "--preset", "tiny", "--crop", "16",
            "--steps", "3", "--batch-size", "4", "--checkpoint-every", "3",
            "--captions", str(tmp_path / "captions.json"), "--prediction", "data",
            "--refine-channels", "4", "--time-sampling", "logit_normal"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    checkpoint = run / "checkpoints" / "step-0000003"
    assert (checkpoint / "ema" / "model.safetensors").exists()
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["prediction"] == "data" and config["refine_channels"] == 4
    state = json.loads((checkpoint / "train_state.json").read_text())
    assert state["extra"]["captions"] == list(captions.values())
    assert state["train_config"]["time_sampling"] == "logit_normal"

    # A second run warm-starts from the first: its model config (levers included) is used.
    tuned = tmp_path / "tuned"
    result = runner.invoke(app, ["train", "--data", str(data), "--out", str(tuned), "--crop", "16",
                                 "--steps", "1", "--batch-size", "4", "--init-from", str(run)])
    assert result.exit_code == 0, result.output
    tuned_checkpoint = tuned / "checkpoints" / "step-0000001"
    assert json.loads((tuned_checkpoint / "config.json").read_text())["refine_channels"] == 4
    assert json.loads((tuned_checkpoint / "train_state.json").read_text())["extra"]["init_from"]

    out = tmp_path / "grid.png"
    result = runner.invoke(app, ["sample", "--checkpoint", str(run), "--prompt", "pink stroma",
                                 "--prompt", "purple nuclei", "--num", "2", "--steps", "2",
                                 "--sampler", "heun", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert Image.open(out).size[0] > 16
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["sample_config"]["sampler"] == "heun"
    assert sidecar["prompts"] == ["pink stroma", "purple nuclei"]

    result = runner.invoke(app, ["info", str(run / "checkpoints" / "step-0000003")])
    assert result.exit_code == 0 and "hidden_size" in result.output


def test_train_refuses_a_captions_file_that_is_not_a_class_map(tmp_path):
    (tmp_path / "captions.json").write_text('["a list", "not a map"]')
    (tmp_path / "tiles" / "a").mkdir(parents=True)
    result = runner.invoke(app, ["train", "--data", str(tmp_path / "tiles"), "--out",
                                 str(tmp_path / "run"), "--captions",
                                 str(tmp_path / "captions.json")])
    assert result.exit_code == 2
    assert "must be a JSON object" in result.output and not (tmp_path / "run").exists()


def test_cli_rejects_a_bad_sampler_name(tmp_path):
    result = runner.invoke(app, ["sample", "--checkpoint", str(tmp_path), "--prompt", "x",
                                 "--sampler", "ddim"])
    assert result.exit_code != 0
    assert "ddim" in result.output


def test_train_from_prepared_shards_and_input_choice(tmp_path):
    from mupad.data.shards import ShardWriter, write_manifest

    shards = tmp_path / "shards"
    generator = torch.Generator().manual_seed(0)
    with ShardWriter(shards, prefix="tiles", shard_size=4) as writer:
        for i in range(6):
            image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8, generator=generator)
            writer.add({"image": image, "label": i % 2, "slide_id": "synthetic"})
    write_manifest(shards)
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", "--shards", str(shards), "--out", str(run), "--preset",
                                 "tiny", "--steps", "2", "--batch-size", "2",
                                 "--checkpoint-every", "2"])
    assert result.exit_code == 0, result.output
    assert (run / "checkpoints" / "step-0000002" / "config.json").exists()

    for extra in ([], ["--data", str(tmp_path), "--shards", str(shards)]):
        result = runner.invoke(app, ["train", "--out", str(tmp_path / "x"), *extra])
        assert result.exit_code != 0
        assert "exactly one of --data" in result.output


def test_train_names_a_truncated_tile_before_step_1(tmp_path):
    """Issue 15: one truncated PNG among the tiles killed training mid-run without its name."""
    data = tmp_path / "tiles"
    (data / "stroma").mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (24, 24), (230, 150, 200 - i)).save(data / "stroma" / f"{i}.png")
    whole = (data / "stroma" / "3.png").read_bytes()
    (data / "stroma" / "3.png").write_bytes(whole[: len(whole) // 2])  # truncated
    run = tmp_path / "run"
    args = ["train", "--data", str(data), "--out", str(run), "--preset", "tiny", "--crop", "16",
            "--steps", "1", "--batch-size", "2", "--checkpoint-every", "1"]
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2, refused.output
    assert "3.png" in refused.output and "--skip-bad-tiles" in refused.output
    assert not (run / "checkpoints").exists()  # stopped before step 1

    skipped = runner.invoke(app, [*args, "--skip-bad-tiles"])
    assert skipped.exit_code == 0, skipped.output
    state = json.loads((run / "checkpoints" / "step-0000001" / "train_state.json").read_text())
    assert [p.endswith("3.png") for p in state["extra"]["skipped_tiles"]] == [True]
