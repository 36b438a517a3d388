"""Labelled tile folders (ImageFolder layout) held in memory, and random-crop batches.

`root/<class_name>/<image>.png|jpg|tif` -> uint8 tiles (N, 3, H, W) + labels. This is for
small sets (demos, few-shot data); large sets go through sharded datasets.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mupad.errors import MupadError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
# Bad files named in an error message (the rest are counted).
BAD_FILES_NAMED = 5


class TileFolderError(MupadError, ValueError):
    """A tile folder is missing, empty or holds unusable images."""


class UnreadableTileError(TileFolderError):
    """An image file cannot be decoded (truncated, corrupt or not an image)."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


class BadTilesError(TileFolderError):
    """A tile folder holds unreadable images and skipping them was not asked for."""


def open_rgb(path: Path) -> Image.Image:
    """Decode an image file completely (truncated files fail here, not later) as RGB.

    Raises UnreadableTileError naming the file.
    """
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise UnreadableTileError(path, f"{type(exc).__name__}: {exc}") from exc


def _name_bad_files(bad: list[UnreadableTileError]) -> str:
    named = "; ".join(str(error) for error in bad[:BAD_FILES_NAMED])
    more = f" and {len(bad) - BAD_FILES_NAMED} more" if len(bad) > BAD_FILES_NAMED else ""
    return f"{named}{more}"


@dataclass(frozen=True)
class TileSet:
    images: torch.Tensor  # (N, 3, H, W) uint8
    labels: torch.Tensor  # (N,) int64 index into class_names
    class_names: tuple[str, ...]
    paths: tuple[Path, ...]
    skipped: tuple[Path, ...] = ()  # unreadable files left out (skip_bad=True)

    def __len__(self) -> int:
        return self.images.shape[0]


def bundled_kather_dir() -> Path:
    """The 96 Kather 2016 CRC tiles shipped with mupad (CC BY 4.0, see ATTRIBUTION.md)."""
    return Path(str(resources.files("mupad") / "assets" / "kather2016"))


def load_tile_folder(
    root: str | Path, size: int | None = None, *, skip_bad: bool = False
) -> TileSet:
    """Read every image of `root/<class>/`; all tiles must share one size (or pass `size`).

    Every file is decoded up front. Unreadable ones (truncated, corrupt) raise BadTilesError
    naming them, or with `skip_bad` are left out, logged and listed in `TileSet.skipped`.
    """
    root = Path(root)
    if not root.is_dir():
        raise TileFolderError(f"tile folder {root} does not exist")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise TileFolderError(
            f"{root} has no class subfolders; expected root/<class_name>/<tile>.png"
        )
    images, labels, paths = [], [], []
    bad: list[UnreadableTileError] = []
    for label, class_dir in enumerate(class_dirs):
        files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        for path in files:
            try:
                rgb = open_rgb(path)
            except UnreadableTileError as error:
                bad.append(error)
                continue
            if size is not None and rgb.size != (size, size):
                rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
            array = np.asarray(rgb, dtype=np.uint8)
            images.append(torch.from_numpy(array.copy()).permute(2, 0, 1))  # (3, H, W)
            labels.append(label)
            paths.append(path)
    if bad and not skip_bad:
        raise BadTilesError(
            f"{len(bad)} unreadable image(s) in the tile folder {root}: {_name_bad_files(bad)}; "
            "replace or remove them, or pass --skip-bad-tiles to train on the others"
        )
    if bad:
        logger.warning("skipping %d unreadable tile(s): %s", len(bad), _name_bad_files(bad))
    if not images:
        raise TileFolderError(
            f"no readable images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}"
        )
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) > 1:
        raise TileFolderError(
            f"tiles in {root} have different sizes {sorted(shapes)}; pass size=... to resize"
        )
    return TileSet(
        images=torch.stack(images),
        labels=torch.tensor(labels, dtype=torch.long),
        class_names=tuple(d.name for d in class_dirs),
        paths=tuple(paths),
        skipped=tuple(error.path for error in bad),
    )


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return images.float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255] (clamped)."""
    return images.float().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)


def random_crops(
    tiles: TileSet, crop: int, batch_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tiles, random crops, random dihedral transforms (histology has no 'up').

    Returns images (B, 3, crop, crop) in [-1, 1] and the indices of the tiles used (B,).
    """
    n, _, height, width = tiles.images.shape
    if crop > min(height, width):
        raise TileFolderError(f"crop {crop} is larger than the tiles ({height}x{width})")
    index = torch.randint(n, (batch_size,), generator=generator)
    top = torch.randint(height - crop + 1, (batch_size,), generator=generator)
    left = torch.randint(width - crop + 1, (batch_size,), generator=generator)
    flips = torch.randint(2, (batch_size,), generator=generator)
    turns = torch.randint(4, (batch_size,), generator=generator)
    out = []
    for i in range(batch_size):
        patch = tiles.images[index[i], :, top[i] : top[i] + crop, left[i] : left[i] + crop]
        if flips[i]:
            patch = patch.flip(-1)
        out.append(torch.rot90(patch, int(turns[i]), dims=(-2, -1)))
    return to_unit_range(torch.stack(out)), index


def load_image_tiles(root: str | Path, size: int | None = None) -> TileSet:
    """Every image under `root` (a flat folder, an ImageFolder layout or any nesting), as one
    TileSet of square `size` x `size` centre crops.

    `size=None` centre-crops every tile to the smallest side found. Labels index the image's
    parent folder relative to `root` ("." for images directly in `root`). Files are read in
    sorted path order, so the result (and any split of it) is deterministic.
    """
    root = Path(root)
    if not root.is_dir():
        raise TileFolderError(f"tile folder {root} does not exist")
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise TileFolderError(
            f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}; put tiles in "
            "root/<tile>.png or root/<class_name>/<tile>.png"
        )
    arrays = [np.asarray(open_rgb(path), dtype=np.uint8) for path in files]  # (H, W, 3) each
    side = min(min(a.shape[:2]) for a in arrays) if size is None else size
    images = []
    for path, array in zip(files, arrays):
        height, width = array.shape[:2]
        if height < side or width < side:
            raise TileFolderError(
                f"{path} is {height}x{width}, smaller than the tile size {side}; remove it or "
                "pass a smaller size"
            )
        top, left = (height - side) // 2, (width - side) // 2
        crop = array[top : top + side, left : left + side]
        images.append(torch.from_numpy(crop.copy()).permute(2, 0, 1))  # (3, side, side)
    groups = [str(p.parent.relative_to(root)) for p in files]
    class_names = tuple(sorted(set(groups)))
    return TileSet(
        images=torch.stack(images),
        labels=torch.tensor([class_names.index(g) for g in groups], dtype=torch.long),
        class_names=class_names,
        paths=tuple(files),
    )
