"""`mupad demo` end to end at a tiny budget: from scratch without a packaged model, then as a
fine-tune of an exported packaged model; and the packaged-model export itself."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mupad.applications import default_model, demo
from mupad.applications.default_model import (
    DefaultModelError,
    default_checkpoint,
    export_pretrained,
)
from mupad.applications.demo import run_demo
from mupad.config import DemoConfig

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = DemoConfig(steps=2, batch_size=4, samples_per_class=1, sample_steps=2)
CLASSES = 8


def _use_packaged(patch: pytest.MonkeyPatch, folder) -> None:
    """Pretend the installed package ships `folder` (None: no packaged model)."""
    for module in (default_model, demo):
        patch.setattr(module, "packaged_model_dir", lambda: folder)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MUPAD_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def scratch_run(tmp_path_factory):
    """One from-scratch demo run shared by the tests of this module."""
    out = tmp_path_factory.mktemp("demo") / "scratch"
    with pytest.MonkeyPatch.context() as patch:
        _use_packaged(patch, None)
        patch.setenv("MUPAD_CACHE", str(out.parent / "cache"))
        run_demo(out, TINY)
    return out


def test_demo_from_scratch_writes_every_sample_and_its_measures(scratch_run):
    pngs = sorted(scratch_run.glob("samples/*/*.png"))
    assert len(pngs) == CLASSES * TINY.samples_per_class
    assert not (scratch_run / "pretrained_samples").exists()
    metrics = json.loads((scratch_run / "metrics.json").read_text())
    assert metrics["pretrained_model"] is None
    assert metrics["border_ratio"]["token_period_px"] == 8
    assert 0.8 < metrics["border_ratio"]["real"] < 1.2  # real crops know no token grid
    assert len(metrics["colour"]["generated"]["mean"]) == 3
    assert "first row holds real crops" in (scratch_run / "index.html").read_text()


def test_export_pretrained_stores_bf16_ema_weights_metadata_and_card(scratch_run, tmp_path):
    folder = export_pretrained(scratch_run, tmp_path / "packaged", card="# card\n", extra={"step": 2})
    tensors = load_file(str(folder / "model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    metadata = json.loads((folder / "metadata.json").read_text())
    assert metadata["text_encoder"] == "minilm" and len(metadata["class_names"]) == CLASSES
    assert metadata["step"] == 2 and metadata["source"].endswith("ema")
    assert (folder / "MODEL_CARD.md").read_text() == "# card\n"


def test_export_refuses_a_model_over_the_size_limit(scratch_run, tmp_path, monkeypatch):
    monkeypatch.setattr(default_model, "MAX_PACKAGED_BYTES", 1024)
    with pytest.raises(DefaultModelError, match="MiB limit"):
        export_pretrained(scratch_run, tmp_path / "big", card="")
    assert not (tmp_path / "big").exists()  # nothing half-written under the final name


def test_demo_samples_the_packaged_model_first_then_fine_tunes_it(scratch_run, tmp_path, monkeypatch):
    packaged = export_pretrained(scratch_run, tmp_path / "packaged", card="")
    _use_packaged(monkeypatch, packaged)
    # Without a demo run the packaged model is the default of generate / serve.
    assert default_checkpoint() == packaged
    out = tmp_path / "tuned"
    run_demo(out, TINY)
    assert len(sorted(out.glob("pretrained_samples/*/*.png"))) == CLASSES
    assert len(sorted(out.glob("samples/*/*.png"))) == CLASSES
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["pretrained_model"] == str(packaged)
    assert len(metrics["models"]) == 2
    state = json.loads(next(out.glob("checkpoints/*/train_state.json")).read_text())
    assert state["extra"]["init_from"] == str(packaged)
    assert default_checkpoint() == out  # the finished demo run now comes first
