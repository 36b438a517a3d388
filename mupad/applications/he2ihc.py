"""H&E -> IHC (paper section 5, eq. 6): a rectified flow in embedding space, then a SiT
fine-tuned on IHC tiles generates the IHC tile from the predicted embedding.

    H&E tile --encoder--> H&E embedding --flow (6-block residual MLP)--> IHC embedding
             --image-condition stream--> SiT fine-tuned on IHC --> IHC tile

The flow's time convention, defined here once on top of `mupad.transport.paths`
(t = 0 data, t = 1 noise): the IHC embedding takes the place of the data and the H&E
embedding the place of the noise,

    x_t = (1 - t) * ihc + t * he      = paths.interpolate(ihc, he, t)      (`flow_interpolate`)
    v   = he - ihc                     = paths.velocity_target(ihc, he)    (`flow_velocity_target`)

and a prediction integrates dx/dt = v_theta(x, t) from t = 1 (x = the H&E embedding) down to
t = 0 with the project's ODE samplers (`samplers.euler_ode` / `heun_ode`). Both embeddings
are standardised per domain first (per-dimension mean and std of the training pairs; the
std floored at `std_floor` times its mean so near-constant dimensions are not blown up)
and, with `components` = k > 0, projected on each domain's top-k principal axes (the
regime for a few hundred pairs: a 2048-d flow memorises them). The network's output layer
starts at zero, so an untrained flow returns the H&E embedding moment-matched to the IHC
statistics. `dropout` and `source_noise` (Gaussian noise on the H&E end, training only)
regularise small pair sets.

Pieces:
- `EmbeddingFlowConfig`, `ResidualFlowMLP`, `EmbeddingFlow` (predict / save_pretrained /
  from_pretrained; a folder of config.json, metadata.json, model.safetensors, stats.safetensors),
- `train_embedding_flow`: the rectified-flow loop, exactly resumable from `out/checkpoints/`,
- `evaluate_flow`: held-out cosine (and retrieval, R^2) of the predicted vs the true IHC
  embedding, next to the baselines "H&E embedding itself", "mean IHC embedding",
  "moment-matched H&E" and a ridge regression,
- `EmbeddingSpec` / `embed_tiles`: which encoder and which tokens (global embedding or all),
- `train_ihc_generator`: the SiT on IHC tiles conditioned on their own IHC embeddings
  through the image stream (`mupad.training.loop.Trainer`),
- `HEToIHCTranslator`: uint8 H&E tiles (B, S, S, 3) -> uint8 IHC tiles (B, S, S, 3),
- `apply_to_he`: translate a tile folder or an H&E image, one PNG + sidecar JSON per tile.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from mupad.conditions import Conditions, ConditionStream
from mupad.config import (
    ConfigError,
    ModelConfig,
    SampleConfig,
    SamplerKind,
    TrainConfig,
    from_dict,
    model_preset,
    parse_enum,
    to_dict,
)
from mupad.data.tiles import load_image_tiles, to_unit_range
from mupad.errors import MupadError
from mupad.fileio import atomic_directory, atomic_write_text
from mupad.models.embeddings import TimestepEmbedder
from mupad.training.checkpoint import (
    ResumeError,
    checkpoint_dir,
    latest_checkpoint,
    list_checkpoints,
    optimizer_tensors,
    restore_optimizer,
)
from mupad.training.loop import TrainBatch, learning_rate, step_generator
from mupad.transport import paths
from mupad.transport.samplers import euler_ode, heun_ode

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
METADATA_NAME = "metadata.json"
WEIGHTS_NAME = "model.safetensors"
STATS_NAME = "stats.safetensors"
TRAIN_STATE_NAME = "train_state.json"
OPTIMIZER_NAME = "optimizer.safetensors"
FLOW_FORMAT = "mupad-embedding-flow"

# Train-config fields that may change when a run is resumed (they do not alter the steps).
_RESUMABLE_FIELDS = {
    "steps",
    "log_every",
    "checkpoint_every",
    "eval_every",
    "sample_steps",
    "sampler",
}


class HE2IHCError(MupadError, ValueError):
    """Inputs to the H&E -> IHC pipeline that cannot work; the message says how to fix them."""


# --------------------------------------------------------------------------------------
# The flow's path: IHC at t = 0 (the data end), H&E at t = 1 (the source end)
# --------------------------------------------------------------------------------------

SOURCE_TIME = paths.T_NOISE  # t = 1: the H&E embedding
TARGET_TIME = paths.T_DATA  # t = 0: the IHC embedding


def flow_interpolate(he: torch.Tensor, ihc: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) * ihc + t * he (IHC in the data slot, H&E in the noise slot)."""
    return paths.interpolate(ihc, he, t)


def flow_velocity_target(he: torch.Tensor, ihc: torch.Tensor) -> torch.Tensor:
    """dx_t/dt = he - ihc."""
    return paths.velocity_target(ihc, he)


# --------------------------------------------------------------------------------------
# Config and network
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbeddingFlowConfig:
    """The embedding flow: network shape, optimisation and integration."""

    dim: int = 2048  # embedding width D (2048 for the Inception default)
    num_tokens: int = 1  # 1: one global embedding per tile (B, D); T > 1: tokens (B, T, D)
    hidden: int = 512
    blocks: int = 6  # residual blocks (the paper's "6-layer MLP")
    mlp_ratio: float = 2.0  # inner width of each block = hidden * mlp_ratio
    time_frequencies: int = 256  # sinusoidal features of t (mupad.models.embeddings)
    learning_rate: float = 3e-4
    weight_decay: float = 0.01
    warmup_steps: int = 100
    grad_clip: float = 1.0  # 0 disables
    steps: int = 2000
    batch_size: int = 64
    seed: int = 0
    std_floor: float = 0.1  # per-dim std floored at std_floor * mean std when standardising
    components: int = 0  # > 0: the flow works on this many principal axes per domain
    dropout: float = 0.0  # inside each residual block, training only
    source_noise: float = 0.0  # std of Gaussian noise added to the H&E source in training
    sample_steps: int = 16  # ODE steps from H&E (t = 1) to IHC (t = 0)
    sampler: SamplerKind = SamplerKind.EULER  # euler or heun (deterministic)
    log_every: int = 50
    eval_every: int = 0  # held-out loss/cosine every N steps (0: at the end only)
    checkpoint_every: int = 500

    def __post_init__(self) -> None:
        object.__setattr__(self, "sampler", parse_enum(SamplerKind, self.sampler))
        if self.sampler is SamplerKind.SDE:
            raise ConfigError("the embedding flow integrates an ODE: sampler must be euler or heun")
        for name in (
            "dim",
            "num_tokens",
            "hidden",
            "blocks",
            "time_frequencies",
            "steps",
            "batch_size",
            "sample_steps",
            "log_every",
            "checkpoint_every",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(
                    f"EmbeddingFlowConfig.{name} must be >= 1, got {getattr(self, name)}"
                )
        if self.mlp_ratio <= 0 or self.learning_rate <= 0:
            raise ConfigError("mlp_ratio and learning_rate must be positive")
        if (
            self.weight_decay < 0
            or self.grad_clip < 0
            or self.warmup_steps < 0
            or self.eval_every < 0
        ):
            raise ConfigError("weight_decay, grad_clip, warmup_steps and eval_every must be >= 0")
        if not 0.0 < self.std_floor <= 1.0:
            raise ConfigError(f"std_floor must be in (0, 1], got {self.std_floor}")
        if self.components < 0 or self.source_noise < 0 or not 0.0 <= self.dropout < 1.0:
            raise ConfigError("components and source_noise must be >= 0, dropout in [0, 1)")

    @property
    def width(self) -> int:
        """Width of the flow's working coordinates: `components`, else the embedding `dim`."""
        return self.components or self.dim


class ResidualFlowBlock(nn.Module):
    """h + Linear(SiLU(Linear(modulate(LayerNorm(h), time))))."""

    def __init__(self, hidden: int, mlp_ratio: float, dropout: float = 0.0) -> None:
        super().__init__()
        inner = max(1, round(hidden * mlp_ratio))
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Linear(hidden, 2 * hidden)  # time -> (shift, scale)
        self.fc1 = nn.Linear(hidden, inner)
        self.fc2 = nn.Linear(inner, hidden)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, h: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        # h (B, T, H); time (B, 1, H)
        shift, scale = self.modulation(F.silu(time)).chunk(2, dim=-1)
        y = self.norm(h) * (1.0 + scale) + shift
        return h + self.fc2(self.dropout(F.silu(self.fc1(y))))


class ResidualFlowMLP(nn.Module):
    """v_theta(x, t): input projection, `blocks` time-conditioned residual blocks, zero-init
    output. x is (B, D) or (B, T, D) (tokens share the weights and get a learned position
    offset), t is (B,); the output is shaped like x."""

    def __init__(self, config: EmbeddingFlowConfig) -> None:
        super().__init__()
        self.config = config
        self.input = nn.Linear(config.width, config.hidden)
        self.position = (
            nn.Parameter(torch.zeros(config.num_tokens, config.hidden))
            if config.num_tokens > 1
            else None
        )
        self.time = TimestepEmbedder(config.hidden, config.time_frequencies)
        self.blocks = nn.ModuleList(
            ResidualFlowBlock(config.hidden, config.mlp_ratio, config.dropout)
            for _ in range(config.blocks)
        )
        self.final_norm = nn.LayerNorm(config.hidden, eps=1e-6)
        self.output = nn.Linear(config.hidden, config.width)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        squeeze = x.dim() == 2
        tokens = x[:, None, :] if squeeze else x  # (B, T, D)
        expected = (1 if squeeze else self.config.num_tokens, self.config.width)
        if tuple(tokens.shape[1:]) != expected or (squeeze and self.config.num_tokens != 1):
            raise HE2IHCError(
                f"the flow takes {'(B, D)' if self.config.num_tokens == 1 else '(B, T, D)'} "
                f"inputs with T={self.config.num_tokens}, width={self.config.width}; got "
                f"{tuple(x.shape)}"
            )
        h = self.input(tokens)  # (B, T, H)
        if self.position is not None:
            h = h + self.position
        time = self.time(t.reshape(-1))[:, None, :]  # (B, 1, H)
        for block in self.blocks:
            h = block(h, time)
        v = self.output(self.final_norm(h))  # (B, T, D)
        return v[:, 0] if squeeze else v

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# --------------------------------------------------------------------------------------
# Standardisation and the trained flow
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbeddingStats:
    """How raw embeddings become the flow's working coordinates, per domain.

    Per-dimension mean and (floored) std, (D,) each; with `components` = k > 0 also the top-k
    principal axes of the standardised training embeddings, (D, k), and one scale (the RMS of
    the projected coordinates), so the flow works in k dimensions of about unit variance.
    Without a basis the working coordinates are the standardised embeddings themselves.
    """

    he_mean: torch.Tensor
    he_std: torch.Tensor
    ihc_mean: torch.Tensor
    ihc_std: torch.Tensor
    he_basis: torch.Tensor | None = None  # (D, k)
    ihc_basis: torch.Tensor | None = None  # (D, k)
    he_scale: torch.Tensor | None = None  # () RMS of the projected H&E coordinates
    ihc_scale: torch.Tensor | None = None

    @staticmethod
    def _moments(x: torch.Tensor, floor: float) -> tuple[torch.Tensor, torch.Tensor]:
        flat = x.reshape(-1, x.shape[-1]).double()  # (N*T, D)
        mean = flat.mean(dim=0)
        std = flat.std(dim=0, unbiased=False)
        std = std.clamp_min(floor * float(std.mean()) + 1e-12)
        return mean.float(), std.float()

    @staticmethod
    def _principal_axes(z: torch.Tensor, components: int) -> tuple[torch.Tensor, torch.Tensor]:
        flat = z.reshape(-1, z.shape[-1]).double()  # (N*T, D), centred by construction
        if components > min(flat.shape):
            raise HE2IHCError(
                f"components={components} exceeds min(pairs, dim) = {min(flat.shape)}; "
                "ask for fewer components or give more pairs"
            )
        _, _, vh = torch.linalg.svd(flat, full_matrices=False)
        basis = vh[:components].T  # (D, k)
        scale = (flat @ basis).square().mean().sqrt().clamp_min(1e-12)
        return basis.float().contiguous(), scale.float()

    @classmethod
    def fit(
        cls, he: torch.Tensor, ihc: torch.Tensor, std_floor: float, components: int = 0
    ) -> EmbeddingStats:
        he_mean, he_std = cls._moments(he, std_floor)
        ihc_mean, ihc_std = cls._moments(ihc, std_floor)
        stats = cls(he_mean, he_std, ihc_mean, ihc_std)
        if components:
            he_basis, he_scale = cls._principal_axes((he - he_mean) / he_std, components)
            ihc_basis, ihc_scale = cls._principal_axes((ihc - ihc_mean) / ihc_std, components)
            stats = dataclasses.replace(
                stats,
                he_basis=he_basis,
                ihc_basis=ihc_basis,
                he_scale=he_scale,
                ihc_scale=ihc_scale,
            )
        return stats

    def standardize_he(self, he: torch.Tensor) -> torch.Tensor:
        """Raw H&E embeddings (..., D) -> working coordinates (..., D or k)."""
        z = (he - self.he_mean.to(he)) / self.he_std.to(he)
        if self.he_basis is None:
            return z
        return (z @ self.he_basis.to(z)) / self.he_scale.to(z)  # type: ignore[union-attr]

    def standardize_ihc(self, ihc: torch.Tensor) -> torch.Tensor:
        """Raw IHC embeddings (..., D) -> working coordinates (..., D or k)."""
        z = (ihc - self.ihc_mean.to(ihc)) / self.ihc_std.to(ihc)
        if self.ihc_basis is None:
            return z
        return (z @ self.ihc_basis.to(z)) / self.ihc_scale.to(z)  # type: ignore[union-attr]

    def destandardize_ihc(self, z: torch.Tensor) -> torch.Tensor:
        """Working coordinates -> raw IHC embeddings (..., D)."""
        if self.ihc_basis is not None:
            z = (z * self.ihc_scale.to(z)) @ self.ihc_basis.to(z).T  # type: ignore[union-attr]
        return z * self.ihc_std.to(z) + self.ihc_mean.to(z)

    def per_dimension(self) -> EmbeddingStats:
        """The same means and stds without principal axes (plain standardisation)."""
        return dataclasses.replace(
            self, he_basis=None, ihc_basis=None, he_scale=None, ihc_scale=None
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            f.name: getattr(self, f.name).contiguous()
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> EmbeddingStats:
        return cls(
            **{
                f.name: tensors[f.name].float()
                for f in dataclasses.fields(cls)
                if f.name in tensors
            }
        )


def _write_flow_files(
    folder: Path,
    config: EmbeddingFlowConfig,
    state: dict[str, torch.Tensor],
    stats: EmbeddingStats,
    metadata: dict[str, Any],
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in state.items()}, str(folder / WEIGHTS_NAME)
    )
    save_file(stats.tensors(), str(folder / STATS_NAME))
    (folder / CONFIG_NAME).write_text(json.dumps(to_dict(config), indent=2, sort_keys=True) + "\n")
    (folder / METADATA_NAME).write_text(
        json.dumps({"format": FLOW_FORMAT, **metadata}, indent=2, default=str) + "\n"
    )


class EmbeddingFlow:
    """A trained embedding flow: network + standardisation + config + metadata (how the
    embeddings were made: encoder, tokens, tile size, mpp, stain)."""

    def __init__(
        self,
        model: ResidualFlowMLP,
        stats: EmbeddingStats,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self.model = model.eval()
        self.config = model.config
        self.stats = stats
        self.metadata = dict(metadata or {})

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> EmbeddingFlow:
        self.model.to(device)
        return self

    def velocity(
        self, x: torch.Tensor, t: torch.Tensor, cond: Conditions | None = None
    ) -> torch.Tensor:
        """The VelocityFn contract (cond is unused: the flow is unconditional in x)."""
        return self.model(x, t)

    @torch.no_grad()
    def predict(
        self,
        he: torch.Tensor,
        num_steps: int | None = None,
        sampler: SamplerKind | str | None = None,
    ) -> torch.Tensor:
        """H&E embeddings (B, D) or (B, T, D) -> predicted IHC embeddings, same shape, float32.

        Integrates from t = 1 (the standardised H&E embedding) to t = 0 with `num_steps`
        (default config.sample_steps) Euler or Heun steps, then undoes the IHC standardisation.
        """
        kind = parse_enum(SamplerKind, sampler or self.config.sampler)
        if kind is SamplerKind.SDE:
            raise HE2IHCError("the embedding flow is deterministic: use sampler euler or heun")
        integrate = heun_ode if kind is SamplerKind.HEUN else euler_ode
        self.model.eval()
        x = self.stats.standardize_he(he.float().to(self.device))
        z = integrate(
            self.velocity,
            x,
            None,
            num_steps or self.config.sample_steps,
            t_start=SOURCE_TIME,
            t_end=TARGET_TIME,
        )
        return self.stats.destandardize_ihc(z).cpu()

    def save_pretrained(self, folder: str | Path) -> Path:
        """config.json + metadata.json + model.safetensors + stats.safetensors (atomic)."""
        folder = Path(folder)
        with atomic_directory(folder) as tmp:
            _write_flow_files(tmp, self.config, self.model.state_dict(), self.stats, self.metadata)
        return folder

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, device: str | torch.device = "cpu"
    ) -> EmbeddingFlow:
        """Load a folder written by `save_pretrained` or `train_embedding_flow` (nothing is
        unpickled)."""
        folder = Path(folder)
        missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME, STATS_NAME) if not (folder / n).is_file()]
        if missing:
            raise HE2IHCError(
                f"{folder} is not an embedding-flow folder (missing {', '.join(missing)}); "
                "train one with `mupad staining train-flow`"
            )
        config = from_dict(EmbeddingFlowConfig, json.loads((folder / CONFIG_NAME).read_text()))
        metadata: dict[str, Any] = {}
        if (folder / METADATA_NAME).is_file():
            metadata = json.loads((folder / METADATA_NAME).read_text())
            metadata.pop("format", None)
        model = ResidualFlowMLP(config)
        model.load_state_dict(load_file(str(folder / WEIGHTS_NAME)))
        stats = EmbeddingStats.from_tensors(load_file(str(folder / STATS_NAME)))
        return cls(model.to(device), stats, metadata)


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


@dataclass
class FlowTrainResult:
    flow: EmbeddingFlow
    step: int
    resumed_from: int
    last_loss: float
    history: list[dict[str, Any]]


def _check_pairs(
    he: torch.Tensor, ihc: torch.Tensor, config: EmbeddingFlowConfig, what: str
) -> None:
    if he.shape != ihc.shape:
        raise HE2IHCError(
            f"{what}: H&E embeddings {tuple(he.shape)} and IHC embeddings {tuple(ihc.shape)} "
            "must have the same shape (one row per pair)"
        )
    expected = (config.dim,) if config.num_tokens == 1 else (config.num_tokens, config.dim)
    if tuple(he.shape[1:]) != expected or he.shape[0] < 1:
        raise HE2IHCError(
            f"{what}: expected embeddings (N, {', '.join(map(str, expected))}) for this config "
            f"(dim={config.dim}, num_tokens={config.num_tokens}), got {tuple(he.shape)}"
        )
    if not (torch.isfinite(he).all() and torch.isfinite(ihc).all()):
        raise HE2IHCError(f"{what}: the embeddings contain NaN or Inf")


def _fingerprint(he: torch.Tensor, ihc: torch.Tensor) -> list[float]:
    """A cheap signature of the training data, so a resume on other pairs is refused."""
    return [
        float(he.shape[0]),
        float(he.double().sum()),
        float(ihc.double().sum()),
        float(he.double().square().sum()),
        float(ihc.double().square().sum()),
    ]


def _truncate_log(path: Path, step: int) -> None:
    if not path.exists():
        return
    kept = [
        line
        for line in path.read_text().splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= step
    ]
    path.write_text("".join(line + "\n" for line in kept))


def _save_flow_checkpoint(
    out: Path,
    step: int,
    model: ResidualFlowMLP,
    optimizer: torch.optim.Optimizer,
    stats: EmbeddingStats,
    metadata: dict[str, Any],
    fingerprint: list[float],
    keep: int = 2,
) -> Path:
    final = checkpoint_dir(out, step)
    with atomic_directory(final) as tmp:
        _write_flow_files(tmp, model.config, model.state_dict(), stats, metadata)
        tensors, groups = optimizer_tensors(optimizer)
        save_file(tensors, str(tmp / OPTIMIZER_NAME))
        state = {
            "step": step,
            "train_config": to_dict(model.config),
            "param_groups": groups,
            "fingerprint": fingerprint,
        }
        (tmp / TRAIN_STATE_NAME).write_text(json.dumps(state, indent=2) + "\n")
    for _, old in list_checkpoints(out)[:-keep]:
        import shutil

        shutil.rmtree(old, ignore_errors=True)
    return final


def _resume_flow(
    out: Path,
    config: EmbeddingFlowConfig,
    model: ResidualFlowMLP,
    optimizer: torch.optim.Optimizer,
    fingerprint: list[float],
) -> int:
    folder = latest_checkpoint(out)
    if folder is None:
        return 0
    state = json.loads((folder / TRAIN_STATE_NAME).read_text())
    saved, current = state["train_config"], to_dict(config)
    changed = sorted(
        k for k in current if saved.get(k) != current[k] and k not in _RESUMABLE_FIELDS
    )
    if changed:
        raise ResumeError(
            f"{out} holds a flow trained with other settings ({', '.join(changed)} differ); use "
            "the original settings, another output folder, or delete this one"
        )
    if not np.allclose(state["fingerprint"], fingerprint, rtol=1e-6, atol=1e-6):
        raise ResumeError(
            f"{out} holds a flow trained on other embedding pairs; use another output folder "
            "or delete this one"
        )
    model.load_state_dict(load_file(str(folder / WEIGHTS_NAME)))
    restore_optimizer(optimizer, load_file(str(folder / OPTIMIZER_NAME)), state["param_groups"])
    logger.info("resumed the embedding flow in %s from step %d", out, state["step"])
    return int(state["step"])


def _rng_devices(device: torch.device) -> list[int]:
    return [device.index or 0] if device.type == "cuda" else []


def _flow_loss(
    model: ResidualFlowMLP, he_z: torch.Tensor, ihc_z: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    x_t = flow_interpolate(he_z, ihc_z, t)
    target = flow_velocity_target(he_z, ihc_z)
    return F.mse_loss(model(x_t, t).float(), target.float())


@torch.no_grad()
def _heldout_loss(
    model: ResidualFlowMLP, he_z: torch.Tensor, ihc_z: torch.Tensor, seed: int
) -> float:
    """Flow-matching loss on held-out pairs at fixed times (a seeded, repeatable estimate)."""
    generator = torch.Generator().manual_seed(seed)
    t = paths.sample_training_times(he_z.shape[0], generator).to(he_z.device)
    was_training = model.training
    model.eval()
    loss = float(_flow_loss(model, he_z, ihc_z, t))
    model.train(was_training)
    return loss


def train_embedding_flow(
    he: torch.Tensor,
    ihc: torch.Tensor,
    config: EmbeddingFlowConfig,
    out: str | Path | None = None,
    *,
    heldout: tuple[torch.Tensor, torch.Tensor] | None = None,
    metadata: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> FlowTrainResult:
    """Rectified flow from H&E embeddings to the paired IHC embeddings.

    he, ihc: (N, D) (num_tokens = 1) or (N, T, D), row i of each from the same place.
    Step s draws its batch rows and times from `step_generator(seed, s)`, so with `out` a
    killed run restarted with the same arguments resumes from its newest checkpoint and
    reproduces the uninterrupted run exactly. `heldout` pairs are only evaluated (loss and
    cosine in log.jsonl every `eval_every` steps and at the end). With `out`, the trained
    flow is written there (`EmbeddingFlow.from_pretrained(out)`).
    """
    he, ihc = he.float().cpu(), ihc.float().cpu()
    _check_pairs(he, ihc, config, "training pairs")
    if heldout is not None:
        _check_pairs(heldout[0].float(), heldout[1].float(), config, "held-out pairs")
    device = torch.device(device)
    stats = EmbeddingStats.fit(he, ihc, config.std_floor, config.components)
    he_z, ihc_z = stats.standardize_he(he).to(device), stats.standardize_ihc(ihc).to(device)
    val = None
    if heldout is not None:
        val = (
            stats.standardize_he(heldout[0].float()).to(device),
            stats.standardize_ihc(heldout[1].float()).to(device),
        )
    torch.manual_seed(config.seed)
    model = ResidualFlowMLP(config).to(device).train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    metadata = dict(metadata or {})
    fingerprint = _fingerprint(he, ihc)
    out_dir = Path(out) if out is not None else None
    start = 0
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        start = _resume_flow(out_dir, config, model, optimizer, fingerprint)
        _truncate_log(out_dir / "log.jsonl", start)
    log = (out_dir / "log.jsonl").open("a") if out_dir is not None else None
    history: list[dict[str, Any]] = []
    last_loss = float("nan")
    count = he_z.shape[0]
    bar = tqdm(total=config.steps, initial=start, desc="flow", unit="step", disable=not progress)
    try:
        for step in range(start, config.steps):
            generator = step_generator(config.seed, step)
            rows = torch.randint(count, (config.batch_size,), generator=generator).to(device)
            t = paths.sample_training_times(config.batch_size, generator, device)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(config, step)
            source = he_z[rows]
            if config.source_noise > 0:  # drawn after the rows and times of the step
                noise = torch.randn(source.shape, generator=generator).to(device)
                source = source + config.source_noise * noise
            # Dropout masks come from the global RNG: seed it from the step's generator
            # inside a fork (restored afterwards), so a resumed run draws the same masks.
            dropout_seed = int(torch.randint(2**62, (1,), generator=generator))
            with torch.random.fork_rng(devices=_rng_devices(device)):
                torch.manual_seed(dropout_seed)
                loss = _flow_loss(model, source, ihc_z[rows], t)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            if config.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            last_loss = float(loss.detach())
            done = step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.4f}")
            record: dict[str, Any] = {}
            if done % config.log_every == 0 or done == config.steps:
                record = {"step": done, "loss": last_loss, "lr": learning_rate(config, step)}
            evaluate_now = config.eval_every and done % config.eval_every == 0
            if val is not None and (evaluate_now or done == config.steps):
                record.setdefault("step", done)
                record["heldout_loss"] = _heldout_loss(model, *val, seed=config.seed)
                flow = EmbeddingFlow(model, stats, metadata)
                pred = flow.predict(heldout[0])  # type: ignore[index]
                truth = heldout[1].float()  # type: ignore[index]
                record["heldout_cosine"] = float(_row_cosine(pred, truth).mean())
                model.train()
            if record:
                history.append(record)
                if log is not None:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
            if out_dir is not None and (
                done % config.checkpoint_every == 0 or done == config.steps
            ):
                _save_flow_checkpoint(out_dir, done, model, optimizer, stats, metadata, fingerprint)
    finally:
        bar.close()
        if log is not None:
            log.close()
    flow = EmbeddingFlow(model.eval(), stats, metadata)
    if out_dir is not None:
        with atomic_directory(out_dir / ".final") as tmp:
            _write_flow_files(tmp, config, model.state_dict(), stats, metadata)
        for name in (CONFIG_NAME, METADATA_NAME, WEIGHTS_NAME, STATS_NAME):
            (out_dir / ".final" / name).replace(out_dir / name)
        (out_dir / ".final").rmdir()
    return FlowTrainResult(flow, config.steps, start, last_loss, history)


# --------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------


def _row_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine per row (N,) — tokens (N, T, D) are compared per token and averaged."""
    cos = F.cosine_similarity(a.double(), b.double(), dim=-1, eps=1e-12)
    return cos.mean(dim=-1) if cos.dim() == 2 else cos


def embedding_metrics(
    pred: torch.Tensor, true: torch.Tensor, reference_mean: torch.Tensor
) -> dict[str, float]:
    """How close predicted embeddings are to the true ones (rows paired).

    cosine: mean cosine(pred_i, true_i) in the encoder's space (what the paper reports);
    centred_cosine: the same after subtracting `reference_mean` (the training IHC mean), so a
    constant prediction scores 0; r2: 1 - SSE / SS around `reference_mean`;
    top1 / top5: how often true_i is among the 1 / 5 true rows closest (centred cosine) to
    pred_i (chance = 1/N, 5/N).
    """
    pred, true = pred.double(), true.double()
    mean = reference_mean.double()
    centred_pred, centred_true = pred - mean, true - mean
    metrics = {
        "cosine": float(_row_cosine(pred, true).mean()),
        "centred_cosine": float(_row_cosine(centred_pred, centred_true).mean()),
        "r2": float(
            1.0 - (pred - true).square().sum() / centred_true.square().sum().clamp_min(1e-30)
        ),
    }
    flat_pred = F.normalize(centred_pred.reshape(len(pred), -1), dim=-1, eps=1e-12)
    flat_true = F.normalize(centred_true.reshape(len(true), -1), dim=-1, eps=1e-12)
    similarity = flat_pred @ flat_true.T  # (N, N)
    # Rows at least as similar as the true partner, itself excluded (ties count against).
    rank = (similarity >= similarity.diagonal()[:, None]).sum(dim=1) - 1  # 0 = best
    metrics["top1"] = float((rank < 1).double().mean())
    metrics["top5"] = float((rank < 5).double().mean())
    return metrics


def ridge_baseline(
    he_train: torch.Tensor, ihc_train: torch.Tensor, stats: EmbeddingStats, seed: int = 0
) -> tuple[Any, float]:
    """Linear ridge map from standardised H&E to standardised IHC embeddings (dual form,
    cheap when pairs << dimensions), with the penalty picked on a seeded 20 % split of the
    training pairs. Returns (predict, alpha)."""
    x = stats.standardize_he(he_train.float()).reshape(len(he_train), -1).double()  # (N, F)
    y = stats.standardize_ihc(ihc_train.float()).reshape(len(ihc_train), -1).double()
    count = len(x)

    def fit(xs: torch.Tensor, ys: torch.Tensor, alpha: float) -> torch.Tensor:
        gram = xs @ xs.T  # (n, n)
        return torch.linalg.solve(gram + alpha * torch.eye(len(xs), dtype=xs.dtype), ys)

    scale = float((x * x).sum() / max(count, 1))
    alphas = [scale * f for f in (1e-2, 1e-1, 1.0, 10.0, 100.0)]
    best_alpha = alphas[2]
    if count >= 10:
        order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
        cut = max(1, count // 5)
        val, rest = order[:cut], order[cut:]
        errors = [
            float(((x[val] @ x[rest].T) @ fit(x[rest], y[rest], a) - y[val]).square().mean())
            for a in alphas
        ]
        best_alpha = alphas[int(np.argmin(errors))]
    dual = fit(x, y, best_alpha)  # (N, F_out)

    def predict(he: torch.Tensor) -> torch.Tensor:
        z = stats.standardize_he(he.float()).reshape(len(he), -1).double()
        return stats.destandardize_ihc(((z @ x.T) @ dual).float().reshape(he.shape))

    return predict, best_alpha


def evaluate_flow(
    flow: EmbeddingFlow,
    he_train: torch.Tensor,
    ihc_train: torch.Tensor,
    he_heldout: torch.Tensor,
    ihc_heldout: torch.Tensor,
) -> dict[str, Any]:
    """Held-out metrics of the flow's prediction and of the baselines (see embedding_metrics)."""
    mean = ihc_train.float().reshape(-1, ihc_train.shape[-1]).mean(dim=0)
    true = ihc_heldout.float()
    plain = flow.stats.per_dimension()
    ridge, alpha = ridge_baseline(he_train, ihc_train, plain, seed=flow.config.seed)
    moment_matched = plain.destandardize_ihc(plain.standardize_he(he_heldout.float()))
    candidates = {
        "flow": flow.predict(he_heldout),
        "he_embedding": he_heldout.float(),
        "mean_ihc": mean.expand_as(true),
        "moment_matched_he": moment_matched,
        "ridge": ridge(he_heldout),
    }
    return {
        "num_train": len(he_train),
        "num_heldout": len(he_heldout),
        "ridge_alpha": alpha,
        "metrics": {name: embedding_metrics(pred, true, mean) for name, pred in candidates.items()},
    }


# --------------------------------------------------------------------------------------
# Embeddings of tiles
# --------------------------------------------------------------------------------------


class ConditionTokens(str, enum.Enum):
    GLOBAL = "global"  # one embedding per tile (B, D_emb): the encoder's global_features
    ALL = "all"  # the encoder's full token set (B, 1 + h*w, D): [global, patch grid]


@dataclass(frozen=True)
class EmbeddingSpec:
    """Which encoder makes the embeddings, and which of its outputs are used."""

    encoder: str = "inception"
    image_size: int = 0  # encoder input side; 0 = its default (an Inception-only option)
    tokens: ConditionTokens = ConditionTokens.GLOBAL

    def __post_init__(self) -> None:
        object.__setattr__(self, "tokens", parse_enum(ConditionTokens, self.tokens))
        if self.image_size < 0:
            raise ConfigError(f"image_size must be >= 0, got {self.image_size}")

    def build(
        self, device: str | torch.device = "cpu", weights: str | Path | None = None, **options: Any
    ):
        from mupad.conditioning.image import get_image_encoder

        if self.image_size:
            options["image_size"] = self.image_size
        return get_image_encoder(self.encoder, weights, device=device, **options)

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any]) -> EmbeddingSpec:
        spec = metadata.get("embedding")
        if not spec:
            raise HE2IHCError(
                "the flow's metadata does not say which encoder made its embeddings "
                "(metadata['embedding']); retrain it with `mupad staining train-flow`"
            )
        return from_dict(cls, spec)


def _tiles_to_pixels(tiles: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (B, S, S, 3) or (B, 3, S, S) -> float (B, 3, S, S) in [-1, 1]."""
    array = torch.as_tensor(np.asarray(tiles)) if isinstance(tiles, np.ndarray) else tiles
    if array.dtype != torch.uint8 or array.dim() != 4 or 3 not in (array.shape[1], array.shape[3]):
        raise HE2IHCError(
            f"tiles must be uint8 (B, S, S, 3) or (B, 3, S, S), got {array.dtype} "
            f"{tuple(array.shape)}"
        )
    if array.shape[3] == 3 and array.shape[1] != 3:
        array = array.permute(0, 3, 1, 2)  # channels last -> first
    return to_unit_range(array.contiguous())


@torch.no_grad()
def embed_tiles(
    encoder: Any,
    tiles: np.ndarray | torch.Tensor,
    tokens: ConditionTokens | str = ConditionTokens.GLOBAL,
    progress: bool = False,
    chunk: int = 64,
) -> torch.Tensor:
    """uint8 tiles -> float32 CPU embeddings: (N, D_emb) for "global", (N, 1 + h*w, D) for "all"."""
    kind = parse_enum(ConditionTokens, tokens)
    pixels = _tiles_to_pixels(tiles)
    parts = []
    for start in tqdm(
        range(0, len(pixels), chunk), desc="embed", disable=not progress, leave=False
    ):
        features = encoder.features(pixels[start : start + chunk])
        parts.append(
            (features.embedding if kind is ConditionTokens.GLOBAL else features.tokens())
            .float()
            .cpu()
        )
    return torch.cat(parts)


# --------------------------------------------------------------------------------------
# The IHC generator: a SiT conditioned on IHC embeddings through the image stream
# --------------------------------------------------------------------------------------


def image_conditions(embeddings: torch.Tensor) -> Conditions:
    """Embeddings (B, D) (one token each) or tokens (B, T, D) -> the image-condition stream."""
    return Conditions.build(image=ConditionStream.from_tokens(embeddings.float()))


class EmbeddingConditionedBatches:
    """`batch_fn(step, generator)` for the Trainer: IHC tiles + their own embeddings.

    Tiles get a random dihedral transform (histology has no 'up'); the condition stays the
    embedding of the untransformed tile (the global embedding is close to invariant).
    """

    def __init__(self, tiles: torch.Tensor, embeddings: torch.Tensor, batch_size: int) -> None:
        if tiles.dtype != torch.uint8 or tiles.dim() != 4 or tiles.shape[1] != 3:
            raise HE2IHCError(
                f"tiles must be uint8 (N, 3, S, S), got {tiles.dtype} {tuple(tiles.shape)}"
            )
        if len(tiles) != len(embeddings):
            raise HE2IHCError(f"{len(tiles)} tiles but {len(embeddings)} embeddings")
        self.tiles, self.embeddings, self.batch_size = tiles, embeddings.float(), batch_size

    def __call__(self, step: int, generator: torch.Generator) -> TrainBatch:
        rows = torch.randint(len(self.tiles), (self.batch_size,), generator=generator)
        flips = torch.randint(2, (self.batch_size,), generator=generator)
        turns = torch.randint(4, (self.batch_size,), generator=generator)
        images = []
        for i in range(self.batch_size):
            tile = self.tiles[rows[i]]
            if flips[i]:
                tile = tile.flip(-1)
            images.append(torch.rot90(tile, int(turns[i]), dims=(-2, -1)))
        return TrainBatch(
            x0=to_unit_range(torch.stack(images)), cond=image_conditions(self.embeddings[rows])
        )


def train_ihc_generator(
    tiles: torch.Tensor,
    embeddings: torch.Tensor,
    out: str | Path,
    *,
    train_config: TrainConfig,
    preset: str = "tiny",
    patch_size: int = 0,
    model_overrides: dict[str, Any] | None = None,
    init_from: str | Path | None = None,
    metadata: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
):
    """Fine-tune (or, without `init_from`, train) a pixel-space SiT on IHC tiles (N, 3, S, S)
    uint8 conditioned on their embeddings (N, D) or (N, T, D) via the image stream.

    Without `init_from` the model is `model_config_for(side, D, preset, patch_size,
    **model_overrides)`. `init_from` is a SiT checkpoint (run folder, checkpoint or model
    folder) whose image stream takes D-wide tokens; its weights are the starting point (the
    paper fine-tunes MUPAD on IHC). Re-running with the same `out` resumes. Returns the
    Trainer's TrainResult.
    """
    from mupad.applications.train_tiles import _resolve_checkpoint
    from mupad.models import SiT
    from mupad.training.loop import Trainer

    if train_config.alignment.uses_teacher:
        raise ConfigError("the IHC generator is trained with the plain velocity objective (sit)")
    side = tiles.shape[-1]
    dim = embeddings.shape[-1]
    if init_from is not None:
        model_dir, _ = _resolve_checkpoint(Path(init_from))
        pretrained = SiT.from_pretrained(model_dir)
        if pretrained.config.image_dim != dim or pretrained.config.in_channels != 3:
            raise HE2IHCError(
                f"{init_from}: its image stream takes {pretrained.config.image_dim}-wide tokens "
                f"and {pretrained.config.in_channels} input channels; these IHC tiles need "
                f"{dim} and 3 (pixel space)"
            )
        # Same weights; only the default sampling size follows the IHC tiles.
        model = SiT(dataclasses.replace(pretrained.config, sample_size=side))
        model.load_state_dict(pretrained.state_dict())
    else:
        torch.manual_seed(train_config.seed)
        model = SiT(model_config_for(side, dim, preset, patch_size, **(model_overrides or {})))
    run_metadata = {
        "task": "he2ihc-generator",
        "latents": "identity",
        "tile_size": side,
        "condition_dim": dim,
        "condition_tokens": 1 if embeddings.dim() == 2 else int(embeddings.shape[1]),
        "init_from": str(init_from) if init_from is not None else None,
        **(metadata or {}),
    }
    batches = EmbeddingConditionedBatches(tiles, embeddings, train_config.batch_size)
    trainer = Trainer(
        model, train_config, out, batches, device=device, metadata=run_metadata, progress=progress
    )
    return trainer.train()


def load_generator(checkpoint: str | Path, device: str | torch.device = "cpu"):
    """A SiT run / checkpoint / model folder -> (model in eval mode, run metadata)."""
    from mupad.applications.train_tiles import _resolve_checkpoint
    from mupad.models import SiT

    model_dir, metadata = _resolve_checkpoint(Path(checkpoint))
    model = SiT.from_pretrained(model_dir).to(device).eval()
    if not model.config.image_dim:
        raise HE2IHCError(
            f"{checkpoint}: this SiT has no image-condition stream (image_dim = 0); train the IHC "
            "generator with `mupad staining train-generator`"
        )
    return model, {**metadata, "model_dir": str(model_dir)}


# --------------------------------------------------------------------------------------
# The translator (TileTranslator protocol) and applying it
# --------------------------------------------------------------------------------------


class HEToIHCTranslator:
    """uint8 H&E tiles (B, S, S, 3) -> uint8 IHC tiles (B, S, S, 3).

    Encodes each tile, predicts its IHC embedding with the flow, and samples the IHC tile
    from the IHC-fine-tuned SiT conditioned on it through the image stream. Attributes for a
    whole-slide engine: `tile_size` (the generator's native side, px), `output_channels` (3),
    `mpp` (µm/px of the training tiles, None when unknown), `batch_size`. Numpy in -> numpy
    out; torch in -> torch out. The same tiles in the same batch positions give the same
    output (`sample_config.seed`).
    """

    output_channels = 3

    def __init__(
        self,
        flow: EmbeddingFlow,
        generator: nn.Module,
        *,
        encoder: Any = None,
        codec: Any = None,
        sample_config: SampleConfig | None = None,
        flow_steps: int | None = None,
        mpp: float | None = None,
        batch_size: int = 16,
        generator_metadata: dict[str, Any] | None = None,
    ) -> None:
        from mupad.latents import load_codec

        self.flow = flow
        self.generator = generator.eval()
        self.spec = EmbeddingSpec.from_metadata(flow.metadata)
        self.encoder = encoder if encoder is not None else self.spec.build(flow.device)
        generator_metadata = generator_metadata or {}
        self.codec = (
            codec
            if codec is not None
            else load_codec(generator_metadata.get("latents", "identity"))
        )
        self.sample_config = sample_config or SampleConfig()
        self.flow_steps = flow_steps
        if batch_size < 1:
            raise HE2IHCError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        config = generator.config  # type: ignore[attr-defined]
        self.tile_size = int(config.sample_size * self.codec.downsample)
        self.mpp = (
            mpp if mpp is not None else flow.metadata.get("mpp", generator_metadata.get("mpp"))
        )
        width = flow.config.dim
        if config.image_dim != width:
            raise HE2IHCError(
                f"the flow predicts {width}-wide embeddings but the generator's image stream "
                f"takes {config.image_dim}-wide tokens; pair a flow and a generator trained on "
                "the same encoder"
            )
        made_with = generator_metadata.get("embedding")
        if made_with and made_with != to_dict(self.spec):
            raise HE2IHCError(
                f"the generator was conditioned on {made_with} embeddings but the flow predicts "
                f"{to_dict(self.spec)}; use a flow and a generator made with the same encoder"
            )

    @classmethod
    def from_pretrained(
        cls,
        flow: str | Path,
        checkpoint: str | Path,
        *,
        sample_config: SampleConfig | None = None,
        flow_steps: int | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 16,
        mpp: float | None = None,
        encoder_weights: str | Path | None = None,
    ) -> HEToIHCTranslator:
        """A flow folder and an IHC generator checkpoint -> a translator on `device`."""
        embedding_flow = EmbeddingFlow.from_pretrained(flow, device)
        generator, metadata = load_generator(checkpoint, device)
        spec = EmbeddingSpec.from_metadata(embedding_flow.metadata)
        return cls(
            embedding_flow,
            generator,
            encoder=spec.build(device, encoder_weights),
            sample_config=sample_config,
            flow_steps=flow_steps,
            mpp=mpp,
            batch_size=batch_size,
            generator_metadata=metadata,
        )

    def _tile_step(self) -> int:
        """Tile sides must be multiples of this (SiT patch size x codec downsample), px."""
        return int(self.generator.config.patch_size * self.codec.downsample)  # type: ignore[attr-defined]

    def _check_tiles(self, tiles: np.ndarray | torch.Tensor) -> torch.Tensor:
        array = torch.as_tensor(np.asarray(tiles)) if isinstance(tiles, np.ndarray) else tiles
        if array.dtype != torch.uint8 or array.dim() != 4 or array.shape[-1] != 3:
            raise HE2IHCError(
                f"the translator takes uint8 tiles (B, S, S, 3), got {array.dtype} "
                f"{tuple(array.shape)}"
            )
        side = array.shape[1]
        step = self._tile_step()
        if array.shape[2] != side or side % step:
            raise HE2IHCError(
                f"tiles must be square with a side divisible by {step} px (native "
                f"{self.tile_size}); "
                f"got {array.shape[1]}x{array.shape[2]}"
            )
        return array

    def embed(self, tiles: np.ndarray | torch.Tensor) -> torch.Tensor:
        """H&E embeddings of uint8 tiles (B, S, S, 3): (B, D) or (B, T, D)."""
        return embed_tiles(self.encoder, self._check_tiles(tiles), self.spec.tokens)

    def predict_embeddings(self, tiles: np.ndarray | torch.Tensor) -> torch.Tensor:
        """The flow's IHC embeddings of uint8 H&E tiles."""
        return self.flow.predict(self.embed(tiles), self.flow_steps)

    def generate(self, embeddings: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """IHC embeddings (B, D) / (B, T, D) -> uint8 IHC tiles (B, S, S, 3) (torch)."""
        from mupad.applications.generate import generate

        side = size or self.tile_size
        images = generate(
            self.generator,
            image_conditions(embeddings),
            self.sample_config,
            codec=self.codec,
            size=side // self.codec.downsample,
        )  # (B, 3, S, S) uint8
        return images.permute(0, 2, 3, 1).contiguous()

    def translate(self, tiles: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 H&E tiles -> (uint8 IHC tiles (B, S, S, 3), predicted IHC embeddings)."""
        array = self._check_tiles(tiles)
        outputs, predicted = [], []
        for start in range(0, len(array), self.batch_size):
            chunk = array[start : start + self.batch_size]
            embedding = self.predict_embeddings(chunk)
            outputs.append(self.generate(embedding, chunk.shape[1]))
            predicted.append(embedding)
        return torch.cat(outputs), torch.cat(predicted)

    def __call__(self, tiles: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        images, _ = self.translate(tiles)
        return images.numpy() if isinstance(tiles, np.ndarray) else images


_WSI_OPTION_KEYS = (
    "flow",
    "sampler",
    "steps",
    "seed",
    "flow_steps",
    "guidance_start",
    "guidance_end",
)


def wsi_translator(checkpoint: Path | None, options: Any) -> HEToIHCTranslator:
    """Factory for the whole-slide engine (`mupad.applications.wsi`, registered as
    "he2ihc": "mupad.applications.he2ihc:wsi_translator").

    `checkpoint` is the IHC generator; `options` a wsi.TranslatorOptions whose `extra` must
    give `flow=FOLDER` and may give sampler, steps, seed, flow_steps, guidance_start,
    guidance_end. `options.tile_size` (if set) must be a multiple of the generator's patch
    size; `options.mpp` overrides the flow's recorded µm/px; device "auto" picks CUDA when
    available.
    """
    from mupad.applications.wsi import translator_extras

    extra = translator_extras(options, "he2ihc", _WSI_OPTION_KEYS, HE2IHCError)
    if checkpoint is None or "flow" not in extra:
        raise HE2IHCError(
            "he2ihc needs the IHC generator as the checkpoint and the flow folder as "
            "--option flow=FOLDER"
        )
    device = getattr(options, "device", "cpu") or "cpu"
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    defaults = SampleConfig()
    sample_config = SampleConfig(
        sampler=extra.get("sampler", defaults.sampler),
        num_steps=int(extra.get("steps", defaults.num_steps)),
        seed=int(extra.get("seed", defaults.seed)),
        guidance=dataclasses.replace(
            defaults.guidance,
            start=float(extra.get("guidance_start", defaults.guidance.start)),
            end=float(extra.get("guidance_end", defaults.guidance.end)),
        ),
    )
    translator = HEToIHCTranslator.from_pretrained(
        extra["flow"],
        checkpoint,
        sample_config=sample_config,
        flow_steps=int(extra["flow_steps"]) if "flow_steps" in extra else None,
        device=device,
        batch_size=getattr(options, "batch_size", None) or 16,
        mpp=getattr(options, "mpp", None),
    )
    tile_size = getattr(options, "tile_size", None)
    if tile_size:
        step = translator._tile_step()
        if tile_size % step:
            raise HE2IHCError(f"tile_size {tile_size} is not a multiple of {step} px")
        translator.tile_size = int(tile_size)
    return translator


@dataclass
class ApplyResult:
    out: Path
    num_tiles: int
    outputs: list[Path]
    mosaic: Path | None


def apply_to_he(
    translator: HEToIHCTranslator,
    he: str | Path,
    out: str | Path,
    *,
    min_tissue: float = 0.5,
    max_tiles: int = 0,
    mpp: float | None = None,
    provenance: dict[str, Any] | None = None,
    progress: bool = True,
) -> ApplyResult:
    """Translate an H&E tile folder (tiles centre-cropped to tile_size) or an H&E image (its
    tissue tiles on a grid at native resolution, plus a stitched mosaic) into `out`:
    `<name>.png` + `<name>.json` per tile (source, position, predicted-embedding summary,
    sample config, provenance) and `summary.json`."""
    from PIL import Image

    from mupad.applications.serial_pairs import grid_tiles, load_section

    he, out = Path(he), Path(out)
    size = translator.tile_size
    positions: list[tuple[int, int] | None]
    section = None
    if he.is_dir():
        tileset = load_image_tiles(he, size=size)
        tiles = tileset.images.permute(0, 2, 3, 1).contiguous()  # (N, S, S, 3)
        names = [str(p.relative_to(he).with_suffix("")).replace("/", "__") for p in tileset.paths]
        sources = [str(p) for p in tileset.paths]
        positions = [None] * len(names)
    elif he.is_file():
        section = load_section(he, mpp)
        array, xy = grid_tiles(section, size, min_tissue)
        tiles = torch.from_numpy(array)
        names = [f"tile_x{x}_y{y}" for x, y in xy]
        sources = [str(he)] * len(names)
        positions = [(int(x), int(y)) for x, y in xy]
    else:
        raise HE2IHCError(f"{he} is neither an H&E image file nor a folder of H&E tiles")
    if max_tiles:
        tiles, names, sources, positions = (
            tiles[:max_tiles],
            names[:max_tiles],
            sources[:max_tiles],
            positions[:max_tiles],
        )
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    mosaic = None
    if section is not None:
        mosaic = np.full((section.height, section.width, 3), 255, dtype=np.uint8)
    common = {
        "tile_size": size,
        "mpp": translator.mpp,
        "sample_config": to_dict(translator.sample_config),
        "flow_steps": translator.flow_steps or translator.flow.config.sample_steps,
        "embedding": to_dict(translator.spec),
        **(provenance or {}),
    }
    bar = tqdm(total=len(tiles), desc="he2ihc", unit="tile", disable=not progress)
    for start in range(0, len(tiles), translator.batch_size):
        chunk = tiles[start : start + translator.batch_size]
        he_embedding = translator.embed(chunk)
        predicted = translator.flow.predict(he_embedding, translator.flow_steps)
        images = translator.generate(predicted, chunk.shape[1])
        for i in range(len(chunk)):
            index = start + i
            path = out / f"{names[index]}.png"
            Image.fromarray(images[i].numpy()).save(path)
            sidecar = {
                "output": path.name,
                "source": sources[index],
                "position_xy": positions[index],
                "batch_index": i,
                "predicted_embedding_norm": float(predicted[i].norm()),
                "predicted_vs_he_cosine": float(
                    _row_cosine(predicted[i : i + 1], he_embedding[i : i + 1])[0]
                ),
                **common,
            }
            atomic_write_text(path.with_suffix(".json"), json.dumps(sidecar, indent=2) + "\n")
            written.append(path)
            if mosaic is not None and positions[index] is not None:
                x, y = positions[index]  # type: ignore[misc]
                mosaic[y : y + size, x : x + size] = images[i].numpy()
        bar.update(len(chunk))
    bar.close()
    mosaic_path = None
    if mosaic is not None:
        mosaic_path = out / "mosaic.png"
        Image.fromarray(mosaic).save(mosaic_path)
        section.close()  # type: ignore[union-attr]
    summary = {
        "input": str(he),
        "num_tiles": len(written),
        "outputs": [p.name for p in written],
        **common,
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return ApplyResult(out, len(written), written, mosaic_path)


# --------------------------------------------------------------------------------------
# From pairs to a trained flow (the `train-flow` pipeline)
# --------------------------------------------------------------------------------------


@dataclass
class PairEmbeddings:
    he: torch.Tensor  # (N, D) or (N, T, D)
    ihc: torch.Tensor
    names: list[str]


def embed_pairs(
    pairs: Any,
    spec: EmbeddingSpec,
    cache: str | Path | None = None,
    *,
    device: str | torch.device = "cpu",
    encoder: Any = None,
    progress: bool = True,
) -> PairEmbeddings:
    """Embeddings of both sides of `PatchPairs`, cached in a safetensors file keyed by the
    spec and the pair names (a re-run, or a resumed training, does not re-encode)."""
    names = list(pairs.names)
    key = json.dumps({"spec": to_dict(spec), "names": names, "shape": list(pairs.he.shape)})
    if cache is not None and Path(cache).is_file():
        from safetensors import safe_open

        with safe_open(str(cache), "pt") as handle:
            if (handle.metadata() or {}).get("key") == key:
                logger.info("using cached pair embeddings %s", cache)
                return PairEmbeddings(handle.get_tensor("he"), handle.get_tensor("ihc"), names)
    encoder = encoder if encoder is not None else spec.build(device)
    he = embed_tiles(encoder, pairs.he, spec.tokens, progress=progress)
    ihc = embed_tiles(encoder, pairs.ihc, spec.tokens, progress=progress)
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(cache).with_name(Path(cache).name + ".tmp")
        save_file({"he": he.contiguous(), "ihc": ihc.contiguous()}, str(tmp), metadata={"key": key})
        tmp.replace(cache)
    return PairEmbeddings(he, ihc, names)


def split_rows(
    count: int, split: Sequence[str] | np.ndarray | None, heldout_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, held-out rows): from a given split ("train"/"heldout"/"" = unused), or
    else a seeded random `heldout_fraction` of the pairs."""
    if split is not None:
        split = np.asarray(split).astype(str)
        return np.flatnonzero(split == "train"), np.flatnonzero(split == "heldout")
    if not 0.0 <= heldout_fraction < 1.0:
        raise HE2IHCError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    order = np.random.default_rng(seed).permutation(count)
    cut = round(heldout_fraction * count)
    return np.sort(order[cut:]), np.sort(order[:cut])


def train_flow_from_pairs(
    pairs: Any,
    out: str | Path,
    config: EmbeddingFlowConfig,
    spec: EmbeddingSpec,
    *,
    split: Sequence[str] | np.ndarray | None = None,
    heldout_fraction: float = 0.2,
    metadata: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    encoder: Any = None,
    progress: bool = True,
) -> tuple[FlowTrainResult, dict[str, Any]]:
    """Embed the pairs (cached in out/embeddings.safetensors), train the flow on the train
    rows, evaluate on the held-out rows; writes out/metrics.json. Returns (result, metrics)."""
    out = Path(out)
    embedded = embed_pairs(
        pairs,
        spec,
        out / "embeddings.safetensors",
        device=device,
        encoder=encoder,
        progress=progress,
    )
    width = embedded.he.shape[-1]
    num_tokens = 1 if embedded.he.dim() == 2 else embedded.he.shape[1]
    if (config.dim, config.num_tokens) != (width, num_tokens):
        config = dataclasses.replace(config, dim=width, num_tokens=num_tokens)
    train, held = split_rows(len(embedded.names), split, heldout_fraction, config.seed)
    if len(train) < 2:
        raise HE2IHCError(f"only {len(train)} training pairs; sample more pairs or hold out fewer")
    he_train, ihc_train = embedded.he[train], embedded.ihc[train]
    heldout = (embedded.he[held], embedded.ihc[held]) if len(held) else None
    info = dict(getattr(pairs, "info", {}) or {})
    flow_metadata = {
        "embedding": to_dict(spec),
        "tile_size": int(pairs.he.shape[1]),
        "mpp": info.get("mpp"),
        "num_train_pairs": len(train),
        "num_heldout_pairs": len(held),
        "pairs": info,
        **(metadata or {}),
    }
    result = train_embedding_flow(
        he_train,
        ihc_train,
        config,
        out,
        heldout=heldout,
        metadata=flow_metadata,
        device=device,
        progress=progress,
    )
    metrics: dict[str, Any] = {"num_train": len(train), "num_heldout": len(held)}
    if heldout is not None and len(held) >= 2:
        metrics = evaluate_flow(result.flow, he_train, ihc_train, *heldout)
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return result, metrics


def format_metrics(metrics: dict[str, Any]) -> str:
    """A plain-text table of `evaluate_flow` output."""
    rows = metrics.get("metrics")
    if not rows:
        return f"(no held-out pairs: {metrics})"
    lines = [
        f"held-out pairs: {metrics['num_heldout']} (train {metrics['num_train']})",
        f"{'prediction':<20}{'cosine':>9}{'centred':>9}{'r2':>9}{'top1':>8}{'top5':>8}",
    ]
    for name, m in rows.items():
        lines.append(
            f"{name:<20}{m['cosine']:>9.4f}{m['centred_cosine']:>9.4f}{m['r2']:>9.3f}"
            f"{m['top1']:>8.3f}{m['top5']:>8.3f}"
        )
    return "\n".join(lines)


def model_config_for(
    tiles_side: int, dim: int, preset: str = "tiny", patch_size: int = 0, **overrides: Any
) -> ModelConfig:
    """The pixel-space SiT `train_ihc_generator` builds from scratch: `preset` with RGB input,
    an image stream of width `dim`, sample size `tiles_side`, and any field overridden
    (e.g. hidden_size=256, depth=6, num_heads=4 with patch_size=8 is a CPU-friendly 64 px model)."""
    fields: dict[str, Any] = {"in_channels": 3, "image_dim": dim, "sample_size": tiles_side}
    if patch_size:
        fields["patch_size"] = patch_size
    fields.update(overrides)
    return model_preset(preset, **fields)


__all__ = [
    "SOURCE_TIME",
    "TARGET_TIME",
    "ApplyResult",
    "ConditionTokens",
    "EmbeddingConditionedBatches",
    "EmbeddingFlow",
    "EmbeddingFlowConfig",
    "EmbeddingSpec",
    "EmbeddingStats",
    "FlowTrainResult",
    "HE2IHCError",
    "HEToIHCTranslator",
    "PairEmbeddings",
    "ResidualFlowMLP",
    "apply_to_he",
    "embed_pairs",
    "embed_tiles",
    "embedding_metrics",
    "evaluate_flow",
    "flow_interpolate",
    "flow_velocity_target",
    "format_metrics",
    "image_conditions",
    "load_generator",
    "model_config_for",
    "ridge_baseline",
    "split_rows",
    "train_embedding_flow",
    "train_flow_from_pairs",
    "train_ihc_generator",
    "wsi_translator",
]
