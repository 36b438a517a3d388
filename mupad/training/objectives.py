"""The training objective: velocity loss, alignment to a frozen teacher, CLS-token denoising.

    loss = |v(x_t, t) - (eps - x0)|^2                                  (every objective)
         + align_weight * mean_patches(-cos(proj(h_k), teacher_patches))  (REPA: MLP, MUPAD: CNN)
         + cls_weight * |v_cls(c_t, t) - (eps_c - c0)|^2                  (MUPAD)

h_k are the patch tokens after block k; c0 is the teacher's global embedding of the clean
image, standardised per vector so it lives on the noise's scale, and c_t is noised on the
same path and at the same t as the image (paths.interpolate). Every loss term is reduced in
fp32 whatever the autocast dtype: normalisations of bf16 features are what makes the
alignment loss go NaN late in training.

Randomness of one step is drawn in a fixed order from the step's generator for the whole
global batch — data, condition dropout, t, image noise, CLS noise — and each process then
takes its rows, so the batch a row sees never depends on the number of processes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mupad.conditions import Conditions
from mupad.config import AlignmentConfig, ConfigError, ModelConfig
from mupad.models.projectors import build_projector, projector_kind
from mupad.models.sit import SiT, SiTOutput
from mupad.training.teacher import TeacherError, TeacherFeatures, TeacherSpec
from mupad.transport import paths
from mupad.transport.losses import make_noisy_batch, velocity_loss

_STANDARDISE_EPS = 1e-6


@dataclass(frozen=True)
class ObjectiveBatch:
    """Everything one optimizer step regresses, row-aligned so it can be split."""

    x_t: torch.Tensor  # (B, C, H, W)
    t: torch.Tensor  # (B,)
    target: torch.Tensor  # (B, C, H, W) velocity target eps - x0
    cond: Conditions | None
    cls_noise: torch.Tensor | None  # (B, cls_dim) when the model denoises a CLS token
    teacher: TeacherFeatures | None  # cached teacher features of the clean images
    pixels: torch.Tensor | None  # (B, 3, H', W') clean images for an online teacher

    @property
    def batch_size(self) -> int:
        return self.x_t.shape[0]

    def rows(self, start: int, stop: int) -> ObjectiveBatch:
        def cut(value):
            return None if value is None else value[start:stop]

        return ObjectiveBatch(
            x_t=self.x_t[start:stop],
            t=self.t[start:stop],
            target=self.target[start:stop],
            cond=None if self.cond is None else self.cond.index(slice(start, stop)),
            cls_noise=cut(self.cls_noise),
            teacher=None if self.teacher is None else self.teacher.rows(start, stop),
            pixels=cut(self.pixels),
        )

    def to(self, device: torch.device) -> ObjectiveBatch:
        def move(value):
            return None if value is None else value.to(device, non_blocking=True)

        return dataclasses.replace(
            self,
            x_t=move(self.x_t),
            t=move(self.t),
            target=move(self.target),
            cond=None if self.cond is None else self.cond.to(device),
            cls_noise=move(self.cls_noise),
            teacher=None if self.teacher is None else self.teacher.to(device),
            pixels=move(self.pixels),
        )


def draw_objective_batch(
    x0: torch.Tensor,
    cond: Conditions | None,
    generator: torch.Generator,
    *,
    condition_dropout: float,
    cls_dim: int = 0,
    teacher: TeacherFeatures | None = None,
    pixels: torch.Tensor | None = None,
    logit_normal: tuple[float, float] | None = None,
) -> ObjectiveBatch:
    """Draw dropout, t, image noise and CLS noise (in that order) for a global batch x0;
    t is uniform, or logit-normal with `logit_normal` = (location, scale)."""
    if cond is not None:
        cond = cond.dropout(condition_dropout, generator)
    noisy = make_noisy_batch(x0, generator=generator, logit_normal=logit_normal)
    cls_noise = None
    if cls_dim:
        cls_noise = torch.randn((x0.shape[0], cls_dim), generator=generator)
    return ObjectiveBatch(
        x_t=noisy.x_t,
        t=noisy.t,
        target=noisy.target,
        cond=cond,
        cls_noise=cls_noise,
        teacher=teacher,
        pixels=pixels,
    )


def standardise(vectors: torch.Tensor) -> torch.Tensor:
    """Per-vector zero mean, unit variance (fp32): the teacher's CLS embedding on the noise's
    scale, whatever the encoder's feature magnitudes."""
    vectors = vectors.float()
    mean = vectors.mean(dim=-1, keepdim=True)
    std = vectors.std(dim=-1, keepdim=True, unbiased=False)
    return (vectors - mean) / (std + _STANDARDISE_EPS)


def alignment_loss(projected: torch.Tensor, teacher_patches: torch.Tensor) -> torch.Tensor:
    """Mean over patches of -cos(projected, teacher), per sample, in fp32: (B,).

    projected, teacher_patches: (B, N, D) on the same patch grid.
    """
    if projected.shape != teacher_patches.shape:
        raise TeacherError(
            f"projected features {tuple(projected.shape)} and teacher patches "
            f"{tuple(teacher_patches.shape)} differ in shape"
        )
    cosine = F.cosine_similarity(projected.float(), teacher_patches.float(), dim=-1, eps=1e-6)
    return -cosine.mean(dim=1)


def objective_model_config(
    config: ModelConfig, alignment: AlignmentConfig, teacher: TeacherSpec | None
) -> ModelConfig:
    """The model config an objective trains: the CLS width is the teacher's when MUPAD
    denoises a CLS token, else 0."""
    if alignment.uses_cls:
        if teacher is None:
            raise ConfigError("the mupad objective needs a teacher for its CLS token")
        return dataclasses.replace(config, cls_dim=teacher.dim)
    return dataclasses.replace(config, cls_dim=0)


@dataclass
class ModuleOutput:
    sit: SiTOutput
    projected: torch.Tensor | None  # (B, N_teacher, D_teacher)


class TrainingModule(nn.Module):
    """The backbone plus the alignment projector: every trained weight in one module, so
    DDP/FSDP wrap, clip and checkpoint them together."""

    def __init__(
        self, model: SiT, alignment: AlignmentConfig, teacher: TeacherSpec | None = None
    ) -> None:
        super().__init__()
        self.model = model
        self.alignment = alignment
        self.teacher_spec = teacher
        kind = projector_kind(alignment.objective)
        self.projector: nn.Module | None = None
        self.align_block: int | None = None
        if kind is not None:
            if teacher is None:
                raise ConfigError(
                    f"the {alignment.objective.value} objective needs teacher features; cache "
                    "them with `mupad prepare --image-encoder NAME` or use teacher_source=online"
                )
            self.align_block = alignment.resolved_block(model.config.depth)
            self.projector = build_projector(
                kind, model.config.hidden_size, teacher.dim, alignment.projector_dim
            )
        expected_cls = teacher.dim if alignment.uses_cls and teacher is not None else 0
        if model.config.cls_dim != expected_cls:
            raise ConfigError(
                f"the model has cls_dim={model.config.cls_dim} but the {alignment.objective.value} "
                f"objective needs {expected_cls}; build it with objective_model_config"
            )

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        cond: Conditions | None,
        cls_t: torch.Tensor | None,
    ) -> ModuleOutput:
        out = self.model(x_t, t, cond, cls_token=cls_t, hidden_from_block=self.align_block)
        projected = None
        if self.projector is not None:
            patch = self.model.config.patch_size
            grid = (x_t.shape[-2] // patch, x_t.shape[-1] // patch)
            projected = self.projector(out.hidden, grid, self.teacher_spec.grid)
        return ModuleOutput(sit=out, projected=projected)


@dataclass
class LossTerms:
    total: torch.Tensor  # scalar, the quantity to backpropagate
    velocity: torch.Tensor  # scalar, detached
    alignment: torch.Tensor | None  # scalar mean -cos, detached
    cls: torch.Tensor | None  # scalar CLS velocity loss, detached


def objective_losses(
    module: nn.Module, batch: ObjectiveBatch, alignment: AlignmentConfig
) -> LossTerms:
    """Forward `module` (a TrainingModule, possibly wrapped by DDP/FSDP) on a batch whose
    teacher features are filled in; all reductions in fp32."""
    teacher = batch.teacher
    if alignment.uses_teacher and teacher is None:
        raise TeacherError("this objective needs teacher features for every batch")
    cls_t = cls_target = None
    if batch.cls_noise is not None:
        c0 = standardise(teacher.cls)  # (B, K)
        cls_t = paths.interpolate(c0, batch.cls_noise, batch.t)
        cls_target = paths.velocity_target(c0, batch.cls_noise)
    out = module(batch.x_t, batch.t, batch.cond, cls_t)
    velocity = velocity_loss(out.sit.velocity.float(), batch.target.float()).mean()
    total = velocity
    align = cls = None
    if out.projected is not None:
        align = alignment_loss(out.projected, teacher.patches).mean()
        if alignment.align_weight > 0:
            total = total + alignment.align_weight * align
        else:  # logged, but not a single gradient from it
            align = align.detach()
    if cls_target is not None:
        cls = velocity_loss(out.sit.cls_velocity.float(), cls_target).mean()
        total = total + alignment.cls_weight * cls
    return LossTerms(
        total=total,
        velocity=velocity.detach(),
        alignment=None if align is None else align.detach(),
        cls=None if cls is None else cls.detach(),
    )
