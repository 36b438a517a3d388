"""Frozen configuration dataclasses, named presets and their JSON round trip.

Every checkpoint carries the resolved configs as JSON; strings from the command line or a
JSON file become enums here, once, at the edge.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from pathlib import Path
from typing import Any, TypeVar

from mupad.errors import MupadError


class ConfigError(MupadError, ValueError):
    """A configuration value is invalid; the message says which and how to fix it."""


class CrossAttentionKind(str, enum.Enum):
    """How condition tokens reach the image tokens."""

    DECOUPLED = "decoupled"  # one stream per modality, gated by presence (the paper's DCA)
    SHARED = "shared"  # one stream over concatenated tokens + modality embeddings (ablation)
    NONE = "none"  # unconditional backbone


class Prediction(str, enum.Enum):
    """What the network's last layer predicts; the model always returns a velocity."""

    VELOCITY = "velocity"  # the velocity eps - x0 directly (SiT)
    DATA = "data"  # the clean image x0, turned into a velocity by `paths` (x-prediction)


class TimeSampling(str, enum.Enum):
    """How training draws t (0 = data, 1 = noise)."""

    UNIFORM = "uniform"  # t ~ U[0, 1)
    LOGIT_NORMAL = "logit_normal"  # t = sigmoid(N(location, scale^2))


class Precision(str, enum.Enum):
    FP32 = "fp32"
    BF16 = "bf16"  # bf16 autocast with fp32 master weights


class SamplerKind(str, enum.Enum):
    EULER = "euler"  # deterministic ODE, first order
    HEUN = "heun"  # deterministic ODE, second order
    SDE = "sde"  # Euler-Maruyama on the reverse SDE (the paper's default)


class Objective(str, enum.Enum):
    """The training objective (the paper's alignment ablation arms)."""

    SIT = "sit"  # velocity flow matching only
    REPA = "repa"  # + alignment of hidden states to a frozen teacher through an MLP projector
    MUPAD = "mupad"  # + alignment through a CNN projector on the token grid + CLS denoising


class TeacherSource(str, enum.Enum):
    CACHED = "cached"  # teacher features stored in the shards (`mupad prepare --image-encoder`)
    ONLINE = "online"  # the teacher encodes each clean training image as it is drawn


class ParallelKind(str, enum.Enum):
    DDP = "ddp"  # replicated weights, all-reduced gradients
    FSDP = "fsdp"  # weights, gradients and optimizer state sharded across processes


class LRScheduleKind(str, enum.Enum):
    CONSTANT = "constant"  # linear warm-up, then constant
    COSINE = "cosine"  # linear warm-up, then cosine decay to `min_learning_rate`


class GuidanceScheduleKind(str, enum.Enum):
    CONSTANT = "constant"
    LINEAR = "linear"  # linear anneal from `start` (at t=1, pure noise) to `end` (at t=0, data)
    INTERVAL = "interval"  # constant scale inside [t_low, t_high], zero outside


class GuidanceMode(str, enum.Enum):
    JOINT = "joint"  # one scale; the unconditional pass drops every modality at once
    PER_MODALITY = "per_modality"  # one scale per modality; each pass drops one modality


E = TypeVar("E", bound=enum.Enum)


def parse_enum(enum_type: type[E], value: str | E) -> E:
    """Resolve a user string into an enum member, with an error that lists the choices."""
    if isinstance(value, enum_type):
        return value
    try:
        return enum_type(str(value).lower())
    except ValueError:
        choices = ", ".join(m.value for m in enum_type)
        raise ConfigError(
            f"{value!r} is not a valid {enum_type.__name__}; choose one of: {choices}"
        ) from None


# --------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The SiT backbone with its cross-attention.

    Any input whose height and width are multiples of `patch_size` is accepted; position
    embeddings are computed for the actual token grid.
    """

    in_channels: int = 4  # 4 for SD-style VAE latents, 3 for pixel space
    out_channels: int = 0  # 0 means "same as in_channels"
    patch_size: int = 2
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    cross_attention: CrossAttentionKind = CrossAttentionKind.DECOUPLED
    # Width of each modality's condition tokens; 0 means the model has no stream for it.
    image_dim: int = 0
    text_dim: int = 0
    rna_dim: int = 0
    # > 0: the RNA stream takes (B, rna_pathways, 1) pathway scores and embeds each into an
    # rna_dim-wide token (value MLP + learned pathway identity); 0: tokens arrive rna_dim wide.
    rna_pathways: int = 0
    cls_dim: int = 0  # width of the global (CLS) token; 0 means no CLS token
    sample_size: int = 32  # default spatial size used when sampling (not a restriction)
    # VELOCITY: the last layer is the velocity. DATA: it is the clean image x0, and the
    # velocity follows from paths.velocity_from_denoised (trained with the same velocity
    # loss); clean images are smooth, so patches of them are easier targets in pixel space.
    prediction: Prediction = Prediction.VELOCITY
    # > 0: the patch embedding goes through this many features first (C*p*p -> r -> D), a
    # low-rank bottleneck that keeps the tokens from spending width on per-pixel noise.
    bottleneck_dim: int = 0
    # > 0: the last layer emits this many feature channels per pixel, and two 3x3
    # convolutions turn them into the output image, so neighbouring tokens' pixels are
    # computed together and agree across token borders. 0: a linear unpatchify (SiT).
    refine_channels: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "cross_attention", parse_enum(CrossAttentionKind, self.cross_attention)
        )
        object.__setattr__(self, "prediction", parse_enum(Prediction, self.prediction))
        if self.out_channels == 0:
            object.__setattr__(self, "out_channels", self.in_channels)
        for name in ("in_channels", "patch_size", "hidden_size", "depth", "num_heads"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        for name in (
            "image_dim", "text_dim", "rna_dim", "rna_pathways", "cls_dim", "bottleneck_dim",
            "refine_channels",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"ModelConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.rna_pathways and not self.rna_dim:
            raise ConfigError(
                f"rna_pathways={self.rna_pathways} needs rna_dim > 0, the width of the embedded "
                "pathway tokens (e.g. rna_dim=hidden_size)"
            )
        if self.sample_size % self.patch_size:
            raise ConfigError(
                f"sample_size {self.sample_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.prediction is Prediction.DATA and self.out_channels > self.in_channels:
            raise ConfigError(
                f"prediction='data' predicts the clean version of the first out_channels "
                f"({self.out_channels}) input channels, but there are only {self.in_channels}"
            )

    @property
    def condition_input_dims(self) -> dict[str, int]:
        """Modality name -> width of the tokens the model takes in (1 for pathway scores)."""
        dims = self.condition_dims
        if "rna" in dims and self.rna_pathways:
            dims["rna"] = 1
        return dims

    @property
    def condition_dims(self) -> dict[str, int]:
        """Modality name -> token width, for the modalities this model has streams for."""
        dims = {"image": self.image_dim, "text": self.text_dim, "rna": self.rna_dim}
        if self.cross_attention is CrossAttentionKind.NONE:
            return {}
        return {name: dim for name, dim in dims.items() if dim > 0}


# The DiT/SiT family: (hidden, depth, heads). Patch size comes from the "/p" suffix.
_BACKBONES: dict[str, tuple[int, int, int]] = {
    "tiny": (64, 2, 2),
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}
_PATCHES = (2, 4, 8)


def model_preset_names() -> list[str]:
    """Every preset name: "tiny", "tile" (the pixel-space tile generator, see
    `tile_model_config`) and S/B/L/XL crossed with /2, /4, /8."""
    names = ["tiny", "tile"]
    names += [f"{size}/{p}" for size in ("S", "B", "L", "XL") for p in _PATCHES]
    return names


def model_preset(name: str, **overrides: Any) -> ModelConfig:
    """Build a ModelConfig from a preset name such as "S/2" or "XL/4" (or "tiny").

    Keyword overrides replace any field (e.g. in_channels=3, text_dim=384).
    """
    key = name.strip()
    if key == "tile":
        return tile_model_config(**{"crop": 64, "text_dim": 0, **overrides})
    if key == "tiny":
        hidden, depth, heads = _BACKBONES["tiny"]
        patch = overrides.pop("patch_size", 2)
    else:
        size, _, patch_text = key.partition("/")
        size = size.upper().removeprefix("SIT-")
        if size not in _BACKBONES or size == "TINY" or not patch_text.isdigit() or int(
            patch_text
        ) not in _PATCHES:
            raise ConfigError(
                f"unknown model preset {name!r}; choose one of: {', '.join(model_preset_names())}"
            )
        hidden, depth, heads = _BACKBONES[size]
        patch = int(patch_text)
    fields = {"hidden_size": hidden, "depth": depth, "num_heads": heads, "patch_size": patch}
    fields.update(overrides)
    return ModelConfig(**fields)


# The pixel-space tile generator chosen by the quality study (`mupad study quality`, see the
# README): 8 px tokens whose last layer predicts the clean image through a 64-d patch
# bottleneck and a convolutional refinement head. The demo, the packaged model and the
# recipes use it.
TILE_MODEL_LEVERS: dict[str, Any] = {
    "patch_size": 8,
    "prediction": "data",
    "bottleneck_dim": 64,
    "refine_channels": 32,
}


# Training times of the tile generator (and the default of `mupad train`): logit-normal
# (location 0, scale 1) beat uniform t at equal budget in the quality study. TrainConfig
# itself keeps uniform t, so runs made before the option existed resume unchanged.
TILE_TIME_SAMPLING = "logit_normal"


def tile_model_config(crop: int = 64, text_dim: int = 0, **overrides: Any) -> ModelConfig:
    """The tile generator for `crop` px RGB tiles with a text stream `text_dim` wide:
    hidden 256, depth 6, 4 heads, TILE_MODEL_LEVERS, then `overrides`."""
    fields: dict[str, Any] = dict(
        in_channels=3, hidden_size=256, depth=6, num_heads=4, text_dim=text_dim,
        sample_size=crop, **TILE_MODEL_LEVERS,
    )  # fmt: skip
    fields.update(overrides)
    return ModelConfig(**fields)


# --------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GuidanceConfig:
    """Classifier-free guidance: v = v_cond + w(t) * (v_cond - v_uncond).

    w = 0 is the plain conditional model (and costs one forward pass per step).
    `modality_scales` (PER_MODALITY mode) multiplies the schedule per modality.
    """

    schedule: GuidanceScheduleKind = GuidanceScheduleKind.LINEAR
    start: float = 2.5  # scale at t = 1 (pure noise)
    end: float = 0.0  # scale at t = 0 (data); CONSTANT uses `start` only
    t_low: float = 0.0  # INTERVAL: guidance applies for t in [t_low, t_high]
    t_high: float = 1.0
    mode: GuidanceMode = GuidanceMode.JOINT
    image_scale: float = 1.0
    text_scale: float = 1.0
    rna_scale: float = 1.0
    # Scales with |w(t)| below this count as 0: those steps make one plain conditional pass
    # instead of two. With the paper's anneal, 0.5 leaves t < 0.2 unguided: 10 % fewer
    # forward rows over 250 SDE steps for a mean change of 0.7/255 per pixel and no change
    # in the RGB distance to real tiles (benchmarks/sampling.py). 0 = the exact schedule.
    skip_below: float = 0.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "schedule", parse_enum(GuidanceScheduleKind, self.schedule))
        object.__setattr__(self, "mode", parse_enum(GuidanceMode, self.mode))
        if self.skip_below < 0.0:
            raise ConfigError(f"guidance skip_below must be >= 0, got {self.skip_below}")
        options = {"start": "--guidance-start", "end": "--guidance-end"}
        for name in ("start", "end", "image_scale", "text_scale", "rna_scale"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0.0):
                option = options.get(name, "--" + name.replace("_", "-"))
                raise ConfigError(
                    f"guidance {name} ({option}) must be a finite number >= 0 (0 = no "
                    f"guidance), got {value}"
                )
        if not 0.0 <= self.t_low <= self.t_high <= 1.0:
            raise ConfigError(
                f"guidance interval needs 0 <= t_low <= t_high <= 1, got [{self.t_low}, {self.t_high}]"
            )

    @property
    def modality_scales(self) -> dict[str, float]:
        return {"image": self.image_scale, "text": self.text_scale, "rna": self.rna_scale}


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    sampler: SamplerKind = SamplerKind.SDE
    num_steps: int = 250
    guidance: GuidanceConfig = dataclasses.field(default_factory=GuidanceConfig)
    # SDE: diffusion g(t)^2 = diffusion_scale * t; the last `last_step_size` of time is a
    # deterministic (noise-free) step so the output carries no fresh noise.
    diffusion_scale: float = 1.0
    last_step_size: float = 0.04
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "sampler", parse_enum(SamplerKind, self.sampler))
        if isinstance(self.guidance, dict):
            object.__setattr__(self, "guidance", GuidanceConfig(**self.guidance))
        if self.num_steps < 1:
            raise ConfigError(f"num_steps (--steps) must be >= 1, got {self.num_steps}")
        if not 0.0 <= self.last_step_size < 1.0:
            raise ConfigError(f"last_step_size must be in [0, 1), got {self.last_step_size}")
        if self.diffusion_scale < 0:
            raise ConfigError(f"diffusion_scale must be >= 0, got {self.diffusion_scale}")


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AlignmentConfig:
    """Representation alignment and CLS-token denoising (the paper's eq. 2 and 3).

    `objective` picks the arm: SIT (none of it), REPA (MLP projector), MUPAD (CNN projector on
    the token grid + the teacher's global embedding denoised as an extra token).
    """

    objective: Objective = Objective.SIT
    teacher: str = "inception"  # image encoder registry name (see mupad.conditioning.image)
    teacher_source: TeacherSource = TeacherSource.CACHED
    teacher_field: str = "image_tokens"  # shard field with [global, h*w patches] teacher tokens
    block: int = 0  # 1-based block whose hidden states are aligned; 0 = depth // 3 (REPA: 8/28)
    align_weight: float = 0.5  # weight of the negative-cosine alignment loss
    cls_weight: float = 0.03  # weight of the CLS-token velocity loss (MUPAD only)
    projector_dim: int = 0  # hidden width of the projector; 0 = 2048 (MLP) / hidden_size (CNN)

    def __post_init__(self) -> None:
        object.__setattr__(self, "objective", parse_enum(Objective, self.objective))
        object.__setattr__(self, "teacher_source", parse_enum(TeacherSource, self.teacher_source))
        if self.block < 0 or self.projector_dim < 0:
            raise ConfigError("alignment block and projector_dim must be >= 0")
        if self.align_weight < 0 or self.cls_weight < 0:
            raise ConfigError(
                f"loss weights must be >= 0, got align {self.align_weight}, cls {self.cls_weight}"
            )

    @property
    def uses_teacher(self) -> bool:
        return self.objective is not Objective.SIT

    @property
    def uses_cls(self) -> bool:
        """MUPAD with a nonzero CLS weight; otherwise the model carries no CLS token at all."""
        return self.objective is Objective.MUPAD and self.cls_weight > 0

    def resolved_block(self, depth: int) -> int:
        """The 1-based block to align for a model of `depth` blocks."""
        block = self.block or max(1, depth // 3)
        if not 1 <= block <= depth:
            raise ConfigError(f"alignment block {block} is outside the model's 1..{depth} blocks")
        return block


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    warmup_steps: int = 0
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    ema_decay: float = 0.9999
    precision: Precision = Precision.BF16
    condition_dropout: float = 0.1  # per modality, independently, for classifier-free guidance
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    # `batch_size` is the global batch of one optimizer step, whatever the number of
    # processes; each process takes batch_size / world_size rows of it, in
    # `grad_accumulation` micro-batches.
    grad_accumulation: int = 1
    lr_schedule: LRScheduleKind = LRScheduleKind.CONSTANT
    min_learning_rate: float = 0.0  # end of the cosine decay
    max_nonfinite_steps: int = 20  # skipped steps (NaN/Inf loss or gradient) before giving up
    gradient_checkpointing: bool = False  # recompute block activations in the backward pass
    compile: bool = False  # torch.compile the training module
    parallel: ParallelKind = ParallelKind.DDP  # under torchrun with more than one process
    sample_every: int = 0  # write a sample grid every this many steps (0: never)
    time_sampling: TimeSampling = TimeSampling.UNIFORM
    time_location: float = 0.0  # LOGIT_NORMAL: mean of the normal (> 0 favours noisier t)
    time_scale: float = 1.0  # LOGIT_NORMAL: its standard deviation
    alignment: AlignmentConfig = dataclasses.field(default_factory=AlignmentConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "precision", parse_enum(Precision, self.precision))
        object.__setattr__(self, "lr_schedule", parse_enum(LRScheduleKind, self.lr_schedule))
        object.__setattr__(self, "parallel", parse_enum(ParallelKind, self.parallel))
        object.__setattr__(self, "time_sampling", parse_enum(TimeSampling, self.time_sampling))
        if self.time_scale <= 0:
            raise ConfigError(f"time_scale must be > 0, got {self.time_scale}")
        if isinstance(self.alignment, dict):
            object.__setattr__(self, "alignment", AlignmentConfig(**self.alignment))
        if self.steps < 1 or self.batch_size < 1:
            raise ConfigError("steps and batch_size must be >= 1")
        if self.grad_accumulation < 1 or self.max_nonfinite_steps < 0 or self.sample_every < 0:
            raise ConfigError(
                "grad_accumulation must be >= 1, max_nonfinite_steps and sample_every >= 0"
            )
        if self.batch_size % self.grad_accumulation:
            raise ConfigError(
                f"batch_size {self.batch_size} is not divisible by grad_accumulation "
                f"{self.grad_accumulation}; every micro-batch must have the same size"
            )
        if not 0.0 <= self.condition_dropout <= 1.0:
            raise ConfigError(f"condition_dropout must be in [0, 1], got {self.condition_dropout}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        non_negative = {
            "learning_rate (--lr)": self.learning_rate,
            "min_learning_rate (--min-lr)": self.min_learning_rate,
            "weight_decay (--weight-decay)": self.weight_decay,
            "grad_clip (--grad-clip)": self.grad_clip,
        }
        for name, value in non_negative.items():
            if not (math.isfinite(value) and value >= 0.0):
                raise ConfigError(f"{name} must be a finite number >= 0, got {value}")
        if self.warmup_steps < 0:
            raise ConfigError(
                f"warmup_steps (--warmup-steps) must be >= 0, got {self.warmup_steps}"
            )

    @property
    def logit_normal(self) -> tuple[float, float] | None:
        """(location, scale) when training times are logit-normal, else None (uniform)."""
        if self.time_sampling is TimeSampling.LOGIT_NORMAL:
            return (self.time_location, self.time_scale)
        return None


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """`mupad demo`: samples of the packaged pretrained model, then a short fine-tune on the
    bundled tiles (or, without a packaged model, a short training from scratch)."""

    steps: int = 300  # fine-tuning steps: about 3 min on 2 CPU cores
    batch_size: int = 32
    crop: int = 64
    samples_per_class: int = 8
    sampler: SamplerKind = SamplerKind.EULER
    sample_steps: int = 50
    guidance_start: float = 2.5  # linear anneal to 0 over the trajectory
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "sampler", parse_enum(SamplerKind, self.sampler))
        if min(self.steps, self.batch_size, self.samples_per_class, self.sample_steps) < 1:
            raise ConfigError(
                "demo steps, batch_size, samples_per_class and sample_steps must be >= 1"
            )
        if self.guidance_start < 0:
            raise ConfigError(f"guidance_start must be >= 0, got {self.guidance_start}")


# --------------------------------------------------------------------------------------
# JSON round trip
# --------------------------------------------------------------------------------------

C = TypeVar("C")


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict (enums become their string values, nested configs become dicts)."""

    def convert(value: Any) -> Any:
        if isinstance(value, enum.Enum):
            return value.value
        if dataclasses.is_dataclass(value):
            return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return value

    return convert(config)


def from_dict(cls: type[C], data: dict[str, Any]) -> C:
    """Inverse of `to_dict`; unknown keys are an error (a config from another version)."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - names
    if unknown:
        raise ConfigError(
            f"{cls.__name__} has no field(s) {sorted(unknown)}; was this file written by "
            "another version of mupad?"
        )
    return cls(**data)


def save_json(config: Any, path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_dict(config), indent=2, sort_keys=True) + "\n")


def load_json(cls: type[C], path: str | Path) -> C:
    return from_dict(cls, json.loads(Path(path).read_text()))
