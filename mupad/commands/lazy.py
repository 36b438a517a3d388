"""A command group whose subcommands are imported only when they run.

`mupad --help` lists every command with its one-line help from `LazyCommand.help`, without
importing the command's module (and so torch, pandas, scipy, ...); `mupad NAME ...`
imports `LazyCommand.target` and runs it. tests/test_cli_help.py checks that each listed
help line is the command's own.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import typer
import typer.core

from mupad.commands.errors import MupadGroup


@dataclass(frozen=True)
class LazyCommand:
    target: str  # "package.module:attribute": a typer.Typer (a group) or a command function
    help: str  # the one line `mupad --help` shows (the first line of the command's help)

    def load(self, name: str) -> typer.core.TyperCommand | typer.core.TyperGroup:
        """Import the target and build its click command, named `name`."""
        module_name, _, attribute = self.target.partition(":")
        target = getattr(importlib.import_module(module_name), attribute)
        if isinstance(target, typer.Typer):
            command: Any = typer.main.get_group(target)
        else:
            holder = typer.Typer(add_completion=False)
            holder.command(name)(target)
            command = typer.main.get_command(holder)
        command.name = name
        return command


class LazyGroup(MupadGroup):
    """A MupadGroup that also offers the `lazy_commands` of its subclass."""

    lazy_commands: ClassVar[dict[str, LazyCommand]] = {}

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._listing = False

    def list_commands(self, ctx: typer.Context) -> list[str]:
        eager = super().list_commands(ctx)
        return [*eager, *(name for name in self.lazy_commands if name not in eager)]

    def get_command(self, ctx: typer.Context, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        entry = self.lazy_commands.get(cmd_name)
        if command is not None or entry is None:
            return command
        if self._listing:  # the help page needs the name and one line only
            return typer.core.TyperCommand(cmd_name, help=entry.help)
        command = entry.load(cmd_name)
        self.add_command(command, cmd_name)
        return command

    def format_help(self, ctx: typer.Context, formatter: Any) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False


def command_paths(command: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every command path under a click group, itself first: (), ("omics",), ("omics",
    "score"), ... (loads every lazy command)."""
    yield prefix
    for name in getattr(command, "list_commands", lambda ctx: [])(None):
        yield from command_paths(command.get_command(None, name), (*prefix, name))
