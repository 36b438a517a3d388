"""H&E -> multiplex immunofluorescence (mIF): one intensity map per marker from an H&E tile.

The model (the paper's section 5, "H&E -> mIF"):

- **Marker groups.** K marker intensity maps in [0, 1] are split, in the given order, into
  G = ceil(K / 3) groups of three channels; the last group is padded with all-zero
  channels (zero intensity). Each group is a 3-channel "image" (intensity * 2 - 1, so zero
  intensity is pixel -1) that the latent codec encodes on its own; the G latents are
  concatenated along channels into the diffusion target (B, G*C, h, w). Decoding splits the
  channels back into groups, decodes each, maps pixels to intensities ((p + 1) / 2, clamped
  to [0, 1]) and drops the padding channels -> (B, K, H, W). With the identity codec the
  round trip is exact up to float32 rounding.
- **Concatenated H&E latent.** The H&E tile's latent (B, C, h, w) is concatenated with the
  noisy target along channels: the SiT has in_channels = (G + 1) * C and out_channels =
  G * C, and predicts the target's velocity only. The H&E latent is clean at every t and is
  never dropped.
- **H&E patch embeddings** (an image encoder's tokens, [global, h x w patches]; "inception"
  by default) enter through the image cross-attention stream, dropped with the train
  config's condition_dropout so that classifier-free guidance can act on them.

The network is a plain `SiT`: the concatenation happens outside it, in training by
the Trainer (the H&E latent rides in the batch as `TrainBatch.x_context`) and in
sampling by `concat_velocity` (a velocity closure that concatenates the H&E latent at every
step, repeated to match a guided batch). A checkpoint therefore loads with
`SiT.from_pretrained`, and everything needed to apply it (markers, codec, encoder, tile
size, intensity scales) travels in its run metadata.

Entry points: `train_mif`, `translate_mif`, `MIFTranslator` (the whole-slide
`TileTranslator`, registered as "he2mif"), `apply_mif` (files in, one multi-channel TIFF +
sidecar JSON per input out), `load_mif_folder` (the `mupad mif` data layout) and the metric
`mean_patch_pcc`.

Data layout of `load_mif_folder` (and `mupad mif train --data DIR`):

    DIR/he/<id>.png|.jpg|.tif    RGB H&E tile (square, S x S)
    DIR/mif/<id>.tif|.tiff       the co-registered K-channel mIF stack, (K, S, S) or (S, S, K),
                                 channels in the order of --markers
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mupad.conditions import Conditions, ConditionStream
from mupad.config import (
    ConfigError,
    CrossAttentionKind,
    ModelConfig,
    SampleConfig,
    TrainConfig,
    model_preset,
    parse_enum,
    to_dict,
)
from mupad.data.dihedral import apply_dihedral, draw_dihedral
from mupad.errors import MupadError
from mupad.fileio import atomic_write_text
from mupad.latents import IdentityCodec, LatentCodec, load_codec
from mupad.models.sit import SiT
from mupad.training.loop import TrainBatch, Trainer, TrainResult
from mupad.transport.samplers import sample
from mupad.transport.velocity import VelocityFn

logger = logging.getLogger(__name__)

TASK = "he2mif"
GROUP_SIZE = 3  # markers per codec "image"
NO_ENCODER = "none"  # image_encoder value for a model without the H&E patch-embedding stream
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
MIF_SUFFIXES = (".tif", ".tiff")
_MAX_TOKEN_GRID = 32  # auto patch size: at most 32 x 32 tokens


class MIFError(MupadError, ValueError):
    """H&E / mIF inputs or an mIF checkpoint are unusable; the message says how to fix it."""


class IntensityNormalization(str, enum.Enum):
    """How raw mIF intensities become [0, 1] (see `normalize_intensities`)."""

    DTYPE = "dtype"  # integers / their dtype's maximum; floats must already be in [0, 1]
    PERCENTILE = "percentile"  # per marker / its percentile over the training set, clipped


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------


def check_marker_names(marker_names: Sequence[str]) -> list[str]:
    """Non-empty, unique, non-blank marker names as a list."""
    if isinstance(marker_names, str):
        raise MIFError(
            f"marker_names must be a sequence of names, got the string {marker_names!r}; "
            "split it, e.g. 'CD3,CD8'.split(',')"
        )
    names = [str(name).strip() for name in marker_names]
    if not names:
        raise MIFError("give at least one marker (K = 0 markers cannot be translated)")
    if any(not name for name in names):
        raise MIFError(f"marker names must be non-empty, got {list(marker_names)}")
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise MIFError(f"marker names must be unique; repeated: {', '.join(duplicated)}")
    return names


def num_groups(num_markers: int) -> int:
    """G = ceil(K / 3) codec groups for K markers."""
    if num_markers < 1:
        raise MIFError(f"need at least one marker, got {num_markers}")
    return math.ceil(num_markers / GROUP_SIZE)


def he_to_pixels(he: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 H&E tiles (B, H, W, 3) or (B, 3, H, W) -> float pixels (B, 3, H, W) in [-1, 1]."""
    array = torch.from_numpy(np.ascontiguousarray(he)) if isinstance(he, np.ndarray) else he
    if not isinstance(array, torch.Tensor):
        raise MIFError(
            f"H&E tiles must be a numpy array or a torch tensor, got {type(he).__name__}"
        )
    if array.dim() == 3:
        raise MIFError(
            f"H&E tiles must be a batch (B, H, W, 3), got shape {tuple(array.shape)}; add a "
            "batch axis with x[None]"
        )
    if array.dim() != 4 or 3 not in (array.shape[1], array.shape[-1]):
        raise MIFError(
            f"H&E tiles must be RGB, (B, H, W, 3) or (B, 3, H, W), got shape "
            f"{tuple(array.shape)}; convert grey or RGBA images to RGB first"
        )
    if array.dtype != torch.uint8:
        raise MIFError(
            f"H&E tiles must be uint8 (0-255), got {array.dtype}; convert float images in "
            "[0, 1] with (x * 255).round().astype('uint8')"
        )
    if array.shape[-1] == 3 and array.shape[1] != 3:
        array = array.permute(0, 3, 1, 2)  # (B, H, W, 3) -> (B, 3, H, W)
    if array.shape[0] == 0:
        raise MIFError("the H&E batch is empty")
    return array.float().div(127.5).sub(1.0).contiguous()


def mif_to_unit(mif: np.ndarray | torch.Tensor, num_markers: int | None = None) -> torch.Tensor:
    """mIF stacks (B, K, H, W) -> float32 intensities in [0, 1].

    Float input must already lie in [0, 1] (see `normalize_intensities`); integer input is
    divided by its dtype's maximum (255 for uint8, 65535 for uint16).
    """
    if isinstance(mif, np.ndarray):
        if mif.dtype == np.bool_:
            mif = mif.astype(np.float32)
        elif np.issubdtype(mif.dtype, np.integer):  # scale in numpy: torch lacks most uint ops
            mif = mif.astype(np.float64).clip(0, None) / float(np.iinfo(mif.dtype).max)
        mif = torch.from_numpy(np.ascontiguousarray(mif, dtype=np.float32))
    array = mif
    if not isinstance(array, torch.Tensor) or array.dim() != 4:
        shape = tuple(getattr(array, "shape", ()))
        raise MIFError(f"mIF stacks must be (B, K, H, W), got shape {shape}")
    if num_markers is not None and array.shape[1] != num_markers:
        raise MIFError(
            f"the mIF stacks have {array.shape[1]} channels but {num_markers} markers were "
            "named; give one name per channel, in channel order"
        )
    if array.is_floating_point():
        values = array.float()
        if not bool(torch.isfinite(values).all()):
            raise MIFError("mIF intensities contain NaN or Inf")
        low, high = float(values.min()), float(values.max())
        if low < 0.0 or high > 1.0:
            raise MIFError(
                f"float mIF intensities must lie in [0, 1], got [{low:.4g}, {high:.4g}]; scale "
                "them, e.g. with normalize_intensities(..., method='percentile')"
            )
        return values.contiguous()
    if array.dtype == torch.bool:
        return array.float()
    maximum = float(torch.iinfo(array.dtype).max)
    return array.double().clamp_min(0.0).div(maximum).float().contiguous()


def normalize_intensities(
    stacks: np.ndarray,
    method: IntensityNormalization | str = IntensityNormalization.DTYPE,
    percentile: float = 99.9,
) -> tuple[np.ndarray, list[float]]:
    """Raw mIF stacks (N, K, H, W) -> (float32 intensities in [0, 1], per-marker scales).

    method "dtype": integers are divided by their dtype's maximum, floats are kept (they must
    already lie in [0, 1]); "percentile": each marker is divided by its `percentile`-th
    percentile over the whole set and clipped to [0, 1] (the usual choice for raw uint16
    fluorescence, whose signal fills a small part of the range). intensity = raw / scale.
    """
    try:
        method = parse_enum(IntensityNormalization, method)
    except ConfigError as error:
        raise MIFError(str(error)) from None
    raw = np.asarray(stacks)
    if raw.ndim != 4:
        raise MIFError(f"mIF stacks must be (N, K, H, W), got shape {raw.shape}")
    if method is IntensityNormalization.DTYPE:
        unit = mif_to_unit(raw).numpy()
        if np.issubdtype(raw.dtype, np.integer):
            scale = float(np.iinfo(raw.dtype).max)
        else:
            scale = 1.0
        return unit, [scale] * raw.shape[1]
    # IntensityNormalization.PERCENTILE
    if not 0.0 < percentile <= 100.0:
        raise MIFError(f"percentile must be in (0, 100], got {percentile}")
    values = raw.astype(np.float32)
    if not np.isfinite(values).all():
        raise MIFError("mIF intensities contain NaN or Inf")
    scales = []
    for k in range(values.shape[1]):
        scale = float(np.percentile(values[:, k], percentile))
        if scale <= 0.0:
            scale = float(values[:, k].max()) or 1.0  # an all-dark marker stays 0
        scales.append(scale)
    factors = np.asarray(scales, dtype=np.float32)[None, :, None, None]
    return np.clip(values / factors, 0.0, 1.0), scales


def apply_intensity_scales(stacks: np.ndarray, scales: Sequence[float]) -> np.ndarray:
    """Raw stacks (N, K, H, W) -> float32 intensities raw / scale_k, clipped to [0, 1] (the
    scaling `normalize_intensities` chose for the training set, applied to new data)."""
    raw = np.asarray(stacks, dtype=np.float32)
    if raw.ndim != 4 or raw.shape[1] != len(scales):
        raise MIFError(f"{len(scales)} intensity scales for stacks of shape {raw.shape}")
    factors = np.asarray(scales, dtype=np.float32)[None, :, None, None]
    if not (factors > 0).all():
        raise MIFError(f"intensity scales must be positive, got {list(scales)}")
    return np.clip(raw / factors, 0.0, 1.0)


# --------------------------------------------------------------------------------------
# Marker groups <-> latents
# --------------------------------------------------------------------------------------


def group_markers(maps: torch.Tensor) -> torch.Tensor:
    """Intensities (B, K, H, W) in [0, 1] -> pixels (B, G, 3, H, W) in [-1, 1].

    Markers fill the groups in order; the last group's missing channels are zero intensity
    (pixel -1).
    """
    batch, markers, height, width = maps.shape
    groups = num_groups(markers)
    padded = maps.new_zeros(batch, groups * GROUP_SIZE, height, width)
    padded[:, :markers] = maps
    return padded.mul(2.0).sub(1.0).view(batch, groups, GROUP_SIZE, height, width)


def ungroup_markers(pixels: torch.Tensor, num_markers: int) -> torch.Tensor:
    """Inverse of `group_markers`: pixels (B, G, 3, H, W) -> intensities (B, K, H, W) in [0, 1]."""
    batch, groups, channels, height, width = pixels.shape
    if channels != GROUP_SIZE or groups != num_groups(num_markers):
        raise MIFError(f"{groups} groups of {channels} channels do not hold {num_markers} markers")
    flat = pixels.reshape(batch, groups * GROUP_SIZE, height, width)[:, :num_markers]
    return flat.add(1.0).mul(0.5).clamp(0.0, 1.0)


class MarkerCodec:
    """K marker maps <-> the concatenated latents of their 3-channel groups, plus the H&E latent.

    `encode(maps (B, K, H, W) in [0, 1]) -> (B, G*C, h, w)`;
    `decode(latents (B, G*C, h, w)) -> (B, K, H, W) in [0, 1]`;
    `encode_he(pixels (B, 3, H, W) in [-1, 1]) -> (B, C, h, w)`, with C the codec's latent
    channels and h = H / downsample.
    """

    def __init__(self, codec: LatentCodec, marker_names: Sequence[str]) -> None:
        self.codec = codec
        self.marker_names = check_marker_names(marker_names)
        self.num_markers = len(self.marker_names)
        self.num_groups = num_groups(self.num_markers)

    @property
    def group_channels(self) -> int:
        return self.codec.latent_channels

    @property
    def target_channels(self) -> int:
        """Channels of the diffusion target: G * C."""
        return self.num_groups * self.codec.latent_channels

    @property
    def downsample(self) -> int:
        return self.codec.downsample

    @torch.no_grad()
    def encode(self, maps: torch.Tensor) -> torch.Tensor:
        if maps.dim() != 4 or maps.shape[1] != self.num_markers:
            raise MIFError(
                f"marker maps must be (B, {self.num_markers}, H, W) for markers "
                f"{self.marker_names}, got shape {tuple(maps.shape)}"
            )
        pixels = group_markers(maps.float())  # (B, G, 3, H, W)
        latents = [self.codec.encode(pixels[:, g].contiguous()) for g in range(self.num_groups)]
        return torch.cat(latents, dim=1)  # (B, G*C, h, w)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.dim() != 4 or latents.shape[1] != self.target_channels:
            raise MIFError(
                f"marker latents must be (B, {self.target_channels}, h, w) ({self.num_groups} "
                f"groups x {self.group_channels} channels), got shape {tuple(latents.shape)}"
            )
        groups = latents.float().split(self.group_channels, dim=1)
        pixels = torch.stack([self.codec.decode(g.contiguous()) for g in groups], dim=1)
        return ungroup_markers(pixels, self.num_markers)  # (B, K, H, W)

    @torch.no_grad()
    def encode_he(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.codec.encode(pixels)  # (B, C, h, w)


# --------------------------------------------------------------------------------------
# Training: the H&E latent rides in the batch and is concatenated to x_t
# --------------------------------------------------------------------------------------


@dataclass
class MIFTrainingData:
    """Everything the batch function draws from, precomputed once."""

    target: torch.Tensor  # (N, G*C, h, w) marker-group latents
    context: torch.Tensor  # (N, C, h, w) H&E latents
    tokens: torch.Tensor | None  # (N, 1 + gh*gw, D) float16 H&E patch embeddings, or None
    token_grid: tuple[int, int] | None  # (gh, gw) of the tokens' patch grid

    def __len__(self) -> int:
        return self.target.shape[0]


class MIFBatches:
    """`batch_fn(step, generator)`: random pairs, one random dihedral transform per pair.

    The transform is applied to the target latents, the H&E latent and the tokens' patch grid
    alike (the global token is left as is). Exact in pixel space; for a VAE a close
    approximation (its latents are nearly equivariant to flips and quarter turns).
    """

    def __init__(self, data: MIFTrainingData, batch_size: int, augment: bool = True) -> None:
        if len(data) == 0:
            raise MIFError("no training pairs")
        self.data, self.batch_size, self.augment = data, batch_size, augment
        grid = data.token_grid
        if (
            augment
            and data.tokens is not None
            and (grid is None or data.tokens.shape[1] != 1 + grid[0] * grid[1])
        ):
            # Without a known [global, grid] layout the tokens cannot follow a flip or turn.
            logger.warning(
                "the image tokens (%d per tile) are not [global, %s grid]; augmentation is off",
                data.tokens.shape[1],
                grid,
            )
            self.augment = False
        self.rotate_tokens = grid is not None and grid[0] == grid[1]
        square = data.target.shape[-1] == data.target.shape[-2]
        self.turns_allowed = 4 if (square and (data.tokens is None or self.rotate_tokens)) else 1

    def __call__(self, step: int, generator: torch.Generator) -> TrainBatch:
        data, size = self.data, self.batch_size
        rows = torch.randint(len(data), (size,), generator=generator)
        target, context = data.target[rows], data.context[rows]
        tokens = data.tokens[rows].float() if data.tokens is not None else None
        if self.augment:
            draw = draw_dihedral(size, generator, self.turns_allowed)
            target, context = apply_dihedral(target, draw), apply_dihedral(context, draw)
            if tokens is not None and data.token_grid is not None:
                gh, gw = data.token_grid
                grid = tokens[:, 1:].reshape(size, gh, gw, -1)  # (B, gh, gw, D)
                grid = apply_dihedral(grid, draw, dims=(1, 2)).reshape(size, gh * gw, -1)
                tokens = torch.cat([tokens[:, :1], grid], dim=1)
        cond = (
            Conditions.build(image=ConditionStream.from_tokens(tokens))
            if tokens is not None
            else None
        )
        return TrainBatch(x0=target.contiguous(), cond=cond, x_context=context.contiguous())


def _resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _build_encoder(name: str | None, weights: str | Path | None, device: str | torch.device):
    if name is None or str(name).lower() == NO_ENCODER:
        return None
    from mupad.conditioning.image import get_image_encoder

    return get_image_encoder(name, weights, device=device)


@torch.no_grad()
def _he_tokens(encoder: Any, pixels: torch.Tensor) -> torch.Tensor:
    """H&E pixels (B, 3, H, W) in [-1, 1] -> the encoder's tokens (B, 1 + h*w, D), float32 CPU."""
    tokens, _ = encoder.encode(pixels)
    return tokens.float().cpu()


@torch.no_grad()
def prepare_training_data(
    he_pixels: torch.Tensor,
    maps: torch.Tensor,
    marker_codec: MarkerCodec,
    encoder: Any = None,
    *,
    chunk: int = 32,
    progress: bool = False,
) -> MIFTrainingData:
    """Encode all pairs once: target latents, H&E latents and (with an encoder) H&E tokens."""
    targets, contexts, tokens = [], [], []
    for start in tqdm(
        range(0, len(he_pixels), chunk), desc="encode pairs", disable=not progress, leave=False
    ):
        he = he_pixels[start : start + chunk]
        targets.append(marker_codec.encode(maps[start : start + chunk]).cpu())
        contexts.append(marker_codec.encode_he(he).cpu())
        if encoder is not None:
            tokens.append(_he_tokens(encoder, he).to(torch.float16))  # halves the memory
    grid_size = getattr(encoder, "grid_size", None)
    grid = tuple(int(v) for v in grid_size) if grid_size is not None else None
    return MIFTrainingData(
        target=torch.cat(targets),
        context=torch.cat(contexts),
        tokens=torch.cat(tokens) if tokens else None,
        token_grid=grid,  # type: ignore[arg-type]
    )


def auto_patch_size(latent_side: int, patch_size: int) -> int:
    """Double `patch_size` while the token grid is wider than 32 and the side stays divisible."""
    while latent_side // patch_size > _MAX_TOKEN_GRID and latent_side % (2 * patch_size) == 0:
        patch_size *= 2
    return patch_size


def mif_model_config(
    marker_codec: MarkerCodec,
    latent_side: int,
    image_dim: int,
    preset: str = "S/2",
    patch_size: int = 0,
) -> ModelConfig:
    """The SiT for a marker codec: in = (G + 1) * C, out = G * C, an image stream of
    `image_dim` (0: none). patch_size 0: the preset's, doubled while the grid exceeds 32."""
    base = model_preset(preset)
    patch = patch_size or auto_patch_size(latent_side, base.patch_size)
    if latent_side % patch:
        raise ConfigError(
            f"the latent side {latent_side} is not a multiple of the patch size {patch}; choose "
            "another patch size or tile size"
        )
    return dataclasses.replace(
        base,
        in_channels=marker_codec.target_channels + marker_codec.group_channels,
        out_channels=marker_codec.target_channels,
        patch_size=patch,
        image_dim=image_dim,
        cross_attention=CrossAttentionKind.DECOUPLED if image_dim else CrossAttentionKind.NONE,
        sample_size=latent_side,
        cls_dim=0,
    )


def _codec_spec(latents: str | Path | LatentCodec) -> str:
    """The string that reloads a codec with load_codec."""
    if isinstance(latents, IdentityCodec):
        return "identity"
    if isinstance(latents, LatentCodec):
        folder = latents.describe().get("folder")
        if folder is None:
            raise MIFError(
                f"cannot record how to reload the codec {latents!r}; pass 'identity' or a VAE "
                "folder instead of a codec object"
            )
        return str(folder)
    return str(latents)


def _check_pairs(he_pixels: torch.Tensor, maps: torch.Tensor, step: int) -> int:
    """Paired, square, equal-sized, divisible by `step`; returns the side S."""
    if he_pixels.shape[0] != maps.shape[0]:
        raise MIFError(f"{he_pixels.shape[0]} H&E tiles but {maps.shape[0]} mIF stacks")
    he_size, mif_size = tuple(he_pixels.shape[-2:]), tuple(maps.shape[-2:])
    if he_size != mif_size:
        raise MIFError(
            f"H&E tiles are {he_size[0]}x{he_size[1]} px but the mIF stacks are "
            f"{mif_size[0]}x{mif_size[1]}; pairs must be co-registered tiles of the same size"
        )
    side = he_size[0]
    if he_size[0] != he_size[1]:
        raise MIFError(f"tiles must be square, got {he_size[0]}x{he_size[1]}")
    if side % step:
        raise MIFError(
            f"the tile side {side} px must be a multiple of {step} px (codec downsample x "
            "patch size); crop the tiles"
        )
    return side


def train_mif(
    he_images: np.ndarray | torch.Tensor,
    mif_stacks: np.ndarray | torch.Tensor,
    marker_names: Sequence[str],
    out: str | Path,
    *,
    train_config: TrainConfig | None = None,
    latents: str | Path | LatentCodec = "identity",
    image_encoder: str | None = "inception",
    encoder_weights: str | Path | None = None,
    preset: str = "S/2",
    patch_size: int = 0,
    model_config: ModelConfig | None = None,
    augment: bool = True,
    mpp: float | None = None,
    intensity_scales: Sequence[float] | None = None,
    metadata: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> TrainResult:
    """Train an H&E -> mIF SiT on paired tiles; re-running with the same `out` resumes.

    he_images: uint8 (N, S, S, 3) (or (N, 3, S, S)) RGB H&E tiles; mif_stacks: (N, K, S, S)
    intensities (float in [0, 1], or integers divided by their dtype max); marker_names: K
    names in channel order. `latents` is "identity" (pixel space) or a VAE folder;
    `image_encoder` names the encoder whose tokens enter the image stream ("none": no
    stream). `model_config` overrides preset/patch_size (its channels and image_dim must
    match). `intensity_scales` (one per marker) records how raw intensities were scaled.
    Returns the Trainer's TrainResult; the run folder holds checkpoints whose metadata say
    everything `translate_mif` needs.
    """
    names = check_marker_names(marker_names)
    train_config = train_config or TrainConfig()
    if train_config.alignment.uses_teacher:
        raise ConfigError("the mIF translator is trained with the plain velocity objective (sit)")
    device = _resolve_device(device)
    he_pixels = he_to_pixels(he_images)
    maps = mif_to_unit(mif_stacks, len(names))
    codec = load_codec(latents, device=device)
    marker_codec = MarkerCodec(codec, names)
    encoder = _build_encoder(image_encoder, encoder_weights, device)
    image_dim = int(encoder.dim) if encoder is not None else 0
    side = _check_pairs(he_pixels, maps, codec.downsample)
    latent_side = side // codec.downsample
    if model_config is None:
        model_config = mif_model_config(marker_codec, latent_side, image_dim, preset, patch_size)
    expected = (
        marker_codec.target_channels + marker_codec.group_channels,
        marker_codec.target_channels,
        image_dim,
    )
    found = (model_config.in_channels, model_config.out_channels, model_config.image_dim)
    if found != expected:
        raise ConfigError(
            f"model_config has (in_channels, out_channels, image_dim) = {found} but "
            f"{len(names)} markers with this codec and encoder need {expected}"
        )
    _check_pairs(he_pixels, maps, codec.downsample * model_config.patch_size)
    if intensity_scales is not None and len(intensity_scales) != len(names):
        raise MIFError(f"{len(intensity_scales)} intensity scales for {len(names)} markers")

    data = prepare_training_data(he_pixels, maps, marker_codec, encoder, progress=progress)
    torch.manual_seed(train_config.seed)
    model = SiT(model_config)
    run_metadata = {
        "task": TASK,
        "markers": names,
        "group_size": GROUP_SIZE,
        "latents": _codec_spec(latents),
        "codec": codec.describe(),
        "image_encoder": str(image_encoder) if encoder is not None else NO_ENCODER,
        "token_grid": list(data.token_grid) if data.token_grid else None,
        "tile_size": side,
        "mpp": mpp,
        "intensity_scales": list(intensity_scales) if intensity_scales is not None else None,
        "records_per_epoch": len(data),
        "augment": augment,
        **(metadata or {}),
    }
    batches = MIFBatches(data, train_config.batch_size, augment)
    trainer = Trainer(
        model, train_config, out, batches, device=device, metadata=run_metadata, progress=progress
    )
    return trainer.train()


# --------------------------------------------------------------------------------------
# Sampling and the translator
# --------------------------------------------------------------------------------------


def concat_velocity(model: SiT, context: torch.Tensor) -> VelocityFn:
    """v(x, t, cond) = model(concat([x, context]), t, cond).velocity.

    A guided call stacks copies of the batch (cond, uncond, ...); the context is repeated
    to match, in the same order.
    """
    rows = context.shape[0]

    def velocity(x: torch.Tensor, t: torch.Tensor, cond: Conditions | None) -> torch.Tensor:
        if x.shape[0] % rows:
            raise MIFError(f"a batch of {x.shape[0]} rows is not a multiple of {rows} contexts")
        copies = x.shape[0] // rows
        extra = context if copies == 1 else context.repeat(copies, 1, 1, 1)
        return model(torch.cat([x, extra.to(x.dtype)], dim=1), t, cond).velocity

    return velocity


def load_mif_model(
    checkpoint: str | Path, device: str | torch.device = "cpu"
) -> tuple[SiT, dict[str, Any]]:
    """A run folder, a checkpoint folder or its ema/ -> (SiT in eval mode, run metadata)."""
    from mupad.applications.train_tiles import _resolve_checkpoint

    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise MIFError(f"no checkpoint at {checkpoint}")
    model_dir, metadata = _resolve_checkpoint(checkpoint)
    if metadata.get("task") != TASK:
        raise MIFError(
            f"{checkpoint} is not an H&E -> mIF run (its task is {metadata.get('task')!r}); "
            "train one with `mupad mif train` or train_mif"
        )
    model = SiT.from_pretrained(model_dir).to(device).eval()
    return model, {**metadata, "model_dir": str(model_dir)}


class MIFTranslator:
    """uint8 H&E tiles (B, S, S, 3) -> float32 marker intensities (B, S, S, K) in [0, 1].

    The whole-slide `TileTranslator`: `tile_size` (the training tiles' side, px),
    `output_channels` (K), `channel_names` (the markers), `mpp` (µm/px of the training tiles,
    None when unknown), `batch_size`. Numpy in -> numpy out; torch in -> torch out. Noise is
    seeded with `sample_config.seed` for every chunk of `batch_size` tiles, so the same tiles
    in the same positions give the same maps.
    """

    def __init__(
        self,
        model: SiT,
        marker_codec: MarkerCodec,
        *,
        encoder: Any = None,
        sample_config: SampleConfig | None = None,
        tile_size: int | None = None,
        mpp: float | None = None,
        batch_size: int = 8,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        config = model.config
        if config.in_channels != marker_codec.target_channels + marker_codec.group_channels or (
            config.out_channels != marker_codec.target_channels
        ):
            raise MIFError(
                f"the model maps {config.in_channels} -> {config.out_channels} channels but "
                f"{marker_codec.num_markers} markers with this codec need "
                f"{marker_codec.target_channels + marker_codec.group_channels} -> "
                f"{marker_codec.target_channels}"
            )
        encoder_dim = int(encoder.dim) if encoder is not None else 0
        if encoder_dim != config.image_dim:
            raise MIFError(
                f"the model's image stream takes {config.image_dim}-wide tokens but the encoder "
                f"gives {encoder_dim}; use the encoder the model was trained with"
            )
        if batch_size < 1:
            raise MIFError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.eval()
        self.marker_codec = marker_codec
        self.encoder = encoder
        self.sample_config = sample_config or SampleConfig()
        self.tile_size = int(tile_size or config.sample_size * marker_codec.downsample)
        self.mpp = mpp
        self.batch_size = batch_size
        self.metadata = metadata or {}
        self.name = TASK

    @property
    def channel_names(self) -> list[str]:
        return list(self.marker_codec.marker_names)

    @property
    def output_channels(self) -> int:
        return self.marker_codec.num_markers

    @property
    def step_px(self) -> int:
        """Tile sides must be multiples of this (codec downsample x patch size)."""
        return self.marker_codec.downsample * self.model.config.patch_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @classmethod
    def from_pretrained(
        cls,
        checkpoint: str | Path,
        *,
        sample_config: SampleConfig | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 8,
        mpp: float | None = None,
        encoder_weights: str | Path | None = None,
    ) -> MIFTranslator:
        """A run / checkpoint folder written by `train_mif` -> a translator on `device`."""
        device = _resolve_device(device)
        model, metadata = load_mif_model(checkpoint, device)
        marker_codec = MarkerCodec(
            load_codec(metadata.get("latents", "identity"), device=device), metadata["markers"]
        )
        encoder = _build_encoder(metadata.get("image_encoder"), encoder_weights, device)
        return cls(
            model,
            marker_codec,
            encoder=encoder,
            sample_config=sample_config,
            tile_size=metadata.get("tile_size"),
            mpp=mpp if mpp is not None else metadata.get("mpp"),
            batch_size=batch_size,
            metadata=metadata,
        )

    def _pixels(self, tiles: np.ndarray | torch.Tensor) -> torch.Tensor:
        pixels = he_to_pixels(tiles)
        height, width = pixels.shape[-2:]
        step = self.step_px
        if height % step or width % step:
            raise MIFError(
                f"H&E tiles must have sides that are multiples of {step} px (native "
                f"{self.tile_size}), got {height}x{width}; crop or pad them"
            )
        return pixels

    @torch.no_grad()
    def translate_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """H&E pixels (B, 3, H, W) in [-1, 1] -> intensities (B, K, H, W) float32 CPU."""
        outputs = []
        device = self.device
        for start in range(0, len(pixels), self.batch_size):
            chunk = pixels[start : start + self.batch_size].to(device)
            context = self.marker_codec.encode_he(chunk).to(device)  # (b, C, h, w)
            cond = None
            if self.encoder is not None:
                tokens = _he_tokens(self.encoder, chunk).to(device)
                cond = Conditions.build(image=ConditionStream.from_tokens(tokens))
            generator = torch.Generator().manual_seed(self.sample_config.seed)
            shape = (len(chunk), self.marker_codec.target_channels, *context.shape[-2:])
            noise = torch.randn(shape, generator=generator).to(device)
            latents = sample(
                concat_velocity(self.model, context), noise, cond, self.sample_config, generator
            )
            outputs.append(self.marker_codec.decode(latents.float()).cpu())
        return torch.cat(outputs)

    def translate(self, tiles: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 H&E tiles (B, H, W, 3) -> intensities (B, K, H, W) float32 in [0, 1] (torch)."""
        return self.translate_pixels(self._pixels(tiles))

    def __call__(self, tiles: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        maps = self.translate(tiles).permute(0, 2, 3, 1).contiguous()  # (B, S, S, K)
        return maps.numpy() if isinstance(tiles, np.ndarray) else maps


def translate_mif(
    checkpoint: str | Path,
    he_tiles: np.ndarray | torch.Tensor,
    *,
    sample_config: SampleConfig | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    encoder_weights: str | Path | None = None,
) -> torch.Tensor:
    """uint8 H&E tiles (B, H, W, 3) -> predicted intensities (B, K, H, W) float32 in [0, 1]."""
    translator = MIFTranslator.from_pretrained(
        checkpoint,
        sample_config=sample_config,
        device=device,
        batch_size=batch_size,
        encoder_weights=encoder_weights,
    )
    return translator.translate(he_tiles)


_WSI_OPTION_KEYS = ("sampler", "steps", "seed", "guidance_start", "guidance_end", "encoder_weights")


def sample_config_from_options(extra: dict[str, str]) -> SampleConfig:
    """SampleConfig from string options (sampler, steps, seed, guidance_start/_end)."""
    defaults = SampleConfig()
    try:
        return SampleConfig(
            sampler=extra.get("sampler", defaults.sampler),
            num_steps=int(extra.get("steps", defaults.num_steps)),
            seed=int(extra.get("seed", defaults.seed)),
            guidance=dataclasses.replace(
                defaults.guidance,
                start=float(extra.get("guidance_start", defaults.guidance.start)),
                end=float(extra.get("guidance_end", defaults.guidance.end)),
            ),
        )
    except ValueError as error:
        raise MIFError(f"bad he2mif sampling option: {error}") from None


def wsi_translator(checkpoint: Path | None, options: Any) -> MIFTranslator:
    """Factory of the whole-slide engine's "he2mif" translator.

    `checkpoint`: a `train_mif` run; `options.extra` may give sampler, steps, seed,
    guidance_start, guidance_end, encoder_weights; `options.tile_size` (a multiple of the
    model's step), `options.mpp` (overrides the run's), `options.batch_size`, device "auto".
    """
    from mupad.applications.wsi import WsiTranslationError
    from mupad.conditioning.base import EncoderError
    from mupad.latents import LatentsError
    from mupad.models.errors import CheckpointError

    try:
        return _wsi_translator(checkpoint, options)
    except (MIFError, ConfigError, EncoderError, LatentsError, CheckpointError) as error:
        # The whole-slide CLI reports WsiTranslationError as a clean error message.
        raise WsiTranslationError(f"he2mif: {error}") from error


def _wsi_translator(checkpoint: Path | None, options: Any) -> MIFTranslator:
    from mupad.applications.wsi import translator_extras

    extra = translator_extras(options, "he2mif", _WSI_OPTION_KEYS, MIFError)
    if checkpoint is None:
        raise MIFError("he2mif needs a checkpoint: the run folder written by `mupad mif train`")
    translator = MIFTranslator.from_pretrained(
        checkpoint,
        sample_config=sample_config_from_options(extra),
        device=getattr(options, "device", "cpu") or "cpu",
        batch_size=getattr(options, "batch_size", None) or 8,
        mpp=getattr(options, "mpp", None),
        encoder_weights=extra.get("encoder_weights"),
    )
    tile_size = getattr(options, "tile_size", None)
    if tile_size:
        if tile_size % translator.step_px:
            raise MIFError(f"tile_size {tile_size} is not a multiple of {translator.step_px} px")
        translator.tile_size = int(tile_size)
    return translator


# --------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------


def _correlations(predicted: Any, target: Any, marker_names: Sequence[str] | None = None):
    """`mupad.evaluation.pcc.patch_correlations`, its errors as MIFError."""
    from mupad.evaluation.pcc import PCCError, patch_correlations

    try:
        return patch_correlations(predicted, target, marker_names)
    except PCCError as error:
        raise MIFError(str(error)) from None


def patch_pcc(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pearson correlation per patch and marker: (B, K, H, W) x 2 -> (B, K), float64.

    NaN where either map is constant (its correlation is undefined); computed by
    `mupad.evaluation.pcc.patch_correlations`.
    """
    correlations = _correlations(predicted, target)
    values = np.where(correlations.defined, correlations.values, math.nan)
    return torch.from_numpy(values)


def mean_patch_pcc(
    predicted: torch.Tensor, target: torch.Tensor, marker_names: Sequence[str]
) -> dict[str, Any]:
    """Per-marker mean patch PCC (patches with a constant map skipped) and its marker mean.

    {"per_marker": {name: pcc}, "mean": mean over markers, "num_patches": B,
     "num_undefined": {name: patches skipped}}; NaN for a marker constant in every patch.
    Bootstrap intervals and the slide level: `mupad.evaluation.pcc.marker_correlation`.
    """
    names = check_marker_names(marker_names)
    correlations = _correlations(predicted, target, names)
    per_marker = {
        name: math.nan if value is None else value
        for name, value in correlations.marker_means().items()
    }
    finite = [v for v in per_marker.values() if not math.isnan(v)]
    return {
        "per_marker": per_marker,
        "mean": float(np.mean(finite)) if finite else math.nan,
        "num_patches": int(correlations.values.shape[0]),
        "num_undefined": correlations.num_undefined(),
    }


def evaluate_mif(
    translator: MIFTranslator, he_tiles: np.ndarray | torch.Tensor, mif_stacks: Any
) -> dict[str, Any]:
    """Translate H&E tiles and score them against the true stacks (`mean_patch_pcc`)."""
    truth = mif_to_unit(mif_stacks, translator.output_channels)
    predicted = translator.translate(he_tiles)
    if predicted.shape != truth.shape:
        raise MIFError(
            f"the true stacks are {tuple(truth.shape)} but the predictions {tuple(predicted.shape)}"
        )
    return mean_patch_pcc(predicted, truth, translator.channel_names)


# --------------------------------------------------------------------------------------
# Files: the data layout, TIFF outputs
# --------------------------------------------------------------------------------------


@dataclass
class MIFFolder:
    he: np.ndarray  # uint8 (N, S, S, 3)
    mif: np.ndarray  # raw (N, K, S, S), the TIFFs' dtype
    ids: list[str]


def read_rgb(path: str | Path) -> np.ndarray:
    """An image file -> uint8 (H, W, 3) RGB (alpha dropped, grey expanded)."""
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def read_mif_stack(path: str | Path, num_markers: int) -> np.ndarray:
    """A K-channel TIFF, (K, H, W) or (H, W, K) (or (H, W) for K = 1) -> (K, H, W)."""
    import tifffile

    array = np.asarray(tifffile.imread(str(path)))
    array = np.squeeze(array)
    if array.ndim == 2 and num_markers == 1:
        return array[None]
    if array.ndim == 3:
        if array.shape[0] == num_markers:
            return array
        if array.shape[-1] == num_markers:
            return np.moveaxis(array, -1, 0)
    raise MIFError(
        f"{path}: a {num_markers}-marker stack must be (K, H, W) or (H, W, K) with K = "
        f"{num_markers}, got shape {array.shape}; give one --markers name per channel"
    )


def load_mif_folder(root: str | Path, marker_names: Sequence[str]) -> MIFFolder:
    """Paired tiles from `root/he/<id>.<png|jpg|tif>` and `root/mif/<id>.tif` (see module doc)."""
    names = check_marker_names(marker_names)
    root = Path(root)
    he_dir, mif_dir = root / "he", root / "mif"
    if not he_dir.is_dir() or not mif_dir.is_dir():
        raise MIFError(
            f"{root} must hold he/<id>.png (RGB H&E tiles) and mif/<id>.tif ({len(names)}-channel "
            "stacks) side by side"
        )
    he_files = {p.stem: p for p in sorted(he_dir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    mif_files = {p.stem: p for p in sorted(mif_dir.iterdir()) if p.suffix.lower() in MIF_SUFFIXES}
    ids = sorted(set(he_files) & set(mif_files))
    if not ids:
        raise MIFError(f"no <id> has both he/<id>.png and mif/<id>.tif under {root}")
    unpaired = sorted(set(he_files) ^ set(mif_files))
    if unpaired:
        logger.warning("%d unpaired file(s) ignored, e.g. %s", len(unpaired), unpaired[:3])
    he, mif = [], []
    for tile_id in ids:
        image = read_rgb(he_files[tile_id])
        stack = read_mif_stack(mif_files[tile_id], len(names))
        if stack.shape[1:] != image.shape[:2]:
            raise MIFError(
                f"{tile_id}: the H&E tile is {image.shape[0]}x{image.shape[1]} px but its mIF "
                f"stack is {stack.shape[1]}x{stack.shape[2]}; pairs must be co-registered tiles "
                "of the same size"
            )
        he.append(image)
        mif.append(stack)
    shapes = sorted({im.shape for im in he})
    if len(shapes) > 1:
        raise MIFError(f"tiles under {root} differ in size {shapes}; cut them to one size")
    dtypes = sorted({str(s.dtype) for s in mif})
    if len(dtypes) > 1:
        raise MIFError(f"mIF stacks under {root} mix dtypes {dtypes}")
    return MIFFolder(he=np.stack(he), mif=np.stack(mif), ids=ids)


def write_mif_tiff(path: str | Path, maps: np.ndarray, marker_names: Sequence[str]) -> Path:
    """Intensities (K, H, W) float32 -> an OME-TIFF whose channels carry the marker names."""
    import tifffile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tifffile.imwrite(
        str(tmp),
        np.ascontiguousarray(maps, dtype=np.float32),
        ome=True,
        photometric="minisblack",
        metadata={"axes": "CYX", "Channel": {"Name": list(marker_names)}},
    )
    tmp.replace(path)
    return path


@dataclass
class MIFApplyResult:
    out: Path
    outputs: list[Path]


def apply_mif(
    translator: MIFTranslator,
    he: str | Path,
    out: str | Path,
    *,
    provenance: dict[str, Any] | None = None,
    progress: bool = True,
) -> MIFApplyResult:
    """Translate an H&E image or a folder of them (non-recursive) into `out`:
    `<stem>.tif` (K-channel float32 OME-TIFF, channels named by marker) + `<stem>.json`
    (source, markers, intensity scales, checkpoint, sample config) per input, and
    `summary.json`. Image sides must be multiples of `translator.step_px`; larger slides
    go through `mupad wsi translate --translator he2mif`."""
    from mupad.applications.provenance import file_sha256

    he, out = Path(he), Path(out)
    if he.is_dir():
        files = sorted(p for p in he.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise MIFError(f"no H&E images ({', '.join(IMAGE_SUFFIXES)}) in {he}")
    elif he.is_file():
        files = [he]
    else:
        raise MIFError(f"{he} is neither an H&E image nor a folder of them")
    stems = [p.stem for p in files]
    if len(set(stems)) != len(stems):
        raise MIFError(f"{he} holds images that share a name stem; outputs would collide")
    out.mkdir(parents=True, exist_ok=True)
    common = {
        "markers": translator.channel_names,
        "intensity_range": [0.0, 1.0],
        "intensity_scales": translator.metadata.get("intensity_scales"),
        "checkpoint": translator.metadata.get("model_dir"),
        "latents": translator.metadata.get("latents"),
        "image_encoder": translator.metadata.get("image_encoder"),
        "mpp": translator.mpp,
        "sample_config": to_dict(translator.sample_config),
        **(provenance or {}),
    }
    written: list[Path] = []
    bar = tqdm(total=len(files), desc=TASK, unit="image", disable=not progress)
    index = 0
    while index < len(files):  # batches of consecutive equal-sized images
        first = read_rgb(files[index])
        images, batch_files = [first], [files[index]]
        index += 1
        while index < len(files) and len(images) < translator.batch_size:
            image = read_rgb(files[index])
            if image.shape != first.shape:
                break
            images.append(image)
            batch_files.append(files[index])
            index += 1
        maps = translator.translate(np.stack(images)).numpy()  # (b, K, H, W)
        for source, values in zip(batch_files, maps, strict=True):
            path = write_mif_tiff(out / f"{source.stem}.tif", values, translator.channel_names)
            sidecar = {
                "output": path.name,
                "source": str(source),
                "source_sha256": file_sha256(source),
                "shape_khw": list(values.shape),
                "batch_size": len(batch_files),
                **common,
            }
            atomic_write_text(path.with_suffix(".json"), json.dumps(sidecar, indent=2) + "\n")
            written.append(path)
        bar.update(len(batch_files))
    bar.close()
    summary = {"input": str(he), "num_images": len(written), "outputs": [p.name for p in written]}
    atomic_write_text(out / "summary.json", json.dumps({**summary, **common}, indent=2) + "\n")
    return MIFApplyResult(out, written)


__all__ = [
    "GROUP_SIZE",
    "IntensityNormalization",
    "MIFApplyResult",
    "MIFBatches",
    "MIFError",
    "MIFFolder",
    "MIFTrainingData",
    "MIFTranslator",
    "MarkerCodec",
    "apply_intensity_scales",
    "apply_mif",
    "check_marker_names",
    "concat_velocity",
    "evaluate_mif",
    "group_markers",
    "he_to_pixels",
    "load_mif_folder",
    "load_mif_model",
    "mean_patch_pcc",
    "mif_model_config",
    "mif_to_unit",
    "normalize_intensities",
    "num_groups",
    "patch_pcc",
    "prepare_training_data",
    "read_mif_stack",
    "train_mif",
    "translate_mif",
    "ungroup_markers",
    "wsi_translator",
]
