"""Image sets for evaluation: a folder (flat or `<class>/<image>`) or a list of files -> uint8.

Every file is read with the same conversions as reference images (gray -> RGB, alpha onto
white, 16-bit -> 8-bit; float images refused). Sizes must agree unless `size` is given, in
which case each image is centre-cropped to a square and resized (bicubic) — evaluation
never silently mixes scales. Unreadable files raise `EvaluationError` naming the file.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mupad.applications.reference_images import ReferenceImageError, open_image_array, to_rgb8
from mupad.data.tiles import IMAGE_SUFFIXES
from mupad.evaluation.stats import EvaluationError


@dataclass(frozen=True)
class ImageSet:
    """Images of one evaluation set, in sorted path order."""

    images: torch.Tensor  # (N, 3, H, W) uint8
    paths: tuple[Path, ...]
    labels: torch.Tensor | None  # (N,) int64 into class_names, when the folder has classes
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.images.shape[0])


def image_files(root: str | Path) -> list[Path]:
    """Every image file under `root`, sorted, hidden folders skipped."""
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise EvaluationError(f"image folder {root} does not exist")
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def read_rgb(path: str | Path) -> np.ndarray:
    """One image file -> (H, W, 3) uint8, or EvaluationError naming the file."""
    try:
        raw, _, _ = open_image_array(Path(path))
        rgb, _ = to_rgb8(raw, str(path))
    except ReferenceImageError as error:
        raise EvaluationError(str(error).replace("reference image", "image")) from None
    return rgb


def _square(rgb: np.ndarray, size: int) -> np.ndarray:
    height, width = rgb.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    crop = rgb[top : top + side, left : left + side]
    if side != size:
        crop = np.asarray(Image.fromarray(crop).resize((size, size), Image.Resampling.BICUBIC))
    return crop


def load_image_set(
    source: str | Path | Iterable[str | Path], size: int | None = None, *, what: str = "images"
) -> ImageSet:
    """Read a folder or a list of files.

    Labels come from the first folder level below `source` when every image sits in one
    (the ImageFolder layout); otherwise `labels` is None.
    """
    if isinstance(source, (str, Path)):
        root: Path | None = Path(source)
        files = image_files(root)
    else:
        root, files = None, [Path(p) for p in source]
    if not files:
        where = f"under {root}" if root is not None else "in the list given"
        raise EvaluationError(f"no {what} ({', '.join(sorted(IMAGE_SUFFIXES))}) {where}")
    arrays = [read_rgb(path) for path in files]
    if size is not None:
        if size < 1:
            raise EvaluationError(f"size must be positive, got {size}")
        arrays = [_square(a, size) for a in arrays]
    shapes = Counter(a.shape[:2] for a in arrays)
    if len(shapes) > 1:
        common = shapes.most_common(1)[0][0]
        odd = [str(p) for p, a in zip(files, arrays) if a.shape[:2] != common][:3]
        raise EvaluationError(
            f"{what} have different sizes ({', '.join(f'{h}x{w}: {n}' for (h, w), n in shapes.items())}; "
            f"e.g. {', '.join(odd)}); pass a size (--size) to centre-crop and resize them all"
        )
    labels, class_names = None, ()
    if root is not None and root.is_dir():
        parents = [p.relative_to(root).parts for p in files]
        if all(len(parts) == 2 for parts in parents):
            class_names = tuple(sorted({parts[0] for parts in parents}))
            index = {name: i for i, name in enumerate(class_names)}
            labels = torch.tensor([index[parts[0]] for parts in parents], dtype=torch.long)
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return ImageSet(images=images, paths=tuple(files), labels=labels, class_names=class_names)


def as_uint8_images(images: torch.Tensor | np.ndarray, what: str = "images") -> torch.Tensor:
    """Check/convert an in-memory batch to uint8 (N, 3, H, W); floats must be in [-1, 1]."""
    tensor = torch.as_tensor(images)
    if tensor.ndim != 4 or tensor.shape[1] != 3:
        raise EvaluationError(f"{what} must be (N, 3, H, W), got {tuple(tensor.shape)}")
    if tensor.dtype == torch.uint8:
        return tensor
    if not tensor.is_floating_point():
        raise EvaluationError(f"{what} must be uint8 or float in [-1, 1], got {tensor.dtype}")
    if not torch.isfinite(tensor).all():
        raise EvaluationError(f"{what} contain NaN or infinite values")
    return tensor.float().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)
