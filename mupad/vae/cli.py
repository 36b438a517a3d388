"""`mupad vae ...`: train a pathology AutoencoderKL on tiles, and score one (mounted as `vae`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from mupad.commands.errors import MupadGroup
from mupad.data.tiles import load_image_tiles
from mupad.precision import PrecisionChoice, resolve_precision
from mupad.vae.config import VAETrainConfig
from mupad.vae.model import vae_preset_names

_DEFAULT = VAETrainConfig()

vae_app = typer.Typer(
    cls=MupadGroup,
    help="A pathology VAE (diffusers AutoencoderKL) trained from scratch on H&E tiles.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
console = Console(stderr=True)


@vae_app.command()
def train(
    data: Annotated[
        list[Path],
        typer.Option(help="Tile folder (flat or <class>/ subfolders); repeat for several"),
    ],
    out: Annotated[Path, typer.Option(help="Run folder (re-run the same command to resume)")],
    eval_data: Annotated[
        list[Path] | None,
        typer.Option(help="Held-out tile folder(s); default: a fixed fraction of --data"),
    ] = None,
    preset: Annotated[
        str, typer.Option(help="VAE preset: " + ", ".join(vae_preset_names()))
    ] = _DEFAULT.preset,
    steps: Annotated[int, typer.Option(help="Optimiser steps")] = _DEFAULT.steps,
    batch_size: Annotated[int, typer.Option(help="Crops per step")] = _DEFAULT.batch_size,
    crop: Annotated[int, typer.Option(help="Crop side in pixels (multiple of 8)")] = _DEFAULT.crop,
    lr: Annotated[float, typer.Option(help="AdamW learning rate")] = _DEFAULT.learning_rate,
    kl_weight: Annotated[
        float, typer.Option(help="KL weight (per latent element)")
    ] = _DEFAULT.kl_weight,
    mse_weight: Annotated[float, typer.Option(help="MSE weight added to L1")] = _DEFAULT.mse_weight,
    ema_decay: Annotated[float, typer.Option(help="EMA decay; 0 = off")] = _DEFAULT.ema_decay,
    precision: Annotated[
        PrecisionChoice,
        typer.Option(help="auto: bf16 autocast where the hardware has native bf16, else fp32"),
    ] = PrecisionChoice.AUTO,
    eval_every: Annotated[
        int, typer.Option(help="Held-out PSNR/SSIM every N steps; 0 = end only")
    ] = _DEFAULT.eval_every,
    checkpoint_every: int = _DEFAULT.checkpoint_every,
    seed: int = _DEFAULT.seed,
    progress: Annotated[bool, typer.Option(help="Show a progress bar")] = True,
) -> None:
    """Train (or resume) an AutoencoderKL; writes OUT/vae (diffusers folder) and OUT/metrics.json."""
    from mupad.vae.train import train_vae

    config = VAETrainConfig(
        preset=preset,
        steps=steps,
        batch_size=batch_size,
        crop=crop,
        learning_rate=lr,
        kl_weight=kl_weight,
        mse_weight=mse_weight,
        ema_decay=ema_decay,
        precision=resolve_precision(precision),  # the device train_vae picks: auto
        eval_every=eval_every,
        checkpoint_every=checkpoint_every,
        seed=seed,
    )
    result = train_vae(data, out, config, eval_data=eval_data or None, progress=progress)
    typer.echo(json.dumps(result.metrics, indent=2))
    console.print(f"[green]saved[/green] {result.vae_dir}")


@vae_app.command("eval")
def evaluate(
    vae: Annotated[
        Path, typer.Option(help="AutoencoderKL folder (diffusers format) or a run folder")
    ],
    data: Annotated[list[Path], typer.Option(help="Tile folder(s) to reconstruct")],
    out: Annotated[Path | None, typer.Option(help="Also write the JSON here")] = None,
) -> None:
    """Held-out reconstruction PSNR / SSIM of a VAE (and of bicubic down/up by its factor), as JSON."""
    from mupad.fileio import atomic_write_text
    from mupad.latents import AutoencoderKLCodec
    from mupad.vae.train import concat_tiles, evaluate_vae

    codec = AutoencoderKLCodec(vae)
    tiles = concat_tiles([load_image_tiles(folder) for folder in data])
    metrics = evaluate_vae(codec.vae, tiles.images)
    text = json.dumps(metrics, indent=2)
    if out is not None:
        atomic_write_text(out, text + "\n")
    typer.echo(text)
