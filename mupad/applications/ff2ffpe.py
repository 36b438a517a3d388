"""Fresh-frozen (FF) -> FFPE appearance (paper section 5, eq. 4/5): invert, regenerate, inject.

    FF image --codec--> x0 --reverse ODE under the source text ("fresh frozen")--> z
    z --two ODE passes in ONE batch, rows [source; target(; target uncond)]-->
        source rows: reconstruction under the source text (retraces the inversion)
        target rows: regeneration under the target text ("ffpe image"), guided (CFG)
    in blocks `inject_blocks` and during the first `inject_fraction` of the sampling steps
    the target rows' self-attention takes the source rows' (`mupad.models.attention_control`)
    --> target latents --codec--> FFPE-looking image

Injection modes (`InjectionMode`): KV (the default) copies k and v, so the target's queries
attend over the source reconstruction's keys and values; MAPS copies q and k, so the
target's self-attention probabilities equal the source's (the paper's "self-attention
maps", computed through SDPA without materialising them) while the values stay the
target's. On the synthetic benchmark (benchmarks/ff2ffpe_structure.py) KV kept clearly more
structure than MAPS at the same steps and blocks, with stain statistics as close to FFPE.

Row bookkeeping. The state integrated by the ODE solver is (2B, ...): rows [0, B) the source
reconstruction, rows [B, 2B) the target. Per velocity evaluation the model sees

    w(t) == 0:   [x_src | x_tgt]            conditions [source text | target text]
    w(t) != 0:   [x_src | x_tgt | x_tgt]    conditions [source | target | target, text absent]

and the injection's row map sends every target row (conditional and unconditional alike)
to source row r mod B, so the guidance direction v_cond - v_uncond compares two passes with
the same injected attention. The source rows are never guided: they use exactly the
velocity the inversion used, so with enough steps they return the input. Without
`reconstruct`, the source rows are only computed while they are injected: after the
injection window (or throughout, with no injection) the model sees the target rows alone
and the source rows stand still (velocity 0), which gives the same target for less work.

Note that only the self-attention is injected: the target text still acts through the
text cross-attention of every block, which is what changes the appearance. Injecting every
block at every step therefore keeps the source's attention layout but not its pixels.

What else is here: `hematoxylin_ssim` (structure kept: SSIM of the hematoxylin channel of
a colour deconvolution, skimage's rgb2hed), `FFPETranslator` (the whole-slide TileTranslator,
registered as "ff2ffpe" in `mupad.applications.wsi`), `translate_files` (images or a folder ->
PNG + sidecar JSON each) and `finetune_domains` (teach a model the two domain texts from
unpaired FF and FFPE tile folders, optionally warm-started from a pretrained run).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from mupad.conditions import Conditions, ConditionStream, Modality
from mupad.config import (
    GuidanceConfig,
    GuidanceMode,
    GuidanceScheduleKind,
    SamplerKind,
    TrainConfig,
    parse_enum,
    to_dict,
)
from mupad.errors import MupadError
from mupad.fileio import atomic_directory, atomic_file, atomic_write_text
from mupad.models.attention_control import (
    AttentionControlError,
    InjectionMode,
    RowInjection,
    attention_control,
    resolve_blocks,
)
from mupad.transport.guidance import GuidanceSchedule
from mupad.transport.samplers import euler_ode, heun_ode, reverse_ode

logger = logging.getLogger(__name__)

DEFAULT_SOURCE_TEXT = "fresh frozen"
DEFAULT_TARGET_TEXT = "ffpe image"
# Class folders of the fine-tuning layout (`finetune_domains`); their captions are the texts.
SOURCE_CLASS = "fresh_frozen"
TARGET_CLASS = "ffpe_image"
DEFAULT_MAX_SIDE_PX = 1024  # larger images go through `mupad wsi translate --translator ff2ffpe`


class FFPEError(MupadError, ValueError):
    """Inputs to FF -> FFPE that cannot work; the message says how to fix them."""


# --------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FFPESettings:
    """Everything besides the model and the input that decides an FF -> FFPE output."""

    source_text: str = DEFAULT_SOURCE_TEXT
    target_text: str = DEFAULT_TARGET_TEXT
    num_steps: int = 50  # ODE steps of the inversion and of the regeneration
    method: SamplerKind = SamplerKind.EULER  # euler or heun (deterministic, invertible)
    strength: float = 1.0  # invert up to t = strength (1: pure noise; < 1: keep more of x0)
    inject_blocks: tuple[int, ...] | None = None  # 0-based; None = every block
    inject_fraction: float = 0.5  # the first this fraction of sampling steps inject
    inject_mode: InjectionMode = InjectionMode.KV
    guidance: GuidanceConfig | None = None  # CFG of the target pass (None: unguided)

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", parse_enum(SamplerKind, self.method))
        object.__setattr__(self, "inject_mode", parse_enum(InjectionMode, self.inject_mode))
        if isinstance(self.guidance, dict):
            object.__setattr__(self, "guidance", GuidanceConfig(**self.guidance))
        if self.method is SamplerKind.SDE:
            raise FFPEError("FF -> FFPE inverts with a deterministic ODE: method euler or heun")
        if self.num_steps < 1:
            raise FFPEError(f"num_steps must be >= 1, got {self.num_steps}")
        if not 0.0 < self.strength <= 1.0:
            raise FFPEError(f"strength must be in (0, 1], got {self.strength}")
        if not 0.0 <= self.inject_fraction <= 1.0:
            raise FFPEError(f"inject_fraction must be in [0, 1], got {self.inject_fraction}")
        for name in ("source_text", "target_text"):
            if not str(getattr(self, name)).strip():
                raise FFPEError(f"{name} must be a non-empty text")
        if self.inject_blocks is not None:
            blocks = tuple(sorted({int(b) for b in self.inject_blocks}))
            if any(b < 0 for b in blocks):
                raise FFPEError(f"inject_blocks are 0-based block indices, got {blocks}")
            object.__setattr__(self, "inject_blocks", blocks)

    @property
    def num_inject_steps(self) -> int:
        """How many of the `num_steps` sampling steps inject (rounded half up)."""
        if self.inject_blocks == ():
            return 0
        return math.floor(self.inject_fraction * self.num_steps + 0.5)

    def without_injection(self) -> FFPESettings:
        return dataclasses.replace(self, inject_fraction=0.0)

    def to_dict(self) -> dict[str, Any]:
        data = to_dict(self)
        data["inject_blocks"] = None if self.inject_blocks is None else list(self.inject_blocks)
        return data


def guidance_config(guidance: float | GuidanceConfig | None) -> GuidanceConfig | None:
    """A constant CFG scale, a GuidanceConfig, or None/0 (no guidance)."""
    if guidance is None or isinstance(guidance, GuidanceConfig):
        return guidance
    scale = float(guidance)
    if not math.isfinite(scale) or scale < 0:
        raise FFPEError(f"the guidance scale must be a finite number >= 0, got {guidance}")
    if scale == 0.0:
        return None
    return GuidanceConfig(schedule=GuidanceScheduleKind.CONSTANT, start=scale, end=scale)


def parse_blocks(text: str | None) -> tuple[int, ...] | None:
    """'all' / None -> None (every block); 'none' -> (); '0-5' / '0,2,4' / '0-2,7' -> indices."""
    if text is None or text.strip().lower() in ("", "all"):
        return None
    if text.strip().lower() == "none":
        return ()
    blocks: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                low, high = (int(v) for v in part.split("-"))
                if high < low:
                    raise ValueError
                blocks.update(range(low, high + 1))
            else:
                blocks.add(int(part))
        except ValueError:
            raise FFPEError(
                f"blocks look like 'all', 'none', '0-5', '0,2,4' or '0-2,7' (0-based); got {text!r}"
            ) from None
    return tuple(sorted(blocks))


# --------------------------------------------------------------------------------------
# The two domain texts as conditions
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DomainConditions:
    """The source and target text conditions, one row each, on the CPU."""

    source: Conditions
    target: Conditions

    @classmethod
    def encode(cls, encoder: Any, source_text: str, target_text: str) -> DomainConditions:
        """`encoder`: a text encoder registry name (e.g. "minilm") or an object with
        `encode(list_of_str) -> (tokens (2, T, D), mask (2, T))`."""
        if isinstance(encoder, str):
            from mupad.conditioning import get_encoder

            encoder = get_encoder(encoder)
        tokens, mask = encoder.encode([source_text, target_text])
        tokens, mask = tokens.detach().float().cpu(), mask.detach().bool().cpu()
        if tokens.dim() != 3 or tokens.shape[0] != 2:
            raise FFPEError(f"the text encoder returned tokens of shape {tuple(tokens.shape)}")
        rows = [
            Conditions.build(text=ConditionStream.from_tokens(tokens[i : i + 1], mask[i : i + 1]))
            for i in range(2)
        ]
        return cls(source=rows[0], target=rows[1])

    @property
    def width(self) -> int:
        return int(self.source.streams[Modality.TEXT].tokens.shape[-1])

    def repeat(self, batch: int, device: torch.device | str) -> tuple[Conditions, Conditions]:
        index = torch.zeros(batch, dtype=torch.long)
        return self.source.index(index).to(device), self.target.index(index).to(device)


def check_model(model: nn.Module, domains: DomainConditions | None = None) -> None:
    """Raise FFPEError unless `model` can do FF -> FFPE (a text stream, no CLS token)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "velocity"):
        raise FFPEError(f"expected a mupad SiT, got {type(model).__name__}")
    if "text" not in config.condition_dims:
        raise FFPEError(
            "this model has no text stream, so it cannot be told the domain texts; fine-tune "
            "one with `mupad ffpe finetune` (or a text-conditioned `mupad train`)"
        )
    if config.cls_dim:
        raise FFPEError(
            "this model carries a CLS token (cls_dim > 0), whose clean state an FF image does "
            "not give, so the image cannot be inverted; fine-tune it with the sit or repa "
            "objective (`mupad ffpe finetune --init` drops the CLS layers)"
        )
    if domains is not None and domains.width != config.text_dim:
        raise FFPEError(
            f"the text encoder gives {domains.width}-wide tokens but the model's text stream "
            f"takes {config.text_dim}; use the encoder the model was trained with"
        )


# --------------------------------------------------------------------------------------
# The parallel source / target passes
# --------------------------------------------------------------------------------------


class ParallelPasses:
    """The velocity of the stacked state [x_src; x_tgt] (2B, ...) — see the module notes.

    `step` counts finished sampling steps (the solver's callback advances it), so both
    evaluations of a Heun step fall in the same step. `reconstruct=False` skips the source
    rows outside the injection window (their velocity is then 0). `calls` records, per
    evaluation, the number of rows the model saw and whether it injected.
    """

    def __init__(
        self,
        model: nn.Module,
        source: Conditions,
        target: Conditions,
        settings: FFPESettings,
        batch: int,
        *,
        reconstruct: bool = True,
    ) -> None:
        self.model, self.settings, self.batch = model, settings, batch
        self.reconstruct = reconstruct
        depth = len(model.blocks)  # type: ignore[attr-defined]
        try:
            self.blocks = resolve_blocks(settings.inject_blocks, depth)
        except AttentionControlError as error:
            raise FFPEError(str(error)) from None
        self.num_inject = settings.num_inject_steps if self.blocks else 0
        self.schedule = None
        self.text_scale = 1.0
        if settings.guidance is not None:
            schedule = GuidanceSchedule.from_config(settings.guidance)
            if not schedule.is_zero:
                self.schedule = schedule
            if settings.guidance.mode is GuidanceMode.PER_MODALITY:
                self.text_scale = float(settings.guidance.text_scale)  # text is the only one
        uncond = target.without([Modality.TEXT])
        self.target = target
        self.target_guided = Conditions.concat([target, uncond])
        self.conditions = {
            2: Conditions.concat([source, target]),
            3: Conditions.concat([source, target, uncond]),
        }
        rows = torch.arange(batch, device=next(model.parameters()).device)
        self.injections = {
            copies: RowInjection(
                row_map=torch.cat([rows] * copies),  # row r takes from source row r mod B
                blocks=self.blocks,
                mode=settings.inject_mode,
            )
            for copies in (2, 3)
        }
        self.step = 0
        self.calls: list[tuple[int, bool]] = []

    def advance(self, index: int, t: float, x: torch.Tensor) -> None:
        self.step = index + 1

    def weight(self, t: float) -> float:
        if self.schedule is None:
            return 0.0
        return self.schedule(t) * self.text_scale

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Conditions | None) -> torch.Tensor:
        batch = self.batch
        if x.shape[0] != 2 * batch:
            raise FFPEError(f"expected the stacked state of {2 * batch} rows, got {x.shape[0]}")
        w = self.weight(float(t[0]))
        inject = self.step < self.num_inject
        if not (inject or self.reconstruct):
            return self._target_only(x, t, w)
        copies = 3 if w != 0.0 else 2
        x_target = x[batch:]
        x_in = torch.cat([x, x_target]) if copies == 3 else x  # (copies*B, ...)
        t_in = t[:1].expand(copies * batch)
        control = (
            attention_control(self.model, self.injections[copies])
            if inject
            else contextlib.nullcontext()
        )
        with control:
            out = self.model.velocity(x_in, t_in, self.conditions[copies])  # type: ignore[operator]
        self.calls.append((copies * batch, inject))
        if copies == 2:
            return out
        v_target = out[batch : 2 * batch]
        guided = v_target + w * (v_target - out[2 * batch :])
        return torch.cat([out[:batch], guided])

    def _target_only(self, x: torch.Tensor, t: torch.Tensor, w: float) -> torch.Tensor:
        """No injection and no reconstruction wanted: the target rows alone, source frozen."""
        batch = self.batch
        x_target = x[batch:]
        if w == 0.0:
            velocity = self.model.velocity(x_target, t[batch:], self.target)  # type: ignore[operator]
            self.calls.append((batch, False))
        else:
            x_in = torch.cat([x_target, x_target])  # (2B, ...): [target | target uncond]
            out = self.model.velocity(x_in, t[:1].expand(2 * batch), self.target_guided)  # type: ignore[operator]
            self.calls.append((2 * batch, False))
            velocity = out[:batch] + w * (out[:batch] - out[batch:])
        return torch.cat([torch.zeros_like(x_target), velocity])


@dataclasses.dataclass
class LatentTranslation:
    target: torch.Tensor  # (B, C, h, w) regenerated under the target text (with injection)
    reconstruction: torch.Tensor | None  # (B, C, h, w) the source-text reconstruction
    inverted: torch.Tensor  # (B, C, h, w) the inverted latent at t = strength


def _integrator(method: SamplerKind):
    return heun_ode if method is SamplerKind.HEUN else euler_ode


@torch.no_grad()
def translate_latents(
    model: nn.Module,
    x0: torch.Tensor,
    source: Conditions,
    target: Conditions,
    settings: FFPESettings,
    *,
    reconstruct: bool = True,
    progress: bool = False,
) -> LatentTranslation:
    """Invert x0 (B, C, h, w) under `source`, then run the source and target passes together.

    `reconstruct=False` skips the source rows once they are no longer injected (the target
    is the same; `reconstruction` is then None).
    """
    batch = x0.shape[0]
    if source.batch_size != batch or target.batch_size != batch:
        raise FFPEError(
            f"{batch} inputs but {source.batch_size} source / {target.batch_size} target rows"
        )
    steps, strength = settings.num_steps, settings.strength
    inverted = reverse_ode(
        model.velocity,  # type: ignore[arg-type]
        x0,
        source,
        steps,
        method=settings.method,
        t_end=strength,
        progress=progress,
    )
    passes = ParallelPasses(model, source, target, settings, batch, reconstruct=reconstruct)
    state = torch.cat([inverted, inverted])  # (2B, C, h, w): [source; target]
    out = _integrator(settings.method)(
        passes,
        state,
        None,
        steps,
        t_start=strength,
        t_end=0.0,
        progress=progress,
        callback=passes.advance,
    )
    return LatentTranslation(
        target=out[batch:], reconstruction=out[:batch] if reconstruct else None, inverted=inverted
    )


# --------------------------------------------------------------------------------------
# Images in, images out
# --------------------------------------------------------------------------------------


def as_uint8_images(images: Any) -> tuple[torch.Tensor, list[str]]:
    """uint8 (B, 3, H, W) (torch or numpy; (3, H, W) for one image), image paths, or one path
    -> (uint8 (B, 3, H, W) tensor, conversions). Grayscale (B, 1, H, W) is replicated."""
    if isinstance(images, (str, Path)):
        images = [images]
    if (
        isinstance(images, (list, tuple))
        and images
        and all(isinstance(p, (str, Path)) for p in images)
    ):
        loaded = [load_image(p) for p in images]
        shapes = {tuple(array.shape) for array, _ in loaded}
        if len(shapes) > 1:
            raise FFPEError(
                f"the images have different sizes {sorted(shapes)}; translate them separately "
                "(translate_files groups them by size)"
            )
        notes = sorted({note for _, conversions in loaded for note in conversions})
        stacked = np.stack([array for array, _ in loaded])  # (B, H, W, 3)
        return torch.from_numpy(stacked).permute(0, 3, 1, 2).contiguous(), notes
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        raise FFPEError(
            f"images must be uint8 (B, 3, H, W) (torch or numpy) or image paths, got "
            f"{type(images).__name__}"
        )
    if images.dtype != torch.uint8:
        raise FFPEError(
            f"images must be uint8 (0-255), got {images.dtype}; for floats in [0, 1] use "
            "(x * 255).round().clamp(0, 255).to(torch.uint8)"
        )
    if images.dim() == 3:
        images = images[None]
    notes: list[str] = []
    if images.dim() != 4:
        raise FFPEError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
        notes.append("grayscale replicated to RGB")
    elif images.shape[1] != 3:
        hint = " (channels-last? use x.permute(0, 3, 1, 2))" if images.shape[-1] in (1, 3) else ""
        raise FFPEError(
            f"images must have 3 (RGB) or 1 (gray) channels on axis 1, got shape "
            f"{tuple(images.shape)}{hint}"
        )
    if images.shape[0] == 0:
        raise FFPEError("no images given")
    return images.contiguous(), notes


def load_image(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """An image file -> (uint8 (H, W, 3), conversions): gray replicated, alpha onto white,
    16-bit scaled (see `mupad.applications.reference_images`)."""
    from mupad.applications.reference_images import ReferenceImageError, open_image_array, to_rgb8

    path = Path(path)
    if not path.is_file():
        raise FFPEError(f"input image {path} does not exist")
    try:
        raw, _, _ = open_image_array(path)
        return to_rgb8(raw, str(path))
    except ReferenceImageError as error:
        raise FFPEError(str(error).replace("reference image", "input image")) from None


def size_multiple(model: nn.Module, codec: Any) -> int:
    """Image sides must be multiples of this many pixels (patch size x codec downsample)."""
    return int(model.config.patch_size * codec.downsample)  # type: ignore[attr-defined]


@dataclasses.dataclass
class FFPEOutput:
    images: torch.Tensor  # uint8 (B, 3, H, W): the FFPE-looking translation
    reconstruction: torch.Tensor | None  # uint8 (B, 3, H, W): the source-text reconstruction
    conversions: list[str]


@torch.no_grad()
def translate_images(
    model: nn.Module,
    images: Any,
    domains: DomainConditions,
    settings: FFPESettings,
    *,
    codec: Any = None,
    batch_size: int = 8,
    reconstruct: bool = False,
    progress: bool = False,
) -> FFPEOutput:
    """uint8 images (B, 3, H, W) / paths -> FFPEOutput; sides must be multiples of the
    patch size x the codec's downsample (see `size_multiple`). `reconstruct=True` also
    returns the source-text reconstruction (a check of the inversion; costs more)."""
    from mupad.latents import load_codec, pixels_to_uint8, uint8_to_pixels

    device = next(model.parameters()).device
    codec = load_codec(codec, device=device)  # a codec object is used as it is
    check_model(model, domains)
    if model.config.in_channels != codec.latent_channels:  # type: ignore[attr-defined]
        raise FFPEError(
            f"the model takes {model.config.in_channels}-channel inputs but the codec gives "  # type: ignore[attr-defined]
            f"{codec.latent_channels}; use the codec the model was trained with"
        )
    if batch_size < 1:
        raise FFPEError(f"batch_size must be >= 1, got {batch_size}")
    pixels_u8, notes = as_uint8_images(images)
    step = size_multiple(model, codec)
    height, width = pixels_u8.shape[-2:]
    if height % step or width % step:
        raise FFPEError(
            f"image sides must be multiples of {step} px (patch size x codec downsample), got "
            f"{height}x{width}; crop to {height // step * step}x{width // step * step} or pad "
            "(translate_files pads and crops back)"
        )
    model.eval()
    outputs, reconstructions = [], []
    starts = range(0, len(pixels_u8), batch_size)
    for start in tqdm(starts, desc="ff2ffpe", unit="batch", disable=not progress, leave=False):
        chunk = pixels_u8[start : start + batch_size]
        x0 = codec.encode(uint8_to_pixels(chunk).to(device))  # (b, C, h, w)
        source, target = domains.repeat(len(chunk), device)
        result = translate_latents(model, x0, source, target, settings, reconstruct=reconstruct)
        outputs.append(pixels_to_uint8(codec.decode(result.target.float())).cpu())
        if result.reconstruction is not None:
            recon = codec.decode(result.reconstruction.float())
            reconstructions.append(pixels_to_uint8(recon).cpu())
    return FFPEOutput(
        torch.cat(outputs), torch.cat(reconstructions) if reconstructions else None, notes
    )


def ff_to_ffpe(
    model: nn.Module,
    images: Any,
    *,
    source_text: str = DEFAULT_SOURCE_TEXT,
    target_text: str = DEFAULT_TARGET_TEXT,
    num_steps: int = 50,
    inject_blocks: Sequence[int] | None = None,
    inject_steps_fraction: float = 0.5,
    inject_mode: InjectionMode | str = InjectionMode.KV,
    guidance: float | GuidanceConfig | None = None,
    method: SamplerKind | str = SamplerKind.EULER,
    strength: float = 1.0,
    codec: Any = None,
    encoder: Any = "minilm",
    batch_size: int = 8,
    progress: bool = False,
) -> torch.Tensor:
    """FF images -> FFPE-looking uint8 images (B, 3, H, W).

    images: uint8 (B, 3, H, W) (torch or numpy), image paths, or one path; `inject_blocks`
    0-based (None: all); `inject_steps_fraction` of the sampling steps (from the noisy end)
    inject, 0 turns injection off; `guidance` a constant CFG scale on the target pass (or a
    GuidanceConfig); `codec` the model's latent codec (None: pixel space); `encoder` the text
    encoder name or object the model was trained with.
    """
    settings = FFPESettings(
        source_text=source_text,
        target_text=target_text,
        num_steps=num_steps,
        method=method,
        strength=strength,
        inject_blocks=None if inject_blocks is None else tuple(inject_blocks),
        inject_fraction=inject_steps_fraction,
        inject_mode=inject_mode,
        guidance=guidance_config(guidance),
    )
    domains = DomainConditions.encode(encoder, source_text, target_text)
    return translate_images(
        model, images, domains, settings, codec=codec, batch_size=batch_size, progress=progress
    ).images


# --------------------------------------------------------------------------------------
# Structure kept: hematoxylin SSIM
# --------------------------------------------------------------------------------------


def hematoxylin_channel(images: Any) -> np.ndarray:
    """uint8 RGB (B, 3, H, W) -> the hematoxylin optical density (B, H, W), float64, in
    [0, stain_range(HEMATOXYLIN)] (`mupad.evaluation.stains`: skimage's rgb2hed, 0-valued
    channels counted as 1)."""
    from mupad.evaluation.stains import Stain, StainError, stain_density

    try:
        return stain_density(images, Stain.HEMATOXYLIN)
    except StainError as error:
        raise FFPEError(str(error)) from None


def hematoxylin_ssim(a: Any, b: Any) -> np.ndarray:
    """SSIM of the hematoxylin channel between uint8 images a and b (B, 3, H, W) -> (B,).

    1 for identical images. The data range is the fixed range of the H channel for 8-bit
    input (not the per-image range), so the numbers compare across images.
    """
    from skimage.metrics import structural_similarity

    from mupad.evaluation.stains import Stain, stain_range

    ha, hb = hematoxylin_channel(a), hematoxylin_channel(b)
    if ha.shape != hb.shape:
        raise FFPEError(f"images to compare differ in shape: {ha.shape} vs {hb.shape}")
    if min(ha.shape[1:]) < 7:
        raise FFPEError(f"SSIM needs images of at least 7x7 px, got {ha.shape[1]}x{ha.shape[2]}")
    data_range = stain_range(Stain.HEMATOXYLIN)
    return np.array([structural_similarity(x, y, data_range=data_range) for x, y in zip(ha, hb)])


# --------------------------------------------------------------------------------------
# Checkpoints, the whole-slide translator
# --------------------------------------------------------------------------------------


def load_ffpe_model(checkpoint: str | Path, device: str | torch.device = "cpu"):
    """A run / checkpoint / model folder -> (model in eval mode, run metadata, model folder)."""
    from mupad.applications.train_tiles import _resolve_checkpoint
    from mupad.models import SiT

    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise FFPEError(f"checkpoint {checkpoint} does not exist")
    model_dir, metadata = _resolve_checkpoint(checkpoint)
    model = SiT.from_pretrained(model_dir, map_location=device).eval()
    check_model(model)
    return model, metadata, model_dir


def domain_texts(metadata: dict[str, Any]) -> tuple[str, str]:
    """(source, target) texts a fine-tuned run learned (`finetune_domains` metadata), else
    the defaults."""
    names, captions = metadata.get("class_names") or [], metadata.get("captions") or []
    mapping = dict(zip(names, captions))
    if SOURCE_CLASS in mapping and TARGET_CLASS in mapping:
        return mapping[SOURCE_CLASS], mapping[TARGET_CLASS]
    return DEFAULT_SOURCE_TEXT, DEFAULT_TARGET_TEXT


def resolve_device(device: str | torch.device) -> str | torch.device:
    """'auto' -> 'cuda' when a GPU is present, else 'cpu'; anything else as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class FFPETranslator:
    """uint8 FF tiles (B, S, S, 3) -> uint8 FFPE-looking tiles (B, S, S, 3) (TileTranslator).

    Attributes for the whole-slide engine: `tile_size` (px; the model's sample size x the
    codec's downsample unless set), `output_channels` = 3, `mpp` (None: the slide's own),
    `batch_size`. Numpy in -> numpy out, torch in -> torch out. Deterministic.
    """

    output_channels = 3
    name = "ff2ffpe"

    def __init__(
        self,
        model: nn.Module,
        *,
        settings: FFPESettings | None = None,
        encoder: Any = "minilm",
        domains: DomainConditions | None = None,
        codec: Any = None,
        mpp: float | None = None,
        batch_size: int = 8,
        tile_size: int | None = None,
        reconstruct: bool = False,
    ) -> None:
        from mupad.latents import load_codec

        self.model = model.eval()
        self.reconstruct = reconstruct  # also compute the source reconstruction (a check)
        self.settings = settings or FFPESettings()
        self.codec = load_codec(codec, device=next(model.parameters()).device)
        self.domains = domains or DomainConditions.encode(
            encoder, self.settings.source_text, self.settings.target_text
        )
        check_model(model, self.domains)
        try:
            resolve_blocks(self.settings.inject_blocks, len(model.blocks))  # type: ignore[attr-defined]
        except AttentionControlError as error:
            raise FFPEError(str(error)) from None
        if batch_size < 1:
            raise FFPEError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.mpp = mpp
        step = size_multiple(model, self.codec)
        side = tile_size or model.config.sample_size * self.codec.downsample  # type: ignore[attr-defined]
        if side % step:
            raise FFPEError(f"tile_size {side} is not a multiple of {step} px")
        self.tile_size = int(side)

    @classmethod
    def from_pretrained(
        cls,
        checkpoint: str | Path,
        *,
        settings: FFPESettings | None = None,
        text_encoder: str | None = None,
        latents: str | None = None,
        device: str | torch.device = "cpu",
        **kwargs: Any,
    ) -> FFPETranslator:
        """A fine-tuned run; its texts, text encoder and codec come from its metadata."""
        model, metadata, _ = load_ffpe_model(checkpoint, resolve_device(device))
        if settings is None:
            source, target = domain_texts(metadata)
            settings = FFPESettings(source_text=source, target_text=target)
        return cls(
            model,
            settings=settings,
            encoder=text_encoder or metadata.get("text_encoder", "minilm"),
            codec=latents or metadata.get("latents", "identity"),
            **kwargs,
        )

    def translate(self, images: Any, progress: bool = False) -> FFPEOutput:
        """uint8 (B, 3, H, W) -> FFPEOutput (channels first)."""
        return translate_images(
            self.model,
            images,
            self.domains,
            self.settings,
            codec=self.codec,
            batch_size=self.batch_size,
            reconstruct=self.reconstruct,
            progress=progress,
        )

    def __call__(self, tiles: Any) -> Any:
        as_numpy = isinstance(tiles, np.ndarray)
        array = torch.from_numpy(np.ascontiguousarray(tiles)) if as_numpy else tiles
        if (
            not isinstance(array, torch.Tensor)
            or array.dtype != torch.uint8
            or array.dim() != 4
            or array.shape[-1] != 3
        ):
            shape = tuple(array.shape) if hasattr(array, "shape") else type(array).__name__
            raise FFPEError(f"the translator takes uint8 tiles (B, S, S, 3), got {shape}")
        out = self.translate(array.cpu().permute(0, 3, 1, 2)).images  # (B, 3, S, S)
        out = out.permute(0, 2, 3, 1).contiguous()  # (B, S, S, 3)
        return out.numpy() if as_numpy else out


_WSI_OPTION_KEYS = (
    "steps",
    "method",
    "strength",
    "inject_blocks",
    "inject_fraction",
    "inject_mode",
    "guidance",
    "source_text",
    "target_text",
)


def wsi_translator(checkpoint: Path | None, options: Any) -> FFPETranslator:
    """Factory of "ff2ffpe" for `mupad wsi translate`: `checkpoint` the fine-tuned run;
    --option keys steps, method, strength, inject_blocks (e.g. 0-5, all, none),
    inject_fraction, inject_mode (maps, kv), guidance, source_text, target_text."""
    from mupad.applications.wsi import translator_extras

    extra = translator_extras(options, "ff2ffpe", _WSI_OPTION_KEYS, FFPEError)
    if checkpoint is None:
        raise FFPEError("ff2ffpe needs the fine-tuned run as the checkpoint (--checkpoint RUN)")
    device = resolve_device(getattr(options, "device", "cpu") or "cpu")
    model, metadata, _ = load_ffpe_model(checkpoint, device)
    source, target = domain_texts(metadata)
    try:
        settings = FFPESettings(
            source_text=extra.get("source_text", source),
            target_text=extra.get("target_text", target),
            num_steps=int(extra.get("steps", 50)),
            method=extra.get("method", "euler"),
            strength=float(extra.get("strength", 1.0)),
            inject_blocks=parse_blocks(extra.get("inject_blocks")),
            inject_fraction=float(extra.get("inject_fraction", 0.5)),
            inject_mode=extra.get("inject_mode", "kv"),
            guidance=guidance_config(float(extra.get("guidance", 0.0))),
        )
    except ValueError as error:
        raise FFPEError(f"bad ff2ffpe option: {error}") from None
    return FFPETranslator(
        model,
        settings=settings,
        encoder=metadata.get("text_encoder", "minilm"),
        codec=metadata.get("latents", "identity"),
        mpp=getattr(options, "mpp", None),
        batch_size=getattr(options, "batch_size", None) or 8,
        tile_size=getattr(options, "tile_size", None),
    )


# --------------------------------------------------------------------------------------
# Files: images or a folder -> PNG + sidecar JSON each
# --------------------------------------------------------------------------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def list_inputs(path: str | Path) -> list[Path]:
    """An image file, or every image in a folder (recursively, sorted)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix.lower() in IMAGE_SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise FFPEError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {path}")
        return files
    raise FFPEError(f"input {path} is neither an image file nor a folder of images")


def _pad_to_multiple(array: np.ndarray, step: int) -> tuple[np.ndarray, tuple[int, int]]:
    """(H, W, 3) -> reflect-padded (H', W', 3) with H', W' multiples of step; (H, W)."""
    height, width = array.shape[:2]
    pad_h, pad_w = (-height) % step, (-width) % step
    if not (pad_h or pad_w):
        return array, (height, width)
    mode = "reflect" if pad_h < height and pad_w < width else "edge"
    return np.pad(array, ((0, pad_h), (0, pad_w), (0, 0)), mode=mode), (height, width)


def _save_png_atomic(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    with atomic_file(path) as tmp:  # the umask's permissions, as open() would give
        Image.fromarray(array).save(tmp, format="PNG")


@dataclasses.dataclass
class FileResult:
    outputs: list[Path]
    ssim: list[float]  # hematoxylin SSIM input vs output, per output
    seconds: float


def translate_files(
    translator: FFPETranslator,
    inputs: str | Path,
    out: str | Path,
    *,
    max_side: int = DEFAULT_MAX_SIDE_PX,
    provenance: dict[str, Any] | None = None,
    progress: bool = True,
) -> FileResult:
    """Translate an image or a folder of images into `out`: `<name>.png` + `<name>.json`
    (input, conversions, padding, settings, hematoxylin SSIM input vs output, provenance)
    each, then `summary.json`.

    Every input is read and checked before anything is generated. Sides that are not
    multiples of the model's step are reflect-padded and the output cropped back. Each file
    is written under a temporary name and renamed when complete; an output's PNG appears
    only after its sidecar JSON.
    """
    root = Path(inputs)
    files = list_inputs(root)
    step = size_multiple(translator.model, translator.codec)
    loaded = []
    for path in files:
        array, notes = load_image(path)
        if max(array.shape[:2]) > max_side:
            raise FFPEError(
                f"{path} is {array.shape[1]}x{array.shape[0]} px, larger than {max_side} px; "
                "translate whole slides or large regions with `mupad wsi translate "
                "--translator ff2ffpe`"
            )
        if min(array.shape[:2]) < 7:
            raise FFPEError(f"{path} is too small ({array.shape[1]}x{array.shape[0]} px)")
        loaded.append((path, array, notes))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = [
        str(p.relative_to(root).with_suffix("")).replace(os.sep, "__") if root.is_dir() else p.stem
        for p in files
    ]
    common = {"settings": translator.settings.to_dict(), "tile_size": translator.tile_size}
    common.update(provenance or {})
    # Group by padded size so that each group is one batch stream.
    groups: dict[tuple[int, int], list[int]] = {}
    padded = []
    for index, (_, array, _) in enumerate(loaded):
        pad, original = _pad_to_multiple(array, step)
        padded.append((pad, original))
        groups.setdefault(pad.shape[:2], []).append(index)
    outputs: list[Path | None] = [None] * len(files)
    scores: list[float] = [math.nan] * len(files)
    started = time.perf_counter()
    bar = tqdm(total=len(files), desc="ff2ffpe", unit="image", disable=not progress)
    for indices in groups.values():
        for start in range(0, len(indices), translator.batch_size):
            chunk = indices[start : start + translator.batch_size]
            batch = torch.from_numpy(np.stack([padded[i][0] for i in chunk])).permute(0, 3, 1, 2)
            result = translator.translate(batch.contiguous())
            for row, index in enumerate(chunk):
                path, array, notes = loaded[index]
                height, width = padded[index][1]
                image = result.images[row, :, :height, :width]  # (3, H, W)
                source = torch.from_numpy(np.array(array)).permute(2, 0, 1)
                score = float(hematoxylin_ssim(source, image)[0])
                target = out / f"{names[index]}.png"
                sidecar = {
                    "output": target.name,
                    "input": str(path),
                    "input_size_wh": [width, height],
                    "conversions": list(notes),
                    "padded_to_hw": list(padded[index][0].shape[:2]),
                    "hematoxylin_ssim_input_output": score,
                    **common,
                }
                if result.reconstruction is not None:
                    recon = result.reconstruction[row, :, :height, :width]
                    sidecar["hematoxylin_ssim_input_reconstruction"] = float(
                        hematoxylin_ssim(source, recon)[0]
                    )
                atomic_write_text(target.with_suffix(".json"), json.dumps(sidecar, indent=2) + "\n")
                _save_png_atomic(image.permute(1, 2, 0).numpy(), target)
                outputs[index], scores[index] = target, score
            bar.update(len(chunk))
    bar.close()
    seconds = time.perf_counter() - started
    written = [p for p in outputs if p is not None]
    summary = {
        "input": str(root),
        "num_images": len(written),
        "outputs": [p.name for p in written],
        "hematoxylin_ssim_mean": float(np.mean(scores)) if scores else None,
        "seconds": seconds,
        **common,
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return FileResult(written, scores, seconds)


# --------------------------------------------------------------------------------------
# Fine-tuning on unpaired FF and FFPE tiles
# --------------------------------------------------------------------------------------


def domain_layout(
    out: str | Path, ff_dir: str | Path, ffpe_dir: str | Path, dist: Any = None
) -> Path:
    """`out/domains/{fresh_frozen, ffpe_image}` as symlinks to the two tile folders (the
    <data>/<class>/<tile> layout of `train_on_tile_folder`), written atomically (by the main
    process under torchrun; `dist` a DistContext). A run that already has a layout must name
    the same folders."""
    ff_dir, ffpe_dir = Path(ff_dir).resolve(), Path(ffpe_dir).resolve()
    for name, folder in (("FF", ff_dir), ("FFPE", ffpe_dir)):
        if not folder.is_dir():
            raise FFPEError(f"the {name} tile folder {folder} does not exist")
        if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir() if p.is_file()):
            raise FFPEError(
                f"the {name} tile folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}) "
                "directly inside it"
            )
    if ff_dir == ffpe_dir:
        raise FFPEError("the FF and FFPE tile folders must differ")
    layout = Path(out) / "domains"
    wanted = {SOURCE_CLASS: ff_dir, TARGET_CLASS: ffpe_dir}
    if dist is not None and getattr(dist, "world_size", 1) > 1:
        if dist.is_main:
            domain_layout(out, ff_dir, ffpe_dir)
        dist.barrier()
    if layout.exists():
        found = {
            p.name: p.resolve() for p in layout.iterdir() if p.name in wanted and p.is_symlink()
        }
        if found != wanted:
            raise FFPEError(
                f"{out} was fine-tuned on other tile folders ({found}); use another --out or "
                "the same --ff/--ffpe folders"
            )
        return layout
    with atomic_directory(layout) as tmp:
        for name, folder in wanted.items():
            (tmp / name).symlink_to(folder, target_is_directory=True)
    return layout


def finetune_domains(
    ff_dir: str | Path,
    ffpe_dir: str | Path,
    out: str | Path,
    *,
    train_config: TrainConfig,
    init_from: str | Path | None = None,
    source_text: str = DEFAULT_SOURCE_TEXT,
    target_text: str = DEFAULT_TARGET_TEXT,
    preset: str = "S/4",
    crop: int = 64,
    latents: str | None = None,
    text_encoder: str | None = None,
    dist: Any = None,
    progress: bool = True,
):
    """Teach a caption-conditioned SiT the two domain texts from unpaired FF and FFPE tiles.

    Builds `out/domains/` (see `domain_layout`) and trains with `train_on_tile_folder`
    (class "fresh_frozen" -> `source_text`, "ffpe_image" -> `target_text`; 10 % text dropout
    by default, so CFG works). `init_from` warm-starts from a pretrained run (its codec and
    text encoder are used unless given); re-running the same command resumes. Returns the
    `TileRun`.
    """
    from mupad.applications.train_tiles import _resolve_checkpoint, train_on_tile_folder

    if not source_text.strip() or not target_text.strip() or source_text == target_text:
        raise FFPEError("source_text and target_text must be two different non-empty texts")
    metadata: dict[str, Any] = {}
    if init_from is not None:
        if not Path(init_from).exists():
            raise FFPEError(f"--init checkpoint {init_from} does not exist")
        _, metadata = _resolve_checkpoint(Path(init_from))
    layout = domain_layout(out, ff_dir, ffpe_dir, dist)
    return train_on_tile_folder(
        layout,
        out,
        train_config=train_config,
        preset=preset,
        crop=crop,
        latents=latents or metadata.get("latents", "identity"),
        text_encoder=text_encoder or metadata.get("text_encoder", "minilm"),
        captions={SOURCE_CLASS: source_text, TARGET_CLASS: target_text},
        dist=dist,
        progress=progress,
        init_from=init_from,
    )


__all__ = [
    "DEFAULT_SOURCE_TEXT",
    "DEFAULT_TARGET_TEXT",
    "DomainConditions",
    "FFPEError",
    "FFPEOutput",
    "FFPESettings",
    "FFPETranslator",
    "InjectionMode",
    "ParallelPasses",
    "domain_layout",
    "domain_texts",
    "ff_to_ffpe",
    "finetune_domains",
    "guidance_config",
    "hematoxylin_channel",
    "hematoxylin_ssim",
    "load_ffpe_model",
    "parse_blocks",
    "translate_files",
    "translate_images",
    "translate_latents",
    "wsi_translator",
]
