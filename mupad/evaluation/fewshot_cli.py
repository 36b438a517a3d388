"""`mupad evaluate fewshot`: k-shot classification with and without `mupad augment` images.

    mupad evaluate fewshot --train POOL [--test TEST | --test-per-class 4] [--augmented AUG]
        [--shots 5,10] [--seeds 5] [--epochs 50] [--size 64] [--batch-size 32] [--lr 0.05]
        [--weight-decay 5e-4] [--schedule cosine] [--synthetic-per-shot N] [--device cpu]
        [--bf16] --out OUT

POOL is an ImageFolder `<class>/<image>` of real images; the shots come from it. TEST is a
held-out folder with the same classes; without it, `--test-per-class` images per class are
split off the pool (fixed per class) and never used as shots. AUG is the --out folder of
`mupad augment` run on POOL: the augmented arm adds the variations of the chosen shots only.
The protocol and training settings are in `mupad.evaluation.fewshot`.

Writes OUT/metrics.json, OUT/report.html, OUT/accuracy.png (mean ± std per k and arm) and
OUT/fewshot.json (every run: accuracy per class, the shot files).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import numpy as np
import pandas as pd
import typer

from mupad.evaluation.cli_support import console, parse_int_list
from mupad.evaluation.fewshot import (
    FewShotConfig,
    FewShotResult,
    LRSchedule,
    load_fewshot_data,
    run_fewshot,
)
from mupad.evaluation.report import ReportSection, write_evaluation
from mupad.fileio import atomic_write_text

ACCURACY_FIGURE = "accuracy.png"
RESULT_NAME = "fewshot.json"  # every run, with per-class accuracies and the shot files


def _accuracy_figure(result: FewShotResult, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(dict.fromkeys(s.arm for s in result.summaries))
    shots = list(result.config.shots)
    width = 0.8 / len(arms)
    figure, axis = plt.subplots(figsize=(1.5 + 1.4 * len(shots) * len(arms), 3.6))
    for index, arm in enumerate(arms):
        summaries = [result.summary(k, arm) for k in shots]
        positions = [i + (index - (len(arms) - 1) / 2) * width for i in range(len(shots))]
        axis.bar(
            positions, [s.mean for s in summaries], width, yerr=[s.std for s in summaries],
            capsize=4, label=arm.value,
        )  # fmt: skip
    axis.axhline(1.0 / len(result.class_names), color="grey", linestyle=":", label="chance")
    axis.set_xticks(range(len(shots)), [f"k = {k}" for k in shots])
    axis.set_ylim(0, 1)
    axis.set_ylabel(f"test accuracy (mean ± std, {result.config.num_seeds} seeds)")
    axis.legend(loc="upper left", fontsize="small")
    figure.tight_layout()
    figure.savefig(out / ACCURACY_FIGURE, dpi=100)
    plt.close(figure)
    return Path(ACCURACY_FIGURE)


def _sections(result: FewShotResult, figure: Path) -> list[ReportSection]:
    config = result.config
    metrics: dict[str, object] = {}
    for summary in result.summaries:
        name = f"accuracy_k{summary.shots}_{summary.arm.value}"
        metrics[f"{name}_mean"] = summary.mean
        metrics[f"{name}_std"] = summary.std
    for gain in result.gains:
        metrics[f"gain_k{gain.shots}"] = gain.gain
        metrics[f"relative_gain_k{gain.shots}"] = gain.relative_gain
        metrics[f"gain_k{gain.shots}_sign_flip_p"] = gain.p_value
        metrics[f"gain_k{gain.shots}_wins"] = f"{gain.wins} of {gain.gain.n[0]} seeds"
    metrics.update(
        num_classes=len(result.class_names), num_pool=result.num_pool, num_test=result.num_test
    )
    notes = [
        (
            f"ResNet-18 ({result.backend} implementation) from random initialisation, SGD "
            f"(momentum {config.momentum}, weight decay {config.weight_decay}, batch "
            f"{config.batch_size}, lr {config.learning_rate} with {config.schedule.value} decay) "
            f"for {config.epochs} epochs at {config.image_size} px; random flips/90° rotations "
            "only. Std is the sample std over seeds."
        ),
        (
            "Both arms of a seed share the shots, the initial weights and the data-order seed; "
            "the augmented arm adds only the synthetic variations of those shots."
        ),
    ]
    if result.gains:
        notes.append(
            "Gain = augmented - real accuracy, paired by seed: 95 % t interval over seeds and "
            "a two-sided exact sign-flip test."
        )
    runs = pd.DataFrame(
        [
            {
                "k": r.shots, "arm": r.arm.value, "seed": r.seed, "accuracy": r.accuracy,
                "real images": r.num_real, "synthetic images": r.num_synthetic,
            }
            for r in result.runs
        ]
    )  # fmt: skip
    per_class = []
    for summary in result.summaries:
        chosen = [r for r in result.runs if r.shots == summary.shots and r.arm is summary.arm]
        per_class.append(
            {
                "k": summary.shots,
                "arm": summary.arm.value,
                **{
                    name: float(np.mean([r.per_class_accuracy[name] for r in chosen]))
                    for name in result.class_names
                },
            }
        )
    return [
        ReportSection("Few-shot accuracy", metrics, figures=[figure], notes=notes),
        ReportSection("Per-class accuracy (mean over seeds)", table=pd.DataFrame(per_class)),
        ReportSection("Runs", table=runs),
    ]


def evaluate_fewshot(
    train: Annotated[Path, typer.Option(help="Real training pool: <class>/<image> folders")],
    out: Annotated[Path, typer.Option(help="Output folder: metrics.json, report.html, PNG")],
    test: Annotated[
        Path | None, typer.Option(help="Held-out test folder with the same classes")
    ] = None,
    test_per_class: Annotated[
        int, typer.Option(help="Without --test: images per class held out of the pool")
    ] = 4,
    augmented: Annotated[
        Path | None, typer.Option(help="`mupad augment` output folder (adds the augmented arm)")
    ] = None,
    shots: Annotated[str, typer.Option(help="Comma-separated k: real shots per class")] = "5,10",
    seeds: Annotated[int, typer.Option(help="Seeds per k (shots, init and data order)")] = 5,
    first_seed: int = 0,
    epochs: Annotated[int, typer.Option(help="Training epochs (the paper: 50)")] = 50,
    size: Annotated[int, typer.Option(help="Classifier input side in px (>= 32)")] = 64,
    batch_size: int = 32,
    lr: Annotated[float, typer.Option(help="Base SGD learning rate")] = 0.05,
    weight_decay: float = 5e-4,
    momentum: float = 0.9,
    schedule: LRSchedule = LRSchedule.COSINE,
    synthetic_per_shot: Annotated[
        int | None, typer.Option(help="At most N synthetic variations per shot (default: all)")
    ] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N")] = "cpu",
    bf16: Annotated[bool, typer.Option(help="bfloat16 autocast")] = False,
    progress: bool = True,
) -> None:
    """Few-shot classification accuracy (mean ± std over seeds) with and without synthetic
    variations of the shots."""
    config = FewShotConfig(
        shots=parse_int_list(shots, "--shots"), num_seeds=seeds, first_seed=first_seed, epochs=epochs,
        image_size=size, batch_size=batch_size, learning_rate=lr, momentum=momentum,
        weight_decay=weight_decay, schedule=schedule, synthetic_per_shot=synthetic_per_shot,
        device=device, bf16=bf16,
    )  # fmt: skip
    config.validate()
    data = load_fewshot_data(train, test, augmented, image_size=size, test_per_class=test_per_class)
    result = run_fewshot(data, config, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    settings = {
        "train": train.resolve(),
        "test": test.resolve() if test is not None else None,
        "test_per_class": test_per_class if test is None else None,
        "augmented": augmented.resolve() if augmented is not None else None,
        "backend": result.backend,
        **config.to_dict(),
    }
    sections = _sections(result, _accuracy_figure(result, out))
    metrics_path, report_path = write_evaluation(out, "Few-shot classification", sections, settings)
    atomic_write_text(out / RESULT_NAME, json.dumps(result.to_dict(), indent=2) + "\n")
    for summary in result.summaries:
        console.print(
            f"k={summary.shots} {summary.arm.value}: {summary.mean:.3f} ± {summary.std:.3f}"
        )
    console.print(f"[green]wrote[/green] {metrics_path} and {report_path}")
    typer.echo(json.dumps({"out": str(out), "summaries": [s.to_dict() for s in result.summaries]}))


def register(app: typer.Typer) -> None:
    """Add `fewshot` to the `mupad evaluate` group."""
    app.command("fewshot")(evaluate_fewshot)


__all__ = ["evaluate_fewshot", "register"]
