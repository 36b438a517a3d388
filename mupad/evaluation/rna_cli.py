"""`mupad evaluate rna`: does an RNA/ST-conditioned model draw each spot's own tissue?

    mupad evaluate rna --checkpoint RUN --pairs HELDOUT_PAIRS.csv --out OUT [--per-spot 2]
        [--max-spots N] [--reference-pairs TRAIN_PAIRS.csv] [--features inception]
        [--mpp 2.0] [--cell-model classical]
        [--no-cells] [--top-k 1,5] [--bootstrap 25] [--permutations 1000] [--seed 0]
        [--steps 250 --sampler sde --guidance-start 2.5 ...]

HELDOUT_PAIRS is the paired-files CSV of `mupad prepare` for spots the model never saw (an
`image` column, relative to the CSV's folder, and `rna_*` pathway-score columns in the
model's pathway order). Every spot gets `--per-spot` patches generated from its scores
alone; each representation (image features; cell-type proportions and nuclei density at
`--mpp` µm/px) gives a spot x spot distance matrix, scored by
`mupad.evaluation.spot_matching.spot_matching`: own-spot vs other-spot distance, the win
rate (chance 0.5), top-k retrieval (chance k / N) and a permutation test. With
--reference-pairs (the training spots' CSV), each held-out spot is also given the real
training patch of the spot with the nearest pathway scores and scored the same way: what
expression reveals of a spot's look with no generator at all, the yardstick for the model.

Writes OUT/metrics.json, OUT/report.html, OUT/pairs.png (real patches above, generated
below, for the first spots), OUT/distances.png and OUT/generated/spot<i>/<k>.png + sidecars.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pandas as pd
import typer

from mupad.applications.generate_cli import (
    BatchSize,
    Device,
    GuidanceEnd,
    GuidanceStart,
    Progress,
    Sampler,
    Schedule,
    SkipBelow,
    Steps,
    build_sample_config,
    generation_settings,
)
from mupad.config import GuidanceConfig, GuidanceMode, GuidanceScheduleKind, SamplerKind, to_dict
from mupad.evaluation.celltypes import (
    DEFAULT_MODEL,
    build_cell_type_model,
    config_dict,
    profile_images,
)
from mupad.evaluation.cli_support import (
    CacheDirOption,
    FeaturesOption,
    WeightsOption,
    console,
    parse_int_list,
)
from mupad.evaluation.features import (
    DEFAULT_EXTRACTOR,
    cached_features,
    default_cache_dir,
    feature_extractor,
)
from mupad.evaluation.images import ImageSet, load_image_set
from mupad.evaluation.report import ReportSection, write_evaluation
from mupad.evaluation.spot_matching import (
    SpotMatching,
    SpotPairs,
    cell_distances,
    describe_matching,
    feature_distances,
    generate_spot_tiles,
    nearest_expression_patches,
    read_spot_pairs,
    spot_ids,
    spot_matching,
    spot_seed,
)
from mupad.evaluation.stats import EvaluationError

PAIRS_FIGURE = "pairs.png"
DISTANCES_FIGURE = "distances.png"
GRID_SPOTS = 8  # spots shown in the pairs figure


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _pairs_figure(real: ImageSet, generated: ImageSet, per_spot: int, out: Path) -> Path:
    """Columns = the first spots; row 0 the real patch, then its generated patches."""
    plt = _pyplot()
    shown = min(GRID_SPOTS, len(real))
    rows = 1 + per_spot
    figure, axes = plt.subplots(
        rows, shown, figsize=(1.2 * shown + 0.6, 1.2 * rows + 0.3), squeeze=False
    )
    for column in range(shown):
        tiles = [real.images[column]]
        tiles += [generated.images[column * per_spot + k] for k in range(per_spot)]
        for row, tile in enumerate(tiles):
            axis = axes[row, column]
            axis.imshow(tile.permute(1, 2, 0).numpy())
            axis.set_xticks([])
            axis.set_yticks([])
        axes[0, column].set_title(f"spot {column}", fontsize=7)
    axes[0, 0].set_ylabel("real", fontsize=8)
    for row in range(1, rows):
        axes[row, 0].set_ylabel("generated", fontsize=8)
    figure.tight_layout()
    figure.savefig(out / PAIRS_FIGURE, dpi=100)
    plt.close(figure)
    return Path(PAIRS_FIGURE)


def _distances_figure(matrices: dict[str, np.ndarray], out: Path) -> Path:
    """Per representation: histogram of own-spot vs other-spot distances."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(matrices), figsize=(4.2 * len(matrices), 3.2), squeeze=False)
    for axis, (name, distances) in zip(axes[0], matrices.items()):
        own = np.diag(distances)
        others = distances[~np.eye(len(distances), dtype=bool)]
        bins = np.histogram_bin_edges(np.concatenate([own, others]), bins=30)
        axis.hist(others, bins=bins, density=True, alpha=0.6, label="other spots")
        axis.hist(own, bins=bins, density=True, alpha=0.6, label="own spot")
        axis.set_title(name, fontsize=9)
        axis.set_xlabel("distance (generated -> real)")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out / DISTANCES_FIGURE, dpi=100)
    plt.close(figure)
    return Path(DISTANCES_FIGURE)


def _section(
    title: str, result: SpotMatching, prefix: str, notes: tuple[str, ...]
) -> ReportSection:
    return ReportSection(title=title, metrics=result.metrics(prefix), notes=notes)


def _features_label(extractor_name: str) -> str:
    return f"{extractor_name} features (cosine)"


def _match(
    candidates: ImageSet,
    per_spot: int,
    context: dict[str, Any],
    title: str,
    prefix: str,
) -> tuple[list[ReportSection], dict[str, np.ndarray], dict[str, Any]]:
    """Spot matching of candidate patches (`per_spot` per held-out spot, in spot order)
    against the real patches, by image features and, when `context` holds a cell-type
    model, nuclei density and cell-type proportions: report sections (metric names start
    with `prefix`, titles with `title`), the distance matrices and a JSON summary."""
    extractor, stats = context["extractor"], context["stats"]
    features = cached_features(
        candidates, extractor, context["cache"], progress=context["progress"]
    )
    feature_matrix = feature_distances(features, context["real_features"], per_spot)
    by_features = spot_matching(feature_matrix, **stats)
    sections = [
        _section(
            f"{title}Image features ({extractor.name}, cosine distance)",
            by_features,
            f"{prefix}features_",
            (extractor.description,),
        )
    ]
    matrices = {_features_label(extractor.name): feature_matrix}
    summary: dict[str, Any] = {"features": describe_matching(by_features)}
    cell_type_model = context.get("cell_type_model")
    if cell_type_model is None:
        return sections, matrices, summary
    distances = cell_distances(
        profile_images(candidates.images, cell_type_model), context["real_profile"], per_spot
    )
    by_density = spot_matching(distances.density, **stats)
    density_note = (
        "Distance |log(1 + nuclei per mm² candidate) - log(1 + nuclei per mm² real)|; "
        f"mean nuclei per patch: candidate {distances.generated_nuclei.mean():.1f}, "
        f"real {distances.real_nuclei.mean():.1f}."
    )
    sections.append(
        _section(f"{title}Nuclei density", by_density, f"{prefix}density_", (density_note,))
    )
    matrices["nuclei density"] = distances.density
    summary["density"] = describe_matching(by_density)
    if len(distances.kept) >= 2:
        by_types = spot_matching(distances.proportions, **stats)
        types_note = (
            "Total-variation distance of the nucleus type proportions; "
            f"{len(candidates) // per_spot - len(distances.kept)} spot(s) left out because "
            "their real or candidate patches hold no nucleus."
        )
        sections.append(
            _section(
                f"{title}Cell-type proportions", by_types, f"{prefix}celltypes_", (types_note,)
            )
        )
        matrices["cell-type proportions (TV)"] = distances.proportions
        summary["celltypes"] = describe_matching(by_types)
    return sections, matrices, summary


def _spot_table(pairs: SpotPairs, seed: int, per_spot_distance: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "spot": spot_ids(len(pairs)),
            "patch": list(pairs.keys),
            "seed": [spot_seed(seed, k) for k in pairs.keys],
            "feature_distance_own": np.diag(per_spot_distance),
            "feature_distance_others_mean": (
                per_spot_distance.sum(axis=1) - np.diag(per_spot_distance)
            )
            / (len(pairs) - 1),
        }
    )


def evaluate_rna(
    checkpoint: Annotated[
        Path, typer.Option(help="RNA/ST-conditioned run, checkpoint or model folder")
    ],
    pairs: Annotated[
        Path,
        typer.Option(help="Held-out paired-files CSV (image + rna_* columns), as for prepare"),
    ],
    out: Annotated[Path, typer.Option(help="Output folder: metrics.json, report.html, PNGs")],
    per_spot: Annotated[int, typer.Option(help="Generated patches per spot")] = 2,
    max_spots: Annotated[
        int | None, typer.Option(help="Evaluate only the first N spots of the CSV")
    ] = None,
    reference_pairs: Annotated[
        Path | None,
        typer.Option(
            help="Training spots' paired-files CSV: adds the nearest-expression training "
            "patch (no generator) as a reference arm"
        ),
    ] = None,
    features: FeaturesOption = DEFAULT_EXTRACTOR,
    weights: WeightsOption = None,
    cells: Annotated[
        bool, typer.Option(help="Also compare cell-type proportions and nuclei density")
    ] = True,
    mpp: Annotated[
        float | None,
        typer.Option(help="µm/px of the patches, for nuclei sizes (default: the model's)"),
    ] = None,
    cell_model: Annotated[str, typer.Option(help="Cell-type model name")] = DEFAULT_MODEL,
    top_k: Annotated[str, typer.Option(help="Retrieval cut-offs, e.g. 1,5")] = "1,5",
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples (95 % intervals)")] = 25,
    permutations: Annotated[
        int, typer.Option(help="Random pairings of the permutation test")
    ] = 1000,
    cache_dir: CacheDirOption = None,
    seed: Annotated[int, typer.Option(help="Seed of generation (per spot) and statistics")] = 0,
    sampler: Sampler = SamplerKind.SDE,
    steps: Steps = 250,
    guidance_schedule: Schedule = GuidanceScheduleKind.LINEAR,
    guidance_start: GuidanceStart = 2.5,
    guidance_end: GuidanceEnd = 0.0,
    guidance_skip_below: SkipBelow = GuidanceConfig.skip_below,
    batch_size: BatchSize = None,
    device: Device = "auto",
    overwrite: Annotated[
        bool, typer.Option(help="Replace generated patches made with other settings")
    ] = False,
    progress: Progress = True,
) -> None:
    """Spot matching of an RNA/ST-conditioned model on held-out spots: are patches generated
    from a spot's pathway scores closer to its own real patch than to other spots'?"""
    sample_config = build_sample_config(
        sampler, steps, guidance_schedule, guidance_start, guidance_end, GuidanceMode.JOINT,
        1.0, 1.0, 1.0, 0.0, 1.0, guidance_skip_below, seed,
    )  # fmt: skip
    ks = parse_int_list(top_k, "--top-k")
    spot_pairs = read_spot_pairs(pairs, max_spots)
    from mupad.applications.generation_model import GenerationModel

    model = GenerationModel(generation_settings(checkpoint, device=device, batch_size=batch_size))
    real = load_image_set(spot_pairs.images, model.tile_px, what="real spot patches")
    out.mkdir(parents=True, exist_ok=True)
    generated = generate_spot_tiles(
        model, spot_pairs, per_spot, sample_config, out / "generated", seed=seed,
        overwrite=overwrite, progress=progress,
    )  # fmt: skip
    extractor = feature_extractor(features, weights, device=model.device)
    cache = cache_dir or default_cache_dir()
    context: dict[str, Any] = {
        "extractor": extractor, "cache": cache, "progress": progress,
        "real_features": cached_features(real, extractor, cache, progress=progress),
        "stats": {"top_k": ks, "iterations": bootstrap, "permutation_draws": permutations,
                  "seed": seed},
    }  # fmt: skip
    if cells:
        pixel_mpp = mpp if mpp is not None else model.model_mpp
        if pixel_mpp is None:
            raise EvaluationError(
                "the model recorded no µm/px, and nuclei sizes need one; pass --mpp (the "
                "patches' µm/px) or --no-cells"
            )
        cell_type_model = build_cell_type_model(cell_model, mpp=pixel_mpp)
        context["cell_type_model"] = cell_type_model
        context["real_profile"] = profile_images(real.images, cell_type_model)
    setup_source = (
        f"Held-out spots from {pairs}; each generated patch is conditioned on its spot's "
        "pathway scores only."
    )
    setup_method = (
        "Distances run from a spot's generated patches (averaged over them) to every real "
        "patch; the win rate is the chance that the own spot is nearer than another spot "
        "(0.5 for a generator that ignores the RNA); intervals are bootstrap percentile "
        f"over spots ({bootstrap} resamples)."
    )
    sections = [
        ReportSection(
            title="Setup",
            metrics={
                "num_spots": len(spot_pairs),
                "per_spot": per_spot,
                "tile_px": model.tile_px,
                "num_pathways": spot_pairs.scores.shape[1],
            },
            notes=(setup_source, setup_method),
        ),
    ]
    generated_sections, matrices, summary = _match(generated, per_spot, context, "", "")
    sections += generated_sections
    if reference_pairs is not None:
        retrieved = load_image_set(
            nearest_expression_patches(spot_pairs, read_spot_pairs(reference_pairs)),
            model.tile_px,
            what="nearest-expression reference patches",
        )
        reference_sections, _, summary["nearest_expression"] = _match(
            retrieved, 1, context, "Reference, nearest-expression training patch: ",
            "nearest_expression_",
        )  # fmt: skip
        sections.append(
            ReportSection(
                title="Reference: nearest-expression training patch (no generator)",
                notes=(
                    (
                        f"Each held-out spot is given the real patch of the spot of "
                        f"{reference_pairs} whose z-scored pathway scores are nearest; "
                        "scored like the generated patches, it is what expression alone "
                        "reveals of a spot's look to a retrieval, the yardstick for the "
                        "win rates above."
                    ),
                ),
            )
        )
        sections += reference_sections
    figures = [
        _pairs_figure(real, generated, per_spot, out),
        _distances_figure(matrices, out),
    ]
    sections.append(
        ReportSection(
            title="Spots",
            figures=figures,
            table=_spot_table(spot_pairs, seed, matrices[_features_label(extractor.name)]),
        )
    )
    config = {
        "checkpoint": checkpoint.resolve(), "pairs": pairs.resolve(), "per_spot": per_spot,
        "reference_pairs": reference_pairs.resolve() if reference_pairs else None,
        "max_spots": max_spots, "features": features, "weights": weights, "cells": cells,
        "mpp": mpp, "cell_model": cell_model, "top_k": ks, "bootstrap": bootstrap,
        "permutations": permutations, "seed": seed, "sample_config": to_dict(sample_config),
        "model_dir": str(model.model_dir), "weights_sha256": model.weights_sha256,
        "generation_settings": model.settings.to_dict(),
        "extractor_identity": dict(extractor.identity),
    }  # fmt: skip
    if cells:
        config["cell_type_model"] = config_dict(cell_type_model)
    metrics_path, report_path = write_evaluation(
        out, "RNA/ST conditioning: spot matching on held-out spots", sections, config
    )
    by_features = {"generated": summary["features"]}
    if "nearest_expression" in summary:
        by_features["nearest-expression"] = summary["nearest_expression"]["features"]
    for label, numbers in by_features.items():
        console.print(
            f"{label} (image features): own {numbers['matched_distance']['value']:.4f}, "
            f"others {numbers['other_spots_distance']['value']:.4f}, win rate "
            f"{numbers['win_rate']['value']:.3f} (chance 0.5), p = {numbers['permutation_p']:.4f}"
        )
    console.print(f"[green]wrote[/green] {metrics_path} and {report_path}")
    typer.echo(json.dumps({"out": str(out), **summary}))


def register(app: typer.Typer) -> None:
    """Add `rna` to the `mupad evaluate` group."""
    app.command("rna")(evaluate_rna)


__all__ = ["evaluate_rna", "register"]
