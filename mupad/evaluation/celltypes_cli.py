"""`mupad evaluate celltypes`: cell-type proportions of generated vs real H&E.

    mupad evaluate celltypes GENERATED --real REAL --mpp 0.5 --out OUT
        [--model classical] [--bootstrap 1000] [--seed 0]

GENERATED and REAL are image folders (flat or `<class>/<image>`, any sizes). `--mpp` is the
pixel size of both sets in µm/px: the default model's thresholds are physical (µm²), so a
wrong pixel size mistypes nuclei. See `mupad.evaluation.celltypes` for what the classical
model can and cannot tell.

Writes OUT/metrics.json, OUT/report.html and OUT/celltype_proportions.png.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import numpy as np
import pandas as pd
import typer

from mupad.evaluation.celltypes import (
    DEFAULT_MODEL,
    CellTypeComparison,
    CellTypeModel,
    CellTypeProfile,
    build_cell_type_model,
    compare_profiles,
    config_dict,
    profile_images,
)
from mupad.evaluation.cli_support import console
from mupad.evaluation.images import image_files, read_rgb
from mupad.evaluation.report import ReportSection, write_evaluation
from mupad.evaluation.stats import EvaluationError

FIGURE = "celltype_proportions.png"


def profile_folder(
    folder: Path, model: CellTypeModel, what: str, geojson: Path | None = None
) -> CellTypeProfile:
    """Every image under `folder` (any sizes) through the model; with `geojson`, each
    image's cells are also written as QuPath GeoJSON under geojson/<what>/."""
    files = image_files(folder)
    if not files:
        raise EvaluationError(f"no {what} images under {folder}")
    images = [read_rgb(path).transpose(2, 0, 1) for path in files]  # (3, H, W) each
    writer = None
    if geojson is not None:
        from mupad.evaluation.celltypes_geojson import DetectionWriter

        writer = DetectionWriter(files, folder, geojson / what, model.mpp)
    return profile_images(images, model, on_detect=writer)


def _proportion_figure(comparison: CellTypeComparison, out: Path) -> Path:
    """Mean per-image proportion of each type, real vs generated."""
    from matplotlib.figure import Figure

    types = list(comparison.cell_types)
    x = np.arange(len(types))
    figure = Figure(figsize=(max(4.5, 1.3 * len(types) + 1.5), 3.6))
    axis = figure.add_subplot()
    for offset, label, values in (
        (-0.2, "real", comparison.mean_proportion_real),
        (0.2, "generated", comparison.mean_proportion_generated),
    ):
        axis.bar(x + offset, [values[t] for t in types], 0.4, label=label)
    axis.set_xticks(x, [f"{t}\nW={comparison.wasserstein[t].value:.3f}" for t in types])
    axis.set_ylabel("mean proportion per image")
    axis.set_ylim(0.0, 1.0)
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / FIGURE, dpi=100)
    return Path(FIGURE)


def _table(comparison: CellTypeComparison) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "cell type": t,
                "mean proportion real": comparison.mean_proportion_real[t],
                "mean proportion generated": comparison.mean_proportion_generated[t],
                "Wasserstein": comparison.wasserstein[t].value,
                "CI low": comparison.wasserstein[t].ci_low,
                "CI high": comparison.wasserstein[t].ci_high,
            }
            for t in comparison.cell_types
        ]
    )


def evaluate_celltypes(
    generated: Annotated[Path, typer.Argument(help="Folder of generated H&E images")],
    real: Annotated[Path, typer.Option(help="Folder of real H&E images")],
    out: Annotated[Path, typer.Option(help="Output folder: metrics.json, report.html, PNG")],
    mpp: Annotated[float, typer.Option(help="Pixel size of both sets, µm per pixel")] = 0.5,
    model: Annotated[str, typer.Option(help="Registered cell-type model")] = DEFAULT_MODEL,
    bootstrap: Annotated[
        int, typer.Option(help="Bootstrap resamples (over images) for the 95 % intervals")
    ] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap")] = 0,
    geojson: Annotated[
        Path | None,
        typer.Option(
            help="Also write every image's typed cells as QuPath GeoJSON detections: "
            "DIR/real/... and DIR/generated/... (one .geojson per image, image px)"
        ),
    ] = None,
) -> None:
    """Per-type Wasserstein distance between real and generated cell-type proportions,
    nucleus counts and densities (bootstrap 95 % intervals)."""
    if not mpp > 0:
        raise EvaluationError(f"--mpp must be a positive pixel size in µm, got {mpp}")
    cell_model = build_cell_type_model(model, mpp=mpp)
    real_profile = profile_folder(real, cell_model, "real", geojson)
    generated_profile = profile_folder(generated, cell_model, "generated", geojson)
    comparison = compare_profiles(
        real_profile, generated_profile, model=cell_model.name, mpp=mpp,
        iterations=bootstrap, seed=seed,
    )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    metrics = {
        **{f"wasserstein_{t}": comparison.wasserstein[t] for t in comparison.cell_types},
        "nuclei_per_image_real": comparison.nuclei_per_image_real,
        "nuclei_per_image_generated": comparison.nuclei_per_image_generated,
        "density_wasserstein_per_mm2": comparison.density_wasserstein,
        "num_real": comparison.num_images[0],
        "num_generated": comparison.num_images[1],
        "num_real_without_nuclei": comparison.num_empty[0],
        "num_generated_without_nuclei": comparison.num_empty[1],
    }
    section = ReportSection(
        title="Cell-type fidelity",
        metrics=metrics,
        figures=[_proportion_figure(comparison, out)],
        table=_table(comparison),
        notes=(
            (
                f"Model {cell_model.name!r} at {mpp} µm/px: nuclei segmented and typed per "
                "image; per type, the 1-D Wasserstein distance between the real and the "
                "generated per-image proportions (0 = identical distributions)."
            ),
            (
                "Images without any nucleus have no proportions and are left out of them "
                "(counted above); densities are nuclei per mm² of image area."
            ),
            (
                f"Intervals: bootstrap percentile, each set resampled over its images, "
                f"{bootstrap} resamples, seed {seed}."
            ),
            (
                "The classical model is morphology heuristics (size, shape, hematoxylin "
                "darkness), not a trained classifier: read the types as 'lymphocyte-like' "
                "etc. (see mupad.evaluation.celltypes)."
            ),
        ),
    )
    config = {
        "generated": generated.resolve(), "real": real.resolve(), "mpp": mpp,
        "model": config_dict(cell_model), "bootstrap": bootstrap, "seed": seed,
    }  # fmt: skip
    metrics_path, report_path = write_evaluation(out, "Cell-type fidelity", [section], config)
    for t in comparison.cell_types:
        console.print(f"Wasserstein {t}: {comparison.wasserstein[t]}")
    console.print(f"[green]wrote[/green] {metrics_path} and {report_path}")
    typer.echo(json.dumps({"out": str(out), **comparison.to_dict()}))


def register(app: typer.Typer) -> None:
    """Add `celltypes` to the `mupad evaluate` group."""
    app.command("celltypes")(evaluate_celltypes)


__all__ = ["evaluate_celltypes", "profile_folder", "register"]
