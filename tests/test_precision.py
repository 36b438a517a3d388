"""`--precision auto`: bf16 autocast only where the hardware computes bf16 natively (on an
AVX2-only CPU it made a training step 18x slower than fp32); configs hold the resolved value."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from mupad import precision as precision_module
from mupad.cli import app
from mupad.config import ConfigError, Precision
from mupad.data.tiles import bundled_kather_dir
from mupad.precision import PrecisionChoice, resolve_precision
from mupad.training.checkpoint import checkpoint_dir

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def cpu_with(monkeypatch):
    def set_flags(*flags: str) -> None:
        monkeypatch.setattr(precision_module, "cpu_flags", lambda: frozenset(flags))

    return set_flags


@pytest.mark.parametrize("choice", ["fp32", "bf16", Precision.BF16, PrecisionChoice.FP32])
def test_explicit_choices_pass_through_on_any_device(choice, cpu_with):
    cpu_with()  # no native bf16: an explicit choice still wins
    expected = Precision(getattr(choice, "value", choice))
    assert resolve_precision(choice, "cpu") is expected


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (("avx2", "fma"), Precision.FP32),
        (("avx2", "avx512f", "avx512bw"), Precision.FP32),  # AVX-512 alone emulates bf16
        (("avx512f", "avx512_bf16"), Precision.BF16),
        (("amx_tile", "amx_bf16"), Precision.BF16),
        ((), Precision.FP32),  # flags unknown (not Linux)
    ],
)
def test_auto_on_cpu_follows_native_bf16_support(flags, expected, cpu_with):
    cpu_with(*flags)
    assert resolve_precision("auto", "cpu") is expected
    assert resolve_precision(PrecisionChoice.AUTO, torch.device("cpu")) is expected


def test_auto_elsewhere_and_bad_names(cpu_with):
    cpu_with("amx_bf16")
    assert resolve_precision("auto", "meta") is Precision.FP32
    if not torch.cuda.is_available():
        assert resolve_precision("auto", "auto") is Precision.BF16  # "auto" device = this CPU
    with pytest.raises(ConfigError, match="auto, fp32, bf16"):
        resolve_precision("fp8", "cpu")


def test_real_cpu_flags_are_read_once_and_are_strings():
    precision_module.cpu_flags.cache_clear()
    flags = precision_module.cpu_flags()
    assert flags is precision_module.cpu_flags()
    assert all(isinstance(f, str) and f for f in flags)


def test_train_command_stores_the_resolved_precision(tmp_path, cpu_with):
    cpu_with("avx2")
    run = tmp_path / "run"
    args = [
        "train", "--data", bundled_kather_dir(), "--out", run, "--preset", "tiny", "--crop", 16,
        "--steps", 1, "--batch-size", 2, "--device", "cpu",
    ]  # fmt: skip
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    state = json.loads((checkpoint_dir(run, 1) / "train_state.json").read_text())
    assert state["train_config"]["precision"] == "fp32"  # auto on an AVX2-only CPU
