"""Process-wide random generator states, saved with every checkpoint.

The trainer itself draws every random number of step s from a generator seeded by
(seed, s), so its own draws need no saved state; these are the global generators that user
code (a custom batch function, dropout in a plugged-in module) may consume, restored so a
resumed run continues them where the killed one stopped.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors for safetensors, JSON-ready states) of torch CPU/CUDA, numpy and python."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{index}"] = state
    kind, keys, position, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    states = {
        "numpy": [kind, keys.tolist(), int(position), int(has_gauss), float(cached)],
        "python": [version, list(internal), gauss],
    }
    return tensors, states


def restore_rng(tensors: dict[str, torch.Tensor], states: dict[str, Any] | None) -> None:
    """Inverse of `capture_rng` (missing parts are left as they are)."""
    if "torch_cpu" in tensors:
        torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    if not states:
        return
    if "numpy" in states:
        kind, keys, position, has_gauss, cached = states["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    if "python" in states:
        version, internal, gauss = states["python"]
        random.setstate((version, tuple(internal), gauss))
