"""`mupad mif ...`: H&E -> multiplex immunofluorescence (mounted as `mif`).

mupad mif train    --data DIR --markers CD3,CD8,... --out RUN
mupad mif apply    --checkpoint RUN --he IMG_OR_DIR --out DIR
mupad mif evaluate --checkpoint RUN --data DIR [--out metrics.json]

Data layout (`--data DIR`): paired, co-registered, equal-sized square tiles

    DIR/he/<id>.png            RGB H&E tile (.png/.jpg/.tif)
    DIR/mif/<id>.tif           the K-channel mIF stack, (K, S, S) or (S, S, K), channels in
                               the order of --markers (uint8/uint16/float)

`apply` writes, per input image, `<stem>.tif` (a float32 OME-TIFF, one channel per marker,
named, intensities in [0, 1]) and `<stem>.json` (source, markers, intensity scales,
checkpoint, sampler); whole slides go through `mupad wsi translate --translator he2mif`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from mupad.applications.he2mif import IntensityNormalization
from mupad.commands.errors import MupadGroup
from mupad.config import (
    GuidanceConfig,
    GuidanceScheduleKind,
    SampleConfig,
    SamplerKind,
    TrainConfig,
)
from mupad.precision import PrecisionChoice, resolve_precision

mif_app = typer.Typer(
    cls=MupadGroup,
    help="H&E -> multiplex immunofluorescence: one intensity map per marker from H&E tiles.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
console = Console(stderr=True)

_DEFAULTS = TrainConfig()


def _without_nan(value):
    """NaN (an undefined PCC) -> None, so the JSON stays standard."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _without_nan(item) for key, item in value.items()}
    return value


def _device(name: str) -> str:
    if name == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _sample_config(
    sampler: SamplerKind,
    steps: int,
    guidance_schedule: GuidanceScheduleKind,
    guidance_start: float,
    guidance_end: float,
    seed: int,
) -> SampleConfig:
    return SampleConfig(
        sampler=sampler,
        num_steps=steps,
        guidance=GuidanceConfig(schedule=guidance_schedule, start=guidance_start, end=guidance_end),
        seed=seed,
    )


@mif_app.command()
def train(
    data: Annotated[Path, typer.Option(help="Folder with he/<id>.png and mif/<id>.tif pairs")],
    markers: Annotated[str, typer.Option(help="Marker names in TIFF channel order: CD3,CD8,...")],
    out: Annotated[Path, typer.Option(help="Run folder (re-run the same command to resume)")],
    latents: Annotated[
        str, typer.Option(help="'identity' (pixel space) or a diffusers AutoencoderKL folder")
    ] = "identity",
    image_encoder: Annotated[
        str, typer.Option(help="Encoder of the H&E patch embeddings (image stream); 'none': off")
    ] = "inception",
    encoder_weights: Annotated[
        Path | None, typer.Option(help="Explicit weights of the image encoder")
    ] = None,
    preset: Annotated[str, typer.Option(help="SiT preset (tiny, S/2, B/2, ...)")] = "S/2",
    patch_size: Annotated[
        int, typer.Option(help="Patch size; 0 = the preset's, doubled while > 32x32 tokens")
    ] = 0,
    normalize: Annotated[
        IntensityNormalization,
        typer.Option(help="dtype: integer / dtype max; percentile: per marker / its percentile"),
    ] = IntensityNormalization.DTYPE,
    percentile: float = 99.9,
    steps: int = 2000,
    batch_size: int = 16,
    lr: float = 1e-4,
    warmup_steps: int = 0,
    ema_decay: float = 0.9999,
    precision: Annotated[
        PrecisionChoice,
        typer.Option(help="auto: bf16 autocast where the hardware has native bf16, else fp32"),
    ] = PrecisionChoice.AUTO,
    condition_dropout: Annotated[
        float, typer.Option(help="Drop rate of the H&E patch embeddings (enables guidance)")
    ] = 0.1,
    grad_accumulation: int = 1,
    checkpoint_every: int = 500,
    augment: Annotated[bool, typer.Option(help="Random flips and quarter turns")] = True,
    mpp: Annotated[float | None, typer.Option(help="µm/px of the tiles, if known")] = None,
    seed: int = 0,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto")] = "auto",
    progress: bool = True,
) -> None:
    """Train an H&E -> mIF SiT: H&E latent concatenated to the noisy marker-group latents,
    H&E patch embeddings through the image cross-attention stream."""
    from mupad.applications.he2mif import load_mif_folder, normalize_intensities, train_mif

    started = time.perf_counter()
    names = [name.strip() for name in markers.split(",")]
    folder = load_mif_folder(data, names)
    unit, scales = normalize_intensities(folder.mif, normalize, percentile)
    config = TrainConfig(
        steps=steps, batch_size=batch_size, learning_rate=lr, warmup_steps=warmup_steps,
        ema_decay=ema_decay, precision=resolve_precision(precision, device),
        condition_dropout=condition_dropout,
        grad_accumulation=grad_accumulation, checkpoint_every=checkpoint_every, seed=seed,
    )  # fmt: skip
    result = train_mif(
        folder.he, unit, names, out, train_config=config, latents=latents,
        image_encoder=image_encoder, encoder_weights=encoder_weights, preset=preset,
        patch_size=patch_size, augment=augment, mpp=mpp, intensity_scales=scales,
        metadata={"data": str(data), "num_pairs": len(folder.ids),
                  "normalize": normalize.value, "percentile": percentile,
                  "mif_dtype": str(folder.mif.dtype)},
        device=_device(device), progress=progress,
    )  # fmt: skip
    console.print(
        f"[green]trained[/green] {out}: {len(folder.ids)} pairs, {len(names)} markers, step "
        f"{result.step}, loss {result.last_loss:.4f}, {time.perf_counter() - started:.0f} s"
    )
    typer.echo(json.dumps({"out": str(out), "step": result.step, "loss": result.last_loss}))


@mif_app.command()
def apply(
    checkpoint: Annotated[Path, typer.Option(help="Run / checkpoint folder from `mif train`")],
    he: Annotated[Path, typer.Option(help="An H&E image, or a folder of H&E images")],
    out: Annotated[Path, typer.Option(help="Output folder: <stem>.tif + <stem>.json per input")],
    sampler: SamplerKind = SamplerKind.SDE,
    steps: int = 250,
    guidance_schedule: GuidanceScheduleKind = GuidanceScheduleKind.LINEAR,
    guidance_start: float = 2.5,
    guidance_end: float = 0.0,
    seed: int = 0,
    batch_size: int = 8,
    encoder_weights: Path | None = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto")] = "auto",
    progress: bool = True,
) -> None:
    """Translate H&E images into K-channel mIF OME-TIFFs (marker-named channels) + sidecars."""
    from mupad.applications.he2mif import MIFTranslator, apply_mif

    translator = MIFTranslator.from_pretrained(
        checkpoint,
        sample_config=_sample_config(
            sampler, steps, guidance_schedule, guidance_start, guidance_end, seed
        ),
        device=_device(device), batch_size=batch_size, encoder_weights=encoder_weights,
    )  # fmt: skip
    result = apply_mif(translator, he, out, provenance={"run": str(checkpoint)}, progress=progress)
    console.print(f"[green]wrote[/green] {len(result.outputs)} mIF stack(s) to {result.out}")
    typer.echo(json.dumps({"out": str(result.out), "num_images": len(result.outputs)}))


@mif_app.command()
def evaluate(
    checkpoint: Annotated[Path, typer.Option(help="Run / checkpoint folder from `mif train`")],
    data: Annotated[Path, typer.Option(help="Held-out pairs, laid out like `mif train --data`")],
    out: Annotated[Path | None, typer.Option(help="Write the metrics here as JSON")] = None,
    sampler: SamplerKind = SamplerKind.SDE,
    steps: int = 250,
    guidance_schedule: GuidanceScheduleKind = GuidanceScheduleKind.LINEAR,
    guidance_start: float = 2.5,
    guidance_end: float = 0.0,
    seed: int = 0,
    batch_size: int = 8,
    encoder_weights: Path | None = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto")] = "auto",
) -> None:
    """Per-marker Pearson correlation of predicted vs true maps, mean over patches."""
    from mupad.applications.he2mif import (
        MIFTranslator,
        apply_intensity_scales,
        evaluate_mif,
        load_mif_folder,
        normalize_intensities,
    )
    from mupad.config import to_dict

    translator = MIFTranslator.from_pretrained(
        checkpoint,
        sample_config=_sample_config(
            sampler, steps, guidance_schedule, guidance_start, guidance_end, seed
        ),
        device=_device(device), batch_size=batch_size, encoder_weights=encoder_weights,
    )  # fmt: skip
    folder = load_mif_folder(data, translator.channel_names)
    scales = translator.metadata.get("intensity_scales")
    if scales:  # the training set's scaling, applied to the held-out stacks
        truth = apply_intensity_scales(folder.mif, scales)
    else:
        truth, _ = normalize_intensities(folder.mif, IntensityNormalization.DTYPE)
    metrics = evaluate_mif(translator, folder.he, truth)
    table = Table(title=f"mean patch PCC over {metrics['num_patches']} patches")
    table.add_column("marker")
    table.add_column("PCC", justify="right")
    table.add_column("undefined", justify="right")
    for name, value in metrics["per_marker"].items():
        table.add_row(name, f"{value:.3f}", str(metrics["num_undefined"][name]))
    table.add_row("mean", f"{metrics['mean']:.3f}", "")
    console.print(table)
    report = {
        **metrics,
        "checkpoint": str(checkpoint),
        "data": str(data),
        "sample_config": to_dict(translator.sample_config),
    }
    text = json.dumps(_without_nan(report), indent=2)
    if out is not None:
        from mupad.fileio import atomic_write_text

        atomic_write_text(out, text + "\n")
    typer.echo(
        json.dumps(_without_nan({"mean_patch_pcc": metrics["mean"], **metrics["per_marker"]}))
    )


__all__ = ["mif_app"]
