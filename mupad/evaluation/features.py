"""Feature extractors for the evaluation metrics, and a disk cache of image-set features.

    feature_extractor(name="inception", weights=None, device="cpu", batch_size=32, **options)
    extract_features(images_or_image_set, extractor) -> (N, D) float64
    cached_features(image_set_or_folder, extractor, cache_dir=None, size=None) -> (N, D) float64

Names: every image encoder of `mupad.conditioning.image` (its `global_features`, with the
preprocessing defined next to that encoder; "inception" = the 2048-d FID pool3 features, the
default) plus "colour": 15 per-image colour statistics (`pixel_stats.colour_features`), which
need no weights and, being low-dimensional, give a full-rank FID covariance from 16 images.
Extra `options` go to the encoder (e.g. `image_size` for inception, `global_pool` for ViTs)
and are part of the cache key.

Images reach an extractor as uint8 (b, 3, H, W): float inputs in [-1, 1] are quantised first,
so features of in-memory images equal those of the same images saved as 8-bit files.

Cache: `<cache_dir>/<extractor>-<key>.npy` plus a `.json` describing the key, written
atomically. The key hashes the extractor's identity (name, weights file path + size + mtime,
preprocessing, options) and the images: for a folder or file list, each file's path, size
and mtime plus the resize `size` (so the folder is not even read on a hit); for an in-memory
`ImageSet`, a SHA-256 of its pixels. A changed file or setting gives a new key; stale entries
are never read (delete the folder to reclaim space). Default folder:
`$MUPAD_CACHE/features` (`mupad.conditioning.registry.cache_root()`).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mupad.conditioning.image import get_image_encoder, image_encoder_names
from mupad.conditioning.registry import cache_root
from mupad.evaluation.images import ImageSet, as_uint8_images, image_files, load_image_set
from mupad.evaluation.pixel_stats import colour_features
from mupad.evaluation.stats import EvaluationError
from mupad.fileio import atomic_file, atomic_write_text

logger = logging.getLogger(__name__)

DEFAULT_EXTRACTOR = "inception"
COLOUR_EXTRACTOR = "colour"
COLOUR_DIM = 15
CACHE_VERSION = 1  # bump when the cached layout or the meaning of a key changes


@dataclass(frozen=True)
class FeatureExtractor:
    """A named image -> feature map with everything that determines its output.

    embed: uint8 images (b, 3, H, W) -> features (b, dim), any float dtype, any device.
    identity: JSON-serialisable description of the weights and settings (the cache key).
    """

    name: str
    dim: int
    batch_size: int
    embed: Callable[[torch.Tensor], torch.Tensor] = field(repr=False, compare=False)
    identity: Mapping[str, Any] = field(compare=False)
    description: str = ""


def feature_extractor_names() -> list[str]:
    """Every extractor name: the image encoders, then the weight-free "colour"."""
    return [*image_encoder_names(), COLOUR_EXTRACTOR]


def file_identity(path: str | Path) -> dict[str, Any]:
    """Resolved path, size and modification time (ns) of a file: cheap change detection."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return {"path": str(resolved), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


def feature_extractor(
    name: str = DEFAULT_EXTRACTOR,
    weights: str | Path | None = None,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
    **options: Any,
) -> FeatureExtractor:
    """Build the extractor `name` (see `feature_extractor_names()`).

    Raises EvaluationError for an unknown name; the encoders' own errors
    (`WeightsNotFoundError`, `MissingDependencyError`, both `EncoderError`) say what to
    download or install.
    """
    key = str(getattr(name, "value", name)).strip().lower()
    if batch_size < 1:
        raise EvaluationError(f"batch_size must be >= 1, got {batch_size}")
    if key == COLOUR_EXTRACTOR:
        if weights is not None or options:
            raise EvaluationError(
                "the colour extractor has no weights or options; drop --weights and "
                f"{', '.join(options) or 'the extra options'}"
            )
        return FeatureExtractor(
            name=COLOUR_EXTRACTOR,
            dim=COLOUR_DIM,
            batch_size=batch_size,
            embed=colour_features,
            identity={"extractor": COLOUR_EXTRACTOR, "version": 1},
            description="per-channel mean, std and 10/50/90 % quantiles of RGB (15-d)",
        )
    if key not in image_encoder_names():
        raise EvaluationError(
            f"unknown feature extractor {name!r}; choose one of: "
            f"{', '.join(feature_extractor_names())}"
        )
    encoder = get_image_encoder(key, weights, device=device, batch_size=batch_size, **options)
    path = getattr(encoder, "path", None)
    identity = {
        "extractor": key,
        "weights": file_identity(path) if path is not None else None,
        "preprocessing": _jsonable(dataclasses.asdict(encoder.preprocessing)),
        "options": _jsonable(dict(sorted(options.items()))),
        "dim": int(encoder.embedding_dim),
        "dtype": str(encoder.dtype),
    }
    return FeatureExtractor(
        name=key,
        dim=int(encoder.embedding_dim),
        batch_size=batch_size,
        embed=encoder.global_features,
        identity=identity,
        description=encoder.describe().replace("\n", "; "),
    )


def _images_of(source: ImageSet | torch.Tensor | np.ndarray) -> torch.Tensor:
    images = source.images if isinstance(source, ImageSet) else source
    images = as_uint8_images(images)  # (N, 3, H, W) uint8
    if images.shape[0] == 0:
        raise EvaluationError("no images to extract features from")
    return images


def extract_features(
    images: ImageSet | torch.Tensor | np.ndarray,
    extractor: FeatureExtractor,
    progress: bool = True,
) -> np.ndarray:
    """Images (N, 3, H, W) uint8 or float in [-1, 1], or an ImageSet -> (N, D) float64.

    Raises EvaluationError when the extractor returns the wrong shape or non-finite values
    (naming the images), so a NaN never reaches a metric.
    """
    pixels = _images_of(images)
    count = int(pixels.shape[0])
    out = np.empty((count, extractor.dim), dtype=np.float64)  # (N, D)
    with tqdm(
        total=count, unit="image", desc=f"{extractor.name} features", disable=not progress
    ) as bar:
        for start in range(0, count, extractor.batch_size):
            chunk = pixels[start : start + extractor.batch_size]  # (b, 3, H, W)
            features = extractor.embed(chunk)
            features = torch.as_tensor(features).detach().to("cpu", torch.float64)
            if tuple(features.shape) != (chunk.shape[0], extractor.dim):
                raise EvaluationError(
                    f"{extractor.name} returned features of shape {tuple(features.shape)}, "
                    f"expected ({chunk.shape[0]}, {extractor.dim})"
                )
            bad = ~torch.isfinite(features).all(dim=1)
            if bad.any():
                rows = (start + torch.nonzero(bad).flatten()).tolist()[:5]
                raise EvaluationError(
                    f"{extractor.name} returned NaN or infinite features for image(s) at "
                    f"index {rows}; check those images and the extractor's weights"
                )
            out[start : start + chunk.shape[0]] = features.numpy()
            bar.update(chunk.shape[0])
    return out


def default_cache_dir() -> Path:
    """`$MUPAD_CACHE/features` (default `~/.cache/mupad/features`)."""
    return cache_root() / "features"


def _images_key(source: ImageSet | str | Path | Iterable[str | Path], size: int | None) -> Any:
    """What identifies the images: pixel hash of an ImageSet, else file stats and resize."""
    if isinstance(source, ImageSet):
        pixels = source.images.contiguous().numpy()
        return {
            "pixels_sha256": hashlib.sha256(pixels.tobytes()).hexdigest(),
            "shape": list(pixels.shape),
        }
    files = image_files(source) if isinstance(source, (str, Path)) else [Path(p) for p in source]
    if not files:
        raise EvaluationError(f"no image files in {source}")
    try:
        return {"files": [file_identity(p) for p in files], "size": size}
    except OSError as error:
        raise EvaluationError(f"cannot read image file: {error}") from None


def cache_key(extractor: FeatureExtractor, images_key: Any) -> tuple[str, dict[str, Any]]:
    """(hex digest, the described key) for an extractor identity and an images key."""
    described = {
        "version": CACHE_VERSION,
        "extractor": _jsonable(extractor.identity),
        "images": images_key,
    }
    text = json.dumps(described, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32], described


def _save_array(path: Path, array: np.ndarray) -> None:
    """np.save via a temporary sibling and an atomic rename."""
    with atomic_file(path) as tmp, tmp.open("wb") as handle:
        np.save(handle, array)


def _load_cached(path: Path, dim: int) -> np.ndarray | None:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        logger.warning("ignoring unreadable feature cache %s (%s); recomputing", path, error)
        return None
    if array.ndim != 2 or array.shape[1] != dim or not np.all(np.isfinite(array)):
        logger.warning("ignoring malformed feature cache %s; recomputing", path)
        return None
    return array.astype(np.float64, copy=False)


def cached_features(
    source: ImageSet | str | Path | Iterable[str | Path],
    extractor: FeatureExtractor,
    cache_dir: str | Path | None = None,
    *,
    size: int | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Features (N, D) float64 of an ImageSet, a folder or a file list, read from the cache
    when this exact extractor has seen these exact images before.

    `size` is the centre-crop + resize side used when reading a folder or file list (as in
    `load_image_set`); an ImageSet is used as it is (its pixels are the key).
    """
    if isinstance(source, ImageSet) and size is not None:
        raise EvaluationError("size applies to folders and file lists; this ImageSet is loaded")
    if not isinstance(source, (ImageSet, str, Path)):
        source = [Path(p) for p in source]
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    digest, described = cache_key(extractor, _images_key(source, size))
    path = folder / f"{extractor.name}-{digest}.npy"
    if path.is_file():
        cached = _load_cached(path, extractor.dim)
        if cached is not None:
            logger.info("%s features read from the cache %s", extractor.name, path)
            return cached
    image_set = source if isinstance(source, ImageSet) else load_image_set(source, size)
    features = extract_features(image_set, extractor, progress=progress)  # (N, D)
    folder.mkdir(parents=True, exist_ok=True)
    # The description first: an .npy present means a complete entry.
    atomic_write_text(path.with_suffix(".json"), json.dumps(described, indent=1) + "\n")
    _save_array(path, features)
    logger.info("%s features of %d images cached at %s", extractor.name, len(features), path)
    return features


__all__ = [
    "COLOUR_EXTRACTOR",
    "DEFAULT_EXTRACTOR",
    "FeatureExtractor",
    "cache_key",
    "cached_features",
    "default_cache_dir",
    "extract_features",
    "feature_extractor",
    "feature_extractor_names",
    "file_identity",
]
