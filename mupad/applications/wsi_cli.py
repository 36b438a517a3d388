"""`mupad wsi ...`: translate whole slides into pyramidal (OME-)TIFFs (mounted as `wsi`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from mupad.applications.wsi import (
    DEFAULT_MIN_TISSUE,
    DEFAULT_OVERLAP_PX,
    OutputDtype,
    TranslatorOptions,
    build_translator,
    check_output,
    resolve_translator_factory,
    translate_slide,
    translator_names,
)
from mupad.commands.errors import MupadGroup
from mupad.data.wsi.pyramid_writer import TiffCompression

wsi_app = typer.Typer(
    cls=MupadGroup,
    help="Whole-slide translation (H&E -> IHC / mIF, FF -> FFPE, identity) into pyramidal TIFFs.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
console = Console(stderr=True)


@wsi_app.callback()
def _wsi() -> None:
    """Whole-slide commands."""


def _parse_options(pairs: list[str] | None) -> dict[str, str]:
    extra = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--option takes KEY=VALUE, got {pair!r}")
        extra[key.strip()] = value.strip()
    return extra


@wsi_app.command()
def translate(
    slide: Annotated[Path, typer.Argument(help="Slide: .svs/.ndpi/.mrxs/(OME-)TIFF/PNG/JPEG ...")],
    out: Annotated[
        Path,
        typer.Option(
            help="Output: *.ome.tif = OME-TIFF (QuPath/Bio-Formats; SubIFD pyramid); other "
            "*.tif = generic tiled TIFF (OpenSlide reads every level; RGB only)"
        ),
    ],
    translator: Annotated[
        str, typer.Option(help="Translator: " + ", ".join(translator_names()))
    ] = "identity",
    checkpoint: Annotated[
        Path | None, typer.Option(help="Checkpoint folder/file the translator loads")
    ] = None,
    overlap: Annotated[
        int, typer.Option(help="Tile overlap in px at the translator's µm/px (<= tile size / 2)")
    ] = DEFAULT_OVERLAP_PX,
    slide_mpp: Annotated[
        float | None,
        typer.Option(help="Slide level-0 µm/px (when the file lacks it or records it wrongly)"),
    ] = None,
    mpp: Annotated[
        float | None,
        typer.Option(help="µm/px the translator works at (identity: output µm/px; default native)"),
    ] = None,
    tile_size: Annotated[
        int | None, typer.Option(help="Translator tile size in px (default: the translator's)")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Tiles per translator call (default: the translator's)")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 ...")] = "auto",
    option: Annotated[
        list[str] | None,
        typer.Option(help="Translator-specific KEY=VALUE (repeatable), e.g. steps=50"),
    ] = None,
    tissue_only: Annotated[
        bool,
        typer.Option(
            "--tissue-only/--all-tiles",
            help="Fill glass tiles with --background without running the model",
        ),
    ] = True,
    min_tissue: Annotated[
        float, typer.Option(help="Tissue fraction from which a tile is translated")
    ] = DEFAULT_MIN_TISSUE,
    background: Annotated[
        str | None,
        typer.Option(
            help="Background value(s), comma-separated, output units (default: white "
            "for RGB, 0 for channels)"
        ),
    ] = None,
    dtype: Annotated[OutputDtype, typer.Option(help="Output sample type")] = OutputDtype.UINT8,
    compression: Annotated[
        TiffCompression, typer.Option(help="TIFF tile compression")
    ] = TiffCompression.ZLIB,
    progress: Annotated[bool, typer.Option(help="Show a progress bar")] = True,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out file")] = False,
    tissue_geojson: Annotated[
        Path | None,
        typer.Option(
            help="Also write the slide's tissue mask as QuPath GeoJSON annotations (level-0 px)"
        ),
    ] = None,
) -> None:
    """Translate SLIDE tile by tile (overlaps blended without seams) into a pyramidal TIFF."""
    check_output(out, overwrite)  # before a translator model is loaded
    try:
        resolve_translator_factory(translator)
        background_values = (
            None if background is None else [float(v) for v in background.split(",")]
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    options = TranslatorOptions(
        device=device,
        batch_size=batch_size,
        tile_size=tile_size,
        mpp=mpp,
        extra=_parse_options(option),
    )
    model = build_translator(translator, checkpoint, options)
    result = translate_slide(
        slide,
        model,
        out,
        overlap=overlap,
        tissue_only=tissue_only,
        min_tissue=min_tissue,
        background=background_values,
        slide_mpp=slide_mpp,
        out_dtype=dtype,
        compression=compression,
        progress=progress,
        overwrite=overwrite,
    )
    if tissue_geojson is not None:
        from mupad.data.wsi.tissue_geojson import write_tissue_geojson

        written = write_tissue_geojson(slide, tissue_geojson, slide_mpp=slide_mpp)
        console.print(f"[green]wrote[/green] tissue regions to {written}")
    typer.echo(str(result))


@wsi_app.command("translators")
def list_translators() -> None:
    """List the registered translators."""
    for name in translator_names():
        typer.echo(name)
