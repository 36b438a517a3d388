"""Estimates with confidence intervals: the one result type every evaluation metric returns.

A metric is a function of one or more (N_i, ...) sample arrays. `bootstrap` re-evaluates it
on sets resampled with replacement (each array resampled independently, rows kept whole)
and reports the percentile interval; the point value is always the metric on the full sets,
never the bootstrap mean.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import norm

from mupad.errors import MupadError


class EvaluationError(MupadError, ValueError):
    """An evaluation cannot run on these inputs; the message says why and what would fix it."""


class IntervalKind(str, enum.Enum):
    """How bootstrap replicates become an interval.

    PERCENTILE: the central quantiles of the replicates (the default).
    NORMAL: value ± z * standard deviation of the replicates. For statistics that resampling
    itself biases — FID grows when a resample repeats images (fewer distinct samples) — the
    percentile interval shifts away from the value and can miss it; the replicates' spread is
    still a fair measure of the sampling variability, so this interval is centred on the value.
    """

    PERCENTILE = "percentile"
    NORMAL = "normal"


@dataclass(frozen=True)
class Estimate:
    """A number with its interval and how the interval was obtained."""

    value: float
    ci_low: float = math.nan
    ci_high: float = math.nan
    confidence: float = 0.95
    method: str = ""  # e.g. "bootstrap percentile, 25 resamples"
    n: tuple[int, ...] = ()  # sample sizes the value was computed on

    def to_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["n"] = list(self.n)
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}

    def __str__(self) -> str:
        if math.isnan(self.ci_low):
            return f"{self.value:.4g}"
        level = round(self.confidence * 100)
        return f"{self.value:.4g} [{level}% CI {self.ci_low:.4g}, {self.ci_high:.4g}]"


def percentile_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """The central `confidence` interval of bootstrap replicates (NaNs are an error)."""
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        raise EvaluationError("no bootstrap replicates to form an interval from")
    if not np.all(np.isfinite(array)):
        raise EvaluationError(
            f"{int((~np.isfinite(array)).sum())} bootstrap replicates are not finite"
        )
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(array, [tail, 100.0 - tail])
    return float(low), float(high)


def bootstrap(
    metric: Callable[..., float],
    *samples: np.ndarray,
    iterations: int = 25,
    confidence: float = 0.95,
    seed: int = 0,
    paired: bool = False,
    interval: IntervalKind = IntervalKind.PERCENTILE,
) -> Estimate:
    """`metric(*samples)` with a bootstrap percentile interval.

    Args:
        metric: function of the sample arrays returning a float.
        samples: arrays whose first axis indexes independent samples.
        iterations: bootstrap resamples (the paper uses 25).
        paired: resample the same rows of every array (they must be equally long), for
            metrics of matched pairs (e.g. generated vs its reference).
        interval: percentile, or normal (value ± z * replicate standard deviation).
    """
    if iterations < 2:
        raise EvaluationError(f"bootstrap needs at least 2 iterations, got {iterations}")
    if not 0.0 < confidence < 1.0:
        raise EvaluationError(f"confidence must lie in (0, 1), got {confidence}")
    sizes = tuple(int(s.shape[0]) for s in samples)
    if paired and len(set(sizes)) > 1:
        raise EvaluationError(f"paired bootstrap needs equally many rows, got {sizes}")
    value = float(metric(*samples))
    rng = np.random.default_rng(seed)
    replicates = []
    for _ in range(iterations):
        if paired:
            rows = rng.integers(0, sizes[0], size=sizes[0])
            resampled = [s[rows] for s in samples]
        else:
            resampled = [s[rng.integers(0, n, size=n)] for s, n in zip(samples, sizes)]
        replicates.append(float(metric(*resampled)))
    interval = IntervalKind(interval)
    if interval is IntervalKind.PERCENTILE:
        low, high = percentile_interval(replicates, confidence)
        name = "bootstrap percentile"
    else:
        percentile_interval(replicates, confidence)  # the same finiteness checks
        half = float(norm.ppf(0.5 + confidence / 2.0)) * float(np.std(replicates, ddof=1))
        low, high = value - half, value + half
        name = "bootstrap normal (value ± z·sd of replicates)"
    return Estimate(
        value=value,
        ci_low=low,
        ci_high=high,
        confidence=confidence,
        method=f"{name}, {iterations} resamples{' (paired)' if paired else ''}",
        n=sizes,
    )


def mean_and_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        raise EvaluationError("mean of an empty list")
    std = float(array.std(ddof=1)) if array.size > 1 else 0.0
    return float(array.mean()), std
