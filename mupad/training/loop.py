"""Single-process training loop: flow matching with condition dropout, AdamW, EMA, bf16.

Reproducibility by construction: everything random in step `s` (the batch, condition
dropout, times and noise) comes from a generator seeded with (seed, s). A run that is
stopped and restarted from its last checkpoint therefore replays exactly the steps it
would have taken, and ends bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from mupad.conditions import Conditions
from mupad.config import Precision, TrainConfig, to_dict
from mupad.models.sit import CONFIG_NAME
from mupad.training.checkpoint import (
    ResumeError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from mupad.training.ema import EMA
from mupad.transport.losses import make_noisy_batch, velocity_loss

logger = logging.getLogger(__name__)

# Train-config fields that may differ when a run is resumed (they do not change the maths
# of the steps already taken).
_RESUMABLE_CHANGES = {"steps", "log_every", "checkpoint_every", "keep_checkpoints"}


@dataclass(frozen=True)
class TrainBatch:
    x0: torch.Tensor  # (B, C, H, W) clean data in the model's space (pixels in [-1, 1] or latents)
    cond: Conditions | None = None


BatchFn = Callable[[int, torch.Generator], TrainBatch]
CheckpointHook = Callable[[int, Path], None]


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator that drives every random choice of one training step."""
    generator = torch.Generator()
    generator.manual_seed((seed * 1_000_003 + step) % (2**63 - 1))
    return generator


class WarmupSchedule(Protocol):
    learning_rate: float
    warmup_steps: int


def learning_rate(config: WarmupSchedule, step: int) -> float:
    """Linear warm-up to `learning_rate`, then constant (any config with those two fields)."""
    if config.warmup_steps > 0 and step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    return config.learning_rate


def autocast_context(precision: Precision, device: torch.device) -> contextlib.AbstractContextManager:
    if precision is Precision.BF16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class TrainResult:
    step: int
    last_loss: float
    checkpoint: Path | None
    resumed_from: int


class Trainer:
    """Trains `model` on batches from `batch_fn` and writes everything to `run_dir`.

    Re-running with the same arguments resumes from the newest checkpoint in `run_dir`.
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        run_dir: str | Path,
        batch_fn: BatchFn,
        *,
        device: str | torch.device = "cpu",
        metadata: dict[str, Any] | None = None,
        on_checkpoint: CheckpointHook | None = None,
        progress: bool = True,
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.config = config
        self.run_dir = Path(run_dir)
        self.batch_fn = batch_fn
        self.metadata = metadata or {}
        self.on_checkpoint = on_checkpoint
        self.progress = progress
        self.ema = EMA(self.model, config.ema_decay)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=config.learning_rate,
            betas=(config.beta1, config.beta2),
            weight_decay=config.weight_decay,
        )
        self.log_path = self.run_dir / "log.jsonl"

    # ---------------------------------------------------------------- resume
    def _resume(self) -> int:
        folder = latest_checkpoint(self.run_dir)
        if folder is None:
            return 0
        saved_model = json.loads((folder / CONFIG_NAME).read_text())
        current_model = to_dict(self.model.config)  # type: ignore[attr-defined]
        if saved_model != current_model:
            changed = sorted(k for k in current_model if saved_model.get(k) != current_model[k])
            raise ResumeError(
                f"{self.run_dir} holds a run of a different model (fields {changed} differ). "
                "Use another output folder, or delete this one to start over."
            )
        saved_train = json.loads((folder / "train_state.json").read_text())["train_config"]
        current_train = to_dict(self.config)
        changed = sorted(
            k
            for k in current_train
            if saved_train.get(k) != current_train[k] and k not in _RESUMABLE_CHANGES
        )
        if changed:
            raise ResumeError(
                f"{self.run_dir} was trained with other settings ({', '.join(changed)} differ); "
                "resuming would not reproduce the run. Use the original settings, another "
                "output folder, or delete this one."
            )
        state = load_checkpoint(folder, self.model, self.ema, self.optimizer)
        self._truncate_log(state.step)
        logger.info("resumed %s from step %d", self.run_dir, state.step)
        return state.step

    def _truncate_log(self, step: int) -> None:
        """Drop log lines written after the checkpoint we resume from (they will be redone)."""
        if not self.log_path.exists():
            return
        kept = [
            line
            for line in self.log_path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step
        ]
        self.log_path.write_text("".join(line + "\n" for line in kept))

    # ---------------------------------------------------------------- one step
    def _step(self, step: int) -> tuple[float, float]:
        config = self.config
        generator = step_generator(config.seed, step)
        batch = self.batch_fn(step, generator)
        x0 = batch.x0.to(self.device, non_blocking=True)
        cond = batch.cond
        if cond is not None:
            cond = cond.dropout(config.condition_dropout, generator).to(self.device)
        noisy = make_noisy_batch(x0, generator=generator)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        with autocast_context(config.precision, self.device):
            prediction = self.model(noisy.x_t, noisy.t, cond).velocity
        # The loss is computed in fp32 whatever the autocast dtype.
        loss = velocity_loss(prediction.float(), noisy.target.float()).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"loss became {loss.item()} at step {step}; lower the learning rate or use "
                "--precision fp32"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        max_norm = config.grad_clip if config.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.optimizer.step()
        self.ema.update(self.model)
        return loss.item(), float(grad_norm)

    # ---------------------------------------------------------------- main loop
    def train(self) -> TrainResult:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        start = self._resume()
        config = self.config
        self.model.train()
        last_loss = float("nan")
        checkpoint: Path | None = latest_checkpoint(self.run_dir) if start else None
        bar = tqdm(
            total=config.steps,
            initial=start,
            desc="train",
            unit="step",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        window_start, window_images = time.perf_counter(), 0
        with self.log_path.open("a") as log:
            for step in range(start, config.steps):
                loss, grad_norm = self._step(step)
                last_loss = loss
                window_images += config.batch_size
                done = step + 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if done % config.log_every == 0 or done == config.steps:
                    elapsed = time.perf_counter() - window_start
                    record = {
                        "step": done,
                        "loss": loss,
                        "grad_norm": grad_norm,
                        "lr": learning_rate(config, step),
                        "images_per_s": window_images / max(elapsed, 1e-9),
                        "time": time.time(),
                    }
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    window_start, window_images = time.perf_counter(), 0
                if done % config.checkpoint_every == 0 or done == config.steps:
                    checkpoint = save_checkpoint(
                        self.run_dir,
                        done,
                        self.model,
                        self.ema,
                        self.optimizer,
                        to_dict(config),
                        extra=self.metadata,
                        keep=config.keep_checkpoints,
                    )
                    if self.on_checkpoint is not None:
                        self.on_checkpoint(done, checkpoint)
        bar.close()
        return TrainResult(
            step=config.steps, last_loss=last_loss, checkpoint=checkpoint, resumed_from=start
        )


def read_log(run_dir: str | Path) -> list[dict[str, Any]]:
    """The JSONL training log of a run as a list of records."""
    path = Path(run_dir) / "log.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
