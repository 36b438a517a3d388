"""`mupad st ...`: spatial transcriptomics commands (mounted by mupad.cli as the `st` group)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from mupad.commands.errors import MupadGroup
from mupad.omics.scoring import ScoringMethod
from mupad.omics.spatial import ImageLevel, SpatialKind, extract_spots
from mupad.omics.spatial.extract import DEFAULT_PATCH_UM, DEFAULT_SIZE

st_app = typer.Typer(
    cls=MupadGroup,
    help="Spatial transcriptomics: spot patches paired with pathway scores.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
console = Console(stderr=True)


@st_app.callback()
def _st() -> None:
    """Spatial transcriptomics: spot patches paired with pathway scores."""


@st_app.command()
def extract(
    folder: Annotated[
        Path,
        typer.Argument(
            help="Space Ranger output folder (outs/ or its parent), a HER2ST or a HEST-1k folder"
        ),
    ],
    out: Annotated[Path, typer.Option(help="Output folder (patches/, scores.csv, manifest.csv)")],
    kind: Annotated[
        SpatialKind | None,
        typer.Option(help="Folder layout; detected from the contents if omitted"),
    ] = None,
    section: Annotated[
        str | None,
        typer.Option(help="HER2ST section (e.g. B4) or HEST sample id, when there are several"),
    ] = None,
    image: Annotated[
        Path | None,
        typer.Option(
            help="Visium: the full-resolution H&E (default: spatial/tissue_hires, then lowres)"
        ),
    ] = None,
    image_level: Annotated[
        ImageLevel | None, typer.Option(help="Visium: force which image the patches come from")
    ] = None,
    patch_um: Annotated[float, typer.Option(help="Patch side in micrometres")] = DEFAULT_PATCH_UM,
    size: Annotated[int, typer.Option(help="Patch side in output pixels")] = DEFAULT_SIZE,
    gene_sets: Annotated[
        Path | None, typer.Option(help="GMT file of gene sets (default: the bundled collection)")
    ] = None,
    method: Annotated[
        ScoringMethod, typer.Option(help="Pathway scoring method")
    ] = ScoringMethod.SSGSEA,
    mpp: Annotated[
        float | None,
        typer.Option(help="µm per full-resolution pixel (overrides scale factors / grid estimate)"),
    ] = None,
    skip_outside: Annotated[
        bool,
        typer.Option(help="Leave out spots whose patch leaves the image (listed in summary.json)"),
    ] = False,
    uppercase_symbols: Annotated[
        bool,
        typer.Option(
            help="Allow mouse-style symbols to match human gene sets by upper case (approximate)"
        ),
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier extraction in --out")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars")] = True,
) -> None:
    """Cut one H&E patch per spot and pair it with the spot's pathway scores."""
    manifest = extract_spots(
        folder,
        out,
        kind=kind,
        section=section,
        image=image,
        image_level=image_level,
        patch_um=patch_um,
        size=size,
        gene_sets=gene_sets,
        method=method,
        mpp=mpp,
        skip_outside=skip_outside,
        uppercase_symbols=uppercase_symbols,
        overwrite=overwrite,
        progress=progress,
    )
    summary = json.loads((manifest.parent / "summary.json").read_text())
    scoring = summary["scoring"]
    console.print(
        f"[green]wrote[/green] {summary['spots_written']} patches "
        f"({summary['patch_um']:g} µm -> {summary['patch_size_px']} px, source "
        f"{summary['source_mpp']:.3f} µm/px) and {scoring['gene_sets_scored']} pathway scores "
        f"per spot ({scoring['gene_sets'] - scoring['gene_sets_scored']} sets left out: too "
        "few genes) "
        f"to {manifest.parent}"
    )
    console.print(
        f"gene overlap: {scoring['genes_overlapping']} of {scoring['genes_in_gene_sets']} "
        f"gene-set genes found ({scoring['symbol_matching']})"
    )
    if summary["skipped"]:
        console.print(
            f"[yellow]skipped[/yellow] {len(summary['skipped'])} spot(s); see summary.json"
        )
    for warning in summary["warnings"]:
        console.print(f"[yellow]warning[/yellow]: {warning}")
