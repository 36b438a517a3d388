"""`mupad generate` and `mupad augment` (mounted by mupad.cli): parse options -> one library call.

mupad generate --checkpoint RUN --text "H&E histology: tumor" --num-images 4
mupad generate --checkpoint RUN --image tile.png --image-mpp 0.25     # image variation
mupad generate --checkpoint RUN --st-folder spots/ --st-spot 10x14    # ST -> image
mupad generate --checkpoint RUN --prompts prompts.csv --out generated/
mupad generate --from-sidecar generated/00001_0.json --out again/     # exact regeneration
mupad augment --data fewshot/ --checkpoint RUN --per-image 8 --out augmented/
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from mupad.applications.prompts import RECORD_FIELDS
from mupad.config import GuidanceConfig, GuidanceMode, GuidanceScheduleKind, SamplerKind

console = Console(stderr=True)

_PROMPTS_HELP = (
    "CSV/TSV (header row) or JSONL prompt file, one record per row/line; paths relative to "
    "the file; fields: " + ", ".join(RECORD_FIELDS)
)

# Options shared by both commands (sampler, guidance, model inputs, runtime).
Sampler = Annotated[
    SamplerKind, typer.Option(help="sde (paper), euler or heun", rich_help_panel="Sampler")
]
Steps = Annotated[int, typer.Option(help="Sampler steps (paper: 250)", rich_help_panel="Sampler")]
Schedule = Annotated[
    GuidanceScheduleKind,
    typer.Option(help="Guidance schedule (paper: linear 2.5 -> 0)", rich_help_panel="Sampler"),
]
GuidanceStart = Annotated[
    float, typer.Option(help="Guidance at t = 1 (noise)", rich_help_panel="Sampler")
]
GuidanceEnd = Annotated[
    float, typer.Option(help="Guidance at t = 0 (linear)", rich_help_panel="Sampler")
]
Mode = Annotated[
    GuidanceMode,
    typer.Option(
        help="joint: one scale; per_modality: x --*-scale each", rich_help_panel="Sampler"
    ),
]
Scale = Annotated[
    float, typer.Option(help="Per-modality guidance multiplier", rich_help_panel="Sampler")
]
TLow = Annotated[float, typer.Option(help="Interval schedule: lower t", rich_help_panel="Sampler")]
THigh = Annotated[float, typer.Option(help="Interval schedule: upper t", rich_help_panel="Sampler")]
SkipBelow = Annotated[
    float,
    typer.Option(
        help="Guidance below this scale counts as 0 (no unconditional pass on the annealed tail)",
        rich_help_panel="Sampler",
    ),
]
BatchSize = Annotated[
    int | None,
    typer.Option(
        help="Images per sampler call (default: all images of a record)", rich_help_panel="Runtime"
    ),
]
TextEncoder = Annotated[
    str | None,
    typer.Option(help="Text encoder (default: the run's, else minilm)", rich_help_panel="Model"),
]
ImageEncoder = Annotated[
    str | None,
    typer.Option(
        help="Image encoder (default: the run's, else inception)", rich_help_panel="Model"
    ),
]
Latents = Annotated[
    str | None,
    typer.Option(
        help="VAE folder or 'identity' (default: the run's, else identity)", rich_help_panel="Model"
    ),
]
ModelMpp = Annotated[
    float | None,
    typer.Option(
        help="µm/px the model was trained at (default: the run's target_mpp)",
        rich_help_panel="Model",
    ),
]
RnaPathways = Annotated[
    Path | None,
    typer.Option(
        help="The model's pathway names, in order: one per line, a scores table (header) or a "
        "standardiser JSON",
        rich_help_panel="Model",
    ),
]
RnaStandardiser = Annotated[
    Path | None,
    typer.Option(
        help="ScoreStandardiser JSON the RNA stream was trained with", rich_help_panel="Model"
    ),
]
GeneSets = Annotated[
    Path | None,
    typer.Option(help="GMT used to score expression (default: bundled)", rich_help_panel="Model"),
]
Size = Annotated[
    int | None,
    typer.Option(help="Latent side to generate (default: the model's)", rich_help_panel="Runtime"),
]
Bf16 = Annotated[bool, typer.Option(help="bf16 autocast while sampling", rich_help_panel="Runtime")]
Device = Annotated[
    str, typer.Option(help="auto (a GPU when present), cpu, cuda", rich_help_panel="Runtime")
]
Overwrite = Annotated[
    bool,
    typer.Option(
        help="Replace existing outputs made with other settings", rich_help_panel="Runtime"
    ),
]
Progress = Annotated[bool, typer.Option(help="Show a progress bar", rich_help_panel="Runtime")]
Conditions = Annotated[
    str | None,
    typer.Option(help="Use only these conditions, comma-separated (text,image,rna)"),
]


def build_sample_config(
    sampler: SamplerKind, steps: int, schedule: GuidanceScheduleKind, start: float, end: float,
    mode: GuidanceMode, image_scale: float, text_scale: float, rna_scale: float, t_low: float,
    t_high: float, skip_below: float, seed: int,
):  # fmt: skip
    from mupad.config import SampleConfig

    return SampleConfig(
        sampler=sampler,
        num_steps=steps,
        guidance=GuidanceConfig(
            schedule=schedule,
            start=start,
            end=end,
            t_low=t_low,
            t_high=t_high,
            skip_below=skip_below,
            mode=mode,
            image_scale=image_scale,
            text_scale=text_scale,
            rna_scale=rna_scale,
        ),
        seed=seed,
    )


def generation_settings(checkpoint: Path, **options):
    from mupad.applications.generation_model import GenerationSettings, resolve_device

    options["device"] = resolve_device(options["device"])
    return GenerationSettings(
        checkpoint=str(checkpoint),
        **{k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()},
    )


def generate(
    checkpoint: Annotated[
        Path | None,
        typer.Option(help="Run folder, checkpoint folder or SiT.save_pretrained folder"),
    ] = None,
    out: Annotated[Path, typer.Option(help="Output folder: <id>_<k>.png + <id>_<k>.json")] = Path(
        "generated"
    ),
    prompts: Annotated[Path | None, typer.Option(help=_PROMPTS_HELP)] = None,
    text: Annotated[
        str | None, typer.Option(help="Text condition", rich_help_panel="Prompt")
    ] = None,
    image: Annotated[
        Path | None,
        typer.Option(help="Reference image (image condition)", rich_help_panel="Prompt"),
    ] = None,
    image_mpp: Annotated[
        float | None,
        typer.Option(help="µm/px of --image (resampled to the model's)", rich_help_panel="Prompt"),
    ] = None,
    rna: Annotated[
        Path | None,
        typer.Option(
            help="Pathway scores: .npy/.txt vector or .csv/.tsv table", rich_help_panel="Prompt"
        ),
    ] = None,
    rna_row: Annotated[
        str | None,
        typer.Option(
            help="Row/sample of a multi-row --rna / --rna-expression", rich_help_panel="Prompt"
        ),
    ] = None,
    rna_expression: Annotated[
        Path | None,
        typer.Option(help="Expression file, scored with the gene sets", rich_help_panel="Prompt"),
    ] = None,
    st_folder: Annotated[
        Path | None, typer.Option(help="`mupad st extract` output folder", rich_help_panel="Prompt")
    ] = None,
    st_spot: Annotated[
        str | None, typer.Option(help="Spot barcode in --st-folder", rich_help_panel="Prompt")
    ] = None,
    record_id: Annotated[
        str | None, typer.Option("--id", help="Output name prefix", rich_help_panel="Prompt")
    ] = None,
    num_images: Annotated[int, typer.Option(help="Images per prompt record")] = 1,
    seed: Annotated[int, typer.Option(help="Seed (prompt files: seed + row index by default)")] = 0,
    conditions: Conditions = None,
    sampler: Sampler = SamplerKind.SDE,
    steps: Steps = 250,
    guidance_schedule: Schedule = GuidanceScheduleKind.LINEAR,
    guidance_start: GuidanceStart = 2.5,
    guidance_end: GuidanceEnd = 0.0,
    guidance_mode: Mode = GuidanceMode.JOINT,
    image_scale: Scale = 1.0,
    text_scale: Scale = 1.0,
    rna_scale: Scale = 1.0,
    guidance_t_low: TLow = 0.0,
    guidance_t_high: THigh = 1.0,
    guidance_skip_below: SkipBelow = GuidanceConfig.skip_below,
    batch_size: BatchSize = None,
    text_encoder: TextEncoder = None,
    image_encoder: ImageEncoder = None,
    latents: Latents = None,
    model_mpp: ModelMpp = None,
    rna_pathways: RnaPathways = None,
    rna_standardiser: RnaStandardiser = None,
    gene_sets: GeneSets = None,
    size: Size = None,
    bf16: Bf16 = False,
    device: Device = "auto",
    overwrite: Overwrite = False,
    progress: Progress = True,
    from_sidecar: Annotated[
        Path | None,
        typer.Option(help="Regenerate the image a sidecar JSON describes, exactly, into --out"),
    ] = None,
) -> None:
    """Generate H&E images from any subset of text, reference image and RNA/ST conditions.

    One prompt from the options, or one per row/line of a --prompts CSV/JSONL file.

    Every PNG gets a sidecar JSON (seed, conditions, input and weight hashes, sampler config);
    --from-sidecar regenerates that image exactly.

    Reference images: grayscale, alpha and 16-bit are converted to 8-bit RGB, --image-mpp
    resamples them to the model's µm/px, and the centre tile is used.
    """
    single = {
        "text": text, "image": image, "image_mpp": image_mpp, "rna": rna, "rna_row": rna_row,
        "rna_expression": rna_expression, "st_folder": st_folder, "st_spot": st_spot,
        "id": record_id,
    }  # fmt: skip
    given = [f"--{k.replace('_', '-')}" for k, v in single.items() if v is not None]
    if from_sidecar is not None:
        if prompts is not None or given:
            raise typer.BadParameter("--from-sidecar takes no prompt options")
        _regenerate(from_sidecar, out, checkpoint, device)
        return
    if checkpoint is None:
        from mupad.applications.default_model import default_checkpoint

        checkpoint = default_checkpoint()
        console.print(f"using the demo model {checkpoint} (no --checkpoint given)")
    if prompts is not None and given:
        raise typer.BadParameter(
            f"give either --prompts or single-prompt options ({', '.join(given)}), not both"
        )
    from mupad.applications.batch_generate import FlatLayout, generate_records
    from mupad.applications.generation_model import GenerationModel
    from mupad.applications.prompts import (
        parse_modalities,
        read_prompt_file,
        record_from_fields,
    )

    modalities = parse_modalities(conditions)
    if prompts is not None:
        records = read_prompt_file(prompts, seed=seed, num_images=num_images)
    else:
        fields = {k: v for k, v in single.items() if v is not None}
        records = [
            record_from_fields(
                fields,
                base=Path.cwd(),
                default_id="00001",
                defaults={"seed": seed, "num_images": num_images},
            )
        ]
    sample_config = build_sample_config(
        sampler, steps, guidance_schedule, guidance_start, guidance_end, guidance_mode,
        image_scale, text_scale, rna_scale, guidance_t_low, guidance_t_high,
        guidance_skip_below, seed,
    )  # fmt: skip
    settings = generation_settings(
        checkpoint, text_encoder=text_encoder, image_encoder=image_encoder, latents=latents,
        model_mpp=model_mpp, rna_pathways=rna_pathways, rna_standardiser=rna_standardiser,
        gene_sets=gene_sets, size=size, bf16=bf16, device=device, batch_size=batch_size,
    )  # fmt: skip
    model = GenerationModel(settings)
    report = generate_records(
        model, records, sample_config, FlatLayout(out),
        modalities=modalities, overwrite=overwrite, progress=progress,
    )  # fmt: skip
    console.print(
        f"[green]wrote[/green] {len(report.written)} image(s) + sidecar JSONs to {out} "
        f"({report.records} record(s); {len(report.skipped)} already there, skipped)",
        soft_wrap=True,
    )


def _regenerate(sidecar: Path, out: Path, checkpoint: Path | None, device: str) -> None:
    from mupad.applications.batch_generate import regenerate
    from mupad.applications.generation_model import resolve_device

    result = regenerate(
        sidecar,
        out,
        checkpoint=checkpoint,
        device=None if device == "auto" else resolve_device(device),
    )
    same = (
        "identical to the recorded image"
        if result.identical
        else "DIFFERENT from the recorded image"
    )
    console.print(f"[green]regenerated[/green] {result.png} ({same})", soft_wrap=True)
    if not result.conditions_match:
        console.print("[yellow]warning[/yellow]: the inputs encode differently than recorded")


def augment(
    data: Annotated[Path, typer.Option(help="Few-shot ImageFolder: <data>/<class>/<image>")],
    checkpoint: Annotated[
        Path, typer.Option(help="Run folder, checkpoint folder or SiT.save_pretrained folder")
    ],
    out: Annotated[Path, typer.Option(help="Output ImageFolder (+ index.csv, augment.json)")],
    per_image: Annotated[int, typer.Option(help="Synthetic variations per real image")] = 8,
    captions: Annotated[
        Path | None,
        typer.Option(
            help="JSON {class: caption} (default: the run's captions, else derived from the class name)"
        ),
    ] = None,
    include_real: Annotated[bool, typer.Option(help="Copy the real images into --out too")] = False,
    mpp: Annotated[
        float | None, typer.Option(help="µm/px of the real images (resampled to the model's)")
    ] = None,
    seed: Annotated[int, typer.Option(help="Base seed (each image's seed derives from it)")] = 0,
    conditions: Conditions = "image,text",
    sampler: Sampler = SamplerKind.SDE,
    steps: Steps = 250,
    guidance_schedule: Schedule = GuidanceScheduleKind.LINEAR,
    guidance_start: GuidanceStart = 2.5,
    guidance_end: GuidanceEnd = 0.0,
    guidance_mode: Mode = GuidanceMode.JOINT,
    image_scale: Scale = 1.0,
    text_scale: Scale = 1.0,
    rna_scale: Scale = 1.0,
    guidance_t_low: TLow = 0.0,
    guidance_t_high: THigh = 1.0,
    guidance_skip_below: SkipBelow = GuidanceConfig.skip_below,
    batch_size: BatchSize = None,
    text_encoder: TextEncoder = None,
    image_encoder: ImageEncoder = None,
    latents: Latents = None,
    model_mpp: ModelMpp = None,
    size: Size = None,
    bf16: Bf16 = False,
    device: Device = "auto",
    overwrite: Overwrite = False,
    progress: Progress = True,
) -> None:
    """Few-shot augmentation: N class-consistent variations of every real image.

    Each variation is conditioned on the real image's embedding and its class caption; the
    output is an ImageFolder (<out>/<class>/<stem>_aug<k>.png) with index.csv. Resumable.
    """
    import json

    from mupad.applications.augment import augment_folder
    from mupad.applications.generation_model import GenerationModel
    from mupad.applications.prompts import PromptError, parse_modalities

    modalities = parse_modalities(conditions)
    caption_map = None
    if captions is not None:
        try:
            caption_map = json.loads(Path(captions).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise PromptError(f"cannot read captions {captions}: {error}") from None
        if not isinstance(caption_map, dict) or not all(
            isinstance(v, str) for v in caption_map.values()
        ):
            raise PromptError(f"{captions} must be a JSON object {{class: caption}}")
    sample_config = build_sample_config(
        sampler, steps, guidance_schedule, guidance_start, guidance_end, guidance_mode,
        image_scale, text_scale, rna_scale, guidance_t_low, guidance_t_high,
        guidance_skip_below, seed,
    )  # fmt: skip
    settings = generation_settings(
        checkpoint, text_encoder=text_encoder, image_encoder=image_encoder, latents=latents,
        model_mpp=model_mpp, size=size, bf16=bf16, device=device, batch_size=batch_size,
    )  # fmt: skip
    result = augment_folder(
        data, GenerationModel(settings), out,
        per_image=per_image, sample_config=sample_config, captions=caption_map,
        include_real=include_real, mpp=mpp, seed=seed,
        modalities=modalities or (), overwrite=overwrite, progress=progress,
    )  # fmt: skip
    report = result.report
    console.print(
        f"[green]wrote[/green] {len(report.written)} synthetic image(s) for {report.records} real "
        f"image(s) to {out} ({len(report.skipped)} already there, skipped"
        + (f"; {result.real_copied} real copied" if include_real else "")
        + f"); index: {result.index}",
        soft_wrap=True,
    )
