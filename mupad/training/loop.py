"""The training loop: flow matching (+ alignment, + CLS denoising) from one CPU to many GPUs.

Reproducibility by construction: everything random in step `s` (the batch, condition
dropout, times, noise) comes from a generator seeded with (seed, s) and is drawn for the
whole global batch, of which each process then takes its rows (see `distributed`). A run
that is killed at any instant and restarted with the same command resumes from its newest
checkpoint and replays exactly the steps the uninterrupted run would have taken.

One optimizer step = `grad_accumulation` micro-batches per process, bf16 autocast over fp32
master weights (losses reduced in fp32), gradient clipping, a warm-up (+ cosine) learning
rate, a guard that skips steps whose loss or gradient is not finite (and stops after
`max_nonfinite_steps`), EMA, and — on rank 0 only — JSONL/TensorBoard logs, sample grids
and atomic, keep-last-N checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from mupad.conditions import Conditions
from mupad.config import LRScheduleKind, Precision, TrainConfig, to_dict
from mupad.errors import Interrupted, MupadError
from mupad.models.sit import SiT
from mupad.training import distributed
from mupad.training.checkpoint import (
    CheckpointContents,
    ResumeError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from mupad.training.distributed import DistContext
from mupad.training.ema import EMA
from mupad.training.interrupt import StopRequest
from mupad.training.objectives import (
    LossTerms,
    ObjectiveBatch,
    TrainingModule,
    draw_objective_batch,
    objective_losses,
)
from mupad.training.rng import capture_rng, restore_rng
from mupad.training.teacher import OnlineTeacher, TeacherFeatures, TeacherSpec, online_teacher

logger = logging.getLogger(__name__)

# Train-config fields that may differ when a run is resumed (they do not change the maths
# of the steps already taken). `steps` is one of them unless a cosine schedule depends on it.
_RESUMABLE_CHANGES = {
    "steps",
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "sample_every",
    "gradient_checkpointing",
    "max_nonfinite_steps",
}


@dataclass(frozen=True)
class TrainBatch:
    x0: torch.Tensor  # (B, C, H, W) clean data in the model's space (pixels in [-1, 1] or latents)
    cond: Conditions | None = None
    teacher: TeacherFeatures | None = None  # cached teacher features of the clean images
    pixels: torch.Tensor | None = None  # (B, 3, H', W') clean images in [-1, 1], online teacher
    # (B, C_ctx, H, W) clean context concatenated to x_t along channels before the model:
    # never noised, never dropped (e.g. the H&E latent of H&E -> mIF). The model has
    # in_channels = C + C_ctx and out_channels = C; the loss is on the C target channels.
    x_context: torch.Tensor | None = None


BatchFn = Callable[[int, torch.Generator], TrainBatch]
CheckpointHook = Callable[[int, Path], None]
SampleHook = Callable[[int, SiT], Any]  # (step, EMA model) -> anything; rank 0 only


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator that drives every random choice of one training step."""
    generator = torch.Generator()
    generator.manual_seed((seed * 1_000_003 + step) % (2**63 - 1))
    return generator


class WarmupSchedule(Protocol):
    learning_rate: float
    warmup_steps: int


def learning_rate(config: WarmupSchedule, step: int) -> float:
    """Linear warm-up to `learning_rate`, then constant — or, for a TrainConfig with
    lr_schedule=cosine, a cosine decay to `min_learning_rate` at the last step."""
    if config.warmup_steps > 0 and step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    if getattr(config, "lr_schedule", LRScheduleKind.CONSTANT) is LRScheduleKind.COSINE:
        # Steps are 0-based: the last one, steps - 1, trains at exactly min_learning_rate.
        span = max(1, config.steps - 1 - config.warmup_steps)  # type: ignore[attr-defined]
        progress = min(1.0, (step - config.warmup_steps) / span)
        low = config.min_learning_rate  # type: ignore[attr-defined]
        return low + 0.5 * (config.learning_rate - low) * (1.0 + math.cos(math.pi * progress))
    return config.learning_rate


def autocast_context(precision: Precision, device: torch.device) -> contextlib.AbstractContextManager:
    if precision is Precision.BF16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class NonFiniteLossError(MupadError, FloatingPointError):
    """Too many steps had a NaN/Inf loss or gradient."""


@dataclass
class TrainResult:
    step: int
    last_loss: float
    checkpoint: Path | None
    resumed_from: int
    skipped_steps: int = 0


class _MetricWriter:
    """JSONL always; TensorBoard scalars too when the `tensorboard` package is installed."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.path = run_dir / "log.jsonl"
        self.file = self.path.open("a") if enabled else None
        self.board = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.info("tensorboard is not installed; logging to %s only", self.path)
            else:
                self.board = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.board is not None:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)):
                    self.board.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.board is not None:
            self.board.close()


class Trainer:
    """Trains `model` on batches from `batch_fn` and writes everything to `run_dir`.

    Re-running with the same arguments resumes from the newest checkpoint in `run_dir`.
    `teacher` gives the teacher features' width and grid when the objective aligns to cached
    features (`TrainBatch.teacher`); an online teacher (`online`, else built from the
    config) encodes `TrainBatch.pixels` instead. Under
    torchrun pass `dist=distributed.from_environment()`; the model is wrapped here.
    """

    def __init__(
        self,
        model: SiT,
        config: TrainConfig,
        run_dir: str | Path,
        batch_fn: BatchFn,
        *,
        device: str | torch.device | None = None,
        dist: DistContext | None = None,
        teacher: TeacherSpec | None = None,
        online: OnlineTeacher | None = None,
        metadata: dict[str, Any] | None = None,
        on_checkpoint: CheckpointHook | None = None,
        sample_hook: SampleHook | None = None,
        progress: bool = True,
    ) -> None:
        if dist is None:
            dist = DistContext(device=distributed.resolve_device(device or "cpu"))
        self.dist = dist
        self.device = dist.device
        self.config = config
        self.alignment = config.alignment
        self.run_dir = Path(run_dir)
        self.batch_fn = batch_fn
        self.metadata = metadata or {}
        self.on_checkpoint = on_checkpoint
        self.sample_hook = sample_hook
        self.progress = progress and dist.is_main
        self.online_teacher = online or online_teacher(self.alignment, self.device)
        if self.online_teacher is not None:
            teacher = self.online_teacher.spec
        self.teacher_spec = teacher if self.alignment.uses_teacher else None
        self.module = TrainingModule(model.to(self.device), self.alignment, self.teacher_spec)
        model.gradient_checkpointing = config.gradient_checkpointing
        self.model = model
        self.wrapped = distributed.wrap(self.module, dist, config.parallel)
        # EMA of the backbone only (the projector is a training device, never sampled from).
        self.ema = EMA(self.model, config.ema_decay)
        self.optimizer = torch.optim.AdamW(
            self.wrapped.parameters(),
            lr=config.learning_rate,
            betas=(config.beta1, config.beta2),
            weight_decay=config.weight_decay,
        )
        self.forward_module = torch.compile(self.wrapped) if config.compile else self.wrapped
        self.skipped_steps = 0
        self.log_path = self.run_dir / "log.jsonl"

    # ---------------------------------------------------------------- resume
    def _check_compatible(self, contents: CheckpointContents) -> None:
        folder_model = json.loads(
            (latest_checkpoint(self.run_dir) / "config.json").read_text()  # type: ignore[operator]
        )
        current_model = to_dict(self.model.config)
        if folder_model != current_model:
            changed = sorted(k for k in current_model if folder_model.get(k) != current_model[k])
            raise ResumeError(
                f"{self.run_dir} holds a run of a different model (fields {changed} differ). "
                "Use another output folder, or delete this one to start over."
            )
        saved = contents.state["train_config"]
        current = to_dict(self.config)
        free = set(_RESUMABLE_CHANGES)
        if self.config.lr_schedule is LRScheduleKind.COSINE:
            free.discard("steps")
        changed = sorted(k for k in current if saved.get(k) != current[k] and k not in free)
        if changed:
            raise ResumeError(
                f"{self.run_dir} was trained with other settings ({', '.join(changed)} differ); "
                "resuming would not reproduce the run. Use the original settings, another "
                "output folder, or delete this one."
            )

    def _resume(self) -> int:
        folder = latest_checkpoint(self.run_dir)
        if folder is None:
            return 0
        contents = load_checkpoint(folder)
        self._check_compatible(contents)
        full = {f"model.{k}": v for k, v in contents.model.items()}
        for name, tensors in contents.modules.items():
            full.update({f"{name}.{k}": v for k, v in tensors.items()})
        distributed.load_full_model_state(self.wrapped, full)
        distributed.load_full_optimizer_state(self.wrapped, self.optimizer, contents.optimizer)
        if contents.ema is not None:
            self.ema.load_state_dict(contents.ema, contents.state["ema_updates"])
        self.skipped_steps = int(contents.state.get("counters", {}).get("skipped_steps", 0))
        restore_rng(contents.rng, contents.state.get("rng"))
        if self.dist.is_main:
            self._truncate_log(contents.step)
        logger.info("resumed %s from step %d", self.run_dir, contents.step)
        return contents.step

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

    # ---------------------------------------------------------------- checkpoints
    def _save(self, step: int) -> Path | None:
        """Gather everything (collective), write on rank 0, wait for it on every rank."""
        config = self.config
        full = distributed.full_model_state(self.wrapped)
        optimizer = distributed.full_optimizer_state(self.wrapped, self.optimizer)
        ema = self.ema.state_dict()
        folder = None
        if self.dist.is_main:
            model = {k.removeprefix("model."): v for k, v in full.items() if k.startswith("model.")}
            projector = {
                k.removeprefix("projector."): v for k, v in full.items() if k.startswith("projector.")
            }
            rng_tensors, rng_states = capture_rng()
            records_per_epoch = self.metadata.get("records_per_epoch")
            samples_seen = step * config.batch_size
            data = {"samples_seen": samples_seen}
            if records_per_epoch:
                data.update(
                    epoch=samples_seen // records_per_epoch,
                    epoch_position=samples_seen % records_per_epoch,
                )
            contents = CheckpointContents(
                step=step,
                model=model,
                ema=ema,
                optimizer=optimizer,
                modules={"projector": projector} if projector else {},
                rng=rng_tensors,
                state={
                    "ema_updates": self.ema.num_updates,
                    "train_config": to_dict(config),
                    "scheduler": {
                        "kind": config.lr_schedule.value,
                        "warmup_steps": config.warmup_steps,
                        "next_step": step,
                        "next_learning_rate": learning_rate(config, step),
                    },
                    "data": data,
                    "counters": {"skipped_steps": self.skipped_steps},
                    "world_size": self.dist.world_size,
                    "rng": rng_states,
                    "extra": self.metadata,
                },
            )
            folder = save_checkpoint(
                self.run_dir, contents, self.model.config, keep=config.keep_checkpoints
            )
            if self.on_checkpoint is not None:
                self.on_checkpoint(step, folder)
        self.dist.barrier()
        return folder

    def ema_model(self) -> SiT:
        """A fresh SiT holding the EMA weights, in eval mode (collective under FSDP)."""
        weights = self.ema.state_dict()
        model = SiT(self.model.config)
        model.load_state_dict({k: v.to(model.final_proj.weight.dtype) for k, v in weights.items()})
        return model.to(self.device).eval()

    # ---------------------------------------------------------------- one step
    def _local_batch(self, step: int) -> ObjectiveBatch:
        config = self.config
        generator = step_generator(config.seed, step)
        batch = self.batch_fn(step, generator)
        if batch.x0.shape[0] != config.batch_size:
            raise ValueError(
                f"the batch function returned {batch.x0.shape[0]} rows at step {step}, but the "
                f"global batch size is {config.batch_size}"
            )
        drawn = draw_objective_batch(
            batch.x0,
            batch.cond,
            generator,
            condition_dropout=config.condition_dropout,
            cls_dim=self.model.config.cls_dim,
            teacher=batch.teacher if self.alignment.uses_teacher else None,
            pixels=batch.pixels if self.online_teacher is not None else None,
            logit_normal=config.logit_normal,
        )
        if batch.x_context is not None:
            context = batch.x_context
            if context.shape[0] != batch.x0.shape[0] or context.shape[-2:] != batch.x0.shape[-2:]:
                raise ValueError(
                    f"TrainBatch.x_context {tuple(context.shape)} must match x0 "
                    f"{tuple(batch.x0.shape)} in batch size, height and width"
                )
            # x_t is the model input; it is row-sliced with the rest of the batch below.
            drawn = dataclasses.replace(
                drawn, x_t=torch.cat([drawn.x_t, context.to(drawn.x_t.dtype)], dim=1)
            )
        start, stop = self.dist.rows(config.batch_size)
        local = drawn.rows(start, stop).to(self.device)
        if self.online_teacher is not None:
            if local.pixels is None:
                raise ValueError(
                    "an online teacher needs the clean images: the batch function must fill "
                    "TrainBatch.pixels"
                )
            local = dataclasses.replace(local, teacher=self.online_teacher(local.pixels))
        return local

    def _step(self, step: int) -> dict[str, float]:
        config = self.config
        local = self._local_batch(step)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        accumulation = config.grad_accumulation
        rows = local.batch_size
        if rows % accumulation:
            raise distributed.DistributedError(
                f"{rows} rows per process do not split into {accumulation} equal micro-batches"
            )
        micro = rows // accumulation
        self.optimizer.zero_grad(set_to_none=True)
        # Sums over micro-batches of: total, velocity, alignment, cls, "was finite".
        sums = torch.zeros(5, dtype=torch.float64)
        for index in range(accumulation):
            part = local.rows(index * micro, (index + 1) * micro)
            last = index == accumulation - 1
            with distributed.gradient_sync(self.wrapped, enabled=last):
                with autocast_context(config.precision, self.device):
                    terms = objective_losses(self.forward_module, part, self.alignment)
                (terms.total / accumulation).backward()
            sums += _term_values(terms)
        max_norm = config.grad_clip if config.grad_clip > 0 else math.inf
        grad_norm = distributed.full_tensor(
            torch.nn.utils.clip_grad_norm_(self.wrapped.parameters(), max_norm)
        )
        # Mean over micro-batches, then over processes (equal sizes: the global-batch mean).
        means = self.dist.sum(sums / accumulation) / self.dist.world_size
        grad_norm = float(grad_norm)
        finite = math.isfinite(grad_norm) and means[4].item() == 1.0
        if finite:
            self.optimizer.step()
            self.ema.update(self.model)
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            logger.warning(
                "step %d: non-finite loss or gradient (grad norm %s); skipped (%d so far)",
                step + 1,
                grad_norm,
                self.skipped_steps,
            )
            if self.skipped_steps > config.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"{self.skipped_steps} steps had a NaN/Inf loss or gradient (limit "
                    f"max_nonfinite_steps={config.max_nonfinite_steps}); lower the learning "
                    "rate, check the data for NaN, or use --precision fp32"
                )
        values = {
            "loss": means[0].item(),
            "velocity_loss": means[1].item(),
            "grad_norm": grad_norm,
            "skipped": not finite,
        }
        if self.alignment.uses_teacher:
            values["alignment_loss"] = means[2].item()
        if self.model.config.cls_dim:
            values["cls_loss"] = means[3].item()
        return values

    # ---------------------------------------------------------------- main loop
    def _stop_requested(self, stop: StopRequest) -> bool:
        """Ctrl-C seen by any process (every process stops at the same step)."""
        if not self.dist.enabled:
            return stop.requested
        return bool(self.dist.sum(torch.tensor([float(stop.requested)]))[0] > 0)

    def train(self) -> TrainResult:
        """Train to `config.steps`. Ctrl-C stops after the current step with a checkpoint
        there and raises mupad.errors.Interrupted (re-running resumes from it)."""
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.dist.barrier()
        start = self._resume()
        config = self.config
        self.wrapped.train()
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
        writer = _MetricWriter(self.run_dir, enabled=self.dist.is_main)
        window_start, window_images = time.perf_counter(), 0
        try:
            with StopRequest() as stop:
                for step in range(start, config.steps):
                    values = self._step(step)
                    last_loss = values["loss"]
                    window_images += config.batch_size
                    done = step + 1
                    bar.update(1)
                    elapsed = time.perf_counter() - window_start
                    bar.set_postfix(
                        loss=f"{last_loss:.4f}", img_s=f"{window_images / max(elapsed, 1e-9):.1f}"
                    )
                    if done % config.log_every == 0 or done == config.steps:
                        record = {
                            "step": done,
                            **values,
                            "lr": learning_rate(config, step),
                            "images_per_s": window_images / max(elapsed, 1e-9),
                            "skipped_total": self.skipped_steps,
                            "time": time.time(),
                        }
                        writer.write(record)
                        window_start, window_images = time.perf_counter(), 0
                    if (
                        config.sample_every
                        and self.sample_hook is not None
                        and (done % config.sample_every == 0 or done == config.steps)
                    ):
                        model = self.ema_model()
                        if self.dist.is_main:
                            self.sample_hook(done, model)
                        self.dist.barrier()
                    saved = done % config.checkpoint_every == 0 or done == config.steps
                    if saved:
                        checkpoint = self._save(done)
                    if done < config.steps and self._stop_requested(stop):
                        if not saved:
                            checkpoint = self._save(done)
                        raise Interrupted(
                            f"stopped at step {done} of {config.steps} with a checkpoint in "
                            f"{checkpoint}; run the same command again to resume from there"
                        )
        finally:
            writer.close()
            bar.close()
        return TrainResult(
            step=config.steps,
            last_loss=last_loss,
            checkpoint=checkpoint,
            resumed_from=start,
            skipped_steps=self.skipped_steps,
        )


def _term_values(terms: LossTerms) -> torch.Tensor:
    """(total, velocity, alignment, cls, finite) of one micro-batch as fp64 numbers."""
    total = terms.total.detach().double()
    return torch.stack(
        [
            total,
            terms.velocity.double(),
            terms.alignment.double() if terms.alignment is not None else total.new_zeros(()),
            terms.cls.double() if terms.cls is not None else total.new_zeros(()),
            torch.isfinite(total).double(),
        ]
    ).cpu()


def read_log(run_dir: str | Path) -> list[dict[str, Any]]:
    """The JSONL training log of a run as a list of records."""
    path = Path(run_dir) / "log.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
