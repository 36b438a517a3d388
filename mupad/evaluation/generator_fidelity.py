"""Measured fidelity of a trained class/caption-conditioned generator, checkpoint by checkpoint.

    refs = select_checkpoints("runs/kather/model", "all")          # [CheckpointRef(step, path)]
    real = load_real_tiles("heldout/", tile_px=64)                 # ImageSet, labelled
    generated = generate_class_tiles(model, captions, 16, sample_config, out_dir, seed=0)
    classifier = fit_class_classifier(train_features, train_labels, class_names)
    accuracy = conditioning_accuracy(classifier, features, labels)  # ClassAccuracy

Generation goes through the `mupad generate` engine (`GenerationModel` +
`generate_records`): one prompt record per class (text = the class caption, seed derived
from (seed, class name)), written as `<out>/<class>/<k>.png` with the sidecar JSON that
regenerates each tile exactly. Every checkpoint is sampled with the same seeds, so changes
over training are changes of the weights, not of the noise.

Real tiles are brought to the model's tile: without µm/px (the default) each tile is
centre-cropped to a square and resized (bicubic) to the model's tile side — for square
tiles exactly what `mupad prepare --kind tiles --tile-size N` did to the training tiles,
so held-out tiles of the training tiles' size and scale land at the training scale. With
`mpp` (the tiles' µm/px) and a model that recorded its µm/px (`target_mpp`), each tile is
resampled to the model's µm/px and its centre tile_px square is cut, as `mupad generate`
does with a reference image (refused when the tile is too small).

Conditioning classifier: multinomial logistic regression on standardised features (z-scores
with the training tiles' mean and std), L2 penalty `l2 * ||W||^2 / 2` on the weights (not the
bias) added to the mean cross-entropy, fitted to convergence with L-BFGS in float64 (convex,
so the fit is deterministic). It is fitted on the real training tiles only; its accuracy on
the held-out real tiles is the ceiling a perfect generator could reach with this classifier.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from mupad.applications.batch_generate import FolderLayout, generate_records, named_seed
from mupad.applications.generation_model import GenerationModel
from mupad.applications.prompts import PromptRecord
from mupad.applications.reference_images import ReferenceImageError, load_reference_image
from mupad.conditions import Modality
from mupad.config import SampleConfig
from mupad.evaluation.images import ImageSet, image_files, load_image_set
from mupad.evaluation.stats import Estimate, EvaluationError, bootstrap
from mupad.training.checkpoint import checkpoint_dir, list_checkpoints

DEFAULT_L2 = 1e-2
_STEP = re.compile(r"^(?:step-)?(\d+)$")


# --------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CheckpointRef:
    """One checkpoint to evaluate: its training step (None for a bare model folder)."""

    step: int | None
    path: Path

    @property
    def label(self) -> str:
        return f"step-{self.step:07d}" if self.step is not None else self.path.name

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "path": str(self.path.resolve())}


def _step_of(folder: Path) -> int | None:
    match = re.match(r"^step-(\d+)$", folder.name)
    return int(match.group(1)) if match else None


def select_checkpoints(run: str | Path, which: str = "last") -> list[CheckpointRef]:
    """Checkpoints of `run` to evaluate, oldest first.

    which: "last" (a run's latest checkpoint, or the folder itself when it is a checkpoint
    or model folder), "all" (every finished checkpoint of a run) or steps "200,400" /
    "step-0000200,step-0000400".
    """
    run = Path(run)
    if not run.exists():
        raise EvaluationError(f"checkpoint {run} does not exist")
    found = list_checkpoints(run)
    is_run = (run / "checkpoints").is_dir()
    which = which.strip().lower()
    if which == "last":
        if not is_run:
            return [CheckpointRef(_step_of(run), run)]
        if not found:
            raise EvaluationError(f"{run} has no finished checkpoint yet")
        return [CheckpointRef(*found[-1])]
    if not is_run:
        raise EvaluationError(
            f"--checkpoints {which} needs a training run folder (with checkpoints/), but {run} "
            "is a single checkpoint or model folder; use --checkpoints last"
        )
    if which == "all":
        if not found:
            raise EvaluationError(f"{run} has no finished checkpoint yet")
        return [CheckpointRef(step, path) for step, path in found]
    refs = []
    for part in (p.strip() for p in which.split(",") if p.strip()):
        match = _STEP.match(part)
        if match is None:
            raise EvaluationError(
                f"--checkpoints takes all, last or comma-separated steps (200,400 or "
                f"step-0000200), got {part!r}"
            )
        step = int(match.group(1))
        folder = checkpoint_dir(run, step)
        if not (folder / "train_state.json").is_file():
            have = ", ".join(str(s) for s, _ in found) or "none"
            raise EvaluationError(f"{run} has no checkpoint at step {step}; it has: {have}")
        refs.append(CheckpointRef(step, folder))
    if not refs:
        raise EvaluationError("--checkpoints names no step")
    return sorted(set(refs), key=lambda r: r.step or 0)


# --------------------------------------------------------------------------------------
# Real tiles and captions
# --------------------------------------------------------------------------------------


def load_real_tiles(
    folder: str | Path,
    tile_px: int,
    *,
    mpp: float | None = None,
    model_mpp: float | None = None,
    what: str = "real tiles",
) -> ImageSet:
    """A labelled ImageFolder `<class>/<tile>` at the model's tile size (see the module doc)."""
    folder = Path(folder)
    files = image_files(folder)
    if not files:
        raise EvaluationError(f"no {what} (image files) under {folder}; expected <class>/<tile>")
    if mpp is None:
        tiles = load_image_set(folder, tile_px, what=what)
    else:
        try:
            pixels = [
                load_reference_image(p, tile_px, mpp=mpp, model_mpp=model_mpp).pixels for p in files
            ]
        except ReferenceImageError as error:
            raise EvaluationError(str(error)) from None
        tiles = _labelled(folder, files, torch.stack(pixels))
    if tiles.labels is None:
        raise EvaluationError(
            f"{what} in {folder} must sit in class folders (<class>/<tile>), one level deep"
        )
    return tiles


def _labelled(folder: Path, files: Sequence[Path], images: torch.Tensor) -> ImageSet:
    parts = [p.relative_to(folder).parts for p in files]
    if not all(len(p) == 2 for p in parts):
        return ImageSet(images=images, paths=tuple(files), labels=None, class_names=())
    class_names = tuple(sorted({p[0] for p in parts}))
    index = {name: i for i, name in enumerate(class_names)}
    labels = torch.tensor([index[p[0]] for p in parts], dtype=torch.long)
    return ImageSet(images=images, paths=tuple(files), labels=labels, class_names=class_names)


def run_captions(metadata: Mapping[str, Any]) -> dict[str, str]:
    """{class: caption} a tile run recorded (class_names + captions), else {}."""
    names = metadata.get("class_names") or []
    captions = metadata.get("captions") or []
    return dict(zip(names, captions)) if len(names) == len(captions) else {}


def check_captions(classes: Sequence[str], captions: Mapping[str, str], source: str) -> None:
    """Every evaluated class needs a caption; say which do not have one and how to fix it."""
    if not captions:
        raise EvaluationError(
            f"no captions: {source}. Pass --captions captions.json ({{class: caption}}, the "
            "captions the model was trained with)"
        )
    missing = [c for c in classes if not captions.get(c)]
    if missing:
        raise EvaluationError(
            f"class(es) {missing} of the held-out tiles have no caption in {source} (it has "
            f"{sorted(captions)}); pass --captions with a caption for every class folder"
        )


# --------------------------------------------------------------------------------------
# Generation through the mupad generate engine
# --------------------------------------------------------------------------------------


def class_seed(seed: int, class_name: str) -> int:
    """A stable 63-bit seed per class (independent of which other classes are evaluated)."""
    return named_seed(seed, class_name)


def check_text_stream(model: GenerationModel) -> None:
    if Modality.TEXT.value not in model.streams:
        have = ", ".join(sorted(model.streams)) or "none (unconditional)"
        raise EvaluationError(
            f"the model at {model.model_dir} has no text stream (its condition streams: {have}); "
            "class-conditional fidelity prompts each class with its caption, so evaluate a "
            "text-conditioned checkpoint"
        )


def generate_class_tiles(
    model: GenerationModel,
    captions: Mapping[str, str],
    per_class: int,
    sample_config: SampleConfig,
    out: str | Path,
    *,
    seed: int,
    overwrite: bool = False,
    progress: bool = True,
) -> ImageSet:
    """`per_class` text-conditioned tiles per class (keys of `captions`, sorted) written to
    `out/<class>/` and returned as a labelled ImageSet in the same class order. Tiles already
    there from the same request are reused (see `generate_records`)."""
    check_text_stream(model)
    if per_class < 1:
        raise EvaluationError(f"--per-class must be >= 1, got {per_class}")
    out = Path(out)
    class_names = tuple(sorted(captions))
    records = [
        PromptRecord(
            id=name, seed=class_seed(seed, name), num_images=per_class, text=captions[name]
        )
        for name in class_names
    ]
    layout = FolderLayout(out)  # out/<class>/<k>.png + the regeneration sidecar
    generate_records(
        model, records, sample_config, layout, modalities=(Modality.TEXT,),
        overwrite=overwrite, progress=progress,
    )  # fmt: skip
    files = [layout.png(r, k) for r in records for k in range(per_class)]
    images = load_image_set(files, what="generated tiles").images  # (K * per_class, 3, S, S)
    labels = torch.arange(len(class_names)).repeat_interleave(per_class)
    return ImageSet(images=images, paths=tuple(files), labels=labels, class_names=class_names)


# --------------------------------------------------------------------------------------
# Conditioning classifier
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LinearClassifier:
    """Multinomial logistic regression on z-scored features."""

    class_names: tuple[str, ...]
    mean: np.ndarray  # (D,)
    scale: np.ndarray  # (D,)
    weight: np.ndarray  # (D, K)
    bias: np.ndarray  # (K,)
    l2: float

    def predict(self, features: np.ndarray) -> np.ndarray:
        """(N, D) features -> (N,) class indices into `class_names`."""
        logits = ((features - self.mean) / self.scale) @ self.weight + self.bias  # (N, K)
        return np.argmax(logits, axis=1)

    def describe(self) -> str:
        return (
            f"multinomial logistic regression on z-scored features, L2 {self.l2:g} on the "
            f"weights, L-BFGS (float64), {len(self.class_names)} classes"
        )


def fit_class_classifier(
    features: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    *,
    l2: float = DEFAULT_L2,
) -> LinearClassifier:
    """Fit the classifier on (N, D) features with (N,) labels into `class_names`."""
    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    num_classes = len(class_names)
    present = np.unique(labels)
    if num_classes < 2 or len(present) < num_classes:
        lacking = [class_names[i] for i in range(num_classes) if i not in set(present.tolist())]
        raise EvaluationError(
            f"the classifier needs training tiles of at least 2 classes and of every class; "
            f"classes without tiles: {lacking or 'n/a'} (of {list(class_names)})"
        )
    if not l2 > 0:
        raise EvaluationError(f"the classifier's L2 penalty must be > 0, got {l2}")
    mean = features.mean(axis=0)
    scale = features.std(axis=0)
    scale = np.where(scale > 1e-12, scale, 1.0)  # constant features stay 0 after centring
    inputs = torch.from_numpy((features - mean) / scale)  # (N, D)
    targets = torch.from_numpy(labels)
    weight = torch.zeros(inputs.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-12,
        history_size=20, line_search_fn="strong_wolfe",
    )  # fmt: skip

    def loss_fn() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(inputs @ weight + bias, targets)
        loss = loss + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(loss_fn)
    return LinearClassifier(
        class_names=tuple(class_names),
        mean=mean,
        scale=scale,
        weight=weight.detach().numpy(),
        bias=bias.detach().numpy(),
        l2=l2,
    )


@dataclasses.dataclass(frozen=True)
class ClassAccuracy:
    """How often the classifier labels tiles with the class they belong to / were asked for."""

    overall: Estimate
    per_class: pd.DataFrame  # class, n, correct, accuracy

    def to_dict(self) -> dict[str, Any]:
        return {
            "overall": self.overall.to_dict(),
            "per_class": self.per_class.to_dict(orient="records"),
        }


def conditioning_accuracy(
    classifier: LinearClassifier,
    features: np.ndarray,
    class_names: Sequence[str],
    labels: np.ndarray,
    *,
    iterations: int,
    seed: int,
) -> ClassAccuracy:
    """Accuracy of `classifier` on (N, D) features whose true/requested class is
    `class_names[labels]`, with a bootstrap percentile interval over tiles."""
    index = {name: i for i, name in enumerate(classifier.class_names)}
    unknown = sorted(set(class_names) - set(index))
    if unknown:
        raise EvaluationError(
            f"class(es) {unknown} have no training tiles for the classifier (--train-real has "
            f"{list(classifier.class_names)}); add them to the training folder"
        )
    target = np.array([index[class_names[i]] for i in np.asarray(labels)])  # (N,)
    correct = (classifier.predict(features) == target).astype(np.float64)  # (N,)
    if len(correct) < 2:
        raise EvaluationError("accuracy needs at least 2 tiles")
    overall = bootstrap(np.mean, correct, iterations=iterations, seed=seed)
    rows = []
    for i, name in enumerate(class_names):
        picked = correct[np.asarray(labels) == i]
        rows.append(
            {
                "class": name,
                "n": len(picked),
                "correct": int(picked.sum()),
                "accuracy": float(picked.mean()) if len(picked) else None,
            }
        )
    return ClassAccuracy(overall=overall, per_class=pd.DataFrame(rows))


__all__ = [
    "DEFAULT_L2",
    "CheckpointRef",
    "ClassAccuracy",
    "LinearClassifier",
    "check_captions",
    "check_text_stream",
    "class_seed",
    "conditioning_accuracy",
    "fit_class_classifier",
    "generate_class_tiles",
    "load_real_tiles",
    "run_captions",
    "select_checkpoints",
]
