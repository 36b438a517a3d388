"""`mupad evaluate biomarker`: ROC AUC of the DAB-positive fraction of (virtual) IHC images
against case labels.

    mupad evaluate biomarker IHC_DIR --labels labels.csv --out OUT [--exclude-equivocal]
        [--dab-threshold 0.05] [--tissue-threshold 0.03] [--bootstrap 1000] [--seed 0]

IHC_DIR holds one hematoxylin-DAB image per case (flat or in subfolders; file stems must be
unique). labels.csv has a header and the columns `image,label` (image: file name or stem;
label: positive/negative/equivocal or a HER2 score 0/1+/2+/3+, see
`mupad.evaluation.biomarker`). Every image needs a label.

Writes OUT/metrics.json, OUT/report.html and OUT/roc.png.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import pandas as pd
import typer

from mupad.evaluation.biomarker import (
    DEFAULT_DAB_THRESHOLD,
    DEFAULT_TISSUE_THRESHOLD,
    BiomarkerResult,
    biomarker_auc,
    dab_positive_fraction,
    match_labels,
    read_labels,
)
from mupad.evaluation.cli_support import console
from mupad.evaluation.images import image_files, read_rgb
from mupad.evaluation.report import ReportSection, write_evaluation
from mupad.evaluation.stats import EvaluationError

FIGURE = "roc.png"


def score_folder(
    folder: Path, dab_threshold: float, tissue_threshold: float
) -> tuple[list[str], list[float]]:
    """(stems, DAB-positive fractions) of every image under `folder`, one at a time."""
    files = image_files(folder)
    if not files:
        raise EvaluationError(f"no IHC images under {folder}")
    stems = [p.stem for p in files]
    repeated = sorted({s for s in stems if stems.count(s) > 1})
    if repeated:
        raise EvaluationError(
            f"image stems must be unique to match labels; repeated: {repeated[:5]}"
        )
    scores = []
    for path in files:
        image = read_rgb(path).transpose(2, 0, 1)  # (3, H, W)
        try:
            scores.append(float(dab_positive_fraction(image, dab_threshold, tissue_threshold)[0]))
        except EvaluationError as error:
            raise EvaluationError(f"{path}: {error}") from None
    return stems, scores


def _roc_figure(result: BiomarkerResult, out: Path) -> Path:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.2, 4.0))
    axis = figure.add_subplot()
    # straight segments between the ROC points: the diagonal pieces are tied scores
    curve = result.curve
    axis.plot(curve.false_positive_rate, curve.true_positive_rate, label=f"AUC {result.auc}")
    axis.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
    point = result.youden
    axis.scatter([1 - point.specificity], [point.sensitivity], color="black", zorder=3,
                 label=f"Youden, threshold {point.threshold:.3g}")  # fmt: skip
    axis.set_xlabel("false positive rate (1 - specificity)")
    axis.set_ylabel("true positive rate (sensitivity)")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1.02)
    axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(out / FIGURE, dpi=100)
    return Path(FIGURE)


def evaluate_biomarker(
    ihc_dir: Annotated[Path, typer.Argument(help="Folder of (virtual) IHC images, one per case")],
    labels: Annotated[Path, typer.Option(help="CSV with columns image,label")],
    out: Annotated[Path, typer.Option(help="Output folder: metrics.json, report.html, PNG")],
    exclude_equivocal: Annotated[
        bool, typer.Option(help="Leave equivocal cases (e.g. HER2 2+) out instead of failing")
    ] = False,
    dab_threshold: Annotated[
        float, typer.Option(help="DAB optical density (rgb2hed units) of a positive pixel")
    ] = DEFAULT_DAB_THRESHOLD,
    tissue_threshold: Annotated[
        float, typer.Option(help="Summed RGB optical density of a tissue pixel")
    ] = DEFAULT_TISSUE_THRESHOLD,
    bootstrap: Annotated[
        int, typer.Option(help="Stratified bootstrap resamples for the 95 % interval")
    ] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap")] = 0,
) -> None:
    """ROC AUC (stratified bootstrap 95 % interval) of the DAB-positive fraction per image
    against binary case labels, with the Youden threshold for information."""
    stems, scores = score_folder(ihc_dir, dab_threshold, tissue_threshold)
    case_labels = match_labels(stems, read_labels(labels))
    result = biomarker_auc(
        scores, case_labels, exclude_equivocal=exclude_equivocal, iterations=bootstrap,
        seed=seed,
    )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(
        {"image": stems, "label": [c.value for c in case_labels], "dab_fraction": scores}
    )
    section = ReportSection(
        title="Biomarker AUC",
        metrics={
            "auc": result.auc,
            "youden_threshold": result.youden.threshold,
            "youden_sensitivity": result.youden.sensitivity,
            "youden_specificity": result.youden.specificity,
            "num_positive": result.num_positive,
            "num_negative": result.num_negative,
            "num_excluded_equivocal": result.num_excluded_equivocal,
        },
        figures=[_roc_figure(result, out)],
        table=table,
        notes=(
            (
                "Score: the share of tissue pixels (summed RGB optical density > "
                f"{tissue_threshold}) whose DAB optical density (rgb2hed units) exceeds "
                f"{dab_threshold}. Meant for hematoxylin-DAB images, not H&E."
            ),
            (
                "AUC = P(score of a positive case > score of a negative case) + half the "
                f"ties; interval: stratified bootstrap, {bootstrap} resamples, seed {seed}."
            ),
            (
                "The Youden threshold is chosen on these same cases, so its sensitivity "
                "and specificity are optimistic; it is reported for information only."
            ),
        ),
    )
    config = {
        "ihc_dir": ihc_dir.resolve(), "labels": labels.resolve(),
        "exclude_equivocal": exclude_equivocal, "dab_threshold": dab_threshold,
        "tissue_threshold": tissue_threshold, "bootstrap": bootstrap, "seed": seed,
    }  # fmt: skip
    metrics_path, report_path = write_evaluation(
        out, "Biomarker AUC from virtual IHC", [section], config
    )
    console.print(f"AUC: {result.auc}")
    console.print(f"[green]wrote[/green] {metrics_path} and {report_path}")
    typer.echo(json.dumps({"out": str(out), **result.to_dict()}))


def register(app: typer.Typer) -> None:
    """Add `biomarker` to the `mupad evaluate` group."""
    app.command("biomarker")(evaluate_biomarker)


__all__ = ["evaluate_biomarker", "register", "score_folder"]
