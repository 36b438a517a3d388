"""The command line's one error path.

Every `mupad` command group is a `MupadGroup`. Whatever a command raises on purpose ends
there as one red line on stderr:

- a `MupadError` (the library's message: what is wrong, which file or option, how to fix
  it) and a click usage error -> exit code 2;
- an OSError about a path (permission denied, a file where a folder should be, disk full,
  ...) -> exit code 2, naming the path;
- Ctrl-C -> exit code 130, with the `Interrupted` message when the work was left resumable.

`--debug` (or MUPAD_DEBUG=1) lets a MupadError or OSError through with its traceback.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar, NoReturn

import typer
import typer.core
from rich.console import Console
from rich.markup import escape

from mupad.errors import Interrupted, MupadError
from mupad.fileio import DEVICE_ERRNOS, PATH_HINTS, describe_os_error

DEBUG_ENV = "MUPAD_DEBUG"
_DEBUG_KEY = "mupad.debug"
INPUT_ERROR_EXIT = 2
INTERRUPTED_EXIT = 130

# click's UsageError (typer vendors click as a private module; BadParameter derives from it)
UsageError: type[Exception] = next(
    base for base in typer.BadParameter.__mro__ if base.__name__ == "UsageError"
)

_console = Console(stderr=True, soft_wrap=True, highlight=False)


def set_debug(ctx: typer.Context, debug: bool) -> None:
    """Record the root `--debug` option for every nested command of this invocation."""
    ctx.meta[_DEBUG_KEY] = debug


def debug_enabled(ctx: typer.Context | None) -> bool:
    """True when tracebacks were asked for (`--debug` or MUPAD_DEBUG=1)."""
    if ctx is not None and ctx.meta.get(_DEBUG_KEY):
        return True
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def one_line(text: str) -> str:
    """`text` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(text.split())


def report(message: str, *, label: str = "error") -> None:
    """Print `label: message` as one red-labelled line on stderr."""
    _console.print(f"[red]{label}[/red]: {escape(one_line(message))}")


def os_error_message(error: OSError) -> str | None:
    """One line naming the path of an OSError a user can fix; None for any other OSError."""
    if error.errno not in PATH_HINTS:
        return None
    if error.filename is None and error.errno not in DEVICE_ERRNOS:
        return None
    return describe_os_error(error)


def usage_message(error: Any) -> str:
    """A click UsageError as one line that says where the help is."""
    message = error.format_message()
    if error.ctx is not None:
        message += f" (see '{error.ctx.command_path} --help')"
    return message


class MupadGroup(typer.core.TyperGroup):
    """A typer group whose commands end through the one error path described above.
    `resumable_commands`: subcommands whose outputs are written atomically and that skip
    finished work when run again (Ctrl-C tells the user so)."""

    resumable_commands: ClassVar[frozenset[str]] = frozenset()

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: typer.Context | None = None,
        **extra: Any,
    ) -> typer.Context:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except UsageError as error:
            _end_usage_error(error)

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UsageError as error:
            _end_usage_error(error)
        except MupadError as error:
            if debug_enabled(ctx):
                raise
            report(str(error))
            raise typer.Exit(INPUT_ERROR_EXIT) from error
        except OSError as error:
            message = os_error_message(error)
            if message is None or debug_enabled(ctx):
                raise
            report(message)
            raise typer.Exit(INPUT_ERROR_EXIT) from error
        except KeyboardInterrupt as error:
            if debug_enabled(ctx):
                raise
            report(self._interruption(ctx, error), label="interrupted")
            raise typer.Exit(INTERRUPTED_EXIT) from error

    def _interruption(self, ctx: typer.Context, error: KeyboardInterrupt) -> str:
        if isinstance(error, Interrupted) and str(error):
            return str(error)
        if ctx.invoked_subcommand in self.resumable_commands:
            return (
                "stopped by Ctrl-C; finished outputs are kept and nothing half-written is "
                "left: run the same command again to continue"
            )
        return "stopped by Ctrl-C"


def _end_usage_error(error: Any) -> NoReturn:
    """Report a usage error as one line and exit with its code; "no arguments" shows the
    help instead (click prints it for NoArgsIsHelpError)."""
    if type(error).__name__ == "NoArgsIsHelpError":
        raise error
    report(usage_message(error))
    raise typer.Exit(error.exit_code) from error
