"""Trainer: checkpoints are bit-exact, resume reproduces an uninterrupted run, errors are clear."""

import json

import pytest
import torch
from safetensors.torch import load_file

from mupad.conditions import Conditions, ConditionStream
from mupad.config import ModelConfig, Precision, TrainConfig
from mupad.models import SiT
from mupad.training.checkpoint import ResumeError, latest_checkpoint, list_checkpoints
from mupad.training.ema import EMA
from mupad.training.loop import TrainBatch, Trainer, read_log, step_generator
from mupad.transport.losses import make_noisy_batch, velocity_loss

MODEL = ModelConfig(
    in_channels=3, patch_size=4, hidden_size=32, depth=2, num_heads=2, text_dim=8, sample_size=16
)


def toy_batches(step: int, generator: torch.Generator) -> TrainBatch:
    """Deterministic per step: images and text tokens drawn from the step's generator."""
    x0 = torch.rand(4, 3, 16, 16, generator=generator) * 2 - 1
    tokens = torch.randn(4, 3, 8, generator=generator)
    return TrainBatch(x0=x0, cond=Conditions.build(text=ConditionStream.from_tokens(tokens)))


def config(**overrides) -> TrainConfig:
    fields = {
        "steps": 6, "batch_size": 4, "learning_rate": 1e-3, "checkpoint_every": 3, "log_every": 1,
        "precision": Precision.FP32, "ema_decay": 0.99, "keep_checkpoints": 5,
    }
    fields.update(overrides)
    return TrainConfig(**fields)


def fresh_model() -> SiT:
    torch.manual_seed(0)
    return SiT(MODEL)


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_step_generator_is_a_pure_function_of_seed_and_step():
    a = torch.rand(5, generator=step_generator(3, 7))
    b = torch.rand(5, generator=step_generator(3, 7))
    c = torch.rand(5, generator=step_generator(3, 8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_training_lowers_the_loss_and_logs(tmp_path):
    # Fixed data: the model must fit it. Evaluate on fixed noisy copies before and after.
    fixed = toy_batches(0, step_generator(0, 0))
    model = fresh_model()

    def held_out_loss() -> float:
        noisy = make_noisy_batch(fixed.x0.repeat(8, 1, 1, 1), torch.Generator().manual_seed(9))
        cond = Conditions.concat([fixed.cond] * 8)
        with torch.no_grad():
            prediction = model(noisy.x_t, noisy.t, cond).velocity
        return velocity_loss(prediction, noisy.target).mean().item()

    before = held_out_loss()
    trainer = Trainer(
        model, config(steps=80, checkpoint_every=80, learning_rate=3e-3), tmp_path,
        lambda s, g: fixed, progress=False,
    )
    trainer.train()
    assert held_out_loss() < 0.8 * before
    log = read_log(tmp_path)
    assert [r["step"] for r in log] == list(range(1, 81))
    assert {"step", "loss", "grad_norm", "lr", "images_per_s"} <= set(log[0])


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path):
    straight = tmp_path / "straight"
    Trainer(fresh_model(), config(), straight, toy_batches, progress=False).train()

    interrupted = tmp_path / "interrupted"

    def dies_at_step_4(step, generator):
        if step == 4:
            raise KeyboardInterrupt  # the process is killed after the step-3 checkpoint
        return toy_batches(step, generator)

    with pytest.raises(KeyboardInterrupt):
        Trainer(fresh_model(), config(), interrupted, dies_at_step_4, progress=False).train()
    assert [s for s, _ in list_checkpoints(interrupted)] == [3]

    # Same command again: resumes from step 3 and finishes.
    result = Trainer(fresh_model(), config(), interrupted, toy_batches, progress=False).train()
    assert result.resumed_from == 3
    a, b = latest_checkpoint(straight), latest_checkpoint(interrupted)
    for name in ("model.safetensors", "ema/model.safetensors", "optimizer.safetensors"):
        ta, tb = load_file(str(a / name)), load_file(str(b / name))
        assert ta.keys() == tb.keys()
        assert all(torch.equal(ta[k], tb[k]) for k in ta), name
    steps = [r["step"] for r in read_log(interrupted)]
    assert steps == [1, 2, 3, 4, 5, 6]  # no duplicated log lines from the killed attempt


def test_checkpoint_round_trip_is_bit_exact(tmp_path):
    model = fresh_model()
    Trainer(model, config(steps=2, checkpoint_every=2), tmp_path, toy_batches, progress=False).train()
    folder = latest_checkpoint(tmp_path)
    loaded = SiT.from_pretrained(folder)
    original = model.state_dict()
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, original[name]), name
    assert SiT.from_pretrained(folder / "ema").config == MODEL


def test_keep_last_n_checkpoints(tmp_path):
    Trainer(
        fresh_model(), config(steps=6, checkpoint_every=1, keep_checkpoints=2), tmp_path,
        toy_batches, progress=False,
    ).train()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [5, 6]
    assert not list((tmp_path / "checkpoints").glob(".*tmp*"))


def test_resume_refuses_a_different_model(tmp_path):
    Trainer(fresh_model(), config(steps=1, checkpoint_every=1), tmp_path, toy_batches, progress=False).train()
    other = SiT(ModelConfig(**{**json.loads((latest_checkpoint(tmp_path) / "config.json").read_text()), "depth": 3}))
    with pytest.raises(ResumeError, match="depth"):
        Trainer(other, config(steps=2), tmp_path, toy_batches, progress=False).train()


def test_resume_refuses_changed_hyperparameters_but_allows_more_steps(tmp_path):
    Trainer(fresh_model(), config(steps=3), tmp_path, toy_batches, progress=False).train()
    with pytest.raises(ResumeError, match="learning_rate"):
        Trainer(fresh_model(), config(steps=4, learning_rate=5e-3), tmp_path, toy_batches, progress=False).train()
    result = Trainer(fresh_model(), config(steps=4), tmp_path, toy_batches, progress=False).train()
    assert result.resumed_from == 3 and result.step == 4


def test_bf16_autocast_training_runs_and_keeps_fp32_master_weights(tmp_path):
    model = fresh_model()
    Trainer(model, config(steps=2, precision=Precision.BF16), tmp_path, toy_batches, progress=False).train()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_ema_tracks_weights_with_warmup():
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, decay=0.9999)
    before = model.weight.detach().clone()
    assert ema.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)
    # shadow = decay * old + (1 - decay) * new with decay 0.1 on the first update
    assert torch.allclose(ema.shadow["weight"], 0.1 * before + 0.9 * torch.ones(2, 2))
    for _ in range(200):
        ema.update(model)
    assert torch.allclose(ema.shadow["weight"], torch.ones(2, 2), atol=1e-3)
    assert ema.current_decay() < 0.9999
    copy = torch.nn.Linear(2, 2)
    ema.copy_to(copy)
    assert torch.equal(copy.weight, ema.shadow["weight"])
