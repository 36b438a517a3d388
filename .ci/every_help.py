"""`mupad ... --help` for every command and subcommand, in this interpreter (CI runs it in a
venv with only the README's install): each must import and answer with exit code 0."""

import sys

import typer
from typer.testing import CliRunner

from mupad.cli import app
from mupad.commands.lazy import command_paths

runner = CliRunner()
paths = list(command_paths(typer.main.get_command(app)))
failed = []
for path in paths:
    result = runner.invoke(app, [*path, "--help"])
    if result.exit_code != 0:
        failed.append(path)
        print(f"mupad {' '.join(path)} --help: exit {result.exit_code}\n{result.output}")
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            print(repr(result.exception))
print(f"{len(paths) - len(failed)} of {len(paths)} commands answer --help")
sys.exit(1 if failed else 0)
