"""What every `mupad evaluate` command shares: the stderr console, how an input error ends
the command (one red line, exit code 2), comma-separated integer options, and the feature
extractor options."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console(stderr=True)

# Feature-extractor options (names from mupad.evaluation.features).
FeaturesOption = Annotated[
    str, typer.Option(help="Feature extractor: inception, uni, conch, ..., colour")
]
WeightsOption = Annotated[
    Path | None, typer.Option(help="Explicit weights file/folder of the extractor")
]
CacheDirOption = Annotated[
    Path | None, typer.Option(help="Feature cache folder (default $MUPAD_CACHE/features)")
]


def parse_int_list(text: str, option: str) -> tuple[int, ...]:
    """'5,10' -> (5, 10); anything else is a BadParameter naming `option`."""
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise typer.BadParameter(
            f"{option} must be comma-separated integers, got {text!r}"
        ) from None
    if not values:
        raise typer.BadParameter(f"{option} needs at least one value")
    return values
