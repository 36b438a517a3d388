"""The frozen training configuration of a VAE run (serialised next to its checkpoints)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from mupad.config import Precision
from mupad.errors import MupadError


class VAEConfigError(MupadError, ValueError):
    """A VAE training setting is invalid; the message says which and how to fix it."""


@dataclass(frozen=True)
class VAETrainConfig:
    preset: str = "small"  # model preset, see mupad.vae.model.vae_preset_names()
    steps: int = 2000
    batch_size: int = 8
    crop: int = 64  # training crop side in pixels; a multiple of the downsample factor
    learning_rate: float = 2e-4
    warmup_steps: int = 50
    weight_decay: float = 0.0
    l1_weight: float = 1.0  # per-pixel mean |x - x_hat|
    mse_weight: float = 0.0  # per-pixel mean (x - x_hat)^2
    kl_weight: float = 1e-6  # KL per latent element
    grad_clip: float = 1.0  # 0 = off
    precision: Precision = Precision.FP32
    ema_decay: float = 0.0  # 0 = no EMA; otherwise the saved VAE holds the EMA weights
    seed: int = 0
    holdout_fraction: float = 0.1  # used only when no separate eval folder is given
    eval_every: int = 500  # 0 = only at the end
    eval_tiles: int = 64  # held-out tiles scored at each periodic evaluation (all at the end)
    log_every: int = 25
    checkpoint_every: int = 250
    keep_checkpoints: int = 1
    scale_samples: int = 256  # training crops encoded to fit scaling_factor / shift_factor

    def __post_init__(self) -> None:
        if isinstance(self.precision, str):
            try:
                object.__setattr__(self, "precision", Precision(self.precision))
            except ValueError as exc:
                choices = ", ".join(p.value for p in Precision)
                raise VAEConfigError(
                    f"precision {self.precision!r} is not one of {choices}"
                ) from exc
        positive = ("steps", "batch_size", "crop", "log_every", "checkpoint_every", "scale_samples")
        for name in positive:
            if getattr(self, name) < 1:
                raise VAEConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise VAEConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        if min(self.l1_weight, self.mse_weight, self.kl_weight) < 0:
            raise VAEConfigError("l1_weight, mse_weight and kl_weight must be >= 0")
        if self.l1_weight == 0 and self.mse_weight == 0:
            raise VAEConfigError("set l1_weight or mse_weight > 0: nothing would be reconstructed")
        if not 0.0 <= self.ema_decay < 1.0:
            raise VAEConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise VAEConfigError(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction}")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["precision"] = self.precision.value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VAETrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise VAEConfigError(f"unknown VAETrainConfig fields {unknown}")
        return cls(**data)
