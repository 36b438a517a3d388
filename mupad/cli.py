"""`mupad ...` subcommands: parse options -> build configs -> one library call each."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from mupad.commands.errors import set_debug
from mupad.commands.lazy import LazyCommand, LazyGroup
from mupad.config import (
    AlignmentConfig,
    CrossAttentionKind,
    DemoConfig,
    GuidanceConfig,
    GuidanceMode,
    GuidanceScheduleKind,
    LRScheduleKind,
    Objective,
    ParallelKind,
    Prediction,
    SampleConfig,
    TILE_TIME_SAMPLING,
    SamplerKind,
    TeacherSource,
    TimeSampling,
    TrainConfig,
    model_preset,
    model_preset_names,
)
from mupad.precision import PrecisionChoice, resolve_precision

_DEMO = DemoConfig()

# Commands that live next to their library code, imported only when they run (so that
# `mupad --help` imports neither torch nor pandas); `help` is the line `mupad --help` shows.
LAZY_COMMANDS = {
    "prepare": LazyCommand(
        "mupad.data.prepare_cli:prepare",
        "Turn slides / tiles / paired files into training shards (resumable, torchrun-aware).",
    ),
    "generate": LazyCommand(
        "mupad.applications.generate_cli:generate",
        "Generate H&E images from any subset of text, reference image and RNA/ST conditions.",
    ),
    "augment": LazyCommand(
        "mupad.applications.generate_cli:augment",
        "Few-shot augmentation: N class-consistent variations of every real image.",
    ),
    "serve": LazyCommand(
        "mupad.serve.cli:serve",
        "Serve a page to generate H&E tiles from a checkpoint: caption, reference tile, "
        "expression profile, guidance, steps, seed; tiles download with their sidecar JSON.",
    ),
    "omics": LazyCommand(
        "mupad.omics.cli:omics_app", "Bulk RNA: expression -> pathway scores (the RNA condition)."
    ),
    "st": LazyCommand(
        "mupad.omics.st_cli:st_app",
        "Spatial transcriptomics: spot patches paired with pathway scores.",
    ),
    "vae": LazyCommand(
        "mupad.vae.cli:vae_app",
        "A pathology VAE (diffusers AutoencoderKL) trained from scratch on H&E tiles.",
    ),
    "wsi": LazyCommand(
        "mupad.applications.wsi_cli:wsi_app",
        "Whole-slide translation (H&E -> IHC / mIF, FF -> FFPE, identity) into pyramidal TIFFs.",
    ),
    "mif": LazyCommand(
        "mupad.applications.mif_cli:mif_app",
        "H&E -> multiplex immunofluorescence: one intensity map per marker from H&E tiles.",
    ),
    "ffpe": LazyCommand(
        "mupad.applications.ff2ffpe_cli:ffpe_app",
        "Fresh frozen -> FFPE: inversion under the source text, regeneration under the target "
        "text with self-attention injected from the source reconstruction.",
    ),
    "staining": LazyCommand(
        "mupad.applications.staining_cli:staining_app",
        "H&E -> IHC: a rectified flow from H&E to IHC embeddings + a SiT fine-tuned on IHC.",
    ),
    "study": LazyCommand(
        "mupad.experiments.quality_cli:study_app",
        "Studies that decide the defaults: the generator quality study (equal CPU budget per "
        "arm; border ratio, KID, class accuracy, colour, memorisation).",
    ),
    "evaluate": LazyCommand(
        "mupad.evaluation.cli:evaluate_app",
        "Evaluate generated or translated images: FID/KID, similarity, mIF correlation, cell "
        "types, biomarker AUC, few-shot and retrieval benchmarks, RNA/ST spot matching. Each "
        "writes metrics.json and report.html.",
    ),
}


class RootGroup(LazyGroup):
    lazy_commands = LAZY_COMMANDS
    resumable_commands = frozenset({"prepare", "generate", "augment"})


app = typer.Typer(
    cls=RootGroup,
    help="MUPAD: multimodal pathology diffusion (H&E from image, text and RNA conditions).",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
console = Console()


@app.callback()
def _main(
    ctx: typer.Context,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
    debug: Annotated[
        bool,
        typer.Option(
            "--debug",
            help="Show the traceback of an error instead of its one-line message "
            "(or set MUPAD_DEBUG=1)",
        ),
    ] = False,
) -> None:
    set_debug(ctx, debug)
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Output folder")] = Path("runs/demo"),
    steps: Annotated[int, typer.Option(help="Training steps")] = _DEMO.steps,
    batch_size: Annotated[int, typer.Option(help="Crops per step")] = _DEMO.batch_size,
    sample_steps: Annotated[
        int, typer.Option(help="Sampler steps for the grids")
    ] = _DEMO.sample_steps,
    seed: int = _DEMO.seed,
) -> None:
    """Train a small text-conditioned model on the bundled H&E tiles and write a report."""
    from mupad.applications.demo import run_demo

    index = run_demo(
        out, DemoConfig(steps=steps, batch_size=batch_size, sample_steps=sample_steps, seed=seed)
    )
    console.print(f"[green]done[/green]: open {index}")


# Backbone overrides of a preset (shared by train and ablate): a shallower or narrower
# SiT than the DiT family's sizes, e.g. for a CPU budget.
HiddenSizeOption = Annotated[int | None, typer.Option(help="Override the preset's hidden width")]
DepthOption = Annotated[int | None, typer.Option(help="Override the preset's number of blocks")]
NumHeadsOption = Annotated[int | None, typer.Option(help="Override the preset's attention heads")]


# The quality levers (see ModelConfig); unset keeps the preset's value ("tile" sets them).
PredictionOption = Annotated[
    Prediction | None,
    typer.Option(help="What the last layer predicts: velocity or data (the clean image)"),
]
BottleneckOption = Annotated[
    int | None, typer.Option(help="Low-rank patch embedding width; 0 = none")
]
RefineOption = Annotated[
    int | None, typer.Option(help="Convolutional refinement head channels; 0 = linear unpatchify")
]


def _levers(
    prediction: Prediction | None, bottleneck_dim: int | None, refine_channels: int | None
) -> dict:
    """The given quality-lever overrides as ModelConfig fields."""
    given = {
        "prediction": prediction, "bottleneck_dim": bottleneck_dim,
        "refine_channels": refine_channels,
    }  # fmt: skip
    return {name: value for name, value in given.items() if value is not None}


def _backbone(hidden_size: int | None, depth: int | None, num_heads: int | None) -> dict:
    """The given backbone overrides as ModelConfig fields (hidden_size, depth, num_heads)."""
    given = {"hidden_size": hidden_size, "depth": depth, "num_heads": num_heads}
    return {name: value for name, value in given.items() if value is not None}


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
    preset: Annotated[
        str, typer.Option(help="Model preset: " + ", ".join(model_preset_names()))
    ] = "tile",
    hidden_size: HiddenSizeOption = None,
    depth: DepthOption = None,
    num_heads: NumHeadsOption = None,
    prediction: PredictionOption = None,
    bottleneck_dim: BottleneckOption = None,
    refine_channels: RefineOption = None,
    time_sampling: Annotated[
        TimeSampling, typer.Option(help="Training times: uniform or logit-normal")
    ] = TimeSampling(TILE_TIME_SAMPLING),
    time_location: Annotated[
        float, typer.Option(help="Logit-normal mean (> 0 favours noisier t)")
    ] = TrainConfig.time_location,
    time_scale: Annotated[
        float, typer.Option(help="Logit-normal standard deviation")
    ] = TrainConfig.time_scale,
    crop: Annotated[int, typer.Option(help="Training crop size in pixels")] = 64,
    captions: Annotated[
        Path | None,
        typer.Option(help="--data: JSON {class folder: caption} (default 'H&E histology: <class>')"),
    ] = None,
    init_from: Annotated[
        Path | None,
        typer.Option(
            help="--data: warm-start from a run, checkpoint or model folder (e.g. the packaged "
            "model, mupad/assets/pretrained/kather64); its model config is used"
        ),
    ] = None,
    latents: Annotated[
        str, typer.Option(help="'identity' (pixel space) or a local AutoencoderKL folder")
    ] = "identity",
    cross_attention: Annotated[
        CrossAttentionKind, typer.Option(help="Decoupled per-modality streams or one shared")
    ] = CrossAttentionKind.DECOUPLED,
    text_encoder: Annotated[str, typer.Option(help="Caption encoder name")] = "minilm",
    conditions: Annotated[
        str | None,
        typer.Option(
            help="Shards: comma-separated condition streams to train (text,image,rna); "
            "'none' = unconditional; default: every condition the shards hold"
        ),
    ] = None,
    objective: Annotated[
        Objective,
        typer.Option(
            help="sit: velocity only; repa: + MLP alignment; mupad: + CNN alignment + CLS"
        ),
    ] = Objective.SIT,
    teacher: Annotated[
        str, typer.Option(help="Alignment teacher (image encoder name)")
    ] = "inception",
    teacher_source: Annotated[
        TeacherSource, typer.Option(help="cached: shard features; online: encode each image")
    ] = TeacherSource.CACHED,
    align_weight: float = 0.5,
    cls_weight: float = 0.03,
    align_block: Annotated[int, typer.Option(help="1-based block to align; 0 = depth // 3")] = 0,
    steps: int = 10_000,
    batch_size: Annotated[int, typer.Option(help="Global batch of one optimizer step")] = 32,
    grad_accumulation: Annotated[int, typer.Option(help="Micro-batches per step and process")] = 1,
    lr: float = 1e-4,
    lr_schedule: LRScheduleKind = LRScheduleKind.CONSTANT,
    min_lr: Annotated[float, typer.Option(help="End of the cosine decay")] = 0.0,
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
    grad_clip: Annotated[float, typer.Option(help="Max gradient norm; 0 disables")] = 1.0,
    ema_decay: float = 0.9999,
    precision: Annotated[
        PrecisionChoice,
        typer.Option(help="auto: bf16 autocast where the hardware has native bf16, else fp32"),
    ] = PrecisionChoice.AUTO,
    condition_dropout: float = 0.1,
    max_nonfinite_steps: Annotated[
        int, typer.Option(help="NaN/Inf steps skipped before training stops")
    ] = 20,
    gradient_checkpointing: Annotated[
        bool, typer.Option(help="Recompute activations in the backward pass (less memory)")
    ] = False,
    compile: Annotated[bool, typer.Option(help="torch.compile the training step")] = False,
    parallel: Annotated[
        ParallelKind, typer.Option(help="Under torchrun: ddp or fsdp")
    ] = ParallelKind.DDP,
    device: Annotated[str, typer.Option(help="auto (a GPU when present), cpu, cuda")] = "auto",
    log_every: int = 10,
    checkpoint_every: int = 1000,
    keep_checkpoints: int = 2,
    sample_every: Annotated[
        int, typer.Option(help="Write a sample grid every N steps (shards; 0: never)")
    ] = 0,
    dihedral: Annotated[
        bool,
        typer.Option(
            help="Shards: random flips/quarter turns of each tile (pixel space; tile folders "
            "always use them)"
        ),
    ] = False,
    seed: int = 0,
    skip_bad_tiles: Annotated[
        bool,
        typer.Option(help="--data: leave out unreadable tiles (named) instead of stopping"),
    ] = False,
) -> None:
    """Train on a labelled tile folder (class name -> caption) or on prepared shards.

    Launch with `torchrun --nproc_per_node N -m mupad.cli train ...` (or `torchrun $(which
    mupad) train ...`) for data-parallel training; the global batch, learning rate and data
    order do not depend on N.
    """
    from mupad.training import distributed
    from mupad.training.captioned_tiles import read_captions

    if (data is None) == (shards is None):
        raise typer.BadParameter("give exactly one of --data (a tile folder) or --shards")
    if captions is not None and shards is not None:
        raise typer.BadParameter(
            "--captions applies to --data; shards carry the captions `mupad prepare` encoded"
        )
    if init_from is not None and shards is not None:
        raise typer.BadParameter("--init-from applies to --data (tile-folder training)")

    train_config = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        learning_rate=lr,
        lr_schedule=lr_schedule,
        min_learning_rate=min_lr,
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        grad_clip=grad_clip,
        ema_decay=ema_decay,
        precision=resolve_precision(precision, device),
        condition_dropout=condition_dropout,
        log_every=log_every,
        checkpoint_every=checkpoint_every,
        keep_checkpoints=keep_checkpoints,
        grad_accumulation=grad_accumulation,
        max_nonfinite_steps=max_nonfinite_steps,
        gradient_checkpointing=gradient_checkpointing,
        compile=compile,
        parallel=parallel,
        sample_every=sample_every,
        time_sampling=time_sampling,
        time_location=time_location,
        time_scale=time_scale,
        seed=seed,
        alignment=AlignmentConfig(
            objective=objective,
            teacher=teacher,
            teacher_source=teacher_source,
            block=align_block,
            align_weight=align_weight,
            cls_weight=cls_weight,
        ),
    )
    dist = distributed.from_environment(device)
    try:
        if shards is not None:
            from mupad.applications.train_shards import train_on_shards

            result = train_on_shards(
                shards,
                out,
                train_config=train_config,
                preset=preset,
                backbone={
                    **_backbone(hidden_size, depth, num_heads),
                    **_levers(prediction, bottleneck_dim, refine_channels),
                },
                cross_attention=cross_attention,
                latents=None if latents == "identity" else latents,
                text_encoder=text_encoder,
                modalities=_parse_conditions(conditions),
                dist=dist,
                dihedral=dihedral,
            ).result
        else:
            from mupad.applications.train_tiles import train_on_tile_folder

            result = train_on_tile_folder(
                data,
                out,
                preset=preset,
                backbone={
                    **_backbone(hidden_size, depth, num_heads),
                    **_levers(prediction, bottleneck_dim, refine_channels),
                },
                crop=crop,
                captions=read_captions(captions) if captions is not None else None,
                init_from=init_from,
                latents=latents,
                cross_attention=cross_attention,
                text_encoder=text_encoder,
                train_config=train_config,
                dist=dist,
                skip_bad_tiles=skip_bad_tiles,
            ).result
    finally:
        distributed.shutdown(dist)
    if not dist.is_main:
        return
    if result.skipped_steps:
        console.print(f"[yellow]{result.skipped_steps} non-finite steps were skipped[/yellow]")
    console.print(f"[green]trained[/green] to step {result.step}: {result.checkpoint}")


def _parse_conditions(text: str | None) -> list[str] | None:
    if text is None:
        return None
    if text.strip().lower() == "none":
        return []
    return [part.strip().lower() for part in text.split(",") if part.strip()]


@app.command()
def ablate(
    shards: Annotated[Path, typer.Option(help="Training shard folder (`mupad prepare`)")],
    val_shards: Annotated[
        Path, typer.Option(help="Held-out shard folder; its first --eval-records records score")
    ],
    out: Annotated[Path, typer.Option(help="Output folder (re-run the same command to resume)")],
    arms: Annotated[
        str, typer.Option(help="objectives (sit, repa, mupad), attention (decoupled, shared), all")
    ] = "objectives",
    preset: Annotated[
        str, typer.Option(help="Model preset: " + ", ".join(model_preset_names()))
    ] = "S/4",
    hidden_size: HiddenSizeOption = None,
    depth: DepthOption = None,
    num_heads: NumHeadsOption = None,
    steps: Annotated[int, typer.Option(help="Training steps of every arm")] = 10_000,
    eval_every: Annotated[int, typer.Option(help="Score every arm every N steps")] = 1000,
    eval_records: Annotated[int, typer.Option(help="Held-out records scored")] = 256,
    eval_batch_size: Annotated[int, typer.Option(help="Batch of the held-out evaluation")] = 64,
    eval_seed: Annotated[int, typer.Option(help="Seed of the held-out t and noise")] = 0,
    metrics: Annotated[
        str,
        typer.Option(
            help="Comma-separated held-out metrics: velocity_mse, velocity_mse_<text|image|"
            "rna>_only (that condition alone), velocity_mse_unconditional"
        ),
    ] = "velocity_mse",
    conditions: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated condition streams (text,image,rna); 'none' = unconditional; "
            "default: every condition the shards hold"
        ),
    ] = None,
    teacher: Annotated[
        str, typer.Option(help="Alignment teacher (image encoder name)")
    ] = "inception",
    teacher_source: Annotated[
        TeacherSource, typer.Option(help="cached: shard features; online: encode each image")
    ] = TeacherSource.CACHED,
    align_weight: float = 0.5,
    cls_weight: float = 0.03,
    align_block: Annotated[int, typer.Option(help="1-based block to align; 0 = depth // 3")] = 0,
    batch_size: Annotated[int, typer.Option(help="Global batch of one optimizer step")] = 32,
    lr: float = 1e-4,
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
    grad_clip: Annotated[float, typer.Option(help="Max gradient norm; 0 disables")] = 1.0,
    ema_decay: float = 0.9999,
    precision: Annotated[
        PrecisionChoice,
        typer.Option(help="auto: bf16 autocast where the hardware has native bf16, else fp32"),
    ] = PrecisionChoice.AUTO,
    condition_dropout: float = 0.1,
    latents: Annotated[
        str, typer.Option(help="VAE the shards were prepared with (recorded in checkpoints)")
    ] = "identity",
    text_encoder: Annotated[str, typer.Option(help="Caption encoder name (recorded)")] = "minilm",
    device: Annotated[str, typer.Option(help="auto (a GPU when present), cpu, cuda")] = "auto",
    keep_checkpoints: int = 2,
    seed: int = 0,
) -> None:
    """Ablations: train every arm on the same data, seed and steps; score held-out velocity
    MSE (raw and EMA weights) every --eval-every steps; write ablation.{jsonl,csv,md,png}."""
    from mupad.applications.ablate import AblationError, ArmSet, resolve_metrics, run_ablation
    from mupad.config import ConfigError, parse_enum

    try:
        arm_set = parse_enum(ArmSet, arms)
    except ConfigError as error:
        raise typer.BadParameter(str(error), param_hint="--arms") from None
    metric_names = [name.strip() for name in metrics.split(",") if name.strip()]
    try:
        resolve_metrics(metric_names)
    except AblationError as error:
        raise typer.BadParameter(str(error), param_hint="--metrics") from None
    train_config = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        learning_rate=lr,
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        grad_clip=grad_clip,
        ema_decay=ema_decay,
        precision=resolve_precision(precision, device),
        condition_dropout=condition_dropout,
        checkpoint_every=eval_every,
        keep_checkpoints=keep_checkpoints,
        seed=seed,
        alignment=AlignmentConfig(
            teacher=teacher,
            teacher_source=teacher_source,
            block=align_block,
            align_weight=align_weight,
            cls_weight=cls_weight,
        ),
    )
    result = run_ablation(
        shards,
        val_shards,
        out,
        arms=arm_set,
        preset=preset,
        backbone=_backbone(hidden_size, depth, num_heads),
        train_config=train_config,
        eval_every=eval_every,
        eval_records=eval_records,
        eval_batch_size=eval_batch_size,
        eval_seed=eval_seed,
        metrics=metric_names,
        modalities=_parse_conditions(conditions),
        latents=None if latents == "identity" else latents,
        text_encoder=text_encoder,
        device=device,
    )
    table = result.table
    for key in table.metric_keys:
        view = Table("arm", *(f"step {s}" for s in table.steps), "best", title=f"held-out {key}")
        for arm in table.arms:
            values = table.values[key][arm]
            best = table.best(key, arm)
            view.add_row(
                arm,
                *(f"{values[s]:.5f}" if s in values else "" for s in table.steps),
                "" if best is None else f"{best[1]:.5f} (step {best[0]})",
            )
        console.print(view)
    console.print(result.note)
    for path in result.files.values():
        console.print(f"[green]wrote[/green] {path}")


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
    """Print the configs stored with a checkpoint (a run folder: its latest checkpoint)."""
    from mupad.training.checkpoint import stored_configs

    for name, content in stored_configs(checkpoint).items():
        console.rule(name)
        console.print_json(json.dumps(content))


if __name__ == "__main__":  # pragma: no cover
    app()
