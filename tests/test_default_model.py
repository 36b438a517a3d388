"""Commands without --checkpoint fall back to the run `mupad demo` recorded."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from mupad.applications import default_model
from mupad.applications.default_model import (
    DefaultModelError,
    default_checkpoint,
    pointer_path,
    remember_demo_run,
)
from mupad.cli import app
from mupad.config import model_preset
from mupad.models import SiT


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MUPAD_CACHE", str(tmp_path / "cache"))


def test_no_recorded_run_says_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.setattr(default_model, "packaged_model_dir", lambda: None)
    with pytest.raises(DefaultModelError, match="mupad demo"):
        default_checkpoint()
    remember_demo_run(tmp_path / "gone")
    with pytest.raises(DefaultModelError, match="no longer exists"):
        default_checkpoint()
    pointer_path().write_text("not json")
    with pytest.raises(DefaultModelError, match="unreadable"):
        default_checkpoint()


def test_generate_without_a_checkpoint_uses_the_recorded_demo_run(tmp_path):
    torch.manual_seed(0)
    model = SiT(model_preset("tiny", in_channels=3, sample_size=16, text_dim=384))
    run = model.save_pretrained(tmp_path / "demo" / "sit")
    remember_demo_run(run)
    assert json.loads(pointer_path().read_text())["run"] == str(run.resolve())
    assert default_checkpoint() == run.resolve()
    runner = CliRunner()
    out = tmp_path / "out"
    args = ["generate", "--text", "H&E: tumour", "--steps", "2", "--seed", "3", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert sorted(p.suffix for p in out.iterdir()) == [".json", ".png"]
    # Without a recorded run the command fails with the hint, not a traceback.
    pointer_path().unlink()
    result = runner.invoke(app, [*args[:-1], str(tmp_path / "out2")])
    assert result.exit_code == 2 and "mupad demo" in result.output
