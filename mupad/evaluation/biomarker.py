"""Biomarker AUC from virtual IHC: how well a DAB score of generated IHC separates
biomarker-positive from biomarker-negative cases.

Score per image: the DAB-positive fraction — among tissue pixels (`stains.tissue_mask`:
summed RGB optical density > `tissue_threshold`), the share whose DAB optical density
(`stains.stain_density(..., Stain.DAB)`, rgb2hed units, in [0, 0.63]) exceeds
`dab_threshold`. The default 0.05 (a base-10 DAB OD of 0.3) puts the brown of a positive
stain above it and the blue hematoxylin counterstain below it: on scikit-image's IHC sample
60 % of tissue pixels pass, on the CIMA mouse-lung Cc10/proSPC IHC sections (mostly
counterstain) under 1 %. It is meant for hematoxylin-DAB images: on H&E, dark eosin +
hematoxylin overlaps project onto the DAB vector (see `stains`) — the CIMA H&E section
scores 0.007, as much as its serial Ki67 IHC section (0.008), so never score H&E with it.

AUC: the Mann–Whitney form, P(score of a positive > score of a negative) + 0.5 P(tie),
computed from midranks, with a stratified bootstrap interval (positives and negatives
resampled separately, so every resample has both classes). The Youden-optimal threshold
(max sensitivity + specificity - 1) is reported for information; choosing it on the same
data overstates its accuracy.

Labels (`parse_label`): positive / negative / equivocal, case-insensitive, with the
synonyms pos/neg/1/0/true/false/yes/no, and HER2 IHC scores: 0 and 1+ negative, 3+
positive, 2+ equivocal. Equivocal cases have no class: they are excluded when asked
(`exclude_equivocal=True`, the number is reported) and are an error otherwise.
"""

from __future__ import annotations

import csv
import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import rankdata

from mupad.evaluation.stains import Stain, StainError, stain_density, tissue_mask
from mupad.evaluation.stats import Estimate, EvaluationError, bootstrap

logger = logging.getLogger(__name__)

DEFAULT_DAB_THRESHOLD = 0.05
DEFAULT_TISSUE_THRESHOLD = 0.03


class BiomarkerError(EvaluationError):
    """Scores or labels cannot give an AUC; the message says how to fix them."""


class Label(enum.Enum):
    POSITIVE = "positive"
    NEGATIVE = "negative"
    EQUIVOCAL = "equivocal"


_LABEL_WORDS = {
    Label.POSITIVE: ("positive", "pos", "1", "true", "yes", "3+"),
    Label.NEGATIVE: ("negative", "neg", "0", "false", "no", "1+", "0+"),
    Label.EQUIVOCAL: ("equivocal", "2+"),
}
_LABELS = {word: label for label, words in _LABEL_WORDS.items() for word in words}


def parse_label(text: str) -> Label:
    """A label word or HER2 score -> Label (see module doc)."""
    key = str(text).strip().lower()
    if key not in _LABELS:
        raise BiomarkerError(
            f"unknown label {text!r}; use one of {', '.join(sorted(_LABELS))} "
            "(HER2: 0/1+ negative, 2+ equivocal, 3+ positive)"
        )
    return _LABELS[key]


def read_labels(path: str | Path) -> dict[str, Label]:
    """A CSV with a header and columns `image,label` (image: a file name or its stem) ->
    {stem: Label}. Extra columns are ignored."""
    path = Path(path)
    if not path.is_file():
        raise BiomarkerError(f"labels file {path} does not exist")
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"image", "label"} <= set(rows[0]):
        raise BiomarkerError(
            f"{path} must be a CSV with a header holding the columns 'image' and 'label' "
            "(e.g. 'image,label' then 'case01.png,positive')"
        )
    labels: dict[str, Label] = {}
    for line, row in enumerate(rows, start=2):
        stem = Path(str(row["image"]).strip()).stem
        if not stem:
            raise BiomarkerError(f"{path}:{line}: empty image name")
        if stem in labels:
            raise BiomarkerError(f"{path}:{line}: image {stem!r} is labelled twice")
        try:
            labels[stem] = parse_label(row["label"])
        except BiomarkerError as error:
            raise BiomarkerError(f"{path}:{line}: {error}") from None
    return labels


# --------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------


def dab_positive_fraction(
    images: Any,
    dab_threshold: float = DEFAULT_DAB_THRESHOLD,
    tissue_threshold: float = DEFAULT_TISSUE_THRESHOLD,
) -> np.ndarray:
    """DAB-positive share of tissue pixels per image: uint8 (N, 3, H, W) or (3, H, W) ->
    (N,) in [0, 1]. An image without tissue raises (its fraction does not exist)."""
    if not 0 < dab_threshold:
        raise BiomarkerError(f"dab_threshold must be positive, got {dab_threshold}")
    try:
        dab = stain_density(images, Stain.DAB)  # (N, H, W)
        tissue = tissue_mask(images, tissue_threshold)
    except StainError as error:
        raise BiomarkerError(str(error)) from None
    tissue_pixels = tissue.sum(axis=(1, 2))
    empty = np.flatnonzero(tissue_pixels == 0)
    if len(empty):
        raise BiomarkerError(
            f"image(s) {empty.tolist()} hold no tissue (no pixel with optical density above "
            f"{tissue_threshold}); remove blank images or lower the tissue threshold"
        )
    positive = ((dab > dab_threshold) & tissue).sum(axis=(1, 2))
    return positive / tissue_pixels


# --------------------------------------------------------------------------------------
# ROC
# --------------------------------------------------------------------------------------


def _split(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """(scores, binary labels) -> (positive scores, negative scores)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    if s.ndim != 1 or y.shape != s.shape:
        raise BiomarkerError(
            f"scores and labels must be 1-D and equally long, got {s.shape} and {y.shape}"
        )
    if not np.isfinite(s).all():
        raise BiomarkerError("scores contain NaN or infinite values")
    if y.dtype == object or not np.isin(y, (0, 1)).all():
        raise BiomarkerError("labels must be binary (1 positive, 0 negative)")
    y = y.astype(bool)
    positives, negatives = s[y], s[~y]
    if len(positives) == 0 or len(negatives) == 0:
        raise BiomarkerError(
            f"the AUC needs both classes, got {len(positives)} positive and {len(negatives)} "
            "negative case(s)"
        )
    return positives, negatives


def auc_from_groups(positives: np.ndarray, negatives: np.ndarray) -> float:
    """P(positive > negative) + 0.5 P(tie) via midranks (Mann–Whitney U / (n_pos n_neg))."""
    n_pos, n_neg = len(positives), len(negatives)
    ranks = rankdata(np.concatenate([positives, negatives]))  # ties get their mean rank
    u = ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_auc(scores: Any, labels: Any) -> float:
    """ROC AUC of scores (N,) for binary labels (N,) (1 = positive), ties counted half."""
    return auc_from_groups(*_split(scores, labels))


@dataclass(frozen=True)
class RocCurve:
    false_positive_rate: np.ndarray  # (K,), from 0 to 1
    true_positive_rate: np.ndarray  # (K,)
    thresholds: np.ndarray  # (K,): call positive when score >= threshold (first is +inf)


def roc_curve(scores: Any, labels: Any) -> RocCurve:
    """The ROC curve through every distinct score."""
    positives, negatives = _split(scores, labels)
    thresholds = np.concatenate([[np.inf], np.unique(np.concatenate([positives, negatives]))[::-1]])
    tpr = (positives[None, :] >= thresholds[:, None]).mean(axis=1)
    fpr = (negatives[None, :] >= thresholds[:, None]).mean(axis=1)
    return RocCurve(fpr, tpr, thresholds)


@dataclass(frozen=True)
class YoudenPoint:
    threshold: float  # call positive when score >= threshold
    sensitivity: float
    specificity: float


def youden_point(curve: RocCurve) -> YoudenPoint:
    """The ROC point maximising sensitivity + specificity - 1 (first, i.e. highest
    threshold, on ties)."""
    index = int(np.argmax(curve.true_positive_rate - curve.false_positive_rate))
    return YoudenPoint(
        threshold=float(curve.thresholds[index]),
        sensitivity=float(curve.true_positive_rate[index]),
        specificity=float(1.0 - curve.false_positive_rate[index]),
    )


# --------------------------------------------------------------------------------------
# The evaluation
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BiomarkerResult:
    auc: Estimate
    youden: YoudenPoint
    curve: RocCurve
    num_positive: int
    num_negative: int
    num_excluded_equivocal: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "auc": self.auc.to_dict(),
            "youden_threshold": self.youden.threshold,
            "youden_sensitivity": self.youden.sensitivity,
            "youden_specificity": self.youden.specificity,
            "num_positive": self.num_positive,
            "num_negative": self.num_negative,
            "num_excluded_equivocal": self.num_excluded_equivocal,
        }


def biomarker_auc(
    scores: Any,
    labels: Sequence[Label],
    *,
    exclude_equivocal: bool = False,
    iterations: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> BiomarkerResult:
    """AUC of per-case scores (N,) against labels (N,), with a stratified bootstrap interval.

    Equivocal cases are dropped when `exclude_equivocal` (and counted); otherwise their
    presence is an error, since they belong to neither class.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or len(s) != len(labels):
        raise BiomarkerError(f"{len(labels)} labels for scores of shape {s.shape}")
    labels = [label if isinstance(label, Label) else parse_label(label) for label in labels]
    equivocal = np.array([label is Label.EQUIVOCAL for label in labels], dtype=bool)
    if equivocal.any() and not exclude_equivocal:
        raise BiomarkerError(
            f"{int(equivocal.sum())} case(s) are labelled equivocal and belong to neither "
            "class; exclude them (--exclude-equivocal) or relabel them"
        )
    y = np.array([label is Label.POSITIVE for label in labels], dtype=np.int64)[~equivocal]
    s = s[~equivocal]
    positives, negatives = _split(s, y)
    auc = bootstrap(
        auc_from_groups,
        positives,
        negatives,
        iterations=iterations,
        confidence=confidence,
        seed=seed,
    )
    auc = Estimate(
        value=auc.value,
        ci_low=auc.ci_low,
        ci_high=auc.ci_high,
        confidence=confidence,
        method=f"stratified bootstrap percentile, {iterations} resamples",
        n=auc.n,
    )
    curve = roc_curve(s, y)
    return BiomarkerResult(
        auc=auc,
        youden=youden_point(curve),
        curve=curve,
        num_positive=len(positives),
        num_negative=len(negatives),
        num_excluded_equivocal=int(equivocal.sum()),
    )


def match_labels(stems: Sequence[str], labels: dict[str, Label]) -> list[Label]:
    """Labels in the order of `stems`; every image needs one (labels of absent images are
    ignored with a warning)."""
    missing = [stem for stem in stems if stem not in labels]
    if missing:
        raise BiomarkerError(
            f"{len(missing)} image(s) have no label, e.g. {', '.join(missing[:5])}; add a row "
            "'<image>,<label>' for each"
        )
    unused = sorted(set(labels) - set(stems))
    if unused:
        logger.warning(
            "%d label(s) name no image and are ignored, e.g. %s", len(unused), unused[:3]
        )
    return [labels[stem] for stem in stems]


__all__ = [
    "DEFAULT_DAB_THRESHOLD",
    "DEFAULT_TISSUE_THRESHOLD",
    "BiomarkerError",
    "BiomarkerResult",
    "Label",
    "RocCurve",
    "YoudenPoint",
    "auc_from_groups",
    "biomarker_auc",
    "dab_positive_fraction",
    "match_labels",
    "parse_label",
    "read_labels",
    "roc_auc",
    "roc_curve",
    "youden_point",
]
