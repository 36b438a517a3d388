"""`mupad ffpe ...`: fresh-frozen -> FFPE appearance (mounted as `ffpe`).

mupad ffpe finetune  --ff FF_TILES --ffpe FFPE_TILES --out RUN [--init CHECKPOINT]
mupad ffpe translate --checkpoint RUN --input IMG_OR_DIR --out DIR
                     [--no-injection] [--inject-blocks 0-5] [--inject-fraction 0.5]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from mupad.applications.ff2ffpe import (
    DEFAULT_MAX_SIDE_PX,
    DEFAULT_SOURCE_TEXT,
    DEFAULT_TARGET_TEXT,
    InjectionMode,
)
from mupad.commands.errors import MupadGroup
from mupad.config import SamplerKind, TrainConfig
from mupad.precision import PrecisionChoice, resolve_precision

ffpe_app = typer.Typer(
    cls=MupadGroup,
    help="Fresh frozen -> FFPE: inversion under the source text, regeneration under the target "
    "text with self-attention injected from the source reconstruction.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
console = Console(stderr=True)


@ffpe_app.command()
def finetune(
    ff: Annotated[Path, typer.Option(help="Folder of fresh-frozen tiles (unpaired)")],
    ffpe: Annotated[Path, typer.Option(help="Folder of FFPE tiles (unpaired)")],
    out: Annotated[Path, typer.Option(help="Run folder (re-run the same command to resume)")],
    init: Annotated[
        Path | None,
        typer.Option(help="Pretrained run / checkpoint to start from (its codec and text encoder)"),
    ] = None,
    source_text: Annotated[str, typer.Option(help="Text of the FF domain")] = DEFAULT_SOURCE_TEXT,
    target_text: Annotated[str, typer.Option(help="Text of the FFPE domain")] = DEFAULT_TARGET_TEXT,
    preset: Annotated[str, typer.Option(help="Model preset when not --init")] = "S/4",
    crop: Annotated[int, typer.Option(help="Training crop size in pixels")] = 64,
    latents: Annotated[
        str | None,
        typer.Option(help="'identity' or a local AutoencoderKL folder (default: --init's)"),
    ] = None,
    text_encoder: Annotated[
        str | None, typer.Option(help="Text encoder name (default: --init's, else minilm)")
    ] = None,
    steps: int = 2000,
    batch_size: int = 32,
    lr: float = 1e-4,
    warmup_steps: int = 0,
    ema_decay: float = 0.999,
    condition_dropout: Annotated[
        float, typer.Option(help="Text dropout (for classifier-free guidance)")
    ] = 0.1,
    precision: Annotated[
        PrecisionChoice,
        typer.Option(help="auto: bf16 autocast where the hardware has native bf16, else fp32"),
    ] = PrecisionChoice.AUTO,
    checkpoint_every: int = 500,
    seed: int = 0,
    device: Annotated[str, typer.Option(help="auto (a GPU when present), cpu, cuda")] = "auto",
    progress: bool = True,
) -> None:
    """Teach a model the two domain texts from unpaired FF and FFPE tile folders."""
    from mupad.applications.ff2ffpe import finetune_domains
    from mupad.training import distributed

    config = TrainConfig(
        steps=steps, batch_size=batch_size, learning_rate=lr, warmup_steps=warmup_steps,
        ema_decay=ema_decay, condition_dropout=condition_dropout,
        precision=resolve_precision(precision, device),
        checkpoint_every=checkpoint_every, seed=seed,
    )  # fmt: skip
    dist = distributed.from_environment(device)
    try:
        run = finetune_domains(
            ff, ffpe, out, train_config=config, init_from=init, source_text=source_text,
            target_text=target_text, preset=preset, crop=crop, latents=latents,
            text_encoder=text_encoder, dist=dist, progress=progress,
        )  # fmt: skip
    finally:
        distributed.shutdown(dist)
    if dist.is_main:
        result = run.result
        console.print(
            f"[green]trained[/green] {out}: step {result.step}, loss {result.last_loss:.4f}"
        )


@ffpe_app.command()
def translate(
    checkpoint: Annotated[Path, typer.Option(help="Fine-tuned run / checkpoint / model folder")],
    input: Annotated[Path, typer.Option("--input", help="An FF image or a folder of images")],
    out: Annotated[Path, typer.Option(help="Output folder: one PNG + JSON sidecar per image")],
    injection: Annotated[
        bool, typer.Option("--injection/--no-injection", help="Inject source self-attention")
    ] = True,
    inject_blocks: Annotated[
        str, typer.Option(help="0-based blocks to inject: all, none, 0-5, 0,2,4")
    ] = "all",
    inject_fraction: Annotated[
        float, typer.Option(help="Fraction of sampling steps (from the noisy end) that inject")
    ] = 0.5,
    inject_mode: Annotated[
        InjectionMode, typer.Option(help="kv: copy k,v; maps: copy q,k (the attention maps)")
    ] = InjectionMode.KV,
    steps: Annotated[int, typer.Option(help="ODE steps of inversion and regeneration")] = 50,
    sampler: Annotated[SamplerKind, typer.Option(help="euler or heun")] = SamplerKind.EULER,
    strength: Annotated[
        float, typer.Option(help="Invert up to this time (1 = pure noise; lower keeps more)")
    ] = 1.0,
    guidance: Annotated[float, typer.Option(help="Constant CFG scale of the target pass")] = 0.0,
    source_text: Annotated[str | None, typer.Option(help="Default: the run's FF text")] = None,
    target_text: Annotated[str | None, typer.Option(help="Default: the run's FFPE text")] = None,
    text_encoder: Annotated[str | None, typer.Option(help="Default: the run's")] = None,
    latents: Annotated[str | None, typer.Option(help="Default: the run's codec")] = None,
    check_reconstruction: Annotated[
        bool,
        typer.Option(help="Also reconstruct under the source text; its H-SSIM goes in the sidecar"),
    ] = False,
    batch_size: int = 8,
    max_side: Annotated[
        int, typer.Option(help="Refuse images larger than this (use `mupad wsi translate`)")
    ] = DEFAULT_MAX_SIDE_PX,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda")] = "auto",
    progress: bool = True,
) -> None:
    """Translate FF images into FFPE appearance (PNG + sidecar JSON each, summary.json)."""
    from mupad.applications.ff2ffpe import (
        FFPESettings,
        FFPETranslator,
        domain_texts,
        guidance_config,
        load_ffpe_model,
        parse_blocks,
        resolve_device,
        translate_files,
    )
    from mupad.applications.provenance import file_sha256
    from mupad.models.sit import WEIGHTS_NAME

    model, metadata, model_dir = load_ffpe_model(checkpoint, resolve_device(device))
    run_source, run_target = domain_texts(metadata)
    settings = FFPESettings(
        source_text=source_text or run_source,
        target_text=target_text or run_target,
        num_steps=steps,
        method=sampler,
        strength=strength,
        inject_blocks=parse_blocks(inject_blocks),
        inject_fraction=inject_fraction if injection else 0.0,
        inject_mode=inject_mode,
        guidance=guidance_config(guidance),
    )
    encoder_name = text_encoder or metadata.get("text_encoder", "minilm")
    codec_name = latents or metadata.get("latents", "identity")
    translator = FFPETranslator(
        model, settings=settings, encoder=encoder_name, codec=codec_name,
        batch_size=batch_size, reconstruct=check_reconstruction,
    )  # fmt: skip
    provenance = {
        "checkpoint": str(checkpoint),
        "model_dir": str(model_dir),
        "weights_sha256": file_sha256(Path(model_dir) / WEIGHTS_NAME),
        "text_encoder": encoder_name,
        "latents": codec_name,
    }
    result = translate_files(
        translator, input, out, max_side=max_side, provenance=provenance, progress=progress
    )
    mean = sum(result.ssim) / len(result.ssim)
    console.print(
        f"[green]wrote[/green] {len(result.outputs)} images to {out} in {result.seconds:.1f} s "
        f"(hematoxylin SSIM input vs output: mean {mean:.3f})"
    )
    typer.echo(json.dumps({"out": str(out), "num_images": len(result.outputs), "ssim_mean": mean}))
