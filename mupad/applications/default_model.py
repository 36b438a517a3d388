"""The model `mupad generate`, `mupad augment` and `mupad serve` use when no --checkpoint is
given, and the pretrained model that ships inside the package.

Order of preference: the last finished `mupad demo` run (recorded in
`$MUPAD_CACHE/demo_run.json`, so the commands find it from any working directory), then the
pretrained model bundled in `mupad/assets/pretrained/` (trained only on openly licensed
tiles; see its MODEL_CARD.md). A fresh install therefore draws tissue without training.

A packaged model folder is what `export_pretrained` writes from a training run:

    config.json          the ModelConfig (as SiT.save_pretrained writes it)
    model.safetensors    the EMA weights, stored in bf16 to keep the wheel small
    metadata.json        the run metadata every generation needs (text encoder, captions,
                         class names, crop, latents) plus provenance (source run, step)
    MODEL_CARD.md        data, licence and attribution, training, measured quality, use
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from mupad.conditioning.registry import cache_root
from mupad.errors import MupadError
from mupad.fileio import atomic_directory, atomic_write_text

logger = logging.getLogger(__name__)

POINTER_NAME = "demo_run.json"
METADATA_NAME = "metadata.json"
MODEL_CARD_NAME = "MODEL_CARD.md"
PACKAGED_MODEL = "kather64"  # the folder under mupad/assets/pretrained/
MAX_PACKAGED_BYTES = 25 * 1024 * 1024


class DefaultModelError(MupadError, FileNotFoundError):
    """No --checkpoint was given, no demo run is recorded and no model ships with mupad."""


def pointer_path() -> Path:
    return cache_root() / POINTER_NAME


def remember_demo_run(run: str | Path) -> Path:
    """Record `run` as the default model; returns the pointer file."""
    path = pointer_path()
    atomic_write_text(path, json.dumps({"run": str(Path(run).resolve())}, indent=1) + "\n")
    return path


def packaged_model_dir() -> Path | None:
    """The pretrained model folder inside the installed package, or None if absent."""
    folder = Path(str(resources.files("mupad"))) / "assets" / "pretrained" / PACKAGED_MODEL
    return folder if (folder / "model.safetensors").is_file() else None


def _recorded_demo_run() -> tuple[Path | None, str]:
    """(the recorded demo run, "") if usable, else (None, why not)."""
    path = pointer_path()
    if not path.is_file():
        return None, f"no demo model recorded ({path})"
    try:
        run = Path(json.loads(path.read_text())["run"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        return None, f"{path} is unreadable ({error})"
    if not run.is_dir():
        return None, f"the recorded demo model {run} no longer exists"
    return run, ""


def default_checkpoint() -> Path:
    """The recorded demo run, else the packaged pretrained model, else DefaultModelError."""
    run, problem = _recorded_demo_run()
    if run is not None:
        return run
    packaged = packaged_model_dir()
    if packaged is not None:
        logger.info("%s; using the pretrained model that ships with mupad: %s", problem, packaged)
        return packaged
    raise DefaultModelError(
        f"no checkpoint given, {problem}, and no pretrained model in this installation "
        "(mupad/assets/pretrained/); give --checkpoint RUN, or run `mupad demo` once to "
        "train one on the bundled H&E tiles"
    )


def read_model_metadata(model_dir: Path) -> dict[str, Any] | None:
    """The metadata.json of a packaged model folder, or None when the folder has none."""
    path = Path(model_dir) / METADATA_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise DefaultModelError(f"{path} is not valid JSON ({error}); reinstall mupad") from None


def export_pretrained(
    run: str | Path,
    out: str | Path,
    *,
    card: str,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a packaged model folder (see the module doc) from a run / checkpoint folder:
    its EMA weights in bf16, its metadata, and `card` as MODEL_CARD.md. Refuses a result
    over MAX_PACKAGED_BYTES (the package must stay installable)."""
    import torch
    from safetensors.torch import save_file

    from mupad.applications.train_tiles import _resolve_checkpoint
    from mupad.config import save_json
    from mupad.models import SiT

    model_dir, metadata = _resolve_checkpoint(Path(run))
    model = SiT.from_pretrained(model_dir)
    out = Path(out)
    with atomic_directory(out) as tmp:
        state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt", "library": "mupad"})
        save_json(model.config, tmp / "config.json")
        record = {**metadata, **dict(extra or {}), "source": str(model_dir)}
        (tmp / METADATA_NAME).write_text(json.dumps(record, indent=1) + "\n")
        (tmp / MODEL_CARD_NAME).write_text(card)
        size = sum(p.stat().st_size for p in tmp.iterdir())
        if size > MAX_PACKAGED_BYTES:
            raise DefaultModelError(
                f"the packaged model would take {size / 2**20:.1f} MiB, over the "
                f"{MAX_PACKAGED_BYTES / 2**20:.0f} MiB limit; export a smaller model"
            )
    return out
