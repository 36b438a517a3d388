"""Pictures a person looks at: image grids and the loss curve."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image


def save_grid(images: torch.Tensor, path: str | Path, columns: int = 8, pad: int = 2) -> Path:
    """uint8 images (B, 3, H, W) -> one PNG grid with white gutters."""
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError("save_grid expects uint8 images of shape (B, 3, H, W)")
    count, _, height, width = images.shape
    rows = (count + columns - 1) // columns
    canvas = np.full(
        (rows * (height + pad) + pad, columns * (width + pad) + pad, 3), 255, dtype=np.uint8
    )
    array = images.permute(0, 2, 3, 1).numpy()
    for i in range(count):
        r, c = divmod(i, columns)
        top, left = pad + r * (height + pad), pad + c * (width + pad)
        canvas[top : top + height, left : left + width] = array[i]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path)
    return path


def loss_curve_png(records: list[dict[str, Any]], path: str | Path) -> Path:
    """Plot the JSONL training log's loss against step (raw and smoothed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([r["step"] for r in records])
    losses = np.array([r["loss"] for r in records])
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(steps, losses, color="#bbbbbb", lw=0.8, label="logged loss")
    if len(losses) >= 5:
        width = max(3, len(losses) // 20)
        smooth = np.convolve(losses, np.ones(width) / width, mode="valid")
        ax.plot(steps[width - 1 :], smooth, color="#7b2d8e", lw=1.8, label=f"moving mean ({width})")
    ax.set_xlabel("step")
    ax.set_ylabel("velocity MSE")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
