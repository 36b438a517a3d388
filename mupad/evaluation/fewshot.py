"""Few-shot benchmark (the paper's protocol): does `mupad augment` help a classifier trained on
k real images per class?

For every k in `shots` and every seed:

1. pick k real shots per class from the training pool (`select_shots`: per class, a fixed
   permutation drawn from (seed, class name), so the k=5 shots are the first 5 of the k=10
   shots, and adding a class never changes the others' shots);
2. train a randomly initialised ResNet-18 (`mupad.evaluation.resnet`) on
   - arm "real":      the k shots per class,
   - arm "augmented": the same shots + the synthetic variations `mupad augment` made of
     exactly those shots (index.csv rows whose `source` is a chosen shot, matched by class
     folder and file name; at most `synthetic_per_shot` per shot, lowest `k` first);
   both arms of one (k, seed) start from the same initial weights (drawn from the seed) and
   draw their data order and augmentations from a generator with the same seed;
3. score top-1 accuracy (and accuracy per class) on the held-out test set.

Augmenting the whole pool once is equivalent to augmenting each shot set, because augment
derives every image's seed from (seed, class, file name) alone. Variations of images outside
the chosen shots (including held-out images, when the test set was split off the same
folder) are never used.

Training (defaults follow the paper where it is specific: SGD, 50 epochs, 5 seeds):
SGD with momentum 0.9 and weight decay 5e-4 (on every parameter, as in torchvision's recipe),
batch 32, base learning rate 0.05, decayed per step either by a cosine to 0 over all steps
("cosine", default) or by x0.1 after 50 % and 75 % of the epochs ("step"). An epoch is one
pass over the arm's training images in a fresh random order (so the augmented arm takes more
steps per epoch, as in the paper). The only augmentation of any training image is one of the
8 flips/90° rotations, uniformly at random (histology has no "up"). Pixels enter as
x / 127.5 - 1. Images are centre-cropped to a square and resized (bicubic) to `image_size`
(default 64 px: a CPU budget; the paper's classifier saw full-size patches).

The held-out set is a separate folder, or `test_per_class` images per class split off the
pool (`split_holdout`, a fixed per-class permutation), so a test image is never a shot.
Result: accuracy per (k, arm, seed), mean ± sample std over seeds per (k, arm), and per k the
paired gain (augmented - real) over seeds with a t interval and an exact sign-flip test.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy import stats as scipy_stats
from tqdm.auto import tqdm

from mupad.data.dihedral import apply_dihedral, draw_dihedral
from mupad.evaluation.images import ImageSet, load_image_set
from mupad.evaluation.pcc import paired_permutation_test
from mupad.evaluation.resnet import classifier_backend, resnet18
from mupad.evaluation.stats import Estimate, EvaluationError, mean_and_std

logger = logging.getLogger(__name__)

INDEX_NAME = "index.csv"  # written by `mupad augment` (mupad.applications.augment)
INDEX_COLUMNS = ("path", "class", "kind", "source")
SYNTHETIC_KIND = "synthetic"
_SPLIT_STREAM = 7919  # keeps the hold-out permutation independent of the shot permutation


class Arm(str, enum.Enum):
    REAL = "real"  # k real shots per class
    AUGMENTED = "augmented"  # the same shots + their synthetic variations


class LRSchedule(str, enum.Enum):
    COSINE = "cosine"  # per step, from the base rate to 0
    STEP = "step"  # x0.1 after 50 % and 75 % of the epochs


@dataclass(frozen=True)
class FewShotConfig:
    """Every setting of the benchmark (see the module docstring for the protocol)."""

    shots: tuple[int, ...] = (5, 10)
    num_seeds: int = 5
    first_seed: int = 0
    epochs: int = 50
    image_size: int = 64
    batch_size: int = 32
    learning_rate: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: LRSchedule = LRSchedule.COSINE
    synthetic_per_shot: int | None = None  # cap on variations per shot; None = all
    device: str = "cpu"
    bf16: bool = False  # bfloat16 autocast for the forward passes
    eval_batch_size: int = 256

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(range(self.first_seed, self.first_seed + self.num_seeds))

    def validate(self) -> None:
        if not self.shots or min(self.shots) < 1 or len(set(self.shots)) != len(self.shots):
            raise EvaluationError(f"shots must be distinct positive integers, got {self.shots}")
        positive = ("num_seeds", "epochs", "image_size", "batch_size", "eval_batch_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise EvaluationError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.image_size < 32:
            raise EvaluationError(
                f"image_size must be >= 32 (ResNet-18 downsamples 32x), got {self.image_size}"
            )
        if self.batch_size < 2:
            raise EvaluationError("batch_size must be >= 2 (batch norm needs 2 images)")
        if self.learning_rate <= 0 or self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise EvaluationError(
                "learning_rate must be > 0, weight_decay >= 0 and momentum in [0, 1)"
            )
        if self.synthetic_per_shot is not None and self.synthetic_per_shot < 1:
            raise EvaluationError(
                f"synthetic_per_shot must be >= 1 or None, got {self.synthetic_per_shot}"
            )

    def to_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["shots"] = list(self.shots)
        out["schedule"] = self.schedule.value
        out["seeds"] = list(self.seeds)
        return out


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class SyntheticIndex:
    """The synthetic images of a `mupad augment` folder, by the real image they vary."""

    root: Path
    variations: Mapping[tuple[str, str], tuple[Path, ...]]  # (class, real file name) -> files

    def of(self, key: tuple[str, str], cap: int | None = None) -> tuple[Path, ...]:
        files = self.variations.get(key, ())
        return files if cap is None else files[:cap]


@dataclass(frozen=True)
class FewShotData:
    pool: ImageSet  # labelled real training pool
    test: ImageSet  # labelled held-out set, same class_names
    synthetic: SyntheticIndex | None


def image_key(images: ImageSet, row: int) -> tuple[str, str]:
    """(class name, file name) of one image of a labelled set: how augment names its source."""
    assert images.labels is not None
    return images.class_names[int(images.labels[row])], images.paths[row].name


def subset(images: ImageSet, rows: Sequence[int] | np.ndarray) -> ImageSet:
    """The given rows of an image set (same class names)."""
    index = torch.as_tensor(np.asarray(rows, dtype=np.int64))
    return ImageSet(
        images=images.images[index],
        paths=tuple(images.paths[int(i)] for i in index),
        labels=None if images.labels is None else images.labels[index],
        class_names=images.class_names,
    )


def _class_rows(images: ImageSet) -> list[np.ndarray]:
    assert images.labels is not None
    labels = images.labels.numpy()
    return [np.flatnonzero(labels == c) for c in range(len(images.class_names))]


def _class_permutation(name: str, size: int, *entropy: int) -> np.ndarray:
    rng = np.random.default_rng([*entropy, zlib.crc32(name.encode())])
    return rng.permutation(size)


def select_shots(pool: ImageSet, shots: int, seed: int) -> np.ndarray:
    """Rows of `shots` images per class, drawn from (seed, class name); sorted."""
    chosen = []
    for name, rows in zip(pool.class_names, _class_rows(pool), strict=True):
        if rows.size < shots:
            raise EvaluationError(
                f"class {name!r} has {rows.size} image(s) in the training pool, fewer than "
                f"k={shots} shots; lower the shots, add images to the class, or hold out fewer "
                "test images per class"
            )
        chosen.append(rows[_class_permutation(name, rows.size, seed)[:shots]])
    return np.sort(np.concatenate(chosen))


def split_holdout(images: ImageSet, per_class: int, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """(pool, test): `per_class` images of every class held out by a fixed permutation."""
    if images.labels is None:
        raise EvaluationError("a hold-out split needs a labelled <class>/<image> folder")
    if per_class < 1:
        raise EvaluationError(f"test images per class must be >= 1, got {per_class}")
    test_rows, pool_rows = [], []
    for name, rows in zip(images.class_names, _class_rows(images), strict=True):
        if rows.size <= per_class:
            raise EvaluationError(
                f"class {name!r} has {rows.size} image(s); holding out {per_class} for the test "
                "set leaves no training pool; lower the test images per class or pass a test folder"
            )
        order = _class_permutation(name, rows.size, _SPLIT_STREAM, seed)
        test_rows.append(rows[order[:per_class]])
        pool_rows.append(rows[order[per_class:]])
    return subset(images, np.sort(np.concatenate(pool_rows))), subset(
        images, np.sort(np.concatenate(test_rows))
    )


def read_augmented(folder: str | Path, class_names: Sequence[str]) -> SyntheticIndex:
    """The synthetic rows of `folder/index.csv` (written by `mupad augment`)."""
    folder = Path(folder)
    index = folder / INDEX_NAME
    if not index.is_file():
        raise EvaluationError(
            f"{folder} has no {INDEX_NAME}; pass the --out folder of `mupad augment`"
        )
    try:
        table = pd.read_csv(index, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as error:
        raise EvaluationError(f"cannot read {index}: {error}") from None
    missing = [c for c in INDEX_COLUMNS if c not in table.columns]
    if missing:
        raise EvaluationError(
            f"{index} lacks the column(s) {missing}; expected the index written by `mupad augment`"
        )
    table = table[table["kind"] == SYNTHETIC_KIND]
    if table.empty:
        raise EvaluationError(f"{index} lists no synthetic images (kind == 'synthetic')")
    unknown = sorted(set(table["class"]) - set(class_names))
    if unknown:
        raise EvaluationError(
            f"the augmented folder {folder} has class(es) {unknown} that the training pool lacks "
            f"(pool classes: {list(class_names)}); augment the same pool you evaluate"
        )
    number = pd.to_numeric(table["k"], errors="coerce") if "k" in table.columns else 0
    table = table.assign(_number=number).sort_values(["_number", "path"])  # lowest k first
    variations: dict[tuple[str, str], list[Path]] = {}
    for class_name, source, path in zip(table["class"], table["source"], table["path"]):
        variations.setdefault((class_name, Path(source).name), []).append(folder / path)
    return SyntheticIndex(folder, {k: tuple(v) for k, v in variations.items()})


def synthetic_for_shots(
    index: SyntheticIndex,
    keys: Sequence[tuple[str, str]],
    labels: torch.Tensor,
    cap: int | None = None,
) -> tuple[list[Path], torch.Tensor]:
    """The synthetic files of the shots `keys` (class, file name) with their labels (M,).

    Every shot must have at least one variation: a shot without any would silently shrink
    the augmented arm.
    """
    files: list[Path] = []
    counts = []
    for key in keys:
        variations = index.of(key, cap)
        if not variations:
            raise EvaluationError(
                f"the augmented folder {index.root} has no variation of the shot "
                f"{key[0]}/{key[1]}; run `mupad augment` on the whole training pool"
            )
        files += variations
        counts.append(len(variations))
    return files, torch.repeat_interleave(labels, torch.tensor(counts))


def _digests(images: ImageSet) -> list[str]:
    return [hashlib.sha1(image.numpy().tobytes()).hexdigest() for image in images.images]


def _check_disjoint(pool: ImageSet, test: ImageSet) -> None:
    """No test image may also be a training image (same file or same pixels)."""
    shared_files = {p.resolve() for p in pool.paths} & {p.resolve() for p in test.paths}
    pool_digests = dict(zip(_digests(pool), pool.paths))
    shared_pixels = [
        (pool_digests[d], path) for d, path in zip(_digests(test), test.paths) if d in pool_digests
    ]
    if shared_files or shared_pixels:
        examples = [str(p) for p in sorted(shared_files)][:3] or [
            f"{a} = {b}" for a, b in shared_pixels[:3]
        ]
        raise EvaluationError(
            f"{len(shared_files) or len(shared_pixels)} test image(s) are also in the training "
            f"pool (e.g. {', '.join(examples)}); the test set must be held out"
        )


def _labelled(images: ImageSet, what: str, where: str | Path) -> ImageSet:
    if images.labels is None:
        raise EvaluationError(
            f"the {what} {where} must be an ImageFolder layout <class>/<image> with every "
            "image one folder level down"
        )
    return images


def load_fewshot_data(
    train: str | Path,
    test: str | Path | None = None,
    augmented: str | Path | None = None,
    *,
    image_size: int,
    test_per_class: int = 4,
    split_seed: int = 0,
) -> FewShotData:
    """Read the pool (and test folder, or split `test_per_class` per class off the pool)."""
    pool = _labelled(load_image_set(train, image_size, what="training images"), "pool", train)
    if test is None:
        pool, held_out = split_holdout(pool, test_per_class, split_seed)
    else:
        held_out = _labelled(load_image_set(test, image_size, what="test images"), "test", test)
        if held_out.class_names != pool.class_names:
            raise EvaluationError(
                f"the test folder's classes {list(held_out.class_names)} differ from the "
                f"training pool's {list(pool.class_names)}; both need the same class folders"
            )
    _check_disjoint(pool, held_out)
    synthetic = None if augmented is None else read_augmented(augmented, pool.class_names)
    return FewShotData(pool=pool, test=held_out, synthetic=synthetic)


# ----------------------------------------------------------------------------- training


def random_dihedral(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image (B, C, S, S) under one of the 8 flips/90° rotations, drawn uniformly."""
    return apply_dihedral(images, draw_dihedral(images.shape[0], generator))


def _to_input(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    return images.to(device).float().div(127.5).sub(1.0)  # uint8 -> [-1, 1]


def _batches(size: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A random order in batches; a last batch of one joins the one before (batch norm)."""
    order = torch.randperm(size, generator=generator)
    batches = list(order.split(batch_size))
    if len(batches) > 1 and batches[-1].numel() == 1:
        batches[-2] = torch.cat(batches[-2:])
        batches.pop()
    return batches


def _learning_rate(config: FewShotConfig, step: int, total_steps: int, epoch: int) -> float:
    if config.schedule is LRSchedule.COSINE:
        return 0.5 * config.learning_rate * (1.0 + math.cos(math.pi * step / total_steps))
    drops = sum(epoch >= round(config.epochs * f) for f in (0.5, 0.75))
    return config.learning_rate * 0.1**drops


def train_classifier(
    images: torch.Tensor, labels: torch.Tensor, num_classes: int, config: FewShotConfig, seed: int
) -> torch.nn.Module:
    """A ResNet-18 trained from scratch on uint8 images (N, 3, S, S) with labels (N,)."""
    if images.shape[0] < 2:
        raise EvaluationError("training needs at least 2 images")
    device = torch.device(config.device)
    with torch.random.fork_rng(devices=[]):  # same init for both arms, global RNG untouched
        torch.manual_seed(seed)
        model = resnet18(num_classes)
    model = model.to(device).train()
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=config.learning_rate,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = len(_batches(images.shape[0], config.batch_size, torch.Generator()))
    total_steps, step = steps_per_epoch * config.epochs, 0
    for epoch in range(config.epochs):
        for rows in _batches(images.shape[0], config.batch_size, generator):
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(config, step, total_steps, epoch)
            inputs = _to_input(random_dihedral(images[rows], generator), device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
                logits = model(inputs)  # (b, num_classes)
            loss = F.cross_entropy(logits.float(), labels[rows].to(device))
            if not torch.isfinite(loss):
                raise EvaluationError(
                    f"the classifier's loss became {loss.item()} at epoch {epoch}; lower the "
                    "learning rate"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    return model.eval()


@torch.no_grad()
def predict(model: torch.nn.Module, images: torch.Tensor, config: FewShotConfig) -> torch.Tensor:
    """Predicted class (N,) of uint8 images (N, 3, S, S)."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, images.shape[0], config.eval_batch_size):
        inputs = _to_input(images[start : start + config.eval_batch_size], device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
            out.append(model(inputs).float().argmax(dim=1).cpu())
    return torch.cat(out)


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class FewShotRun:
    """One trained classifier."""

    shots: int
    arm: Arm
    seed: int
    num_real: int
    num_synthetic: int
    accuracy: float
    per_class_accuracy: Mapping[str, float]
    shot_files: tuple[str, ...]  # "<class>/<file>" of the real shots

    def to_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["arm"] = self.arm.value
        out["per_class_accuracy"] = dict(self.per_class_accuracy)
        out["shot_files"] = list(self.shot_files)
        return out


@dataclass(frozen=True)
class ArmSummary:
    """Accuracy over seeds of one (k, arm): mean and sample std (ddof=1)."""

    shots: int
    arm: Arm
    mean: float
    std: float
    accuracies: tuple[float, ...]  # in seed order

    def to_dict(self) -> dict[str, object]:
        return {
            "shots": self.shots,
            "arm": self.arm.value,
            "mean": self.mean,
            "std": self.std,
            "accuracies": list(self.accuracies),
        }


@dataclass(frozen=True)
class PairedGain:
    """augmented - real accuracy of one k, paired by seed."""

    shots: int
    gain: Estimate  # mean difference with a 95 % t interval over seeds
    relative_gain: float  # mean(augmented) / mean(real) - 1 (the paper's "+47 %")
    p_value: float  # two-sided exact sign-flip test of the paired differences
    wins: int  # seeds where the augmented arm is more accurate
    ties: int

    def to_dict(self) -> dict[str, object]:
        out = {
            "shots": self.shots,
            "gain": self.gain.to_dict(),
            "relative_gain": None if math.isnan(self.relative_gain) else self.relative_gain,
            "p_value": self.p_value,
            "wins": self.wins,
            "ties": self.ties,
        }
        return {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in out.items()
        }


@dataclass(frozen=True)
class FewShotResult:
    config: FewShotConfig
    backend: str  # "torchvision" or "mupad" (same architecture)
    class_names: tuple[str, ...]
    num_pool: int
    num_test: int
    runs: tuple[FewShotRun, ...]
    summaries: tuple[ArmSummary, ...]
    gains: tuple[PairedGain, ...]  # empty without an augmented folder

    def summary(self, shots: int, arm: Arm) -> ArmSummary:
        for item in self.summaries:
            if item.shots == shots and item.arm is arm:
                return item
        raise KeyError((shots, arm))

    def to_dict(self) -> dict[str, object]:
        return {
            "config": self.config.to_dict(),
            "backend": self.backend,
            "class_names": list(self.class_names),
            "num_pool": self.num_pool,
            "num_test": self.num_test,
            "runs": [r.to_dict() for r in self.runs],
            "summaries": [s.to_dict() for s in self.summaries],
            "gains": [g.to_dict() for g in self.gains],
        }


def paired_gain(shots: int, real: Sequence[float], augmented: Sequence[float]) -> PairedGain:
    """Mean paired difference with a t interval (none for one seed) and the exact sign-flip
    permutation test (2^n sign patterns; with 5 seeds the smallest possible p is 1/16)."""
    diff = np.asarray(augmented, dtype=np.float64) - np.asarray(real, dtype=np.float64)
    mean, std = mean_and_std(diff)
    low = high = math.nan
    if diff.size > 1:
        half = scipy_stats.t.ppf(0.975, diff.size - 1) * std / math.sqrt(diff.size)
        low, high = mean - half, mean + half
    method = f"paired t interval over {diff.size} seeds" if diff.size > 1 else ""
    real_mean = float(np.mean(real))
    return PairedGain(
        shots=shots,
        gain=Estimate(mean, low, high, 0.95, method, (int(diff.size),)),
        # Undefined (NaN, written as null) when the real arm scored 0.
        relative_gain=float(np.mean(augmented)) / real_mean - 1.0 if real_mean > 0 else math.nan,
        p_value=paired_permutation_test(augmented, real).p_value,
        wins=int((diff > 0).sum()),
        ties=int((diff == 0).sum()),
    )


def _accuracies(
    predicted: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str]
) -> tuple[float, dict[str, float]]:
    correct = predicted == labels
    per_class = {
        name: float(correct[labels == c].float().mean())
        for c, name in enumerate(class_names)
        if bool((labels == c).any())
    }
    return float(correct.float().mean()), per_class


class _SyntheticCache:
    """Synthetic images read once at the benchmark's size, by path."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.images: dict[Path, torch.Tensor] = {}

    def get(self, paths: Sequence[Path]) -> torch.Tensor:
        missing = [p for p in dict.fromkeys(paths) if p not in self.images]
        if missing:
            loaded = load_image_set(missing, self.size, what="synthetic images")
            self.images.update(zip(missing, loaded.images))
        return torch.stack([self.images[p] for p in paths])


def run_fewshot(
    data: FewShotData, config: FewShotConfig = FewShotConfig(), *, progress: bool = True
) -> FewShotResult:
    """Train and score every (k, arm, seed); see the module docstring."""
    config.validate()
    pool, test = data.pool, data.test
    assert pool.labels is not None and test.labels is not None
    arms = [Arm.REAL] + ([Arm.AUGMENTED] if data.synthetic is not None else [])
    cache = _SyntheticCache(config.image_size)
    plan = [(k, seed) for k in config.shots for seed in config.seeds]
    for k, seed in plan:  # fail on a small class or a missing variation before training
        rows = select_shots(pool, k, seed)
        if data.synthetic is not None:
            keys = [image_key(pool, int(r)) for r in rows]
            synthetic_for_shots(data.synthetic, keys, pool.labels[rows], config.synthetic_per_shot)
    runs: list[FewShotRun] = []
    bar = tqdm(total=len(plan) * len(arms), desc="few-shot", unit="run", disable=not progress)
    for k, seed in plan:
        rows = select_shots(pool, k, seed)
        keys = [image_key(pool, int(r)) for r in rows]
        for arm in arms:
            images, labels = pool.images[rows], pool.labels[rows]
            num_synthetic = 0
            if arm is Arm.AUGMENTED:
                assert data.synthetic is not None
                files, synthetic_labels = synthetic_for_shots(
                    data.synthetic, keys, labels, config.synthetic_per_shot
                )
                num_synthetic = len(files)
                images = torch.cat([images, cache.get(files)])
                labels = torch.cat([labels, synthetic_labels])
            model = train_classifier(images, labels, len(pool.class_names), config, seed)
            accuracy, per_class = _accuracies(
                predict(model, test.images, config), test.labels, pool.class_names
            )
            runs.append(
                FewShotRun(
                    shots=k, arm=arm, seed=seed, num_real=int(rows.size),
                    num_synthetic=num_synthetic, accuracy=accuracy,
                    per_class_accuracy=per_class, shot_files=tuple(f"{c}/{n}" for c, n in keys),
                )
            )  # fmt: skip
            logger.info("few-shot k=%d %s seed %d: accuracy %.4f", k, arm.value, seed, accuracy)
            bar.update(1)
    bar.close()
    summaries, gains = [], []
    for k in config.shots:
        by_arm = {arm: [r.accuracy for r in runs if r.shots == k and r.arm is arm] for arm in arms}
        for arm, values in by_arm.items():
            mean, std = mean_and_std(values)
            summaries.append(ArmSummary(k, arm, mean, std, tuple(values)))
        if Arm.AUGMENTED in by_arm:
            gains.append(paired_gain(k, by_arm[Arm.REAL], by_arm[Arm.AUGMENTED]))
    return FewShotResult(
        config=config,
        backend=classifier_backend(),
        class_names=pool.class_names,
        num_pool=len(pool),
        num_test=len(test),
        runs=tuple(runs),
        summaries=tuple(summaries),
        gains=tuple(gains),
    )
