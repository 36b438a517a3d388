"""Finding and reading image-encoder weight files (never from a hub).

`locate_weights_file` accepts an explicit file, an explicit folder, or nothing (then the
cache `$MUPAD_CACHE/<name>` and any packaged copy, via `registry.resolve_weights`).
`read_state_dict` reads safetensors, or a PyTorch `.bin`/`.pt` checkpoint with
`torch.load(weights_only=True)` (tensors only, no arbitrary pickled objects).
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mupad.conditioning.base import EncoderError, WeightsNotFoundError
from mupad.conditioning.registry import RequiredFile, resolve_weights

# Keys under which training scripts commonly nest the model's state dict.
_NESTED_KEYS = ("state_dict", "model", "module")


def locate_weights_file(
    name: str,
    weights: str | Path | None,
    candidates: Sequence[str],
    download_hint: str,
    also_required: Sequence[RequiredFile] = (),
) -> Path:
    """The weights file for `name`: `weights` itself if it is a file, else the first of
    `candidates` in the resolved folder (explicit folder, cache, packaged copy)."""
    if weights is not None and Path(weights).expanduser().is_file():
        return Path(weights).expanduser()
    required: list[RequiredFile] = [tuple(candidates), *also_required]
    folder = resolve_weights(name, weights, required, download_hint)
    for candidate in candidates:
        if (folder / candidate).is_file():
            return folder / candidate
    raise WeightsNotFoundError(f"no {' or '.join(candidates)} in {folder}")  # unreachable


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file or a weights-only PyTorch checkpoint, on the CPU."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        if path.suffix == ".safetensors":
            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError, SafetensorError) as exc:
        raise EncoderError(
            f"could not read weights from {path}: {exc}. The file is truncated or not a "
            "safetensors / PyTorch state-dict file; download it again"
        ) from exc
    for key in _NESTED_KEYS:
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise EncoderError(f"{path} does not hold a state dict of tensors")
    return {str(k).removeprefix("module."): v for k, v in state.items()}


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, with a clear error when it is malformed."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise EncoderError(f"could not read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise EncoderError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def mismatch_summary(missing: Sequence[str], unexpected: Sequence[str], limit: int = 8) -> str:
    """'missing: a, b, ...; unexpected: c, ...' (at most `limit` names each)."""

    def names(keys: Sequence[str]) -> str:
        more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
        return ", ".join(keys[:limit]) + more

    parts = []
    if missing:
        parts.append(f"missing {len(missing)} key(s): {names(missing)}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} key(s): {names(unexpected)}")
    return "; ".join(parts)
