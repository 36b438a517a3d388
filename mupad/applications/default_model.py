"""The model `mupad generate`, `mupad augment` and `mupad serve` use when no --checkpoint is
given: the last finished `mupad demo` run.

No trained checkpoint small enough to ship with the package exists (the demo model is 9.4 M
parameters, ~38 MB in fp32), so instead `mupad demo` trains one on the bundled tiles in a
few CPU minutes and records its run folder in `$MUPAD_CACHE/demo_run.json`; the commands
then find it from any working directory.
"""

from __future__ import annotations

import json
from pathlib import Path

from mupad.conditioning.registry import cache_root
from mupad.errors import MupadError
from mupad.fileio import atomic_write_text

POINTER_NAME = "demo_run.json"


class DefaultModelError(MupadError, FileNotFoundError):
    """No --checkpoint was given and no demo run is recorded (or it has gone)."""


def pointer_path() -> Path:
    return cache_root() / POINTER_NAME


def remember_demo_run(run: str | Path) -> Path:
    """Record `run` as the default model; returns the pointer file."""
    path = pointer_path()
    atomic_write_text(path, json.dumps({"run": str(Path(run).resolve())}, indent=1) + "\n")
    return path


def default_checkpoint() -> Path:
    """The recorded demo run, or DefaultModelError saying how to get one."""
    path = pointer_path()
    hint = (
        "give --checkpoint RUN, or run `mupad demo` once: it trains a small model on the "
        "bundled H&E tiles (a few CPU minutes) and remembers it as the default"
    )
    if not path.is_file():
        raise DefaultModelError(f"no checkpoint given and no demo model recorded ({path}); {hint}")
    try:
        run = Path(json.loads(path.read_text())["run"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DefaultModelError(f"{path} is unreadable ({error}); {hint}") from None
    if not run.is_dir():
        raise DefaultModelError(f"the recorded demo model {run} no longer exists; {hint}")
    return run
