"""`mupad evaluate mif`: marker correlation of predicted vs real mIF stacks.

    mupad evaluate mif PRED_DIR REAL_DIR --markers CD3,CD8,... --out OUT
        [--compare OTHER_PRED_DIR] [--slide-pattern REGEX] [--min-patches-per-slide 3]
        [--bootstrap 1000] [--num-permutations 10000] [--seed 0]

PRED_DIR is what `mupad mif apply` writes: `<stem>.tif` (K-channel stacks, channels in
marker order) with `<stem>.json` sidecars. REAL_DIR holds the true stacks `<stem>.tif` —
flat, or the `mupad mif train --data` layout (its `mif/` folder is used). Stacks are read
with the same code as `mupad mif` (`he2mif.read_mif_stack`). When the sidecars carry the
training run's intensity scales, the true stacks are scaled (and clipped) as in training,
so they are what the model was taught to predict; otherwise raw intensities are used
(Pearson correlation is invariant to a positive rescaling).

`--slide-pattern` is a regular expression searched in each stem whose first group names the
patch's slide (e.g. '^(.+)_x\\d+_y\\d+$'); without it every patch counts as one slide.
`--compare` scores a second method's predictions of the same stems and runs the two-sided
paired permutation test on per-patch scores (overall: the mean PCC over the markers defined
for both; and per marker).

Writes OUT/metrics.json, OUT/report.html and OUT/pcc_per_marker.png.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pandas as pd
import typer

from mupad.evaluation.cli_support import console
from mupad.evaluation.pcc import (
    DEFAULT_BOOTSTRAP_ITERATIONS,
    MIN_PATCHES_PER_SLIDE,
    Correlations,
    MarkerCorrelationReport,
    PermutationTestResult,
    marker_correlation,
    paired_permutation_test,
    patch_correlations,
    per_patch_scores,
)
from mupad.evaluation.report import ReportSection, write_evaluation
from mupad.evaluation.stats import Estimate, EvaluationError

FIGURE = "pcc_per_marker.png"


@dataclass(frozen=True)
class StackFolder:
    """mIF stacks of one folder, sorted by stem."""

    stems: tuple[str, ...]
    maps: np.ndarray  # (N, K, H, W) float32
    intensity_scales: list[float] | None  # from `mif apply` sidecars, when present


def _stack_files(folder: Path, what: str) -> dict[str, Path]:
    from mupad.applications.he2mif import MIF_SUFFIXES

    if not folder.is_dir():
        raise EvaluationError(f"{what} folder {folder} does not exist")
    files = {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in MIF_SUFFIXES}
    if not files:
        raise EvaluationError(
            f"no mIF stacks ({', '.join(MIF_SUFFIXES)}) in the {what} folder {folder}"
        )
    return files


def _sidecar_scales(
    folder: Path, stems: Sequence[str], markers: Sequence[str]
) -> list[float] | None:
    """Intensity scales from `mif apply` sidecars; their marker lists must match."""
    scales: list[float] | None = None
    for stem in stems:
        sidecar = folder / f"{stem}.json"
        if not sidecar.is_file():
            continue
        record = json.loads(sidecar.read_text())
        if record.get("markers") is not None and list(record["markers"]) != list(markers):
            raise EvaluationError(
                f"{sidecar} says the stack holds markers {record['markers']} but --markers "
                f"gives {list(markers)}; name the channels in the order the model wrote them"
            )
        scales = record.get("intensity_scales") or scales
    return scales


def _read_stacks(
    files: dict[str, Path], stems: Sequence[str], markers: Sequence[str], what: str
) -> np.ndarray:
    from mupad.applications.he2mif import read_mif_stack

    stacks = [read_mif_stack(files[stem], len(markers)) for stem in stems]
    shapes = sorted({s.shape for s in stacks})
    if len(shapes) > 1:
        raise EvaluationError(f"{what} stacks differ in shape {shapes}; cut them to one size")
    return np.stack(stacks).astype(np.float32)  # (N, K, H, W)


def read_predictions(
    folder: Path, markers: Sequence[str], stems: Sequence[str] | None = None
) -> StackFolder:
    """`mupad mif apply` outputs (all of them, or the given stems)."""
    files = _stack_files(folder, "predictions")
    chosen = sorted(files) if stems is None else list(stems)
    missing = [s for s in chosen if s not in files]
    if missing:
        raise EvaluationError(
            f"{len(missing)} stem(s) have no prediction in {folder}, e.g. {', '.join(missing[:5])}; "
            "both methods must predict the same patches"
        )
    maps = _read_stacks(files, chosen, markers, "predicted")
    return StackFolder(tuple(chosen), maps, _sidecar_scales(folder, chosen, markers))


def read_truth(
    folder: Path, markers: Sequence[str], stems: Sequence[str], scales: Sequence[float] | None
) -> np.ndarray:
    """True stacks of `stems` from a flat folder or a `mif train --data` folder."""
    from mupad.applications.he2mif import apply_intensity_scales

    root = folder / "mif" if (folder / "mif").is_dir() else folder
    files = _stack_files(root, "real")
    missing = [s for s in stems if s not in files]
    if missing:
        raise EvaluationError(
            f"{len(missing)} prediction(s) have no true stack in {root}, e.g. "
            f"{', '.join(missing[:5])}; file stems must match"
        )
    raw = _read_stacks(files, stems, markers, "real")
    if scales:
        return apply_intensity_scales(raw, scales)
    return raw


def slide_ids(stems: Sequence[str], pattern: str | None) -> list[str] | None:
    """The first group of `pattern` searched in each stem (None: no slides given)."""
    if pattern is None:
        return None
    try:
        compiled = re.compile(pattern)
    except re.error as error:
        raise EvaluationError(
            f"--slide-pattern {pattern!r} is not a regular expression: {error}"
        ) from None
    if compiled.groups < 1:
        raise EvaluationError(
            f"--slide-pattern {pattern!r} needs a group naming the slide, e.g. '^(.+)_x'"
        )
    ids = []
    for stem in stems:
        match = compiled.search(stem)
        if match is None or match.group(1) is None:
            raise EvaluationError(f"--slide-pattern {pattern!r} does not match the stem {stem!r}")
        ids.append(match.group(1))
    return ids


def _bar_figure(report: MarkerCorrelationReport, out: Path) -> Path:
    """Per-marker PCC bars (patch and slide level) with their intervals."""
    from matplotlib.figure import Figure

    names = list(report.marker_names)
    x = np.arange(len(names))
    figure = Figure(figsize=(max(4.0, 0.9 * len(names) + 2), 3.6))
    axis = figure.add_subplot()
    for offset, (label, values) in zip(
        (-0.2, 0.2), (("patch", report.patch), ("slide", report.slide))
    ):
        estimates = [values[m] for m in names]
        heights = np.array([np.nan if e is None else e.value for e in estimates])
        low = np.array([np.nan if e is None else e.value - e.ci_low for e in estimates])
        high = np.array([np.nan if e is None else e.ci_high - e.value for e in estimates])
        axis.bar(x + offset, np.nan_to_num(heights), 0.4, label=f"{label} level",
                 yerr=np.nan_to_num(np.stack([low, high])), capsize=3)  # fmt: skip
        for position in x[np.isnan(heights)]:  # undefined: say so rather than draw a 0
            axis.text(position + offset, 0.02, "n/a", ha="center", fontsize=8)
    axis.axhline(0.0, color="black", linewidth=0.8)
    axis.set_xticks(x, names, rotation=45 if len(names) > 6 else 0)
    axis.set_ylabel("Pearson r (95 % CI)")
    axis.set_ylim(-1.0, 1.0)
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / FIGURE, dpi=100)
    return Path(FIGURE)


def _marker_table(report: MarkerCorrelationReport) -> pd.DataFrame:
    def cell(value: Estimate | None, attribute: str) -> float | None:
        return None if value is None else getattr(value, attribute)

    rows = []
    for m in report.marker_names:
        rows.append({
            "marker": m,
            "patch PCC": cell(report.patch[m], "value"),
            "patch CI low": cell(report.patch[m], "ci_low"),
            "patch CI high": cell(report.patch[m], "ci_high"),
            "patches undefined": report.patch_undefined[m],
            "slide PCC": cell(report.slide[m], "value"),
            "slides undefined": report.slide_undefined[m],
        })  # fmt: skip
    return pd.DataFrame(rows)


def compare_methods(
    ours: Correlations, other: Correlations, num_permutations: int, seed: int
) -> tuple[PermutationTestResult, dict[str, PermutationTestResult | None]]:
    """Permutation tests of our per-patch PCC against another method's: overall (mean over
    markers defined for both) and per marker (patches defined for both; None if none)."""
    overall = paired_permutation_test(*per_patch_scores(ours, other), num_permutations, seed)
    per_marker: dict[str, PermutationTestResult | None] = {}
    for k, name in enumerate(ours.marker_names):
        both = ours.defined[:, k] & other.defined[:, k]
        per_marker[name] = (
            paired_permutation_test(
                ours.values[both, k], other.values[both, k], num_permutations, seed
            )
            if both.any()
            else None
        )
    return overall, per_marker


def _comparison_section(
    compare: Path,
    overall: PermutationTestResult,
    per_marker: dict[str, PermutationTestResult | None],
) -> ReportSection:
    rows = [
        {"marker": m, **(r.to_dict() if r is not None else {"n": 0})} for m, r in per_marker.items()
    ]
    return ReportSection(
        title="Paired permutation test",
        metrics={
            "mean_difference": overall.mean_difference,
            "p_value": overall.p_value,
            "num_pairs": overall.n,
            "num_permutations": overall.num_permutations,
            "exact": str(overall.exact),
        },
        table=pd.DataFrame(rows),
        notes=(
            (
                f"Predictions of PRED_DIR minus those of {compare}: per-patch PCC (mean over "
                "the markers defined for both methods in that patch), two-sided test by random "
                "sign flips of the paired differences (exact enumeration when 2^n <= the "
                "number of permutations; otherwise p = (1 + hits) / (1 + permutations))."
            ),
        ),
    )


def evaluate_mif(
    pred_dir: Annotated[
        Path, typer.Argument(help="Predicted stacks: the output folder of `mupad mif apply`")
    ],
    real_dir: Annotated[
        Path, typer.Argument(help="True stacks <stem>.tif (flat, or a `mif train --data` folder)")
    ],
    markers: Annotated[str, typer.Option(help="Marker names in channel order: CD3,CD8,...")],
    out: Annotated[Path, typer.Option(help="Output folder: metrics.json, report.html, PNG")],
    compare: Annotated[
        Path | None,
        typer.Option(help="Another method's predictions of the same stems: permutation test"),
    ] = None,
    slide_pattern: Annotated[
        str | None,
        typer.Option(
            help="Regex whose first group is the slide id in each stem (default: one slide)"
        ),
    ] = None,
    min_patches_per_slide: Annotated[
        int, typer.Option(help="Slides with fewer patches are left out of the slide level")
    ] = MIN_PATCHES_PER_SLIDE,
    bootstrap: Annotated[
        int, typer.Option(help="Bootstrap resamples for the 95 % intervals")
    ] = DEFAULT_BOOTSTRAP_ITERATIONS,
    num_permutations: Annotated[int, typer.Option(help="Random sign flips of the test")] = 10_000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap and the test")] = 0,
) -> None:
    """Patch- and slide-level Pearson correlation per marker (bootstrap 95 % intervals),
    and a paired permutation test against another method on request."""
    from mupad.applications.he2mif import check_marker_names

    names = check_marker_names(markers.split(","))
    predictions = read_predictions(pred_dir, names)
    truth = read_truth(real_dir, names, predictions.stems, predictions.intensity_scales)
    slides = slide_ids(predictions.stems, slide_pattern)
    report = marker_correlation(
        predictions.maps, truth, names, slides, min_patches_per_slide=min_patches_per_slide,
        iterations=bootstrap, seed=seed,
    )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    sections = [
        ReportSection(
            title="Patch-level PCC",
            metrics={
                "mean_over_markers": report.patch_mean,
                **{f"pcc_{m}": report.patch[m] for m in names},
                "num_patches": report.num_patches,
            },
            figures=[_bar_figure(report, out)],
            table=_marker_table(report),
            notes=(
                (
                    "Pearson correlation over pixels of each predicted vs true map; "
                    "patches where either map is constant have no correlation, are left "
                    "out of the means and counted ('patches undefined'). Intervals: "
                    f"bootstrap over patches, {bootstrap} resamples, seed {seed}."
                ),
            ),
        ),
        ReportSection(
            title="Slide-level PCC",
            metrics={
                "mean_over_markers": report.slide_mean,
                **{f"pcc_{m}": report.slide[m] for m in names},
                "num_slides": len(report.slide_ids),
                "num_slides_too_small": len(report.slides_too_small),
            },
            notes=(
                "Per slide, Pearson correlation across its patches of the mean predicted vs "
                "true intensity per patch, then the mean over slides (interval: bootstrap "
                f"over slides). Slides with fewer than {min_patches_per_slide} patches are "
                "left out. "
                + (
                    f"Slides from --slide-pattern {slide_pattern!r}."
                    if slide_pattern
                    else "No --slide-pattern: all patches count as one slide."
                ),
            ),
        ),
    ]
    comparison = None
    if compare is not None:
        other = read_predictions(compare, names, predictions.stems)
        ours_c = patch_correlations(predictions.maps, truth, names)
        other_c = patch_correlations(other.maps, truth, names)
        comparison = compare_methods(ours_c, other_c, num_permutations, seed)
        sections.append(_comparison_section(compare, *comparison))
    config: dict[str, Any] = {
        "pred_dir": pred_dir.resolve(), "real_dir": real_dir.resolve(), "markers": names,
        "compare": compare.resolve() if compare else None, "slide_pattern": slide_pattern,
        "min_patches_per_slide": min_patches_per_slide, "bootstrap": bootstrap,
        "num_permutations": num_permutations, "seed": seed,
        "intensity_scales": predictions.intensity_scales,
        "num_patches": report.num_patches,
    }  # fmt: skip
    metrics_path, report_path = write_evaluation(out, "mIF marker correlation", sections, config)
    console.print(f"mean patch PCC: {report.patch_mean}; slide: {report.slide_mean}")
    console.print(f"[green]wrote[/green] {metrics_path} and {report_path}")
    summary: dict[str, Any] = {"out": str(out), **report.to_dict()}
    if comparison is not None:
        summary["permutation_test"] = comparison[0].to_dict()
    typer.echo(json.dumps(summary))


def register(app: typer.Typer) -> None:
    """Add `mif` to the `mupad evaluate` group."""
    app.command("mif")(evaluate_mif)


__all__ = ["StackFolder", "evaluate_mif", "read_predictions", "read_truth", "register", "slide_ids"]
