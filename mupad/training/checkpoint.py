"""Training checkpoints: safetensors weights + JSON configs and state, written atomically.

Layout of one checkpoint folder (`<run>/checkpoints/step-0000500/`):

    config.json, model.safetensors        the raw weights, loadable with SiT.from_pretrained
    ema/config.json, ema/model.safetensors   the EMA weights, loadable the same way
    optimizer.safetensors                 AdamW moments and step counts, keyed "<param>.<slot>"
    <module>.safetensors                  other trained modules (the alignment projector)
    rng.safetensors                       torch CPU / CUDA generator states
    train_state.json                      step, EMA update count, param groups, train config,
                                          scheduler, data position, counters, numpy/python
                                          RNG states, extra run metadata

The folder is written under a temporary name and renamed when complete, so a run killed at
any instant leaves either the previous checkpoints or the new one, never half of one.

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

from mupad.config import ModelConfig
from mupad.errors import MupadError
from mupad.fileio import atomic_directory
from mupad.models.sit import WEIGHTS_NAME, write_model_files

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d{7,})$")


class ResumeError(MupadError, RuntimeError):
    """A run folder cannot be resumed with the current configuration."""


@dataclass
class CheckpointContents:
    """Everything a run needs to continue exactly; tensors are full (unsharded) CPU tensors."""

    step: int
    model: dict[str, torch.Tensor]  # SiT weights
    ema: dict[str, torch.Tensor] | None
    optimizer: dict[str, Any]  # {'state': {param: {slot: tensor}}, 'param_groups': [...]}
    modules: dict[str, dict[str, torch.Tensor]]  # other trained modules by name
    rng: dict[str, torch.Tensor]  # generator states as uint8 tensors
    state: dict[str, Any]  # JSON: ema_updates, train_config, scheduler, data, counters, ...


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


def stored_configs(path: str | Path) -> dict[str, Any]:
    """The JSON files stored with a checkpoint ({file name: content}): its model config and,
    for a training checkpoint, train_state.json. `path` is a checkpoint or model folder, or
    a run folder (its latest checkpoint). Raises CheckpointError when there is none."""
    from mupad.models.errors import CheckpointError
    from mupad.models.sit import CONFIG_NAME

    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            f"{path} does not exist; pass a run folder, a checkpoint folder "
            "(<run>/checkpoints/step-NNNNNNN) or a model folder"
        )
    if (path / "checkpoints").is_dir():
        path = latest_checkpoint(path) or path
    stored: dict[str, Any] = {}
    for name in (CONFIG_NAME, "train_state.json"):
        file = path / name
        if not file.is_file():
            continue
        try:
            stored[name] = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CheckpointError(f"{file} is not valid JSON ({error}); the file is damaged")
    if not stored:
        raise CheckpointError(
            f"{path} holds no {CONFIG_NAME} or train_state.json; pass a run folder, a "
            "checkpoint folder (<run>/checkpoints/step-NNNNNNN) or a model folder"
        )
    return stored


def flatten_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list]:
    """An optimizer state dict -> safetensors-ready tensors "<param>.<slot>" + param groups.

    <param> is the optimizer's key for the parameter: an index (torch.optim) or a parameter
    name (torch.distributed.checkpoint's full state dicts).
    """
    tensors: dict[str, torch.Tensor] = {}
    for key, per_param in state["state"].items():
        for slot, value in per_param.items():
            value = torch.as_tensor(value)
            tensors[f"{key}.{slot}"] = value.detach().to("cpu").contiguous()
    return tensors, state["param_groups"]


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], param_groups: list) -> dict:
    """Inverse of `flatten_optimizer_state` (slot names such as exp_avg contain no dot)."""
    per_param: dict[int | str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, slot = key.rpartition(".")
        per_param.setdefault(int(name) if name.isdigit() else name, {})[slot] = value
    return {"state": per_param, "param_groups": param_groups}


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    """A local optimizer's state as flat tensors + param groups."""
    return flatten_optimizer_state(optimizer.state_dict())


def restore_optimizer(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], param_groups: list
) -> None:
    """Inverse of `optimizer_tensors`."""
    optimizer.load_state_dict(unflatten_optimizer_state(tensors, param_groups))


def save_checkpoint(
    run_dir: Path, contents: CheckpointContents, model_config: ModelConfig, keep: int = 2
) -> Path:
    """Write one checkpoint atomically and prune older ones beyond `keep` (0 keeps all)."""
    final = checkpoint_dir(run_dir, contents.step)
    with atomic_directory(final) as tmp:
        write_model_files(tmp, model_config, contents.model)
        if contents.ema is not None:
            write_model_files(tmp / "ema", model_config, contents.ema)
        opt_tensors, groups = flatten_optimizer_state(contents.optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        for name, tensors in contents.modules.items():
            save_file(_cpu(tensors), str(tmp / f"{name}.safetensors"))
        save_file(_cpu(contents.rng), str(tmp / "rng.safetensors"))
        state = {
            "step": contents.step,
            **contents.state,
            "param_groups": groups,
            "modules": sorted(contents.modules),
        }
        (tmp / "train_state.json").write_text(json.dumps(state, indent=2) + "\n")
    if keep > 0:
        for _, old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    logger.info("saved checkpoint %s", final)
    return final


def load_checkpoint(folder: Path) -> CheckpointContents:
    """Read a checkpoint folder written by `save_checkpoint` (nothing is unpickled)."""
    folder = Path(folder)
    state = json.loads((folder / "train_state.json").read_text())
    ema_file = folder / "ema" / WEIGHTS_NAME
    rng_file = folder / "rng.safetensors"
    groups = state.pop("param_groups")
    return CheckpointContents(
        step=int(state.pop("step")),
        model=load_file(str(folder / WEIGHTS_NAME)),
        ema=load_file(str(ema_file)) if ema_file.is_file() else None,
        optimizer=unflatten_optimizer_state(
            load_file(str(folder / "optimizer.safetensors")), groups
        ),
        modules={
            name: load_file(str(folder / f"{name}.safetensors")) for name in state.pop("modules", [])
        },
        rng=load_file(str(rng_file)) if rng_file.is_file() else {},
        state=state,
    )


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: value.detach().to("cpu").contiguous() for name, value in tensors.items()}
