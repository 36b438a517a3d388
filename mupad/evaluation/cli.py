"""`mupad evaluate`: one subcommand per evaluation, each writing metrics.json + report.html.

The commands live next to their metrics (`mupad/evaluation/<task>_cli.py`, each with a
`register(app)`); this module only gathers them into the group.
"""

from __future__ import annotations

import importlib

import typer

from mupad.commands.errors import MupadGroup

evaluate_app = typer.Typer(
    cls=MupadGroup,
    help="Evaluate generated or translated images: FID/KID, similarity, mIF correlation, cell "
    "types, biomarker AUC, few-shot and retrieval benchmarks, RNA/ST spot matching. Each "
    "writes metrics.json and report.html.",
    no_args_is_help=True,
)

_COMMAND_MODULES = (
    "images_cli",
    "celltypes_cli",
    "mif_cli",
    "biomarker_cli",
    "fewshot_cli",
    "retrieval_cli",
    "generator_cli",
    "rna_cli",
)

for _name in _COMMAND_MODULES:
    importlib.import_module(f"mupad.evaluation.{_name}").register(evaluate_app)
