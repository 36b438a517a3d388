"""`mupad --help` imports neither torch, pandas nor scipy; it lists every command with the
command's own one-line help; every command and subcommand answers --help."""

import json
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from mupad.cli import LAZY_COMMANDS, app
from mupad.commands.lazy import command_paths

runner = CliRunner()
HEAVY = ("torch", "pandas", "scipy")


def first_paragraph(text: str | None) -> str:
    return " ".join((text or "").strip().split("\n\n")[0].split())


def heavy_modules_after(*code: str) -> tuple[list[str], str]:
    """Run `code` in a fresh interpreter; the heavy libraries it imported, and its stdout."""
    script = "\n".join(
        [*code, f"import sys; print('HEAVY', [m for m in {HEAVY!r} if m in sys.modules])"]
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("HEAVY "), done.stdout
    return json.loads(last.removeprefix("HEAVY ").replace("'", '"')), done.stdout


def test_root_help_imports_no_heavy_library():
    imported, _ = heavy_modules_after(
        "from typer.testing import CliRunner",
        "from mupad.cli import app",
        "assert CliRunner().invoke(app, ['--help']).exit_code == 0",
    )
    assert imported == []


def test_the_entry_point_help_imports_no_heavy_library():
    imported, output = heavy_modules_after(
        "import runpy, sys",
        "sys.argv = ['mupad', '--help']",
        "try:",
        "    runpy.run_module('mupad.cli', run_name='__main__')",
        "except SystemExit as stop:",
        "    assert stop.code in (0, None), stop.code",
    )
    assert imported == []
    assert "generate" in output and "evaluate" in output


def test_root_help_lists_every_command_with_its_own_help_line():
    result = runner.invoke(app, ["--help"], terminal_width=200)
    assert result.exit_code == 0
    root = typer.main.get_command(app)
    for name in root.list_commands(None):
        assert f" {name} " in result.output, name
    for name, entry in LAZY_COMMANDS.items():
        assert first_paragraph(entry.help) == first_paragraph(entry.load(name).help), name


@pytest.mark.parametrize(
    "path",
    [" ".join(p) for p in command_paths(typer.main.get_command(app))],
)
def test_every_command_answers_help(path):
    result = runner.invoke(app, [*path.split(), "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
