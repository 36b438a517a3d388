"""`mupad omics ...`: bulk RNA commands (mounted by mupad.cli as the `omics` group)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from mupad.commands.errors import MupadGroup
from mupad.fileio import atomic_write_text
from mupad.omics.expression import Orientation, read_expression
from mupad.omics.filters import read_gene_list
from mupad.omics.pipeline import expression_to_scores, resolve_gene_sets
from mupad.omics.scoring import DEFAULT_MIN_SIZE, ScoringMethod, SsgseaNormalisation

omics_app = typer.Typer(
    cls=MupadGroup,
    help="Bulk RNA: expression -> pathway scores (the RNA condition).",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
console = Console(stderr=True)
logger = logging.getLogger(__name__)

_SEPARATORS = {".csv": ",", ".tsv": "\t", ".txt": "\t"}


@omics_app.command()
def score(
    expression: Annotated[
        Path,
        typer.Argument(
            help="Expression matrix: .csv/.tsv/.txt (optionally .gz), .parquet or .h5ad; "
            "genes x samples or samples x genes (detected)"
        ),
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Scores file (.csv or .tsv)")],
    gene_sets: Annotated[
        Path | None,
        typer.Option(help="GMT gene-set file [default: bundled WikiPathways 2023 human]"),
    ] = None,
    method: Annotated[ScoringMethod, typer.Option(help="Scoring method")] = ScoringMethod.SSGSEA,
    gene_lengths: Annotated[
        Path | None,
        typer.Option(help="GTF or two-column table (gene, length in bases): TPM instead of CPM"),
    ] = None,
    gene_map: Annotated[
        Path | None,
        typer.Option(help="Ensembl id <-> symbol table (two columns) or GTF, when id kinds differ"),
    ] = None,
    orientation: Annotated[
        Orientation, typer.Option(help="Which axis holds genes")
    ] = Orientation.AUTO,
    normalise: Annotated[
        bool,
        typer.Option(
            help="Counts -> log1p TPM/CPM; --no-normalise for already log-normalised values"
        ),
    ] = True,
    mitochondrial: Annotated[
        bool, typer.Option("--drop-mitochondrial/--keep-mitochondrial", help="Drop MT- genes")
    ] = True,
    housekeeping: Annotated[
        bool,
        typer.Option("--drop-housekeeping/--keep-housekeeping", help="Drop housekeeping genes"),
    ] = True,
    housekeeping_file: Annotated[
        Path | None,
        typer.Option(
            "--housekeeping", help="Housekeeping gene list (one per line) [default: bundled]"
        ),
    ] = None,
    min_size: Annotated[int, typer.Option(help="Min. genes of a set present in the data")] = (
        DEFAULT_MIN_SIZE
    ),
    max_size: Annotated[int | None, typer.Option(help="Max. genes of a set present")] = None,
    normalisation: Annotated[
        SsgseaNormalisation,
        typer.Option(help="ssGSEA scale: universe (ES/N), raw (ES), range (GSVA/gseapy NES)"),
    ] = SsgseaNormalisation.UNIVERSE,
    gene_column: Annotated[
        str | None, typer.Option(help="Table column (or AnnData var column) holding gene ids")
    ] = None,
    layer: Annotated[str | None, typer.Option(help="AnnData layer instead of X")] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars")] = True,
) -> None:
    """Score every gene set for every sample; one output row per sample."""
    separator = _SEPARATORS.get(output.suffix.lower())
    if separator is None:
        raise typer.BadParameter(
            f"must end in .csv or .tsv, got {output.name}", param_hint="--output"
        )
    sets = resolve_gene_sets(gene_sets)
    with console.status(f"reading {expression.name}", spinner="dots"):
        frame = read_expression(
            expression, orientation=orientation, gene_column=gene_column, layer=layer
        )
    console.print(f"{frame.shape[0]} samples x {frame.shape[1]} genes; {len(sets)} gene sets")
    scores = expression_to_scores(
        frame,
        sets,
        gene_lengths,
        method,
        normalise=normalise,
        gene_map=gene_map,
        orientation=Orientation.SAMPLES_X_GENES,
        mitochondrial=mitochondrial,
        housekeeping=read_gene_list(housekeeping_file) if housekeeping_file else housekeeping,
        min_size=min_size,
        max_size=max_size,
        normalisation=normalisation,
        progress=progress,
    )
    atomic_write_text(output, scores.to_csv(sep=separator, index_label="sample"))
    console.print(
        f"[green]wrote[/green] {scores.shape[0]} samples x {scores.shape[1]} gene sets "
        f"({method.value}) to {output}"
    )
