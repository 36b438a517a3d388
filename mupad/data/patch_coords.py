"""TRIDENT / CLAM patch layout: coords.h5 and features/<encoder>/<slide>.h5.

    patches = read_patch_coords("job/patches/slide.h5")   # PatchCoords: (N, 2) level-0 x, y
    write_patch_features(features_path("out/features", "uni", "slide"), feats, patches)

Both tools store one HDF5 file per slide with a dataset `coords` (N, 2) of top-left corners
in level-0 pixels (x, y). Its attributes say how large a patch is:

    patch_size         side in px at the level / magnification the patch was cut at
    patch_level        (CLAM) the pyramid level it was read from; 0 in TRIDENT files
    downsample         (CLAM) that level's downsample, so level-0 side = patch_size * downsample
    patch_size_level0  (TRIDENT) the side in level-0 px
    name               the slide's name

A features file holds `features` (N, D) next to `coords` (N, 2), row i of one describing
patch i of the other. We write every attribute both tools read, so either reads our files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

import h5py
import numpy as np

from mupad.errors import MupadError

if TYPE_CHECKING:
    from mupad.data.wsi import Slide, TileCoord

__all__ = [
    "PatchCoords",
    "PatchFormatError",
    "PatchFeatures",
    "coords_file_for",
    "features_path",
    "read_patch_coords",
    "read_patch_features",
    "slide_tile_coords",
    "write_patch_coords",
    "write_patch_features",
]

COORDS = "coords"
FEATURES = "features"
# Suffixes tools append to the slide name: TRIDENT writes <slide>_patches.h5.
_COORDS_SUFFIXES = ("", "_patches")


class PatchFormatError(MupadError):
    """A coords / features .h5 file is missing, unreadable or not in the TRIDENT/CLAM layout."""


@dataclass(frozen=True)
class PatchCoords:
    """Patches of one slide: top-left corners and side, in level-0 px."""

    coords: np.ndarray  # (N, 2) int64, level-0 (x, y)
    patch_size: int  # px at `patch_level` (CLAM) / at the target magnification (TRIDENT)
    patch_size_level0: int | None = None  # None: CLAM file without `downsample` (see resolve)
    patch_level: int = 0
    slide_id: str = ""

    def __post_init__(self) -> None:
        coords = np.asarray(self.coords)
        if coords.ndim != 2 or coords.shape[1] != 2:
            raise PatchFormatError(
                f"patch coords must be an (N, 2) array of level-0 (x, y), got shape {coords.shape}"
            )
        object.__setattr__(self, "coords", coords.astype(np.int64))
        level0 = self.patch_size_level0
        if self.patch_size < 1 or (level0 is not None and level0 < 1):
            raise PatchFormatError(
                f"patch sizes must be positive, got patch_size={self.patch_size}, "
                f"patch_size_level0={self.patch_size_level0}"
            )

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    def size_level0(self, level_downsamples: tuple[float, ...] | None = None) -> int:
        """The patch side in level-0 px; a CLAM file without `downsample` needs the slide's
        level downsamples to convert `patch_size` at `patch_level`."""
        if self.patch_size_level0 is not None:
            return self.patch_size_level0
        if self.patch_level == 0:
            return self.patch_size
        if level_downsamples is None or self.patch_level >= len(level_downsamples):
            raise PatchFormatError(
                f"the patches of {self.slide_id or 'this slide'} were cut at level "
                f"{self.patch_level}, which the slide does not have "
                f"({0 if level_downsamples is None else len(level_downsamples)} levels); "
                "give the slide the coords were made from"
            )
        return max(1, round(self.patch_size * level_downsamples[self.patch_level]))


@dataclass(frozen=True)
class PatchFeatures:
    """Per-patch features of one slide (row i describes patch i)."""

    features: np.ndarray  # (N, D) float
    patches: PatchCoords


def _attr(attrs: h5py.AttributeManager, name: str) -> object | None:
    value = attrs.get(name)
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(()).item()
    if isinstance(value, bytes):
        value = value.decode()
    return value


def _open(path: Path) -> h5py.File:
    if not path.is_file():
        raise PatchFormatError(
            f"{path}: no such file; give a coords/features .h5 written by TRIDENT, CLAM or mupad"
        )
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise PatchFormatError(f"{path}: not a readable HDF5 file ({exc}); re-create it") from exc


def _read_coords(handle: h5py.File, path: Path) -> PatchCoords:
    if COORDS not in handle:
        raise PatchFormatError(
            f"{path}: no `coords` dataset (found: {', '.join(handle.keys()) or 'nothing'}); give "
            "a TRIDENT/CLAM patches file"
        )
    dataset = handle[COORDS]
    attrs = dataset.attrs
    size = _attr(attrs, "patch_size")
    size_level0 = _attr(attrs, "patch_size_level0")
    level = int(_attr(attrs, "patch_level") or 0)
    downsample = _attr(attrs, "downsample")
    if size_level0 is None and downsample is not None:
        factor = float(np.asarray(downsample, dtype=float).ravel()[0])  # CLAM: (dx, dy)
        if math.isfinite(factor) and factor > 0 and size is not None:
            size_level0 = max(1, round(float(size) * factor))
    if size is None:
        size = size_level0
    if size is None:
        raise PatchFormatError(
            f"{path}: `coords` has no `patch_size` or `patch_size_level0` attribute, so the patch "
            "side is unknown; re-run the patching tool or write the file with write_patch_coords"
        )
    name = _attr(attrs, "name")
    return PatchCoords(
        coords=dataset[()],
        patch_size=int(size),
        patch_size_level0=None if size_level0 is None else int(size_level0),
        patch_level=level,
        slide_id=str(name) if name else _slide_name(path),
    )


def _slide_name(path: Path) -> str:
    stem = path.stem
    return stem[: -len("_patches")] if stem.endswith("_patches") else stem


def read_patch_coords(path: str | Path) -> PatchCoords:
    """Read a TRIDENT / CLAM / mupad patches file (or the coords of a features file)."""
    path = Path(path)
    with _open(path) as handle:
        return _read_coords(handle, path)


def read_patch_features(path: str | Path) -> PatchFeatures:
    """Read features/<encoder>/<slide>.h5: `features` (N, D) and `coords` (N, 2)."""
    path = Path(path)
    with _open(path) as handle:
        if FEATURES not in handle:
            raise PatchFormatError(f"{path}: no `features` dataset; give a features .h5 file")
        features = np.asarray(handle[FEATURES][()])
        patches = _read_coords(handle, path)
    if features.ndim == 3 and features.shape[0] == 1:  # some tools keep a batch axis
        features = features[0]
    if features.ndim != 2 or features.shape[0] != len(patches):
        raise PatchFormatError(
            f"{path}: `features` {features.shape} does not match `coords` ({len(patches)}, 2); "
            "re-extract the features"
        )
    return PatchFeatures(features, patches)


def _write_coords(handle: h5py.File, patches: PatchCoords) -> None:
    dataset = handle.create_dataset(COORDS, data=patches.coords)
    size_level0 = patches.size_level0()
    dataset.attrs["patch_size"] = int(patches.patch_size)
    dataset.attrs["patch_size_level0"] = int(size_level0)
    dataset.attrs["patch_level"] = int(patches.patch_level)
    dataset.attrs["downsample"] = np.full(2, size_level0 / patches.patch_size)
    dataset.attrs["overlap"] = 0
    dataset.attrs["name"] = patches.slide_id


def write_patch_coords(path: str | Path, patches: PatchCoords) -> Path:
    """Write a patches file both TRIDENT and CLAM read (parent folders are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as handle:
        _write_coords(handle, patches)
    return path


def write_patch_features(path: str | Path, features: np.ndarray, patches: PatchCoords) -> Path:
    """Write features/<encoder>/<slide>.h5 (`features` (N, D) float32, `coords` (N, 2))."""
    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 2 or features.shape[0] != len(patches):
        raise PatchFormatError(
            f"features must be (N, D) with one row per patch ({len(patches)}), got {features.shape}"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as handle:
        handle.create_dataset(FEATURES, data=features)
        _write_coords(handle, patches)
    return path


def features_path(root: str | Path, encoder: str, slide_id: str) -> Path:
    """root/<encoder>/<slide_id>.h5, the layout MIL pipelines read."""
    return Path(root) / encoder / f"{slide_id}.h5"


def coords_file_for(coords: str | Path, slide_id: str) -> Path:
    """The patches file of `slide_id`: `coords` itself when it is a file, else
    <coords>/<slide>.h5, <coords>/<slide>_patches.h5 or the same under <coords>/patches/."""
    coords = Path(coords)
    if coords.is_file():
        return coords
    tried = []
    for folder in (coords, coords / "patches"):
        for suffix in _COORDS_SUFFIXES:
            candidate = folder / f"{slide_id}{suffix}.h5"
            if candidate.is_file():
                return candidate
            tried.append(candidate.name if folder == coords else f"patches/{candidate.name}")
    raise PatchFormatError(
        f"no patches file for slide {slide_id!r} in {coords} (looked for {', '.join(tried)}); "
        "name it after the slide or pass the file itself"
    )


def slide_tile_coords(patches: PatchCoords, slide: Slide, tile_size: int) -> list[TileCoord]:
    """The patches as tiles of `slide`, each read from the coarsest level that still has
    `tile_size` px across the patch (their tissue fraction is unknown: NaN)."""
    from mupad.data.wsi import TileCoord

    if len(patches) == 0:
        raise PatchFormatError(f"the patches file of {slide.slide_id} lists no patches")
    size = patches.size_level0(slide.level_downsamples)
    level = slide.best_level_for_downsample(size / tile_size)
    return [TileCoord(int(x), int(y), size, level, math.nan) for x, y in patches.coords]
