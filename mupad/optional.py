"""Imports of packages that only an extra of mupad installs (`pip install "mupad[serve]"`).

Every optional third-party import goes through `require_extra`, so a missing package ends the
command with one line naming the extra to install instead of a ModuleNotFoundError, and
tests/test_dependencies.py can check that each optional package belongs to the extra named.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType

from mupad.errors import MupadError


class MissingExtraError(MupadError, ImportError):
    """A package of one of mupad's extras is not installed; the message says which extra."""


def import_or_explain(module: str, explain: Callable[[str, ImportError], MupadError]) -> ModuleType:
    """Import `module`, or raise `explain(missing module name, the ImportError)`."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise explain(error.name or module, error) from error


def require_extra(module: str, *, extra: str, needed_for: str) -> ModuleType:
    """Import `module` (e.g. "fastapi"), or raise MissingExtraError telling the user to
    `pip install "mupad[<extra>]"` for `needed_for` (e.g. "mupad serve")."""

    def explain(missing: str, error: ImportError) -> MupadError:
        return MissingExtraError(
            f"{needed_for} needs the package {missing!r} of the {extra!r} extra, which is not "
            f'installed: pip install "mupad[{extra}]"'
        )

    return import_or_explain(module, explain)
