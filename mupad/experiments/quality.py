"""The quality study: which model and training levers make the generator draw tissue.

Every arm trains a text-conditioned pixel-space SiT on the same tile folder (each class
described by its caption) for the same wall-clock budget on this machine, then draws the
same number of tiles per class with the same sampler and seeds, scored against held-out
real tiles the arms never saw:

- border ratio at the arm's token period (real tissue ~1.0; a mosaic of tokens > 1);
- KID (Inception features, bootstrap interval) against the held-out tiles;
- class accuracy: a classifier fitted on the real training tiles labels each tile;
- colour: per-channel mean and std against the held-out tiles' (mean |difference|, 0-255);
- memorisation: each generated tile's feature distance to its nearest training tile, beside
  the same distance of the held-out real tiles (a copy sits far below the held-out median).

Equal budget: each arm first trains `calibration_steps` steps; its measured throughput fixes
the number of steps that fill `budget_s`, and the same run continues to that step (the
learning rate is constant after the warm-up, so the calibration steps are the first steps of
the run). The steps are recorded in study.json, so a rerun resumes and never recalibrates.

Then the best arm (lowest KID) is sampled at several guidance settings (`GUIDANCE`), since
the guidance scale is where colours drift.

Outputs in `out/`: arms/<arm>/ (the training runs), samples/<arm>/<class>/<k>.png,
study.json (settings and every number), study.md (the tables), study.png (the measures per
arm), grid_<arm>.png (a real row and generated rows per class).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mupad.config import (
    GuidanceConfig,
    GuidanceScheduleKind,
    ModelConfig,
    Precision,
    SampleConfig,
    SamplerKind,
    TrainConfig,
    tile_model_config,
    to_dict,
)
from mupad.errors import MupadError
from mupad.training.loop import read_log

logger = logging.getLogger(__name__)

STUDY_JSON = "study.json"
STUDY_TABLE = "study.md"
STUDY_PLOT = "study.png"


class StudyError(MupadError, ValueError):
    """The study cannot run with these inputs; the message says how to fix them."""


# --------------------------------------------------------------------------------------
# Arms
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QualityArm:
    name: str
    description: str
    model: Mapping[str, Any]  # ModelConfig overrides of the study's base model
    train: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # TrainConfig overrides


ARMS: dict[str, QualityArm] = {
    arm.name: arm
    for arm in (
        QualityArm("p8", "8 px tokens, velocity, linear unpatchify (the old demo)", {}),
        QualityArm("p8_refine", "+ conv refinement head (32 ch)", {"refine_channels": 32}),
        QualityArm(
            "p8_x", "+ clean-image prediction, 64-d patch bottleneck",
            {"prediction": "data", "bottleneck_dim": 64},
        ),
        QualityArm(
            "p8_x_refine", "clean-image prediction + bottleneck + refinement head",
            {"prediction": "data", "bottleneck_dim": 64, "refine_channels": 32},
        ),
        QualityArm(
            "p8_x_refine_ln", "p8_x_refine + logit-normal t (0, 1)",
            {"prediction": "data", "bottleneck_dim": 64, "refine_channels": 32},
            {"time_sampling": "logit_normal"},
        ),
        QualityArm("p4", "4 px tokens, velocity, linear unpatchify", {"patch_size": 4}),
        QualityArm(
            "p4_x_refine", "4 px tokens + clean-image prediction + refinement head (16 ch)",
            {"patch_size": 4, "prediction": "data", "refine_channels": 16},
        ),
    )
}  # fmt: skip

# Guidance settings compared on the best arm: name -> GuidanceConfig.
GUIDANCE: dict[str, GuidanceConfig] = {
    "none": GuidanceConfig(schedule=GuidanceScheduleKind.CONSTANT, start=0.0),
    "const_1": GuidanceConfig(schedule=GuidanceScheduleKind.CONSTANT, start=1.0),
    "linear_1.5": GuidanceConfig(start=1.5, end=0.0),
    "linear_2.5": GuidanceConfig(start=2.5, end=0.0),
    "linear_4": GuidanceConfig(start=4.0, end=0.0),
}


def base_model_config(crop: int, text_dim: int, **overrides: Any) -> ModelConfig:
    """The backbone every arm shares: the tile generator's (hidden 256, depth 6, 4 heads) with
    every lever off (8 px tokens, velocity, linear unpatchify), then the arm's overrides."""
    plain: dict[str, Any] = dict(
        patch_size=8, prediction="velocity", bottleneck_dim=0, refine_channels=0
    )
    return tile_model_config(crop, text_dim, **{**plain, **overrides})


def base_train_config(steps: int, precision: Precision, seed: int, **overrides: Any) -> TrainConfig:
    fields: dict[str, Any] = dict(
        steps=steps, batch_size=32, learning_rate=5e-4, warmup_steps=100, grad_clip=1.0,
        ema_decay=0.999, precision=precision, condition_dropout=0.1, seed=seed, log_every=10,
        checkpoint_every=10_000, keep_checkpoints=1,
    )  # fmt: skip
    fields.update(overrides)
    return TrainConfig(**fields)


@dataclass(frozen=True)
class StudySettings:
    budget_s: float = 600.0  # training wall-clock per arm
    crop: int = 64
    per_class: int = 16
    sample_steps: int = 50
    sampler: SamplerKind = SamplerKind.EULER
    guidance: str = "linear_2.5"  # the GUIDANCE entry the arms are compared at
    calibration_steps: int = 20
    seed: int = 0
    bootstrap: int = 25
    features: str = "inception"

    def __post_init__(self) -> None:
        if self.budget_s <= 0 or self.per_class < 2 or self.sample_steps < 1:
            raise StudyError("budget_s must be > 0, per_class >= 2 and sample_steps >= 1")
        if self.guidance not in GUIDANCE:
            raise StudyError(f"unknown guidance {self.guidance!r}; choose from {list(GUIDANCE)}")
        if self.calibration_steps < 20:
            raise StudyError("calibration_steps must be >= 20 (two log windows of 10 steps)")


def resolve_arms(names: Sequence[str]) -> list[QualityArm]:
    unknown = [n for n in names if n not in ARMS]
    if unknown or not names:
        raise StudyError(f"unknown arm(s) {unknown}; choose from: {', '.join(ARMS)}")
    return [ARMS[n] for n in names]


# --------------------------------------------------------------------------------------
# Training an arm for the budget
# --------------------------------------------------------------------------------------


def _train(arm: QualityArm, run: Path, steps: int, data: Path, settings: StudySettings,
           precision: Precision, captions: Mapping[str, str], text_dim: int) -> None:  # fmt: skip
    from mupad.applications.train_tiles import train_on_tile_folder

    train_on_tile_folder(
        data, run,
        train_config=base_train_config(steps, precision, settings.seed, **arm.train),
        model_config=base_model_config(settings.crop, text_dim, **arm.model),
        crop=settings.crop, captions=dict(captions), progress=True,
    )  # fmt: skip


def _steps_for_budget(run: Path, settings: StudySettings) -> tuple[int, float]:
    """(steps that fill the budget, images/s) from the calibration run's last log window."""
    log = [r for r in read_log(run) if "images_per_s" in r]
    if not log:
        raise StudyError(f"the calibration run in {run} wrote no log; delete it and rerun")
    images_per_s = float(log[-1]["images_per_s"])  # the second window: past the first step's setup
    batch = base_train_config(1, Precision.FP32, 0).batch_size
    steps = max(settings.calibration_steps, int(settings.budget_s * images_per_s / batch))
    return steps, images_per_s


# --------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------


@dataclass
class RealSets:
    """The held-out and training tiles with their features, and the fitted classifier."""

    heldout: Any  # ImageSet
    train: Any  # ImageSet
    heldout_features: np.ndarray
    train_features: np.ndarray
    classifier: Any  # LinearClassifier
    heldout_accuracy: float
    heldout_colour: dict[str, list[float]]
    heldout_nearest: np.ndarray  # (N_heldout,) distance to the nearest training tile


def load_real_sets(heldout: Path, train: Path, settings: StudySettings, extractor: Any) -> RealSets:
    from mupad.evaluation.features import cached_features
    from mupad.evaluation.generator_fidelity import (
        conditioning_accuracy,
        fit_class_classifier,
        load_real_tiles,
    )
    from mupad.evaluation.tile_quality import colour_moments, nearest_distances

    heldout_set = load_real_tiles(heldout, settings.crop, what="held-out real tiles")
    train_set = load_real_tiles(train, settings.crop, what="training tiles")
    heldout_features, train_features = (
        cached_features(s, extractor, progress=False) for s in (heldout_set, train_set)
    )
    classifier = fit_class_classifier(
        train_features, train_set.labels.numpy(), train_set.class_names
    )
    accuracy = conditioning_accuracy(
        classifier, heldout_features, heldout_set.class_names, heldout_set.labels.numpy(),
        iterations=settings.bootstrap, seed=settings.seed,
    )  # fmt: skip
    return RealSets(
        heldout=heldout_set, train=train_set, heldout_features=heldout_features,
        train_features=train_features, classifier=classifier,
        heldout_accuracy=accuracy.overall.value, heldout_colour=colour_moments(heldout_set.images),
        heldout_nearest=nearest_distances(heldout_features, train_features),
    )  # fmt: skip


def score_tiles(generated: Any, period: int, real: RealSets, extractor: Any,
                settings: StudySettings) -> dict[str, Any]:  # fmt: skip
    """Every study measure of a labelled ImageSet of generated tiles."""
    from mupad.evaluation.features import cached_features
    from mupad.evaluation.fid import kid_with_ci
    from mupad.evaluation.generator_fidelity import conditioning_accuracy
    from mupad.evaluation.tile_quality import (
        border_ratio,
        colour_distance,
        colour_moments,
        nearest_distances,
    )

    features = cached_features(generated, extractor, progress=False)
    kid = kid_with_ci(
        features, real.heldout_features, iterations=settings.bootstrap, seed=settings.seed
    )
    accuracy = conditioning_accuracy(
        real.classifier, features, generated.class_names, generated.labels.numpy(),
        iterations=settings.bootstrap, seed=settings.seed,
    )  # fmt: skip
    colour = colour_moments(generated.images)
    nearest = nearest_distances(features, real.train_features)
    return {
        "border_ratio": border_ratio(generated.images, period),
        "kid": kid.to_dict(),
        "class_accuracy": accuracy.overall.to_dict(),
        "class_accuracy_per_class": accuracy.per_class.to_dict(orient="records"),
        "colour": colour,
        "colour_distance": colour_distance(colour, real.heldout_colour),
        "nearest_train_median": float(np.median(nearest)),
        "nearest_train_min": float(nearest.min()),
        "copies_below_heldout_min": int((nearest < real.heldout_nearest.min()).sum()),
    }


def _sample(run: Path, captions: Mapping[str, str], out: Path, guidance: GuidanceConfig,
            settings: StudySettings) -> Any:  # fmt: skip
    from mupad.applications.generation_model import GenerationModel, GenerationSettings
    from mupad.evaluation.generator_fidelity import generate_class_tiles

    model = GenerationModel(GenerationSettings(checkpoint=str(run), batch_size=64))
    config = SampleConfig(
        sampler=settings.sampler, num_steps=settings.sample_steps, guidance=guidance,
        seed=settings.seed,
    )  # fmt: skip
    return generate_class_tiles(
        model, captions, settings.per_class, config, out, seed=settings.seed, progress=False
    )


# --------------------------------------------------------------------------------------
# The study
# --------------------------------------------------------------------------------------


def _load_records(out: Path) -> dict[str, Any]:
    path = out / STUDY_JSON
    return json.loads(path.read_text()) if path.exists() else {}


def _save_records(out: Path, records: dict[str, Any]) -> None:
    from mupad.fileio import atomic_write_text

    atomic_write_text(out / STUDY_JSON, json.dumps(records, indent=2) + "\n")


def run_quality_study(
    out: str | Path,
    arms: Sequence[QualityArm],
    heldout: str | Path,
    *,
    data: str | Path | None = None,
    captions: Mapping[str, str] | None = None,
    settings: StudySettings | None = None,
    guidance_sweep: bool = True,
) -> dict[str, Any]:
    """Train every arm for the same budget, score it, sweep guidance on the best; returns
    the records also written to out/study.json (see the module doc)."""
    from mupad.applications.demo import KATHER_CAPTIONS
    from mupad.conditioning import get_encoder
    from mupad.data.tiles import bundled_kather_dir
    from mupad.evaluation.features import feature_extractor
    from mupad.precision import PrecisionChoice, resolve_precision

    settings = settings or StudySettings()
    out = Path(out)
    data = Path(data) if data is not None else bundled_kather_dir()
    captions = dict(captions or KATHER_CAPTIONS)
    precision = resolve_precision(PrecisionChoice.AUTO)
    text_dim = get_encoder("minilm").dim
    out.mkdir(parents=True, exist_ok=True)
    records = _load_records(out)
    recorded = records.get("settings")
    current = {**to_dict(settings), "data": str(data), "heldout": str(heldout)}
    if recorded is not None and recorded != current:
        raise StudyError(
            f"{out} holds a study with other settings ({recorded}); use another --out folder"
        )
    records["settings"] = current
    records.setdefault("arms", {})
    extractor = feature_extractor(settings.features)
    real = load_real_sets(Path(heldout), data, settings, extractor)
    records["real"] = {
        "heldout_tiles": len(real.heldout), "train_tiles": len(real.train),
        "class_accuracy_heldout": real.heldout_accuracy, "colour_heldout": real.heldout_colour,
        "heldout_nearest_train_median": float(np.median(real.heldout_nearest)),
        "heldout_nearest_train_min": float(real.heldout_nearest.min()),
        "border_ratio_heldout_p8": _real_border(real, 8),
        "border_ratio_heldout_p4": _real_border(real, 4),
    }  # fmt: skip
    guidance = GUIDANCE[settings.guidance]
    for arm in arms:
        entry = records["arms"].setdefault(arm.name, {"description": arm.description})
        run = out / "arms" / arm.name
        if "steps" not in entry:
            logger.info("calibrating %s", arm.name)
            _train(arm, run, settings.calibration_steps, data, settings, precision, captions,
                   text_dim)  # fmt: skip
            entry["steps"], entry["calibration_images_per_s"] = _steps_for_budget(run, settings)
            _save_records(out, records)
        logger.info("training %s for %d steps", arm.name, entry["steps"])
        _train(arm, run, entry["steps"], data, settings, precision, captions, text_dim)
        entry["train_s"] = _train_seconds(run)
        if "scores" not in entry:
            generated = _sample(run, captions, out / "samples" / arm.name, guidance, settings)
            period = base_model_config(settings.crop, text_dim, **arm.model).patch_size
            entry["scores"] = score_tiles(generated, period, real, extractor, settings)
            _sample_grid(real, generated, out / f"grid_{arm.name}.png")
        _save_records(out, records)
    if guidance_sweep:
        best = min(records["arms"], key=lambda n: records["arms"][n]["scores"]["kid"]["value"])
        sweep = records.setdefault("guidance", {"arm": best, "scores": {}})
        if sweep["arm"] != best:
            sweep = records["guidance"] = {"arm": best, "scores": {}}
        period = base_model_config(settings.crop, text_dim, **ARMS[best].model).patch_size
        for name, config in GUIDANCE.items():
            if name not in sweep["scores"]:
                folder = out / "samples" / f"{best}_guidance_{name}"
                generated = _sample(out / "arms" / best, captions, folder, config, settings)
                sweep["scores"][name] = score_tiles(generated, period, real, extractor, settings)
                _save_records(out, records)
    write_tables(out, records)
    return records


def _real_border(real: RealSets, period: int) -> float:
    from mupad.evaluation.tile_quality import border_ratio

    return border_ratio(real.heldout.images, period)


def _train_seconds(run: Path) -> float:
    """Training wall time of a run from its log: each window's images / its images per s."""
    log = read_log(run)
    seconds, previous = 0.0, 0
    for record in log:
        if "images_per_s" in record and record["images_per_s"] > 0:
            images = (record["step"] - previous) * base_train_config(1, Precision.FP32, 0).batch_size
            seconds += images / record["images_per_s"]
            previous = record["step"]
    return seconds


def _sample_grid(real: RealSets, generated: Any, path: Path, columns: int = 8) -> None:
    """Per class: one row of held-out real tiles, then one row of generated tiles."""
    from mupad.applications.figures import save_grid

    rows = []
    for k, name in enumerate(generated.class_names):
        real_index = [i for i, c in enumerate(real.heldout.labels.tolist())
                      if real.heldout.class_names[c] == name][:columns]  # fmt: skip
        gen = generated.images[generated.labels == k][:columns]
        for block in (real.heldout.images[real_index], gen):
            pad = columns - block.shape[0]
            if pad > 0:
                block = torch.cat([block, torch.full((pad, *block.shape[1:]), 255, dtype=block.dtype)])
            rows.append(block)
    save_grid(torch.cat(rows), path, columns=columns)


# --------------------------------------------------------------------------------------
# Tables and plot
# --------------------------------------------------------------------------------------


def _row(name: str, scores: Mapping[str, Any], extra: str) -> str:
    kid = scores["kid"]
    acc = scores["class_accuracy"]
    return (
        f"| {name} | {extra} | {scores['border_ratio']:.2f} | {kid['value']:.3f} "
        f"[{kid['ci_low']:.3f}, {kid['ci_high']:.3f}] | {acc['value']:.2f} "
        f"[{acc['ci_low']:.2f}, {acc['ci_high']:.2f}] | {scores['colour_distance']:.1f} | "
        f"{scores['nearest_train_median']:.2f} ({scores['copies_below_heldout_min']}) |"
    )


def write_tables(out: Path, records: Mapping[str, Any]) -> None:
    """study.md (one table for the arms, one for the guidance sweep) and study.png."""
    real = records["real"]
    header = (
        "| {first} | {second} | border ratio | KID vs held-out | class accuracy | colour "
        "distance | nearest-train median (copies) |\n|---|---|---|---|---|---|---|"
    )
    lines = [
        f"Held-out real: border ratio {real['border_ratio_heldout_p8']:.2f} (8 px) / "
        f"{real['border_ratio_heldout_p4']:.2f} (4 px), class accuracy "
        f"{real['class_accuracy_heldout']:.2f}, nearest-train median "
        f"{real['heldout_nearest_train_median']:.2f} (min {real['heldout_nearest_train_min']:.2f}); "
        "copies = generated tiles nearer a training tile than any held-out tile is.",
        "",
        header.format(first="arm", second="steps in budget"),
    ]
    arms = records["arms"]
    for name, entry in arms.items():
        if "scores" in entry:
            lines.append(_row(name, entry["scores"], f"{entry['steps']} ({entry['train_s']:.0f} s)"))
    sweep = records.get("guidance")
    if sweep:
        lines += ["", f"Guidance on {sweep['arm']}:", "",
                  header.format(first="guidance", second="schedule")]  # fmt: skip
        for name, scores in sweep["scores"].items():
            lines.append(_row(name, scores, _describe_guidance(GUIDANCE[name])))
    (out / STUDY_TABLE).write_text("\n".join(lines) + "\n")
    _plot(out, records)


def _describe_guidance(config: GuidanceConfig) -> str:
    if config.schedule is GuidanceScheduleKind.CONSTANT:
        return f"constant {config.start:g}"
    return f"{config.start:g} -> {config.end:g} linear"


def _plot(out: Path, records: Mapping[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = {n: e["scores"] for n, e in records["arms"].items() if "scores" in e}
    names = list(arms)
    real = records["real"]
    panels = [
        ("border ratio (real ~1)", [arms[n]["border_ratio"] for n in names], 1.0),
        ("KID vs held-out", [arms[n]["kid"]["value"] for n in names], None),
        ("class accuracy", [arms[n]["class_accuracy"]["value"] for n in names],
         real["class_accuracy_heldout"]),
        ("colour distance (0-255)", [arms[n]["colour_distance"] for n in names], None),
    ]  # fmt: skip
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6))
    for axis, (title, values, reference) in zip(axes, panels):
        axis.bar(range(len(names)), values, color="#7a4a8c")
        if reference is not None:
            axis.axhline(reference, color="k", linestyle="--", linewidth=1, label="held-out real")
            axis.legend(fontsize=7)
        axis.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        axis.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(out / STUDY_PLOT, dpi=110)
    plt.close(figure)


__all__ = [
    "ARMS",
    "GUIDANCE",
    "QualityArm",
    "StudyError",
    "StudySettings",
    "base_model_config",
    "base_train_config",
    "resolve_arms",
    "run_quality_study",
    "score_tiles",
    "write_tables",
]
