"""`mupad evaluate images`: FID and KID of generated vs real images, with intervals.

    mupad evaluate images GENERATED --real REAL --out OUT [--reference REF [--pair-by name]]
        [--features inception] [--weights PATH] [--size N] [--bootstrap 25]
        [--kid-subsets 100] [--kid-subset-size 1000] [--small-sample refuse|allow]
        [--cache-dir DIR] [--seed 0] [--reference-points [--blur-sigma 3]]

GENERATED, REAL and REF are image folders (flat or `<class>/<image>`). Both sets must share
one image size, or `--size` centre-crops and resizes every image to N x N. Features are
cached (see `mupad.evaluation.features`), so re-running against the same real set only
embeds the generated images. With `--reference`, each generated image is also compared with
its reference image (cosine similarity of features), paired by file name relative to the
folder (suffix ignored) or, with `--pair-by order`, by sorted order. `--reference-points`
adds FID/KID of the real set against uniform noise images and against a Gaussian-blurred
copy of itself, the two anchors needed to read an FID on this data.

Writes OUT/metrics.json, OUT/report.html and OUT/samples.png (generated vs real tiles).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pandas as pd
import typer
from rich.markup import escape

from mupad.evaluation.cli_support import (
    CacheDirOption,
    FeaturesOption,
    WeightsOption,
    console,
)
from mupad.evaluation.distances import fid_and_kid, reference_points
from mupad.evaluation.features import (
    DEFAULT_EXTRACTOR,
    FeatureExtractor,
    cached_features,
    default_cache_dir,
    feature_extractor,
)
from mupad.evaluation.fid import (
    DEFAULT_BOOTSTRAP_ITERATIONS,
    DEFAULT_SMALL_SAMPLE_POLICY,
    SmallSamplePolicy,
    check_small_sample,
)
from mupad.evaluation.images import ImageSet, load_image_set
from mupad.evaluation.report import ReportSection, write_evaluation
from mupad.evaluation.similarity import PairBy, image_image_similarity, pair_image_files
from mupad.evaluation.stats import EvaluationError

SAMPLES_FIGURE = "samples.png"
GRID_TILES = 8  # tiles per row of the sample figure


def _check_same_size(generated: ImageSet, real: ImageSet) -> None:
    gen_size, real_size = tuple(generated.images.shape[2:]), tuple(real.images.shape[2:])
    if gen_size != real_size:
        raise EvaluationError(
            f"generated images are {gen_size[0]}x{gen_size[1]} but real images "
            f"{real_size[0]}x{real_size[1]}; FID would compare scales, not content. Pass "
            "--size N to centre-crop and resize both sets to N x N"
        )


def _sample_grid(generated: ImageSet, real: ImageSet, out: Path) -> Path:
    """Two rows of evenly spaced tiles (sorted order), generated on top, real below, saved
    as `out/samples.png`; returns the name relative to `out` (as the report wants it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(GRID_TILES, len(generated), len(real))
    figure, axes = plt.subplots(2, columns, figsize=(1.6 * columns, 3.6), squeeze=False)
    for row, (label, image_set) in enumerate((("generated", generated), ("real", real))):
        picks = np.linspace(0, len(image_set) - 1, columns).round().astype(int)
        for column, index in enumerate(picks):
            axis = axes[row, column]
            axis.imshow(image_set.images[index].permute(1, 2, 0).numpy())
            axis.set_xticks([])
            axis.set_yticks([])
            if column == 0:
                axis.set_ylabel(label)
    figure.tight_layout()
    figure.savefig(out / SAMPLES_FIGURE, dpi=100)
    plt.close(figure)
    return Path(SAMPLES_FIGURE)


def _paired_section(
    generated: Path,
    reference: Path,
    pair_by: PairBy,
    generated_set: ImageSet,
    generated_features: np.ndarray,
    extractor: FeatureExtractor,
    settings: dict[str, Any],
) -> ReportSection:
    pairs = pair_image_files(generated, reference, pair_by)
    position = {path: i for i, path in enumerate(generated_set.paths)}
    reference_set = load_image_set(
        [ref for _, ref in pairs], settings["size"], what="reference images"
    )
    reference_features = cached_features(
        reference_set, extractor, settings["cache_dir"], progress=settings["progress"]
    )
    rows = [position[gen] for gen, _ in pairs]
    result = image_image_similarity(
        generated_features[rows],
        reference_features,
        extractor=extractor.name,
        iterations=settings["bootstrap"],
        seed=settings["seed"],
    )
    table = pd.DataFrame(
        {
            "generated": [gen.relative_to(generated).as_posix() for gen, _ in pairs],
            "reference": [ref.relative_to(reference).as_posix() for _, ref in pairs],
            "cosine": result.per_pair,
        }
    )
    return ReportSection(
        title="Paired similarity (generated vs reference)",
        metrics={"cosine_image_image": result.mean, "num_pairs": len(pairs)},
        table=table,
        notes=(
            (
                f"Cosine similarity of {extractor.name} features of each generated image and "
                f"its reference, paired by {pair_by.value}; the interval resamples pairs."
            ),
        ),
    )


def _reference_points_section(
    real_set: ImageSet,
    real_features: np.ndarray,
    extractor: FeatureExtractor,
    settings: dict[str, Any],
) -> ReportSection:
    metrics = reference_points(real_set, real_features, extractor, settings)
    return ReportSection(
        title="Reference points",
        metrics=metrics,
        notes=(
            (
                "real vs noise: the real set against as many images of uniform random pixels "
                "(near the worst a generator can score)."
            ),
            (
                "real vs blurred: the real set against itself after a Gaussian blur of sigma "
                f"{settings['blur_sigma']} px (what losing fine detail costs)."
            ),
        ),
    )


def evaluate_images(
    generated: Annotated[Path, typer.Argument(help="Folder of generated images")],
    real: Annotated[Path, typer.Option(help="Folder of real images")],
    out: Annotated[Path, typer.Option(help="Output folder: metrics.json, report.html, PNGs")],
    reference: Annotated[
        Path | None,
        typer.Option(help="Folder of per-image references: adds image–image cosine similarity"),
    ] = None,
    pair_by: Annotated[
        PairBy,
        typer.Option(help="Pair generated/reference files by name (suffix ignored) or order"),
    ] = PairBy.NAME,
    features: FeaturesOption = DEFAULT_EXTRACTOR,
    weights: WeightsOption = None,
    size: Annotated[
        int | None, typer.Option(help="Centre-crop and resize every image to N x N first")
    ] = None,
    bootstrap: Annotated[
        int, typer.Option(help="Bootstrap resamples for the 95 % intervals", min=1)
    ] = DEFAULT_BOOTSTRAP_ITERATIONS,
    kid_subsets: Annotated[int, typer.Option(help="KID subsets", min=1)] = 100,
    kid_subset_size: Annotated[
        int, typer.Option(help="KID subset size (capped at the smaller set)", min=2)
    ] = 1000,
    small_sample: Annotated[
        SmallSamplePolicy,
        typer.Option(help="FID with no more images than feature dimensions: refuse or allow"),
    ] = DEFAULT_SMALL_SAMPLE_POLICY,
    cache_dir: CacheDirOption = None,
    seed: Annotated[int, typer.Option(help="Seed of bootstrap, KID subsets, noise")] = 0,
    reference_points: Annotated[
        bool, typer.Option(help="Also report FID/KID of real vs noise and real vs blurred")
    ] = False,
    blur_sigma: Annotated[float, typer.Option(help="Blur of the reference point, px")] = 3.0,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N")] = "cpu",
    batch_size: Annotated[
        int, typer.Option(help="Images per extractor forward pass", min=1)
    ] = 32,
    progress: bool = True,
) -> None:
    """FID and KID (bootstrap 95 % intervals) of generated vs real images, plus image–image
    similarity to references and FID reference points on request."""
    settings: dict[str, Any] = {
        "generated": generated, "real": real, "reference": reference,
        "pair_by": pair_by, "features": features, "weights": weights, "size": size,
        "bootstrap": bootstrap, "kid_subsets": kid_subsets,
        "kid_subset_size": kid_subset_size, "small_sample": small_sample,
        "cache_dir": cache_dir or default_cache_dir(), "seed": seed,
        "reference_points": reference_points, "blur_sigma": blur_sigma, "device": device,
        "batch_size": batch_size, "progress": progress,
    }  # fmt: skip
    generated_set = load_image_set(generated, size, what="generated images")
    real_set = load_image_set(real, size, what="real images")
    _check_same_size(generated_set, real_set)
    extractor = feature_extractor(features, weights, device=device, batch_size=batch_size)
    # Refuse before the (slow) feature extraction when FID cannot be computed.
    caveat = check_small_sample(len(generated_set), len(real_set), extractor.dim, small_sample)
    generated_features, real_features = (
        cached_features(image_set, extractor, settings["cache_dir"], progress=progress)
        for image_set in (generated_set, real_set)
    )
    distances = fid_and_kid(generated_features, real_features, settings)
    out.mkdir(parents=True, exist_ok=True)
    notes = [
        f"Features: {extractor.name} ({extractor.dim}-d). {extractor.description}",
        (
            f"Intervals: bootstrap percentile over {bootstrap} resamples of both sets "
            f"(seed {seed}); the value is the metric on the full sets. Resamples repeat "
            "images, which raises FID, so at small N its interval can lie above the value."
        ),
        (
            f"KID: cubic polynomial kernel, {kid_subsets} subsets of "
            f"{min(kid_subset_size, len(generated_set), len(real_set))} images per set "
            "(subset size capped at the smaller set); unbiased, can be negative."
        ),
    ]
    if caveat is not None:
        notes.append(caveat)
    sections = [
        ReportSection(
            title="Generated vs real",
            metrics={
                **distances,
                "num_generated": len(generated_set),
                "num_real": len(real_set),
                "feature_dim": extractor.dim,
            },
            figures=[_sample_grid(generated_set, real_set, out)],
            notes=notes,
        )
    ]
    if reference is not None:
        sections.append(
            _paired_section(
                generated,
                reference,
                pair_by,
                generated_set,
                generated_features,
                extractor,
                settings,
            )
        )
    if reference_points:
        sections.append(_reference_points_section(real_set, real_features, extractor, settings))
    config = {
        name: value.resolve() if isinstance(value, Path) else value
        for name, value in settings.items()
        if name != "progress"
    }
    config["extractor_identity"] = dict(extractor.identity)
    metrics_path, report_path = write_evaluation(
        out, "Generated image quality (FID / KID)", sections, config
    )
    for name, value in distances.items():
        console.print(f"{name.upper()}: {escape(str(value))}")
    console.print(f"[green]wrote[/green] {metrics_path} and {report_path}")
    summary = {"out": str(out), **{name: value.to_dict() for name, value in distances.items()}}
    typer.echo(json.dumps(summary))


def register(app: typer.Typer) -> None:
    """Add `images` to the `mupad evaluate` group."""
    app.command("images")(evaluate_images)


__all__ = ["evaluate_images", "register"]
