"""`mupad ...` subcommands: parse options -> build configs -> one library call each."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from mupad.config import (
    CrossAttentionKind,
    DemoConfig,
    GuidanceConfig,
    GuidanceMode,
    GuidanceScheduleKind,
    Precision,
    SampleConfig,
    SamplerKind,
    TrainConfig,
    model_preset,
    model_preset_names,
)

_DEMO = DemoConfig()

app = typer.Typer(
    help="MUPAD: multimodal pathology diffusion (H&E from image, text and RNA conditions).",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
console = Console()


def _mount_subcommands() -> None:
    """Command groups that live next to their library code."""
    from mupad.data.prepare_cli import prepare
    from mupad.omics.cli import omics_app
    from mupad.omics.st_cli import st_app
    from mupad.vae.cli import vae_app

    app.command("prepare")(prepare)
    app.add_typer(omics_app, name="omics")
    app.add_typer(st_app, name="st")
    app.add_typer(vae_app, name="vae")


_mount_subcommands()


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Output folder")] = Path("runs/demo"),
    steps: Annotated[int, typer.Option(help="Training steps")] = _DEMO.steps,
    batch_size: Annotated[int, typer.Option(help="Crops per step")] = _DEMO.batch_size,
    sample_steps: Annotated[int, typer.Option(help="Sampler steps for the grids")] = _DEMO.sample_steps,
    seed: int = _DEMO.seed,
) -> None:
    """Train a small text-conditioned model on the bundled H&E tiles and write a report."""
    from mupad.applications.demo import run_demo

    index = run_demo(
        out, DemoConfig(steps=steps, batch_size=batch_size, sample_steps=sample_steps, seed=seed)
    )
    console.print(f"[green]done[/green]: open {index}")


@app.command()
def train(
    out: Annotated[Path, typer.Option(help="Run folder (re-run the same command to resume)")],
    data: Annotated[
        Path | None, typer.Option(help="Tile folder: <data>/<class_name>/<tile>.png")
    ] = None,
    shards: Annotated[
        Path | None,
        typer.Option(help="Shard folder written by `mupad prepare` (cached latents and tokens)"),
    ] = None,
    preset: Annotated[str, typer.Option(help="Model preset: " + ", ".join(model_preset_names()))] = "S/4",
    crop: Annotated[int, typer.Option(help="Training crop size in pixels")] = 64,
    latents: Annotated[
        str, typer.Option(help="'identity' (pixel space) or a local AutoencoderKL folder")
    ] = "identity",
    cross_attention: CrossAttentionKind = CrossAttentionKind.DECOUPLED,
    text_encoder: Annotated[str, typer.Option(help="Caption encoder name")] = "minilm",
    steps: int = 10_000,
    batch_size: int = 32,
    lr: float = 1e-4,
    warmup_steps: int = 0,
    ema_decay: float = 0.9999,
    precision: Precision = Precision.BF16,
    condition_dropout: float = 0.1,
    checkpoint_every: int = 1000,
    seed: int = 0,
) -> None:
    """Train on a labelled tile folder (class name -> caption) or on prepared shards."""
    if (data is None) == (shards is None):
        raise typer.BadParameter("give exactly one of --data (a tile folder) or --shards")

    train_config = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        learning_rate=lr,
        warmup_steps=warmup_steps,
        ema_decay=ema_decay,
        precision=precision,
        condition_dropout=condition_dropout,
        checkpoint_every=checkpoint_every,
        seed=seed,
    )
    if shards is not None:
        from mupad.applications.train_shards import train_on_shards

        result = train_on_shards(
            shards,
            out,
            train_config=train_config,
            preset=preset,
            cross_attention=cross_attention,
            latents=None if latents == "identity" else latents,
            text_encoder=text_encoder,
        ).result
    else:
        from mupad.applications.train_tiles import train_on_tile_folder

        result = train_on_tile_folder(
            data,
            out,
            preset=preset,
            crop=crop,
            latents=latents,
            cross_attention=cross_attention,
            text_encoder=text_encoder,
            train_config=train_config,
        ).result
    console.print(f"[green]trained[/green] to step {result.step}: {result.checkpoint}")


@app.command()
def sample(
    checkpoint: Annotated[Path, typer.Option(help="A checkpoint folder (or its ema/ subfolder)")],
    prompt: Annotated[list[str], typer.Option(help="Caption(s); repeat for several")],
    out: Annotated[Path, typer.Option(help="PNG grid to write")] = Path("samples.png"),
    num: Annotated[int, typer.Option(help="Images per prompt")] = 8,
    sampler: SamplerKind = SamplerKind.SDE,
    steps: int = 250,
    guidance_schedule: GuidanceScheduleKind = GuidanceScheduleKind.LINEAR,
    guidance_start: float = 2.5,
    guidance_end: float = 0.0,
    guidance_mode: GuidanceMode = GuidanceMode.JOINT,
    seed: int = 0,
) -> None:
    """Generate a grid of images for text prompts from a trained checkpoint."""
    from mupad.applications.train_tiles import sample_prompts

    sample_config = SampleConfig(
        sampler=sampler,
        num_steps=steps,
        guidance=GuidanceConfig(
            schedule=guidance_schedule,
            start=guidance_start,
            end=guidance_end,
            mode=guidance_mode,
        ),
        seed=seed,
    )
    path = sample_prompts(checkpoint, prompt, num, sample_config, out)
    console.print(f"[green]wrote[/green] {path} (+ {path.with_suffix('.json').name})")


@app.command()
def presets() -> None:
    """List the model presets with their sizes."""
    table = Table("preset", "hidden", "depth", "heads", "patch")
    for name in model_preset_names():
        c = model_preset(name)
        table.add_row(name, str(c.hidden_size), str(c.depth), str(c.num_heads), str(c.patch_size))
    console.print(table)


@app.command()
def info(checkpoint: Path) -> None:
    """Print the configs stored with a checkpoint."""
    from mupad.models.sit import CONFIG_NAME

    for name in (CONFIG_NAME, "train_state.json"):
        path = checkpoint / name
        if path.exists():
            console.rule(name)
            console.print_json(json.dumps(json.loads(path.read_text())))


if __name__ == "__main__":  # pragma: no cover
    app()
