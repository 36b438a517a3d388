"""`mupad staining ...`: H&E -> IHC by a flow in embedding space (mounted as `staining`).

Serial sections -> patch pairs -> flow -> IHC generator -> translated tiles:

- `pairs --he HE.jpg --ihc IHC.jpg --landmarks HE.csv --landmarks IHC.csv --out PAIRS`
- `train-flow --pairs PAIRS --out FLOW` (or `--he/--ihc/--landmarks` instead of `--pairs`)
- `train-generator --pairs PAIRS --flow FLOW --out IHC_RUN`
- `apply --flow FLOW --checkpoint IHC_RUN --he HE.jpg_or_TILE_DIR --out DIR`
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from mupad.applications.he2ihc import (
    ConditionTokens,
    EmbeddingFlowConfig,
    EmbeddingSpec,
    HE2IHCError,
)
from mupad.applications.serial_pairs import PairingError
from mupad.commands.errors import MupadGroup
from mupad.config import (
    GuidanceConfig,
    GuidanceMode,
    GuidanceScheduleKind,
    Precision,
    SampleConfig,
    SamplerKind,
    TrainConfig,
)

_FLOW = EmbeddingFlowConfig()

staining_app = typer.Typer(
    cls=MupadGroup,
    help="H&E -> IHC: a rectified flow from H&E to IHC embeddings + a SiT fine-tuned on IHC.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
console = Console(stderr=True)


def _parse_blocks(text: str) -> tuple[int, int]:
    try:
        columns, rows = (int(v) for v in text.lower().split("x"))
    except ValueError as exc:
        raise PairingError(f"--blocks must look like 4x4 (columns x rows), got {text!r}") from exc
    return columns, rows


def _pairs_from_sections(
    he: Path,
    ihc: Path,
    landmarks: list[Path],
    landmark_scale: float,
    patch_size: int,
    num_pairs: int,
    grid: bool,
    min_tissue: float,
    heldout_fraction: float,
    blocks: str,
    seed: int,
    mpp: float | None,
    min_ihc_signal: float,
):
    """Register, sample and split -> (pairs, split, affine fit)."""
    from mupad.applications.serial_pairs import (
        PairSamplingConfig,
        fit_affine,
        load_section,
        read_landmarks,
        region_split,
        sample_patch_pairs,
    )

    if len(landmarks) != 2:
        raise PairingError(
            "give --landmarks twice: the H&E landmark file, then the IHC one "
            f"(got {len(landmarks)})"
        )
    fit = fit_affine(
        read_landmarks(landmarks[0], landmark_scale), read_landmarks(landmarks[1], landmark_scale)
    )
    he_section, ihc_section = load_section(he, mpp), load_section(ihc, mpp)
    try:
        config = PairSamplingConfig(
            patch_size=patch_size,
            num_pairs=num_pairs,
            grid=grid,
            min_tissue=min_tissue,
            min_ihc_signal=min_ihc_signal,
            seed=seed,
        )
        pairs = sample_patch_pairs(he_section, ihc_section, fit.matrix, config)
        pairs.info["registration"] = fit.to_dict()
        split = region_split(
            pairs,
            he_section.width,
            he_section.height,
            blocks=_parse_blocks(blocks),
            heldout_fraction=heldout_fraction,
            seed=seed,
        )
    finally:
        he_section.close()
        ihc_section.close()
    return pairs, split, fit


def _report_fit(fit) -> None:
    console.print(
        f"affine registration on {fit.num_landmarks} landmarks: residual RMS "
        f"{fit.residual_rms_px:.2f} px (max {fit.residual_max_px:.2f}, leave-one-out RMS "
        f"{fit.loo_rms_px:.2f})"
    )


@staining_app.command()
def pairs(
    he: Annotated[Path, typer.Option(help="H&E section (image or whole-slide file)")],
    ihc: Annotated[Path, typer.Option(help="IHC section of the next cut")],
    landmarks: Annotated[
        list[Path], typer.Option(help="Landmark CSV: give it twice, H&E first, then IHC")
    ],
    out: Annotated[Path, typer.Option(help="Pairs folder to write (he/, ihc/, pairs.json)")],
    landmark_scale: Annotated[
        float,
        typer.Option(
            help="Multiply landmark coordinates (CIMA: 50 pc landmarks on 5 pc images -> 0.1)"
        ),
    ] = 1.0,
    patch_size: int = 64,
    num_pairs: Annotated[
        int, typer.Option(help="Pairs to draw (grid mode: at most; 0 = all)")
    ] = 512,
    grid: Annotated[bool, typer.Option(help="A regular grid instead of random positions")] = False,
    min_tissue: float = 0.5,
    min_ihc_signal: Annotated[
        float, typer.Option(help="Least non-glass fraction of an IHC patch")
    ] = 0.1,
    heldout_fraction: Annotated[
        float, typer.Option(help="Fraction of region blocks held out")
    ] = 0.25,
    blocks: Annotated[str, typer.Option(help="Region blocks, columns x rows")] = "4x4",
    seed: int = 0,
    mpp: Annotated[float | None, typer.Option(help="µm/px of the sections, if known")] = None,
) -> None:
    """Register two serial sections (affine on landmarks) and write matched patch pairs."""
    from mupad.applications.serial_pairs import write_pairs

    found, split, fit = _pairs_from_sections(
        he,
        ihc,
        landmarks,
        landmark_scale,
        patch_size,
        num_pairs,
        grid,
        min_tissue,
        heldout_fraction,
        blocks,
        seed,
        mpp,
        min_ihc_signal,
    )
    write_pairs(found, out, split)
    _report_fit(fit)
    counts = {name: int((split == name).sum()) for name in ("train", "heldout", "")}
    console.print(
        f"[green]wrote[/green] {len(found)} pairs to {out} (train {counts['train']}, held out "
        f"{counts['heldout']}, unused border pairs {counts['']})"
    )


@staining_app.command("train-flow")
def train_flow(
    out: Annotated[Path, typer.Option(help="Flow folder (re-run the same command to resume)")],
    pairs: Annotated[
        Path | None, typer.Option(help="Pairs folder: he/ and ihc/ tiles with the same names")
    ] = None,
    he: Annotated[Path | None, typer.Option(help="H&E section (instead of --pairs)")] = None,
    ihc: Annotated[
        Path | None, typer.Option(help="IHC serial section (instead of --pairs)")
    ] = None,
    landmarks: Annotated[
        list[Path] | None, typer.Option(help="Landmark CSV, twice: H&E first, then IHC")
    ] = None,
    landmark_scale: float = 1.0,
    patch_size: int = 64,
    num_pairs: int = 512,
    min_tissue: float = 0.5,
    min_ihc_signal: Annotated[
        float, typer.Option(help="Least non-glass fraction of an IHC patch")
    ] = 0.1,
    heldout_fraction: Annotated[
        float,
        typer.Option(
            help="Held-out fraction (region blocks; random rows for --pairs without a split)"
        ),
    ] = 0.25,
    blocks: str = "4x4",
    mpp: float | None = None,
    encoder: Annotated[str, typer.Option(help="Image encoder name")] = "inception",
    encoder_image_size: Annotated[
        int, typer.Option(help="Encoder input side (inception only; 0 = 299)")
    ] = 0,
    tokens: Annotated[
        ConditionTokens, typer.Option(help="global: one embedding per tile; all: every token")
    ] = ConditionTokens.GLOBAL,
    hidden: int = _FLOW.hidden,
    flow_blocks: Annotated[int, typer.Option(help="Residual blocks of the MLP")] = _FLOW.blocks,
    steps: int = _FLOW.steps,
    batch_size: int = _FLOW.batch_size,
    lr: float = _FLOW.learning_rate,
    weight_decay: float = _FLOW.weight_decay,
    sample_steps: Annotated[int, typer.Option(help="ODE steps H&E -> IHC")] = _FLOW.sample_steps,
    components: Annotated[
        int, typer.Option(help="Work on this many principal axes per domain (0 = all dims)")
    ] = _FLOW.components,
    dropout: float = _FLOW.dropout,
    source_noise: Annotated[
        float, typer.Option(help="Gaussian noise on the standardised H&E source in training")
    ] = _FLOW.source_noise,
    eval_every: int = _FLOW.eval_every,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> None:
    """Train the embedding flow H&E -> IHC on patch pairs; prints held-out cosine vs baselines."""
    from mupad.applications.he2ihc import format_metrics, train_flow_from_pairs
    from mupad.applications.serial_pairs import read_pairs, write_pairs

    started = time.perf_counter()
    if pairs is not None:
        if he is not None or ihc is not None:
            raise HE2IHCError("give either --pairs or --he/--ihc/--landmarks, not both")
        found, split = read_pairs(pairs)
    elif he is not None and ihc is not None:
        found, split, fit = _pairs_from_sections(
            he,
            ihc,
            landmarks or [],
            landmark_scale,
            patch_size,
            num_pairs,
            False,
            min_tissue,
            heldout_fraction,
            blocks,
            seed,
            mpp,
            min_ihc_signal,
        )
        _report_fit(fit)
        write_pairs(found, out / "pairs", split)
    else:
        raise HE2IHCError(
            "give --pairs DIR, or --he IMG --ihc IMG --landmarks HE.csv --landmarks IHC.csv"
        )
    config = EmbeddingFlowConfig(
        hidden=hidden,
        blocks=flow_blocks,
        steps=steps,
        batch_size=batch_size,
        learning_rate=lr,
        weight_decay=weight_decay,
        sample_steps=sample_steps,
        components=components,
        dropout=dropout,
        source_noise=source_noise,
        eval_every=eval_every,
        seed=seed,
    )
    spec = EmbeddingSpec(encoder=encoder, image_size=encoder_image_size, tokens=tokens)
    _, metrics = train_flow_from_pairs(
        found,
        out,
        config,
        spec,
        split=split,
        heldout_fraction=heldout_fraction,
        device=device,
        progress=progress,
    )
    console.print(format_metrics(metrics))
    console.print(
        f"[green]wrote[/green] {out} (config.json, model.safetensors, stats.safetensors, "
        f"metrics.json) in {time.perf_counter() - started:.0f} s"
    )


@staining_app.command("train-generator")
def train_generator(
    out: Annotated[Path, typer.Option(help="Run folder (re-run the same command to resume)")],
    flow: Annotated[Path, typer.Option(help="Flow folder: its encoder makes the conditions")],
    pairs: Annotated[
        Path | None, typer.Option(help="Pairs folder: its training IHC tiles are used")
    ] = None,
    tiles: Annotated[Path | None, typer.Option(help="Or any folder of IHC tiles")] = None,
    preset: str = "tiny",
    patch_size: Annotated[int, typer.Option(help="SiT patch size; 0 = the preset's")] = 4,
    hidden_size: Annotated[int, typer.Option(help="SiT width; 0 = the preset's")] = 0,
    depth: Annotated[int, typer.Option(help="SiT blocks; 0 = the preset's")] = 0,
    heads: Annotated[int, typer.Option(help="Attention heads; 0 = the preset's")] = 0,
    init_from: Annotated[
        Path | None,
        typer.Option(help="A MUPAD checkpoint to fine-tune (image stream of the same width)"),
    ] = None,
    steps: int = 400,
    batch_size: int = 16,
    lr: float = 3e-4,
    ema_decay: float = 0.999,
    precision: Precision = Precision.FP32,
    checkpoint_every: int = 200,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> None:
    """Fine-tune a pixel-space SiT on IHC tiles conditioned on their own IHC embeddings."""
    import numpy as np
    import torch

    from mupad.applications.he2ihc import EmbeddingFlow, embed_tiles, train_ihc_generator
    from mupad.applications.serial_pairs import read_pairs
    from mupad.config import to_dict
    from mupad.data.tiles import load_image_tiles

    embedding_flow = EmbeddingFlow.from_pretrained(flow)
    spec = EmbeddingSpec.from_metadata(embedding_flow.metadata)
    if (pairs is None) == (tiles is None):
        raise HE2IHCError("give exactly one of --pairs or --tiles")
    if pairs is not None:
        found, split = read_pairs(pairs)
        rows = np.flatnonzero(split == "train") if split is not None else np.arange(len(found))
        images = torch.from_numpy(found.ihc[rows]).permute(0, 3, 1, 2).contiguous()
    else:
        images = load_image_tiles(tiles).images  # type: ignore[arg-type]
    embeddings = embed_tiles(spec.build(device), images, spec.tokens, progress=progress)
    config = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        learning_rate=lr,
        ema_decay=ema_decay,
        precision=precision,
        checkpoint_every=checkpoint_every,
        seed=seed,
    )
    result = train_ihc_generator(
        images,
        embeddings,
        out,
        train_config=config,
        preset=preset,
        patch_size=patch_size,
        model_overrides={
            name: value
            for name, value in (
                ("hidden_size", hidden_size),
                ("depth", depth),
                ("num_heads", heads),
            )
            if value
        },
        init_from=init_from,
        metadata={
            "embedding": to_dict(spec),
            "mpp": embedding_flow.metadata.get("mpp"),
            "flow": str(flow),
            "tiles": str(pairs or tiles),
        },
        device=device,
        progress=progress,
    )
    console.print(f"[green]trained[/green] {out}: step {result.step}, loss {result.last_loss:.4f}")


@staining_app.command()
def apply(
    flow: Annotated[Path, typer.Option(help="Flow folder from `train-flow`")],
    checkpoint: Annotated[Path, typer.Option(help="IHC generator run / checkpoint folder")],
    he: Annotated[Path, typer.Option(help="An H&E image/slide, or a folder of H&E tiles")],
    out: Annotated[Path, typer.Option(help="Output folder: one PNG + JSON per tile")],
    sampler: SamplerKind = SamplerKind.SDE,
    steps: int = 250,
    guidance_schedule: GuidanceScheduleKind = GuidanceScheduleKind.LINEAR,
    guidance_start: float = 2.5,
    guidance_end: float = 0.0,
    flow_steps: Annotated[int, typer.Option(help="ODE steps of the flow; 0 = its own")] = 0,
    seed: int = 0,
    batch_size: int = 16,
    min_tissue: float = 0.5,
    max_tiles: Annotated[int, typer.Option(help="Translate at most this many tiles (0 = all)")] = 0,
    mpp: Annotated[float | None, typer.Option(help="µm/px of the H&E input, if known")] = None,
    device: str = "cpu",
    progress: bool = True,
) -> None:
    """Translate H&E tiles to IHC: embedding -> flow -> IHC-fine-tuned SiT."""
    from mupad.applications.he2ihc import HEToIHCTranslator, apply_to_he

    sample_config = SampleConfig(
        sampler=sampler,
        num_steps=steps,
        guidance=GuidanceConfig(
            schedule=guidance_schedule,
            start=guidance_start,
            end=guidance_end,
            mode=GuidanceMode.JOINT,
        ),
        seed=seed,
    )
    translator = HEToIHCTranslator.from_pretrained(
        flow,
        checkpoint,
        sample_config=sample_config,
        flow_steps=flow_steps or None,
        device=device,
        batch_size=batch_size,
    )
    result = apply_to_he(
        translator,
        he,
        out,
        min_tissue=min_tissue,
        max_tiles=max_tiles,
        mpp=mpp,
        provenance={"flow": str(flow), "checkpoint": str(checkpoint)},
        progress=progress,
    )
    console.print(
        f"[green]wrote[/green] {result.num_tiles} IHC tiles to {result.out}"
        + (f" (+ {result.mosaic.name})" if result.mosaic else "")
    )
    typer.echo(json.dumps({"out": str(result.out), "num_tiles": result.num_tiles}))
