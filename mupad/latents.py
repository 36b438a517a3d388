"""The pixels <-> latents contract. Latent scale and shift are applied here, and only here.

Pixels are float tensors (B, 3, H, W) in [-1, 1]. A codec maps them to the space the
diffusion model works in and back:

    IdentityCodec        latents = pixels                       (pixel-space models, demos)
    AutoencoderKLCodec   latents = (z - shift_factor) * scaling_factor,  z = E(pixels)
                         pixels  = D(latents / scaling_factor + shift_factor)

with a diffusers `AutoencoderKL` loaded from a local folder (never from a hub). `z` is the
posterior mean, or a posterior sample when asked for one. If the VAE config carries
per-channel `latents_mean` / `latents_std` (and no `shift_factor`), those are used:
latents = (z - mean) * scaling_factor / std.
"""

from __future__ import annotations

import abc
import importlib.util
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mupad.dtypes import parse_dtype
from mupad.errors import MupadError

logger = logging.getLogger(__name__)

IDENTITY_NAMES = ("identity", "pixels", "pixel", "none")
VAE_CONFIG = "config.json"
VAE_WEIGHTS = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
)
VAE_HINT = (
    "a diffusers AutoencoderKL folder such as stabilityai/sd-vae-ft-ema: config.json + "
    "diffusion_pytorch_model.safetensors (e.g. `huggingface-cli download "
    "stabilityai/sd-vae-ft-ema --local-dir <folder>` on a machine with internet access), "
    "then pass that folder, or put it under $MUPAD_CACHE/<name>"
)
_PIXEL_TOLERANCE = 1e-3  # how far outside [-1, 1] input pixels may stray (rounding)


class LatentsError(MupadError, ValueError):
    """Pixels, latents or a VAE folder are unusable; the message says how to fix it."""


# --------------------------------------------------------------------------------------
# Pixel helpers
# --------------------------------------------------------------------------------------


def uint8_to_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (B, 3, H, W) or (B, H, W, 3) in [0, 255] -> float pixels (B, 3, H, W) in [-1, 1]."""
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise LatentsError(
            f"expected uint8 images of shape (B, 3, H, W) or (B, H, W, 3), got {images.dtype} "
            f"{tuple(images.shape)}"
        )
    if images.shape[1] != 3 and images.shape[-1] == 3:
        images = images.permute(0, 3, 1, 2)  # (B, H, W, 3) -> (B, 3, H, W)
    return images.float().div(127.5).sub(1.0).contiguous()


def pixels_to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """Float pixels (B, 3, H, W) in [-1, 1] -> uint8 (B, 3, H, W), clamped and rounded."""
    return pixels.detach().float().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)


def validate_pixels(pixels: Any, downsample: int = 1) -> None:
    """Raise LatentsError unless `pixels` is a finite float (B, 3, H, W) tensor in [-1, 1]
    with H and W divisible by `downsample`."""
    if not isinstance(pixels, torch.Tensor):
        raise LatentsError(
            f"pixels must be a torch.Tensor (B, 3, H, W), got {type(pixels).__name__}"
        )
    if pixels.dim() != 4:
        hint = " (add a batch axis with x[None])" if pixels.dim() == 3 else ""
        raise LatentsError(
            f"pixels must be 4-D (B, 3, H, W), got shape {tuple(pixels.shape)}{hint}"
        )
    if pixels.shape[1] != 3:
        hint = " (channels-last? use x.permute(0, 3, 1, 2))" if pixels.shape[-1] == 3 else ""
        raise LatentsError(
            f"pixels must have 3 channels on axis 1 (B, 3, H, W), got shape "
            f"{tuple(pixels.shape)}{hint}"
        )
    if not pixels.is_floating_point():
        raise LatentsError(
            f"pixels must be float in [-1, 1], got {pixels.dtype}; convert uint8 images with "
            "mupad.latents.uint8_to_pixels (x / 127.5 - 1)"
        )
    height, width = pixels.shape[-2:]
    if height % downsample or width % downsample:
        raise LatentsError(
            f"pixel height and width must be multiples of {downsample} for this codec, got "
            f"{height}x{width}; crop or resize to {height // downsample * downsample}x"
            f"{width // downsample * downsample}"
        )
    if pixels.numel() == 0:
        raise LatentsError(f"pixels are empty, shape {tuple(pixels.shape)}")
    if not bool(torch.isfinite(pixels).all()):
        raise LatentsError("pixels contain NaN or Inf; clean the input images")
    low, high = float(pixels.min()), float(pixels.max())
    if low < -1 - _PIXEL_TOLERANCE or high > 1 + _PIXEL_TOLERANCE:
        raise LatentsError(
            f"pixels must lie in [-1, 1], got [{low:.3g}, {high:.3g}]; map [0, 1] images with "
            "x * 2 - 1 and uint8 images with mupad.latents.uint8_to_pixels"
        )


def _validate_latents(latents: Any, channels: int) -> None:
    if not isinstance(latents, torch.Tensor):
        raise LatentsError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
    if latents.dim() != 4 or latents.shape[1] != channels:
        raise LatentsError(
            f"latents must be (B, {channels}, h, w) for this codec, got shape "
            f"{tuple(latents.shape)}; were they made by a different codec?"
        )
    if not latents.is_floating_point():
        raise LatentsError(f"latents must be floating point, got {latents.dtype}")
    if not bool(torch.isfinite(latents).all()):
        raise LatentsError("latents contain NaN or Inf (a diverged sampler or model?)")


# --------------------------------------------------------------------------------------
# Codecs
# --------------------------------------------------------------------------------------


class LatentCodec(abc.ABC):
    """Pixels (B, 3, H, W) in [-1, 1] <-> latents (B, latent_channels, H/downsample, W/downsample)."""

    name: str
    latent_channels: int
    downsample: int

    @abc.abstractmethod
    def encode(
        self,
        pixels: torch.Tensor,
        *,
        sample: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Pixels (B, 3, H, W) -> scaled latents (B, C, h, w), float32 on the pixels' device."""

    @abc.abstractmethod
    def decode(self, latents: torch.Tensor, *, clamp: bool = True) -> torch.Tensor:
        """Scaled latents (B, C, h, w) -> pixels (B, 3, H, W) in [-1, 1] (clamped unless
        clamp=False), float32 on the latents' device."""

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of the latents of an H x W image."""
        if height % self.downsample or width % self.downsample:
            raise LatentsError(
                f"image size {height}x{width} is not a multiple of the codec's downsample "
                f"factor {self.downsample}"
            )
        return (self.latent_channels, height // self.downsample, width // self.downsample)

    def describe(self) -> dict[str, Any]:
        """JSON-ready description (for checkpoint metadata)."""
        return {
            "name": self.name,
            "latent_channels": self.latent_channels,
            "downsample": self.downsample,
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, latent_channels={self.latent_channels}, "
            f"downsample={self.downsample})"
        )


class IdentityCodec(LatentCodec):
    """Pixel space: latents are the pixels themselves."""

    name = "identity"
    latent_channels = 3
    downsample = 1

    def encode(
        self,
        pixels: torch.Tensor,
        *,
        sample: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        validate_pixels(pixels, self.downsample)
        return pixels.detach().float().clone()  # (B, 3, H, W)

    def decode(self, latents: torch.Tensor, *, clamp: bool = True) -> torch.Tensor:
        _validate_latents(latents, self.latent_channels)
        pixels = latents.detach().float().clone()
        return pixels.clamp_(-1.0, 1.0) if clamp else pixels


def _vae_folder(folder: str | Path) -> Path:
    """The folder holding the AutoencoderKL config + weights (the folder or its `vae/`)."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise LatentsError(f"VAE folder {root} does not exist. Download {VAE_HINT}")
    candidates = [root, root / "vae"]
    for candidate in candidates:
        if (candidate / VAE_CONFIG).is_file() and _has_weights(candidate):
            return candidate
    # Say precisely what is missing, preferring the vae/ subfolder of a pipeline folder.
    target = (
        root / "vae" if (root / "vae").is_dir() or (root / "model_index.json").is_file() else root
    )
    missing = []
    if not (target / VAE_CONFIG).is_file():
        missing.append(VAE_CONFIG)
    if not _has_weights(target):
        bins = sorted(p.name for p in target.glob("*.bin")) if target.is_dir() else []
        note = (
            f" (found {', '.join(bins)}: pickled weights are not loaded; convert them to "
            "safetensors)"
            if bins
            else ""
        )
        missing.append(f"{VAE_WEIGHTS[0]}{note}")
    raise LatentsError(
        f"VAE folder {target} is missing {' and '.join(missing)}. Download {VAE_HINT}"
    )


def _has_weights(folder: Path) -> bool:
    return any((folder / name).is_file() for name in VAE_WEIGHTS) or bool(_variants(folder))


def _variants(folder: Path) -> list[str]:
    """Variant names of `diffusion_pytorch_model.<variant>.safetensors` files (e.g. "fp16")."""
    if not folder.is_dir():
        return []
    names = []
    for path in folder.glob("diffusion_pytorch_model.*.safetensors"):
        variant = path.name[len("diffusion_pytorch_model.") : -len(".safetensors")]
        if variant and "." not in variant:
            names.append(variant)
    return sorted(names)


def _per_channel(
    value: float | Sequence[float] | torch.Tensor, channels: int, what: str
) -> torch.Tensor:
    """A scalar or per-channel factor -> (C,) float64 tensor (exact for describe())."""
    tensor = torch.as_tensor(value, dtype=torch.float64).flatten()
    if tensor.numel() == 1:
        tensor = tensor.expand(channels).clone()
    if tensor.numel() != channels:
        raise LatentsError(
            f"{what} has {tensor.numel()} values but the VAE has {channels} latent channels"
        )
    if not bool(torch.isfinite(tensor).all()):
        raise LatentsError(f"{what} must be finite, got {tensor.tolist()}")
    return tensor


class AutoencoderKLCodec(LatentCodec):
    """A frozen diffusers AutoencoderKL from a local folder, with latent scale and shift.

    Args:
        folder: the VAE folder (config.json + diffusion_pytorch_model.safetensors), or a
            diffusers pipeline folder with a `vae/` subfolder.
        scaling_factor, shift_factor: override the VAE config's values (a float, or one
            value per latent channel). The config's `shift_factor` None means 0.
        dtype: precision the VAE runs in (fp32 default; bf16 allowed; fp16 may overflow
            for SD-style VAEs). Scale/shift arithmetic is always float32.
        device: where the VAE runs; inputs are moved there and results moved back.
        batch_size: images per VAE forward pass (encode/decode run in chunks).
    """

    def __init__(
        self,
        folder: str | Path,
        *,
        scaling_factor: float | Sequence[float] | None = None,
        shift_factor: float | Sequence[float] | None = None,
        dtype: torch.dtype | str = torch.float32,
        device: str | torch.device = "cpu",
        batch_size: int = 8,
    ) -> None:
        if batch_size < 1:
            raise LatentsError(f"batch_size must be >= 1, got {batch_size}")
        self.folder = _vae_folder(folder)
        self.dtype = parse_dtype(dtype, LatentsError, "VAE dtype")
        self.device = torch.device(device)
        self.batch_size = batch_size

        try:
            config = json.loads((self.folder / VAE_CONFIG).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise LatentsError(f"cannot read {self.folder / VAE_CONFIG}: {exc}") from exc
        class_name = config.get("_class_name", "AutoencoderKL")
        if class_name != "AutoencoderKL":
            raise LatentsError(
                f"{self.folder / VAE_CONFIG} describes a {class_name}, not an AutoencoderKL. "
                f"Point at {VAE_HINT}"
            )

        from diffusers import AutoencoderKL  # lazy: heavy import

        variant = None
        if not any((self.folder / name).is_file() for name in VAE_WEIGHTS):
            variant = _variants(self.folder)[0]
        try:
            vae = AutoencoderKL.from_pretrained(
                self.folder,
                local_files_only=True,
                use_safetensors=True,
                variant=variant,
                torch_dtype=self.dtype,
                low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None,
            )
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise LatentsError(
                f"could not load an AutoencoderKL from {self.folder}: {exc}. Check that the folder "
                f"is complete: {VAE_HINT}"
            ) from exc
        self.vae = vae.to(self.device).eval().requires_grad_(False)

        cfg = self.vae.config
        self.latent_channels = int(cfg.latent_channels)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
        self.name = f"autoencoder-kl:{self.folder.name if self.folder.name != 'vae' else self.folder.parent.name}"

        channels = self.latent_channels
        config_scale = getattr(cfg, "scaling_factor", None)
        config_shift = getattr(cfg, "shift_factor", None)
        latents_mean = getattr(cfg, "latents_mean", None)
        latents_std = getattr(cfg, "latents_std", None)
        scale = _per_channel(
            1.0 if config_scale is None else config_scale, channels, "scaling_factor"
        )
        shift = _per_channel(
            0.0 if config_shift is None else config_shift, channels, "shift_factor"
        )
        if config_shift is None and latents_mean is not None and latents_std is not None:
            shift = _per_channel(latents_mean, channels, "latents_mean")
            scale = scale / _per_channel(latents_std, channels, "latents_std")
        if scaling_factor is not None:
            scale = _per_channel(scaling_factor, channels, "scaling_factor")
        if shift_factor is not None:
            shift = _per_channel(shift_factor, channels, "shift_factor")
        if bool((scale == 0).any()):
            raise LatentsError("scaling_factor must be non-zero")
        self.scale = scale  # (C,) float64; applied in float32
        self.shift = shift  # (C,) float64
        logger.info(
            "VAE %s: %d latent channels, %dx down, scale %s, shift %s, %s on %s",
            self.folder, channels, self.downsample, self.scaling_factor, self.shift_factor,
            self.dtype, self.device,
        )  # fmt: skip

    @property
    def scaling_factor(self) -> float | tuple[float, ...]:
        return _compact(self.scale)

    @property
    def shift_factor(self) -> float | tuple[float, ...]:
        return _compact(self.shift)

    def _factors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, C, 1, 1) scale and shift on `device`."""
        scale = self.scale.to(device, torch.float32)[None, :, None, None]
        shift = self.shift.to(device, torch.float32)[None, :, None, None]
        return scale, shift

    @torch.no_grad()
    def encode(
        self,
        pixels: torch.Tensor,
        *,
        sample: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Pixels (B, 3, H, W) in [-1, 1] -> (z - shift) * scale (B, C, H/f, W/f), float32.

        z is the posterior mean, or a posterior sample (drawn with `generator`) if `sample`.
        """
        validate_pixels(pixels, self.downsample)
        scale, shift = self._factors(self.device)
        out = []
        for chunk in pixels.split(self.batch_size):
            posterior = self.vae.encode(chunk.to(self.device, self.dtype)).latent_dist
            z = posterior.sample(generator=generator) if sample else posterior.mean  # (b, C, h, w)
            out.append(((z.float() - shift) * scale).to(pixels.device))
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, *, clamp: bool = True) -> torch.Tensor:
        """Scaled latents (B, C, h, w) -> pixels (B, 3, h*f, w*f), float32, in [-1, 1] if clamp."""
        _validate_latents(latents, self.latent_channels)
        scale, shift = self._factors(self.device)
        out = []
        for chunk in latents.split(self.batch_size):
            z = chunk.to(self.device, torch.float32) / scale + shift  # (b, C, h, w)
            pixels = self.vae.decode(z.to(self.dtype)).sample.float()  # (b, 3, H, W)
            out.append((pixels.clamp(-1.0, 1.0) if clamp else pixels).to(latents.device))
        return torch.cat(out)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "folder": str(self.folder),
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
        }


def _compact(values: torch.Tensor) -> float | tuple[float, ...]:
    """A (C,) tensor as one float when all channels agree, else a tuple."""
    items = tuple(float(v) for v in values)
    return items[0] if all(v == items[0] for v in items) else items


def load_codec(spec: str | Path | LatentCodec | None = None, **kwargs: Any) -> LatentCodec:
    """None / "identity" / "pixels" -> IdentityCodec; a local folder -> AutoencoderKLCodec.

    A name that is not an existing path is looked up in the cache (`$MUPAD_CACHE/<name>`, and
    `$MUPAD_CACHE/<last part of name>` for "org/repo" names). Keyword arguments go to
    AutoencoderKLCodec (scaling_factor, shift_factor, dtype, device, batch_size).
    """
    if isinstance(spec, LatentCodec):
        return spec
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in IDENTITY_NAMES):
        return IdentityCodec()
    path = Path(spec).expanduser()
    if path.exists():
        return AutoencoderKLCodec(path, **kwargs)

    from mupad.conditioning.registry import cache_root  # the one place $MUPAD_CACHE is read

    candidates = [cache_root() / str(spec), cache_root() / path.name]
    for candidate in candidates:
        if candidate.is_dir():
            logger.info("VAE %r resolved to the cache folder %s", str(spec), candidate)
            return AutoencoderKLCodec(candidate, **kwargs)
    looked = ", ".join(dict.fromkeys(str(c) for c in [path, *candidates]))
    raise LatentsError(
        f"latent codec {str(spec)!r} is neither 'identity'/'pixels' nor an existing folder "
        f"(looked in: {looked}). Download {VAE_HINT}"
    )


@torch.no_grad()
def encode_moments(
    codec: LatentCodec, pixels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels (B, 3, H, W) in [-1, 1] -> posterior (mean, logvar), each (B, C, h, w) float32,
    in the codec's scaled latent space: mean = (mu - shift) * scale and
    logvar = log(sigma^2) + 2 log|scale|, so mean + exp(logvar / 2) * eps samples exactly
    what `codec.encode(pixels, sample=True)` samples, and mean == `codec.encode(pixels)`.

    For caching posteriors (`mupad prepare --latents`). Needs an AutoencoderKLCodec: the
    identity codec has no posterior.
    """
    if not isinstance(codec, AutoencoderKLCodec):
        raise LatentsError(
            f"{codec.name} has no latent posterior to cache; pass an AutoencoderKL folder, or "
            "store pixels (no latents) for pixel-space models"
        )
    validate_pixels(pixels, codec.downsample)
    scale, shift = codec._factors(codec.device)
    log_scale_sq = torch.log(scale.square())  # (1, C, 1, 1)
    means, logvars = [], []
    for chunk in pixels.split(codec.batch_size):
        posterior = codec.vae.encode(chunk.to(codec.device, codec.dtype)).latent_dist
        means.append(((posterior.mean.float() - shift) * scale).to(pixels.device))
        logvars.append((posterior.logvar.float() + log_scale_sq).to(pixels.device))
    return torch.cat(means), torch.cat(logvars)
