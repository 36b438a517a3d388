"""`mupad prepare`: the command-line face of `mupad.data.prepare.prepare_dataset`.

Registered by mupad.cli with `app.command("prepare")(prepare)`. Run it under torchrun to
spread the sources over processes (each rank writes its own shards):

    mupad prepare slides/ out/ --latents vae/ --text-encoder minilm
    torchrun --nproc-per-node 4 -m mupad.cli prepare slides/ out/ --latents vae/
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from mupad.data.prepare import FEATURE_DTYPES, PrepareConfig, dist_env, prepare_dataset
from mupad.data.prepare_sources import PAIRED_COLUMNS, SourceKind

console = Console(stderr=True)

_PAIRED_HELP = "; ".join(f"{name}: {text}" for name, text in PAIRED_COLUMNS.items())


def prepare(
    input_path: Annotated[
        Path,
        typer.Argument(
            metavar="INPUT",
            help="A folder of slides, a tile folder (<class_name>/<tile>.png) or a paired-files "
            f"CSV (columns: {_PAIRED_HELP})",
        ),
    ],
    out: Annotated[Path, typer.Argument(help="Output folder (re-run the same command to resume)")],
    kind: Annotated[
        SourceKind,
        typer.Option(help="Input kind; auto: .csv -> paired, slide files -> slides, else tiles"),
    ] = SourceKind.AUTO,
    tile_size: Annotated[int, typer.Option(help="Tile side in px (tile images are resized)")] = 256,
    target_mpp: Annotated[float, typer.Option(help="Slide tiles' resolution, µm/px")] = 0.5,
    min_tissue: Annotated[float, typer.Option(help="Min. tissue fraction of a slide tile")] = 0.5,
    slide_mpp: Annotated[
        float | None, typer.Option(help="µm/px of slides that do not record it")
    ] = None,
    tile_mpp: Annotated[
        float | None, typer.Option(help="µm/px of tile images, stored as `mpp` if given")
    ] = None,
    captions: Annotated[
        Path | None,
        typer.Option(help="JSON: class name or '<class>/<file>' -> caption [default: class name]"),
    ] = None,
    latents: Annotated[
        str | None,
        typer.Option(help="AutoencoderKL folder: cache `latent_moments` instead of pixels"),
    ] = None,
    keep_pixels: Annotated[
        bool, typer.Option(help="With --latents, store the uint8 `image` as well")
    ] = False,
    feature_dtype: Annotated[
        str, typer.Option(help=f"dtype of cached latents/tokens: {', '.join(FEATURE_DTYPES)}")
    ] = "float16",
    text_encoder: Annotated[
        str | None, typer.Option(help="Cache caption tokens with this encoder (e.g. minilm)")
    ] = None,
    text_max_length: Annotated[int, typer.Option(help="Cached caption tokens per record")] = 77,
    image_encoder: Annotated[
        str | None,
        typer.Option(help="Cache image tokens / teacher features (e.g. inception, uni)"),
    ] = None,
    rna_gene_sets: Annotated[
        str | None,
        typer.Option(
            help="Paired CSV with RNA: the GMT its pathway scores were computed from ('bundled' "
            "for mupad's own collection), recorded so generation can check its inputs"
        ),
    ] = None,
    coords: Annotated[
        Path | None,
        typer.Option(
            help="Slides: tile at the patches of a TRIDENT/CLAM coords .h5, or a folder of "
            "<slide>.h5 / <slide>_patches.h5, instead of a tissue grid"
        ),
    ] = None,
    export_features: Annotated[
        Path | None,
        typer.Option(
            help="With --image-encoder: also write DIR/<encoder>/<slide>.h5 (features, coords) "
            "for TRIDENT/CLAM MIL pipelines"
        ),
    ] = None,
    shard_size: Annotated[int, typer.Option(help="Records per shard")] = 1024,
    tiles_per_source: Annotated[
        int, typer.Option(help="Tile-folder / CSV images per unit of work")
    ] = 4096,
    batch_size: Annotated[int, typer.Option(help="Tiles per encoder batch")] = 32,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1, ...")] = "auto",
    progress: Annotated[bool, typer.Option(help="Show progress bars")] = True,
) -> None:
    """Turn slides / tiles / paired files into training shards (resumable, torchrun-aware)."""
    config = PrepareConfig(
        kind=kind,
        tile_size=tile_size,
        target_mpp=target_mpp,
        min_tissue=min_tissue,
        slide_mpp=slide_mpp,
        tile_mpp=tile_mpp,
        captions=captions,
        latents=latents,
        keep_pixels=keep_pixels,
        feature_dtype=feature_dtype,
        text_encoder=text_encoder,
        text_max_length=text_max_length,
        image_encoder=image_encoder,
        rna_gene_sets=rna_gene_sets,
        coords=coords,
        export_features=export_features,
        shard_size=shard_size,
        tiles_per_source=tiles_per_source,
        batch_size=batch_size,
        device=device,
        progress=progress,
    )
    summary = prepare_dataset(input_path, out, config)

    if dist_env().rank != 0:
        return
    console.print(
        f"[green]prepared[/green] {out}: {summary.tiles_total} tiles in total "
        f"({summary.tiles_written} written now); sources: {len(summary.written)} written, "
        f"{len(summary.already_done)} already done, {len(summary.empty)} empty, "
        f"{len(summary.failed)} failed; {summary.corrupt_count} corrupt inputs skipped"
    )
    for failure in summary.failed:
        console.print(f"[yellow]failed[/yellow] {failure['path']}: {failure['reason']}")
    if summary.corrupt_count:
        console.print(f"details: {out / 'summary.json'}")
