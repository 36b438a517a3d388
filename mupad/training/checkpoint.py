"""Training checkpoints: safetensors weights + JSON configs and state, written atomically.

Layout of one checkpoint folder (`<run>/checkpoints/step-0000500/`):

    config.json, model.safetensors        the raw weights, loadable with SiT.from_pretrained
    ema/config.json, ema/model.safetensors   the EMA weights, loadable the same way
    optimizer.safetensors                 AdamW moments and step counts
    train_state.json                      step, EMA update count, param-group hyper-parameters,
                                          train config, extra run metadata

Nothing here unpickles anything: tensors go through safetensors, the rest through JSON.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mupad.fileio import atomic_directory
from mupad.models.sit import WEIGHTS_NAME, write_model_files
from mupad.training.ema import EMA

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d{7,})$")


class ResumeError(RuntimeError):
    """A run folder cannot be resumed with the current configuration."""


@dataclass(frozen=True)
class TrainState:
    step: int
    ema_updates: int
    param_groups: list[dict[str, Any]]
    train_config: dict[str, Any]
    extra: dict[str, Any]


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:07d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Finished checkpoints of a run, oldest first (temporary folders are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / "train_state.json").is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    """AdamW-style state as flat safetensors-ready tensors ("<param>.<slot>") + param groups."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for index, per_param in state["state"].items():
        for key, value in per_param.items():
            value = torch.as_tensor(value)
            tensors[f"{index}.{key}"] = value.detach().to("cpu").contiguous()
    return tensors, state["param_groups"]


def restore_optimizer(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], param_groups: list
) -> None:
    """Inverse of `optimizer_tensors`."""
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, _, name = key.partition(".")
        per_param.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": param_groups})


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    ema: EMA | None,
    optimizer: torch.optim.Optimizer,
    train_config: dict[str, Any],
    extra: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Write one checkpoint atomically and prune older ones beyond `keep`."""
    final = checkpoint_dir(run_dir, step)
    config = model.config  # type: ignore[attr-defined]
    with atomic_directory(final) as tmp:
        write_model_files(tmp, config, model.state_dict())
        if ema is not None:
            write_model_files(tmp / "ema", config, ema.state_dict())
        opt_tensors, groups = optimizer_tensors(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        state = {
            "step": step,
            "ema_updates": ema.num_updates if ema is not None else 0,
            "param_groups": groups,
            "train_config": train_config,
            "extra": extra or {},
        }
        (tmp / "train_state.json").write_text(json.dumps(state, indent=2) + "\n")
    if keep > 0:
        for _, old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    logger.info("saved checkpoint %s", final)
    return final


def load_checkpoint(
    folder: Path,
    model: nn.Module,
    ema: EMA | None,
    optimizer: torch.optim.Optimizer,
) -> TrainState:
    """Restore model, EMA and optimizer in place from `folder`; return the saved state."""
    folder = Path(folder)
    state = json.loads((folder / "train_state.json").read_text())
    weights = load_file(str(folder / WEIGHTS_NAME))
    model.load_state_dict(weights, strict=True)
    if ema is not None:
        ema.load_state_dict(load_file(str(folder / "ema" / WEIGHTS_NAME)), state["ema_updates"])
    restore_optimizer(
        optimizer, load_file(str(folder / "optimizer.safetensors")), state["param_groups"]
    )
    return TrainState(
        step=int(state["step"]),
        ema_updates=int(state["ema_updates"]),
        param_groups=state["param_groups"],
        train_config=state["train_config"],
        extra=state.get("extra", {}),
    )
