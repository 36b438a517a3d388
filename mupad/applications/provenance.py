"""Content hashes and atomic image writes for generated outputs and their sidecars.

A sidecar names every input by path *and* content hash, the model by its weights hash and
the encoded conditions by a checksum of their tensors, so a later regeneration can tell
"same inputs" from "a file with the same name".
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mupad.conditions import Conditions
from mupad.fileio import atomic_file

_CHUNK = 1 << 20


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def conditions_sha256(cond: Conditions | None) -> str:
    """Checksum of encoded conditions: every stream's tokens (as float32), mask and presence,
    in modality-name order. Equal checksums mean bit-identical condition tensors."""
    digest = hashlib.sha256()
    if cond is not None:
        for modality in sorted(cond.streams, key=lambda m: m.value):
            stream = cond.streams[modality]
            digest.update(modality.value.encode())
            for tensor in (stream.tokens.float(), stream.mask, stream.present):
                array = tensor.detach().cpu().contiguous().numpy()
                digest.update(str(array.shape).encode())
                digest.update(array.tobytes())
    return digest.hexdigest()


def save_png_atomic(image: torch.Tensor | np.ndarray, path: str | Path) -> None:
    """Write a uint8 RGB image ((3, H, W) tensor or (H, W, 3) array) as PNG, atomically:
    a temporary sibling is written and renamed, so a reader never sees half a file."""
    array = image.permute(1, 2, 0).numpy() if isinstance(image, torch.Tensor) else image
    array = np.ascontiguousarray(array, dtype=np.uint8)  # (H, W, 3)
    with atomic_file(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
