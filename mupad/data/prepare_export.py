"""`mupad prepare --export-features DIR`: the image encoder's global embedding of every slide
tile, written as DIR/<encoder>/<slide>.h5 (TRIDENT/CLAM layout, see mupad.data.patch_coords)
so a MIL pipeline reads the same patches mupad trained on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from mupad.data.patch_coords import PatchCoords, features_path, write_patch_features


class FeatureExport:
    """Collects (x, y, global embedding) per tile of one slide, then writes one features file."""

    def __init__(self, root: Path, encoder: str) -> None:
        self.root, self.encoder = root, encoder
        self.rows: list[np.ndarray] = []  # (B, D) float32 per batch
        self.xy: list[tuple[int, int]] = []

    def add(self, fields: list[dict[str, Any]], tensors: dict[str, torch.Tensor]) -> None:
        """One encoded batch: the records' fields and their `image_tokens` (B, 1 + h*w, D)."""
        self.rows.append(tensors["image_tokens"][:, 0].float().numpy())  # global token (B, D)
        self.xy.extend((int(f["x"]), int(f["y"])) for f in fields)

    def write(self, slide_id: str, tile_size: int, size_level0: int) -> Path | None:
        """Write <root>/<encoder>/<slide_id>.h5; None when the slide gave no tiles."""
        if not self.xy:
            return None
        patches = PatchCoords(
            np.array(self.xy), patch_size=tile_size, patch_size_level0=size_level0,
            slide_id=slide_id,
        )  # fmt: skip
        path = features_path(self.root, self.encoder, slide_id)
        return write_patch_features(path, np.concatenate(self.rows), patches)
