"""`mupad evaluate generator`: FID/KID and conditioning fidelity of trained checkpoints.

    mupad evaluate generator --checkpoint RUN --real HELDOUT --train-real TRAIN --out OUT
        [--captions captions.json] [--per-class 16] [--checkpoints last|all|200,400]
        [--features inception] [--small-sample refuse|allow] [--bootstrap 25] [--seed 0]
        [--real-mpp F] [--steps 250 --sampler sde --guidance-start 2.5 ...]

For every chosen checkpoint of RUN (EMA weights when the checkpoint has them, as
`mupad generate` loads them), `--per-class` tiles are generated per class of HELDOUT
(`<class>/<tile>`, tiles never used in training), each prompted with its class caption
(--captions, else the captions the run recorded). Reported per checkpoint:

- FID and KID (bootstrap 95 % intervals) of the generated tiles vs the held-out real tiles,
  beside three reference points computed once: real vs uniform noise, real vs blurred
  real, and real held-out vs real training tiles (the floor for a model of TRAIN);
- the border ratio at the model's token period (mean |pixel step| across token borders /
  inside tokens: 1.0 for real tissue, above 1 where the token grid shows) and the colour
  distance (mean |difference| of per-channel RGB mean and std to the held-out tiles, 0-255);
- conditioning fidelity: a logistic-regression classifier fitted on TRAIN's features labels
  each generated tile; its accuracy against the class the tile was asked for, with the
  chance level 1/#classes and the same classifier's accuracy on the held-out real tiles
  (the ceiling), overall and per class.

Real tiles are brought to the model's tile side by centre-crop + resize (as `mupad prepare
--kind tiles` made the training tiles), or with --real-mpp resampled to the model's µm/px
and centre-cut (see `mupad.evaluation.generator_fidelity`).

Writes OUT/metrics.json, OUT/report.html, OUT/<checkpoint>/samples.png (per class: real
tiles, then generated), OUT/<checkpoint>/generated/<class>/<k>.png + sidecars (reused by a
rerun with the same settings), and OUT/over_training.png when several checkpoints are given.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pandas as pd
import typer
from rich.markup import escape

from mupad.applications.generate_cli import (
    BatchSize,
    Bf16,
    Device,
    GuidanceEnd,
    GuidanceStart,
    Latents,
    Mode,
    ModelMpp,
    Progress,
    Sampler,
    Scale,
    Schedule,
    SkipBelow,
    Steps,
    TextEncoder,
    THigh,
    TLow,
    build_sample_config,
    generation_settings,
)
from mupad.config import GuidanceConfig, GuidanceMode, GuidanceScheduleKind, SamplerKind, to_dict
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
from mupad.evaluation.generator_fidelity import (
    DEFAULT_L2,
    CheckpointRef,
    ClassAccuracy,
    LinearClassifier,
    check_captions,
    check_text_stream,
    class_seed,
    conditioning_accuracy,
    fit_class_classifier,
    generate_class_tiles,
    load_real_tiles,
    run_captions,
    select_checkpoints,
)
from mupad.evaluation.images import ImageSet
from mupad.evaluation.report import ReportSection, write_evaluation
from mupad.evaluation.stats import Estimate, EvaluationError
from mupad.training.captioned_tiles import read_captions

OVER_TRAINING_FIGURE = "over_training.png"
GRID_COLUMNS = 4  # real (and generated) tiles per class row of a sample grid


def _exact(value: float, what: str, n: int) -> Estimate:
    """An exactly known number as an Estimate (its interval is the point)."""
    return Estimate(value=value, ci_low=value, ci_high=value, method=what, n=(n,))


# --------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _class_rows(image_set: ImageSet, class_name: str, count: int) -> list[np.ndarray | None]:
    index = image_set.class_names.index(class_name)
    rows = np.flatnonzero(image_set.labels.numpy() == index)[:count]  # type: ignore[union-attr]
    return [image_set.images[i].permute(1, 2, 0).numpy() for i in rows]


def _sample_grid(real: ImageSet, generated: ImageSet, out: Path, name: Path) -> Path:
    """One row per class: up to GRID_COLUMNS held-out real tiles, then generated ones."""
    plt = _pyplot()
    classes = generated.class_names
    widths = [
        min(GRID_COLUMNS, int(np.bincount(s.labels.numpy()).max())) for s in (real, generated)
    ]
    columns = sum(widths)
    figure, axes = plt.subplots(
        len(classes), columns, figsize=(1.1 * columns + 1.5, 1.1 * len(classes) + 0.4),
        squeeze=False,
    )  # fmt: skip
    for row, class_name in enumerate(classes):
        tiles = _class_rows(real, class_name, widths[0])
        tiles += [None] * (widths[0] - len(tiles))  # a class with fewer real tiles
        tiles += _class_rows(generated, class_name, widths[1])
        for column in range(columns):
            axis = axes[row, column]
            axis.set_xticks([])
            axis.set_yticks([])
            if column < len(tiles) and tiles[column] is not None:
                axis.imshow(tiles[column])
            else:
                axis.axis("off")
            if row == 0:
                axis.set_title("real" if column < widths[0] else "generated", fontsize=8)
        axes[row, 0].set_ylabel(class_name, fontsize=7, rotation=0, ha="right", va="center")
    figure.tight_layout()
    (out / name).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out / name, dpi=100)
    plt.close(figure)
    return name


def _errorbar(axis, steps: list[int], estimates: list[Estimate], label: str) -> None:
    values = np.array([e.value for e in estimates])
    low = values - np.array([e.ci_low for e in estimates])
    high = np.array([e.ci_high for e in estimates]) - values
    axis.errorbar(steps, values, yerr=[low, high], marker="o", capsize=3, label=label)


def _over_training_plot(
    out: Path,
    steps: list[int],
    results: list[dict[str, Any]],
    references: dict[str, Estimate],
    ceiling: Estimate,
    chance: float,
) -> Path:
    """FID, KID and class accuracy vs training step, with the reference lines."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for axis, metric in zip(axes[:2], ("fid", "kid")):
        _errorbar(axis, steps, [r[metric] for r in results], "generated vs held-out")
        for anchor, style in (("noise", ":"), ("blurred", "--"), ("train", "-.")):
            reference = references[f"{metric}_real_vs_{anchor}"]
            axis.axhline(reference.value, linestyle=style, color="grey", label=f"real vs {anchor}")
        if metric == "fid" and all(r["fid"].value > 0 for r in results):
            axis.set_yscale("log")  # noise sits orders of magnitude above the rest
        axis.set_title(metric.upper())
    accuracy = axes[2]
    _errorbar(accuracy, steps, [r["class_accuracy"] for r in results], "generated")
    accuracy.axhline(ceiling.value, linestyle="--", color="green", label="held-out real")
    accuracy.axhline(chance, linestyle=":", color="grey", label="chance")
    accuracy.set_ylim(0, 1.05)
    accuracy.set_title("class accuracy")
    for axis in axes:
        axis.set_xlabel("training step")
        axis.xaxis.get_major_locator().set_params(integer=True)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out / OVER_TRAINING_FIGURE, dpi=100)
    plt.close(figure)
    return Path(OVER_TRAINING_FIGURE)


# --------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------


def _accuracy_table(generated: ClassAccuracy, real: ClassAccuracy) -> pd.DataFrame:
    real_rows = real.per_class.set_index("class")
    table = generated.per_class.rename(
        columns={
            "n": "n_generated",
            "correct": "correct_generated",
            "accuracy": "accuracy_generated",
        }
    )
    table["n_real"] = [int(real_rows.loc[c, "n"]) for c in table["class"]]
    table["accuracy_real"] = [real_rows.loc[c, "accuracy"] for c in table["class"]]
    return table


def _evaluate_checkpoint(
    ref: CheckpointRef,
    model: Any,
    context: dict[str, Any],
    settings: dict[str, Any],
) -> tuple[ReportSection, dict[str, Any]]:
    """Generate, embed and score one checkpoint; returns its section and numbers."""
    folder = Path(ref.label)
    generated = generate_class_tiles(
        model, context["captions"], settings["per_class"], context["sample_config"],
        settings["out"] / folder / "generated", seed=settings["seed"],
        overwrite=settings["overwrite"], progress=settings["progress"],
    )  # fmt: skip
    features = cached_features(
        generated, context["extractor"], settings["cache_dir"], progress=settings["progress"]
    )
    distances = fid_and_kid(features, context["real_features"], settings)
    accuracy = conditioning_accuracy(
        context["classifier"], features, generated.class_names, generated.labels.numpy(),
        iterations=settings["bootstrap"], seed=settings["seed"],
    )  # fmt: skip
    grid = _sample_grid(context["real"], generated, settings["out"], folder / "samples.png")
    numbers = {
        **distances, "class_accuracy": accuracy.overall,
        **_tile_measures(generated, context["real"], model.config.patch_size * model.codec.downsample),
    }  # fmt: skip
    section = ReportSection(
        title=f"Checkpoint {ref.label}",
        metrics={
            "step": ref.step,
            **numbers,
            "chance_level": context["chance"],
            "class_accuracy_real_heldout": context["ceiling"].overall,
            "num_generated": len(generated),
        },
        figures=[grid],
        table=_accuracy_table(accuracy, context["ceiling"]),
        notes=(
            f"Weights: {model.model_dir} (EMA)"
            if model.model_dir.name == "ema"
            else f"Weights: {model.model_dir} (no EMA weights in this checkpoint)",
            "Sample grid: each row one class, held-out real tiles left, generated right.",
        ),
    )
    return section, numbers


def _jsonable(value: Estimate | float) -> dict[str, object] | float:
    return value.to_dict() if isinstance(value, Estimate) else value


def _tile_measures(generated: ImageSet, real: ImageSet, period: int) -> dict[str, float]:
    """Border ratio at the token period (held-out real beside it) and colour distance."""
    from mupad.evaluation.tile_quality import border_ratio, colour_distance, colour_moments

    return {
        "border_ratio": border_ratio(generated.images, period),
        "border_ratio_real_heldout": border_ratio(real.images, period),
        "colour_distance": colour_distance(
            colour_moments(generated.images), colour_moments(real.images)
        ),
    }


def _setup_notes(extractor: FeatureExtractor, settings: dict[str, Any], tile_px: int) -> list[str]:
    scale = (
        f"resampled from {settings['real_mpp']} µm/px to the model's µm/px, centre {tile_px} px cut"
        if settings["real_mpp"] is not None
        else f"centre-cropped to a square and resized (bicubic) to the model's {tile_px} px, as "
        "`mupad prepare --kind tiles` resizes training tiles"
    )
    return [
        f"Real tiles (held-out and training): {scale}.",
        f"Features: {extractor.name} ({extractor.dim}-d). {extractor.description}",
        (
            f"FID/KID intervals: bootstrap over {settings['bootstrap']} resamples of both sets "
            f"(seed {settings['seed']}); FID is biased by sample size, so compare checkpoints at "
            "the same --per-class, and the reference points (computed at the held-out set's "
            "size) only as orders of magnitude."
        ),
        (
            "Class accuracy: the classifier is fitted on --train-real features only; the "
            "held-out real accuracy is its ceiling, chance is 1 / number of classes; intervals "
            "are bootstrap percentile over tiles."
        ),
    ]


# --------------------------------------------------------------------------------------
# Command
# --------------------------------------------------------------------------------------


def evaluate_generator(
    checkpoint: Annotated[
        Path, typer.Option(help="Training run folder, checkpoint folder or model folder")
    ],
    real: Annotated[
        Path, typer.Option(help="Held-out real tiles <class>/<tile>, never used in training")
    ],
    train_real: Annotated[
        Path, typer.Option(help="The real training tiles <class>/<tile> (fits the classifier)")
    ],
    out: Annotated[Path, typer.Option(help="Output folder: metrics.json, report.html, PNGs")],
    captions: Annotated[
        Path | None,
        typer.Option(help="JSON {class: caption} (default: the captions the run recorded)"),
    ] = None,
    per_class: Annotated[int, typer.Option(help="Generated tiles per class")] = 16,
    checkpoints: Annotated[
        str, typer.Option(help="last, all, or steps of RUN/checkpoints: 2000,4000")
    ] = "last",
    real_mpp: Annotated[
        float | None,
        typer.Option(help="µm/px of the real tiles: resample to the model's (default: resize)"),
    ] = None,
    features: FeaturesOption = DEFAULT_EXTRACTOR,
    weights: WeightsOption = None,
    small_sample: Annotated[
        SmallSamplePolicy,
        typer.Option(help="FID with no more images than feature dimensions: refuse or allow"),
    ] = DEFAULT_SMALL_SAMPLE_POLICY,
    bootstrap: Annotated[
        int, typer.Option(help="Bootstrap resamples for the 95 % intervals")
    ] = DEFAULT_BOOTSTRAP_ITERATIONS,
    kid_subsets: Annotated[int, typer.Option(help="KID subsets")] = 100,
    kid_subset_size: Annotated[int, typer.Option(help="KID subset size (capped)")] = 1000,
    blur_sigma: Annotated[float, typer.Option(help="Blur of the reference point, px")] = 3.0,
    classifier_l2: Annotated[
        float, typer.Option(help="L2 penalty of the logistic-regression classifier")
    ] = DEFAULT_L2,
    cache_dir: CacheDirOption = None,
    seed: Annotated[
        int, typer.Option(help="Seed of generation (per class), bootstrap, KID, noise")
    ] = 0,
    sampler: Sampler = SamplerKind.SDE,
    steps: Steps = 250,
    guidance_schedule: Schedule = GuidanceScheduleKind.LINEAR,
    guidance_start: GuidanceStart = 2.5,
    guidance_end: GuidanceEnd = 0.0,
    guidance_mode: Mode = GuidanceMode.JOINT,
    text_scale: Scale = 1.0,
    guidance_t_low: TLow = 0.0,
    guidance_t_high: THigh = 1.0,
    guidance_skip_below: SkipBelow = GuidanceConfig.skip_below,
    batch_size: BatchSize = None,
    text_encoder: TextEncoder = None,
    latents: Latents = None,
    model_mpp: ModelMpp = None,
    bf16: Bf16 = False,
    device: Device = "auto",
    overwrite: Annotated[
        bool, typer.Option(help="Replace generated tiles made with other settings")
    ] = False,
    progress: Progress = True,
) -> None:
    """FID/KID (with noise and blurred-real reference points) and class-conditioning
    accuracy of a trained text-conditioned model, per checkpoint, on held-out real tiles."""
    sample_config = build_sample_config(
        sampler, steps, guidance_schedule, guidance_start, guidance_end, guidance_mode,
        1.0, text_scale, 1.0, guidance_t_low, guidance_t_high, guidance_skip_below, seed,
    )  # fmt: skip
    settings: dict[str, Any] = {
        "checkpoint": checkpoint, "real": real, "train_real": train_real, "out": out,
        "captions_file": captions, "per_class": per_class, "checkpoints": checkpoints,
        "real_mpp": real_mpp, "features": features, "weights": weights,
        "small_sample": small_sample, "bootstrap": bootstrap, "kid_subsets": kid_subsets,
        "kid_subset_size": kid_subset_size, "blur_sigma": blur_sigma,
        "classifier_l2": classifier_l2, "cache_dir": cache_dir or default_cache_dir(),
        "seed": seed, "overwrite": overwrite, "progress": progress,
    }  # fmt: skip
    refs = select_checkpoints(checkpoint, checkpoints)

    def load(ref: CheckpointRef):
        from mupad.applications.generation_model import GenerationModel

        return GenerationModel(
            generation_settings(
                ref.path, text_encoder=text_encoder, latents=latents, model_mpp=model_mpp,
                bf16=bf16, device=device, batch_size=batch_size,
            )
        )  # fmt: skip

    first = load(refs[-1])
    check_text_stream(first)
    caption_map = read_captions(captions) if captions is not None else None
    source = str(captions) if caption_map is not None else "the run's metadata"
    caption_map = caption_map if caption_map is not None else run_captions(first.metadata)
    scale = {"mpp": real_mpp, "model_mpp": first.model_mpp}
    real_set = load_real_tiles(real, first.tile_px, what="held-out real tiles", **scale)
    train_set = load_real_tiles(train_real, first.tile_px, what="training tiles", **scale)
    check_captions(real_set.class_names, caption_map, source)
    extractor = feature_extractor(features, weights, device=first.device)
    num_generated = per_class * len(real_set.class_names)
    caveat = check_small_sample(num_generated, len(real_set), extractor.dim, small_sample)
    real_features, train_features = (
        cached_features(s, extractor, settings["cache_dir"], progress=progress)
        for s in (real_set, train_set)
    )
    classifier: LinearClassifier = fit_class_classifier(
        train_features, train_set.labels.numpy(), train_set.class_names, l2=classifier_l2
    )
    ceiling = conditioning_accuracy(
        classifier, real_features, real_set.class_names, real_set.labels.numpy(),
        iterations=bootstrap, seed=seed,
    )  # fmt: skip
    num_classes = len(classifier.class_names)
    chance = _exact(1.0 / num_classes, "exact: 1 / number of classes", num_classes)
    context = {
        "captions": {c: caption_map[c] for c in real_set.class_names},
        "sample_config": sample_config, "extractor": extractor, "real": real_set,
        "real_features": real_features, "classifier": classifier, "ceiling": ceiling,
        "chance": chance,
    }  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    references = reference_points(real_set, real_features, extractor, settings)
    # The floor: the real training tiles are what a generator that memorised its data
    # would produce, so no model trained on them is expected to score below this.
    references.update(
        {f"{metric}_real_vs_train": value
         for metric, value in fid_and_kid(real_features, train_features, settings).items()}
    )  # fmt: skip
    sections, results, described = [], [], []
    for ref in refs:
        model = first if ref == refs[-1] else load(ref)
        if model.tile_px != first.tile_px:
            raise EvaluationError(
                f"{ref.path} generates {model.tile_px} px tiles but {refs[-1].path} "
                f"{first.tile_px} px; evaluate checkpoints of one run together"
            )
        section, numbers = _evaluate_checkpoint(ref, model, context, settings)
        sections.append(section)
        results.append(numbers)
        described.append(
            {**ref.to_dict(), "model_dir": str(model.model_dir),
             "ema": model.model_dir.name == "ema", "weights_sha256": model.weights_sha256}
        )  # fmt: skip
    notes = _setup_notes(extractor, settings, first.tile_px)
    if caveat is not None:
        notes.append(caveat)
    head = [
        ReportSection(
            title="Setup",
            metrics={
                "num_classes": num_classes,
                "num_real_heldout": len(real_set),
                "num_real_train": len(train_set),
                "per_class": per_class,
                "tile_px": first.tile_px,
                "feature_dim": extractor.dim,
            },
            notes=notes,
        ),
        ReportSection(
            title="Reference points",
            metrics=references,
            notes=(
                "real vs noise: held-out real tiles against as many uniform-noise images.",
                (
                    "real vs blurred: held-out real tiles against themselves blurred "
                    f"(Gaussian, sigma {blur_sigma} px)."
                ),
                (
                    "real vs train: held-out real tiles against the real training tiles "
                    f"({len(train_set)}), the floor a generator of the training "
                    "distribution can reach."
                ),
            ),
        ),
        ReportSection(
            title="Classifier ceiling (held-out real tiles)",
            metrics={
                "class_accuracy_real_heldout": ceiling.overall,
                "chance_level": chance,
            },
            table=ceiling.per_class,
            notes=(classifier.describe() + f"; fitted on {len(train_set)} training tiles.",),
        ),
    ]
    if len(refs) > 1:
        steps_list = [int(r.step) for r in refs]  # type: ignore[arg-type]
        figure = _over_training_plot(
            out, steps_list, results, references, ceiling.overall, chance.value
        )
        table = pd.DataFrame(
            {
                "step": steps_list,
                **{
                    f"{name}{part}": [getattr(r[name], attr) for r in results]
                    for name in ("fid", "kid", "class_accuracy")
                    for part, attr in (("", "value"), ("_low", "ci_low"), ("_high", "ci_high"))
                },
            }
        )
        head.append(ReportSection(title="Over training", figures=[figure], table=table))
    config = {
        name: value.resolve() if isinstance(value, Path) else value
        for name, value in settings.items()
        if name != "progress"
    }
    config.update(
        checkpoints_evaluated=described,
        captions=context["captions"],
        class_seeds={c: class_seed(seed, c) for c in real_set.class_names},
        sample_config=to_dict(sample_config),
        generation_settings=first.settings.to_dict(),
        extractor_identity=dict(extractor.identity),
        classifier={"method": classifier.describe(), "l2": classifier_l2},
    )
    metrics_path, report_path = write_evaluation(
        out, "Generator fidelity on held-out real tiles", [*head, *sections], config
    )
    for ref, numbers in zip(refs, results):
        summary = ", ".join(f"{k} {escape(str(v))}" for k, v in numbers.items())
        console.print(f"{ref.label}: {summary}")
    console.print(f"[green]wrote[/green] {metrics_path} and {report_path}")
    typer.echo(
        json.dumps(
            {
                "out": str(out),
                "checkpoints": {
                    ref.label: {k: _jsonable(v) for k, v in numbers.items()}
                    for ref, numbers in zip(refs, results)
                },
            }
        )
    )


def register(app: typer.Typer) -> None:
    """Add `generator` to the `mupad evaluate` group."""
    app.command("generator")(evaluate_generator)


__all__ = ["evaluate_generator", "register"]
