"""The recipes in recipes/ stay runnable: every script parses, and every `mupad` command and
--option it calls exists in the current command line (a renamed option fails here, not an
hour into somebody's training run)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import typer

from mupad.cli import app

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SCRIPTS = sorted(RECIPES.glob("*.sh"))


def mupad_calls(script: Path) -> list[list[str]]:
    """The argument lists of the `mupad ...` calls in a script (continuations joined)."""
    text = re.sub(r"\\\n\s*", " ", script.read_text())
    calls = []
    for line in text.splitlines():
        line = line.split(" #", 1)[0]
        if line.lstrip().startswith("#"):  # a comment line, not a call
            continue
        for match in re.finditer(r"(?:^|[;&|(]\s*|\s)mupad\s+(.*)", line):
            calls.append(shlex.split(match.group(1).split(")", 1)[0], posix=True))
    return calls


def resolve(arguments: list[str]) -> tuple[Any, list[str]]:
    """Walk the command groups down to the leaf command; return it and the rest."""
    command = typer.main.get_command(app)
    rest = list(arguments)
    # A group is anything with subcommands (typer may bring its own click).
    # Commands mounted lazily are listed and loaded through the group's own methods.
    while hasattr(command, "list_commands") and rest and not rest[0].startswith("-"):
        name = rest.pop(0)
        assert name in command.list_commands(None), f"no command {name!r} under {command.name!r}"
        command = command.get_command(None, name)
    return command, rest


def test_there_are_recipes():
    assert {s.name for s in SCRIPTS} >= {"kather_text_image.sh", "her2st_rna.sh"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_recipe_parses_and_calls_only_existing_commands_and_options(script):
    if shutil.which("bash"):
        check = subprocess.run(
            ["bash", "-n", str(script)], capture_output=True, text=True, check=False
        )
        assert check.returncode == 0, check.stderr
    calls = mupad_calls(script)
    assert calls, f"{script.name} calls no mupad command"
    for arguments in calls:
        command, rest = resolve(arguments)
        known = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
        for token in rest:
            if token.startswith("--"):
                option = token.split("=", 1)[0]
                assert option in known, (
                    f"{script.name}: `mupad {' '.join(arguments[:2])}` has no {option}"
                )
