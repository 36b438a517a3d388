"""mIF marker correlation: patch- and slide-level Pearson correlation per marker, and a paired
permutation test between two methods.

Patch level: for every patch n and marker m, the Pearson correlation over pixels of the
predicted and the real intensity map, (N, M, H, W) x 2 -> (N, M).

Slide level: for every slide and marker, the Pearson correlation across the slide's patches
of the per-patch mean intensities (predicted vs real), i.e. whether the model ranks the
regions of a slide by marker abundance the way the real stain does; then the mean over
slides. Without slide ids every patch is taken from one slide. Pearson is invariant to a
positive rescaling of either map, so the per-marker intensity scaling does not matter.

Undefined correlations are explicit, never NaN: a map whose values are all equal (a marker
absent from a patch, a model that outputs a flat map) has no correlation. Such entries are
flagged False in `defined`, hold 0.0 in `values`, are left out of every mean and are counted
(`num_undefined`). At slide level, slides with fewer than `min_patches_per_slide` patches
(a correlation of two points is always +-1) or constant per-patch means are left out and
counted the same way.

Intervals are bootstrap percentile intervals over patches (patch level) or slides (slide
level). The permutation test flips the signs of matched per-patch score differences.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mupad.evaluation.stats import Estimate, EvaluationError, bootstrap

DEFAULT_BOOTSTRAP_ITERATIONS = 1000  # cheap on (N, M) arrays, so more than FID's 25
MIN_PATCHES_PER_SLIDE = 3
_MAX_CHUNK_ELEMENTS = 4_000_000  # sign-flip matrix rows x patches held at once


class PCCError(EvaluationError):
    """Marker maps or scores cannot be correlated as given; the message says why."""


def _as_maps(maps: Any, what: str) -> np.ndarray:
    if isinstance(maps, torch.Tensor):  # via float64: numpy has no bfloat16
        maps = maps.detach().cpu().to(torch.float64).numpy()
    array = np.asarray(maps)
    if array.ndim != 4:
        raise PCCError(
            f"{what} maps must be (N, M, H, W) (patches, markers, rows, cols), got {array.shape}"
        )
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise PCCError(f"{what} maps must be numeric, got {array.dtype}")
    array = array.astype(np.float64, copy=False)
    if not np.isfinite(array).all():
        raise PCCError(f"{what} maps contain NaN or infinite values")
    return array


def _check_names(marker_names: Sequence[str], num_markers: int) -> tuple[str, ...]:
    names = tuple(marker_names)
    if len(names) != num_markers:
        raise PCCError(
            f"the maps have {num_markers} marker channels but {len(names)} marker names were "
            "given; give one name per channel, in channel order"
        )
    if len(set(names)) != len(names):
        raise PCCError(f"marker names must be unique, got {list(names)}")
    return names


@dataclass(frozen=True)
class Correlations:
    """Pearson correlations of units (patches or slides) x markers, with their definedness."""

    values: np.ndarray  # (U, M) float64; 0.0 where not defined
    defined: np.ndarray  # (U, M) bool; False: a constant map/series, left out of every mean
    marker_names: tuple[str, ...]

    def num_undefined(self) -> dict[str, int]:
        return {m: int((~self.defined[:, k]).sum()) for k, m in enumerate(self.marker_names)}

    def marker_means(self) -> dict[str, float | None]:
        """Mean over the units where the correlation is defined; None where there is none."""
        counts = self.defined.sum(axis=0)
        sums = np.where(self.defined, self.values, 0.0).sum(axis=0)
        return {
            m: (float(sums[k] / counts[k]) if counts[k] else None)
            for k, m in enumerate(self.marker_names)
        }


def _pearson_rows(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pearson correlation along the last axis: (..., L) x 2 -> values, defined (...)."""
    constant = (np.ptp(a, axis=-1) == 0) | (np.ptp(b, axis=-1) == 0)
    a = a - a.mean(axis=-1, keepdims=True)
    b = b - b.mean(axis=-1, keepdims=True)
    denominator = np.sqrt((a * a).sum(axis=-1) * (b * b).sum(axis=-1))
    safe = np.where(constant, 1.0, denominator)
    values = np.where(constant, 0.0, (a * b).sum(axis=-1) / safe)
    return np.clip(values, -1.0, 1.0), ~constant


def patch_correlations(
    predicted: Any, real: Any, marker_names: Sequence[str] | None = None
) -> Correlations:
    """Pearson correlation per patch and marker of predicted vs real maps (N, M, H, W).

    A patch/marker whose predicted or real map is constant is undefined (see module doc).
    """
    a, b = _as_maps(predicted, "predicted"), _as_maps(real, "real")
    if a.shape != b.shape:
        raise PCCError(
            f"predicted maps {a.shape} and real maps {b.shape} must have the same (N, M, H, W)"
        )
    if a.shape[0] == 0:
        raise PCCError("no patches to correlate")
    if a.shape[2] * a.shape[3] < 2:
        raise PCCError(f"a correlation needs at least 2 pixels per map, got {a.shape[2:]}")
    names = marker_names if marker_names is not None else [f"marker_{k}" for k in range(a.shape[1])]
    values, defined = _pearson_rows(a.reshape(*a.shape[:2], -1), b.reshape(*b.shape[:2], -1))
    return Correlations(values, defined, _check_names(names, a.shape[1]))


def _slide_groups(slide_ids: Sequence[str] | None, num_patches: int) -> dict[str, np.ndarray]:
    if slide_ids is None:
        return {"all": np.arange(num_patches)}
    ids = [str(s) for s in slide_ids]
    if len(ids) != num_patches:
        raise PCCError(f"{len(ids)} slide ids for {num_patches} patches; give one per patch")
    groups: dict[str, list[int]] = {}
    for index, slide in enumerate(ids):
        groups.setdefault(slide, []).append(index)
    return {slide: np.asarray(rows) for slide, rows in sorted(groups.items())}


@dataclass(frozen=True)
class SlideCorrelations:
    """Per-slide correlations of per-patch mean intensities, and the slides left out."""

    correlations: Correlations  # (S, M), S = slides with enough patches
    slide_ids: tuple[str, ...]  # (S,)
    too_small: tuple[str, ...]  # slides with fewer than min_patches_per_slide patches


def slide_correlations(
    predicted: Any,
    real: Any,
    slide_ids: Sequence[str] | None = None,
    marker_names: Sequence[str] | None = None,
    min_patches_per_slide: int = MIN_PATCHES_PER_SLIDE,
) -> SlideCorrelations:
    """Per slide and marker, Pearson across the slide's patches of the per-patch mean
    predicted vs real intensity (see module doc); `slide_ids` (N,) names each patch's slide
    (None: one slide)."""
    if min_patches_per_slide < 3:
        raise PCCError(f"min_patches_per_slide must be >= 3, got {min_patches_per_slide}")
    a, b = _as_maps(predicted, "predicted"), _as_maps(real, "real")
    if a.shape != b.shape:
        raise PCCError(
            f"predicted maps {a.shape} and real maps {b.shape} must have the same (N, M, H, W)"
        )
    names = marker_names if marker_names is not None else [f"marker_{k}" for k in range(a.shape[1])]
    names = _check_names(names, a.shape[1])
    means_a, means_b = a.mean(axis=(2, 3)), b.mean(axis=(2, 3))  # (N, M)
    kept, small, values, defined = [], [], [], []
    for slide, rows in _slide_groups(slide_ids, a.shape[0]).items():
        if len(rows) < min_patches_per_slide:
            small.append(slide)
            continue
        v, d = _pearson_rows(means_a[rows].T, means_b[rows].T)  # (M,)
        kept.append(slide)
        values.append(v)
        defined.append(d)
    if not kept:
        raise PCCError(
            f"no slide has {min_patches_per_slide} or more patches (slides: {len(small)}); "
            "slide-level correlation needs several patches per slide"
        )
    correlations = Correlations(np.stack(values), np.stack(defined), names)
    return SlideCorrelations(correlations, tuple(kept), tuple(small))


def _mean_over_markers(values: np.ndarray, defined: np.ndarray) -> float:
    """Mean over markers of the per-marker mean over defined rows (the bootstrap metric).

    Every row holds at least one defined marker, so some marker is always defined; a
    resample that happens to miss every patch of a rarely defined marker averages the others.
    """
    counts = defined.sum(axis=0)
    sums = np.where(defined, values, 0.0).sum(axis=0)
    present = counts > 0
    return float((sums[present] / counts[present]).mean())


def summarize(
    correlations: Correlations,
    *,
    unit: str,
    iterations: int = DEFAULT_BOOTSTRAP_ITERATIONS,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[dict[str, Estimate | None], Estimate | None]:
    """Per-marker mean correlation and the mean over markers, each with a bootstrap
    percentile interval over the units (rows). A marker with no defined unit is None and
    left out of the mean over markers; with fewer than 2 defined units there is no
    interval (the Estimate's CI is NaN and its method says why)."""
    per_marker: dict[str, Estimate | None] = {}
    for k, name in enumerate(correlations.marker_names):
        values = correlations.values[correlations.defined[:, k], k]
        per_marker[name] = _estimate(
            lambda v: float(v.mean()), (values,), unit, iterations, confidence, seed
        )
    usable = [k for k, m in enumerate(correlations.marker_names) if per_marker[m] is not None]
    if not usable:
        return per_marker, None
    rows = correlations.defined[:, usable].any(axis=1)
    values = correlations.values[rows][:, usable]
    defined = correlations.defined[rows][:, usable]
    overall = _estimate(
        _mean_over_markers, (values, defined), unit, iterations, confidence, seed, paired=True
    )
    return per_marker, overall


def _estimate(
    metric: Callable[..., float],
    samples: tuple[np.ndarray, ...],
    unit: str,
    iterations: int,
    confidence: float,
    seed: int,
    paired: bool = False,
) -> Estimate | None:
    n = int(samples[0].shape[0])
    if n == 0:
        return None
    if n == 1:
        return Estimate(value=float(metric(*samples)), method=f"single {unit}: no interval", n=(1,))
    estimate = bootstrap(
        metric, *samples, iterations=iterations, confidence=confidence, seed=seed, paired=paired
    )
    return Estimate(
        value=estimate.value,
        ci_low=estimate.ci_low,
        ci_high=estimate.ci_high,
        confidence=confidence,
        method=f"bootstrap percentile over {unit}s, {iterations} resamples",
        n=(n,),
    )


@dataclass(frozen=True)
class MarkerCorrelationReport:
    """Patch- and slide-level PCC per marker and their means over markers."""

    marker_names: tuple[str, ...]
    patch: dict[str, Estimate | None]  # per marker, mean over defined patches
    patch_mean: Estimate | None  # mean over markers
    patch_undefined: dict[str, int]  # per marker, patches with a constant map
    num_patches: int
    slide: dict[str, Estimate | None]
    slide_mean: Estimate | None
    slide_undefined: dict[str, int]  # per marker, slides with constant per-patch means
    slide_ids: tuple[str, ...]  # slides that entered the slide level
    slides_too_small: tuple[str, ...]  # slides with too few patches, left out

    def to_dict(self) -> dict[str, Any]:
        def dump(value: Estimate | None) -> dict[str, Any] | None:
            return None if value is None else value.to_dict()

        return {
            "markers": list(self.marker_names),
            "patch": {
                "per_marker": {m: dump(v) for m, v in self.patch.items()},
                "mean_over_markers": dump(self.patch_mean),
                "num_patches": self.num_patches,
                "num_undefined": dict(self.patch_undefined),
            },
            "slide": {
                "per_marker": {m: dump(v) for m, v in self.slide.items()},
                "mean_over_markers": dump(self.slide_mean),
                "slides": list(self.slide_ids),
                "num_undefined": dict(self.slide_undefined),
                "slides_too_small": list(self.slides_too_small),
            },
        }


def marker_correlation(
    predicted: Any,
    real: Any,
    marker_names: Sequence[str],
    slide_ids: Sequence[str] | None = None,
    *,
    min_patches_per_slide: int = MIN_PATCHES_PER_SLIDE,
    iterations: int = DEFAULT_BOOTSTRAP_ITERATIONS,
    confidence: float = 0.95,
    seed: int = 0,
) -> MarkerCorrelationReport:
    """Patch- and slide-level Pearson correlation per marker with bootstrap intervals.

    predicted, real: (N, M, H, W) intensity maps; slide_ids: (N,) or None (one slide).
    The slide level is skipped (empty, listed in `slides_too_small`) when no slide has
    `min_patches_per_slide` patches.
    """
    patches = patch_correlations(predicted, real, marker_names)
    patch, patch_mean = summarize(
        patches, unit="patch", iterations=iterations, confidence=confidence, seed=seed
    )
    groups = _slide_groups(slide_ids, patches.values.shape[0])
    if max(len(rows) for rows in groups.values()) >= min_patches_per_slide:
        slides = slide_correlations(
            predicted, real, slide_ids, patches.marker_names, min_patches_per_slide
        )
        slide, slide_mean = summarize(
            slides.correlations,
            unit="slide",
            iterations=iterations,
            confidence=confidence,
            seed=seed,
        )
        slide_undefined = slides.correlations.num_undefined()
        kept, small = slides.slide_ids, slides.too_small
    else:
        slide = {m: None for m in patches.marker_names}
        slide_mean, slide_undefined = None, {m: 0 for m in patches.marker_names}
        kept, small = (), tuple(groups)
    return MarkerCorrelationReport(
        marker_names=patches.marker_names,
        patch=patch,
        patch_mean=patch_mean,
        patch_undefined=patches.num_undefined(),
        num_patches=int(patches.values.shape[0]),
        slide=slide,
        slide_mean=slide_mean,
        slide_undefined=slide_undefined,
        slide_ids=kept,
        slides_too_small=small,
    )


# --------------------------------------------------------------------------------------
# Paired permutation test
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PermutationTestResult:
    """Two-sided paired permutation (sign-flip) test of mean(scores_a - scores_b) = 0."""

    mean_difference: float  # mean of a - b over the matched pairs
    p_value: float
    n: int  # matched pairs
    num_permutations: int  # sign patterns evaluated (2^n when exact)
    exact: bool  # every sign pattern enumerated (no +1 correction needed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean_difference": self.mean_difference,
            "p_value": self.p_value,
            "n": self.n,
            "num_permutations": self.num_permutations,
            "exact": self.exact,
        }


def _sign_patterns(n: int, start: int, stop: int) -> np.ndarray:
    """+-1 patterns number start..stop-1 of the 2^n of length n (bit i of the number is the
    sign of element i): (stop - start, n)."""
    bits = (np.arange(start, stop, dtype=np.int64)[:, None] >> np.arange(n)[None, :]) & 1
    return 1.0 - 2.0 * bits


def paired_permutation_test(
    scores_a: Any, scores_b: Any, num_permutations: int = 10_000, seed: int = 0
) -> PermutationTestResult:
    """Two-sided paired permutation test on matched per-unit scores (e.g. per-patch PCC).

    Under the null the two methods are exchangeable within each pair, so the sign of each
    difference d_i = a_i - b_i is a fair coin. The statistic is |mean(d)|; the p-value is the
    share of sign patterns whose |mean| reaches the observed one. When 2^n <=
    num_permutations every pattern is enumerated (exact p, at least 2 / 2^n unless all
    differences are 0); otherwise `num_permutations` random patterns are drawn with `seed`
    and p = (1 + hits) / (1 + num_permutations), which is never 0 and keeps the test valid.
    """
    a = np.asarray(scores_a, dtype=np.float64)
    b = np.asarray(scores_b, dtype=np.float64)
    if a.ndim != 1 or b.ndim != 1 or a.shape != b.shape:
        raise PCCError(
            f"paired scores must be two 1-D arrays of equal length, got {a.shape} and {b.shape}"
        )
    if a.size == 0:
        raise PCCError("no paired scores to test")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise PCCError("paired scores contain NaN or infinite values; drop undefined pairs first")
    if num_permutations < 1:
        raise PCCError(f"num_permutations must be >= 1, got {num_permutations}")
    differences = a - b  # (n,)
    n = differences.size
    observed = abs(differences.mean())
    # Sums of the same numbers in another order differ in the last bits: compare with a
    # tolerance so that sign patterns giving the observed |mean| count as reaching it.
    tolerance = 1e-12 * max(1.0, float(np.abs(differences).max()))
    chunk = max(1, _MAX_CHUNK_ELEMENTS // n)  # sign patterns held at once

    def hits_of(signs: np.ndarray) -> int:
        return int((np.abs(signs @ differences) / n >= observed - tolerance).sum())

    if n < 63 and 2**n <= num_permutations:  # enumerate every pattern: the exact p
        total = 2**n
        hits = sum(
            hits_of(_sign_patterns(n, start, min(start + chunk, total)))
            for start in range(0, total, chunk)
        )
        return PermutationTestResult(float(differences.mean()), hits / total, n, total, True)
    rng = np.random.default_rng(seed)
    hits, done = 0, 0
    while done < num_permutations:
        rows = min(chunk, num_permutations - done)
        hits += hits_of(rng.choice(np.array([-1.0, 1.0]), size=(rows, n)))
        done += rows
    p_value = (1 + hits) / (1 + num_permutations)
    return PermutationTestResult(float(differences.mean()), p_value, n, num_permutations, False)


def per_patch_scores(
    correlations: Correlations, other: Correlations
) -> tuple[np.ndarray, np.ndarray]:
    """Matched per-patch scores of two methods on the same patches: the mean PCC over the
    markers defined for both in that patch; patches with no such marker are dropped."""
    if correlations.values.shape != other.values.shape:
        raise PCCError(
            f"the two methods were scored on {correlations.values.shape} and "
            f"{other.values.shape} patches x markers; compare them on the same patches"
        )
    both = correlations.defined & other.defined  # (N, M)
    counts = both.sum(axis=1)
    keep = counts > 0
    if not keep.any():
        raise PCCError("no patch has a marker whose correlation is defined for both methods")

    def score(c: Correlations) -> np.ndarray:
        return np.where(both, c.values, 0.0)[keep].sum(axis=1) / counts[keep]

    return score(correlations), score(other)


__all__ = [
    "DEFAULT_BOOTSTRAP_ITERATIONS",
    "MIN_PATCHES_PER_SLIDE",
    "Correlations",
    "MarkerCorrelationReport",
    "PCCError",
    "PermutationTestResult",
    "SlideCorrelations",
    "marker_correlation",
    "paired_permutation_test",
    "patch_correlations",
    "per_patch_scores",
    "slide_correlations",
    "summarize",
]
