"""Ctrl-C during training: the step in progress finishes, a checkpoint is written at that
step, mupad.errors.Interrupted says how to resume, and resuming matches an uninterrupted run;
from the command line the run ends with exit code 130 and one line."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_training import config, fresh_model, toy_batches

from mupad.errors import Interrupted
from mupad.training.checkpoint import latest_checkpoint, list_checkpoints
from mupad.training.loop import TrainBatch, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def ctrl_c_during(step_index: int, times: int = 1):
    """A batch function that sends this process SIGINT `times` times while drawing the
    batch of 0-based step `step_index`."""

    def batches(step: int, generator: torch.Generator) -> TrainBatch:
        if step == step_index:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)
        return toy_batches(step, generator)

    return batches


def test_ctrl_c_finishes_the_step_saves_a_checkpoint_there_and_resume_matches(tmp_path):
    straight = tmp_path / "straight"
    Trainer(fresh_model(), config(), straight, toy_batches, progress=False).train()

    run = tmp_path / "run"
    with pytest.raises(Interrupted) as stopped:
        Trainer(fresh_model(), config(), run, ctrl_c_during(1), progress=False).train()
    # Step 2 (0-based 1) finished; checkpoint_every=3 would not have saved it.
    assert [step for step, _ in list_checkpoints(run)] == [2]
    message = str(stopped.value)
    assert "step 2 of 6" in message and "same command" in message and "step-0000002" in message
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored

    result = Trainer(fresh_model(), config(), run, toy_batches, progress=False).train()
    assert result.resumed_from == 2 and result.step == 6
    for name in ("model.safetensors", "ema/model.safetensors"):
        a = load_file(str(latest_checkpoint(straight) / name))
        b = load_file(str(latest_checkpoint(run) / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_a_second_ctrl_c_stops_at_once_without_a_new_checkpoint(tmp_path):
    with pytest.raises(KeyboardInterrupt) as stopped:
        Trainer(
            fresh_model(), config(), tmp_path, ctrl_c_during(4, times=2), progress=False
        ).train()
    assert not isinstance(stopped.value, Interrupted)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [3]  # the regular one only
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def _tile_folder(root):
    generator = torch.Generator().manual_seed(0)
    for name, colour in (("01_pink_stroma", (230, 150, 200)), ("02_purple_nuclei", (90, 40, 140))):
        (root / name).mkdir(parents=True)
        for i in range(3):
            noise = torch.randint(-20, 20, (24, 24, 3), generator=generator)
            array = (torch.tensor(colour) + noise).clamp(0, 255).to(torch.uint8).numpy()
            Image.fromarray(array).save(root / name / f"{i}.png")
    return root


def test_mupad_train_stops_on_sigint_with_exit_130_a_checkpoint_and_how_to_resume(tmp_path):
    data, run = _tile_folder(tmp_path / "tiles"), tmp_path / "run"
    command = [
        sys.executable, "-m", "mupad.cli", "train", "--data", str(data), "--out", str(run),
        "--preset", "tiny", "--crop", "16", "--batch-size", "4", "--log-every", "1",
        "--checkpoint-every", "100000", "--device", "cpu", "--precision", "fp32",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [*command, "--steps", "100000"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    log = run / "log.jsonl"
    deadline = time.monotonic() + 180
    while not (log.exists() and log.read_text().strip()):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no training step logged in 180 s"
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)

    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.startswith("interrupted:")]
    assert len(lines) == 1 and "same command" in lines[0], stderr
    (step, folder), *_ = list_checkpoints(run)
    assert f"stopped at step {step} of 100000" in lines[0] and folder.name in lines[0]
    state = json.loads((folder / "train_state.json").read_text())
    assert state["scheduler"]["next_step"] == step

    # The same command (with a reachable --steps) resumes from that checkpoint.
    resumed = subprocess.run(
        [*command, "--steps", str(step + 1)], env=env, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"trained to step {step + 1}" in " ".join(resumed.stdout.split())
