"""Fréchet distance (FID) and kernel distance (KID) between two sets of image features.

    frechet_distance(a, b)                    a (N_a, D), b (N_b, D) -> float
    frechet_distance_from_stats(mu_a, cov_a, mu_b, cov_b) -> float
    kernel_inception_distance(a, b)           unbiased MMD^2, cubic polynomial kernel
    fid_with_ci(a, b) / kid_with_ci(a, b)     -> Estimate with a bootstrap 95 % interval

FID is the squared 2-Wasserstein distance between Gaussians fitted to the two sets:

    ||mu_a - mu_b||^2 + Tr(S_a) + Tr(S_b) - 2 Tr((S_a S_b)^{1/2})

(S = unbiased sample covariance). The cross term is computed without a general matrix square
root: the eigenvalues of S_a S_b are those of the symmetric PSD matrix S_a^{1/2} S_b S_a^{1/2},
so Tr((S_a S_b)^{1/2}) = sum of the square roots of its eigenvalues (rounding negatives
clipped to 0). From features, when N_a N_b <= D^2 the same trace is taken in sample space,
exactly and more cheaply: with centred features X_a, X_b, the non-zero eigenvalues of
S_a S_b are the squared singular values of X_a X_b^T / sqrt((N_a - 1)(N_b - 1)), so the
trace is that matrix's nuclear norm. Everything runs in float64.

Small samples: with N <= D images the covariance is singular (rank <= N - 1). The formula
stays finite and exact for the fitted Gaussians, but the estimate is then dominated by an
upward bias that depends on N, so numbers at different N are not comparable and may not be
compared with the literature. `SmallSamplePolicy.REFUSE` (the default) raises an
EvaluationError that says so; `ALLOW` computes it and the Estimate's `method` carries the
note. Refusing is the default because a number that looks like an FID but mostly measures
the sample size is worse than no number; KID (unbiased at any N >= 2) or a lower-dimensional
extractor are the honest alternatives.

KID (Bińkowski et al. 2018): MMD^2 with k(x, y) = (gamma x.y + coef0)^degree, gamma = 1/D by
default, unbiased within-set terms, averaged over `num_subsets` random subsets of
m = min(subset_size, N_a, N_b) rows per set drawn without replacement. The subset size is
capped at the smaller set; when both sets have exactly m rows every subset is the whole set
and a single evaluation is made. KID can be negative (it is unbiased around 0).

Bootstrap intervals (the paper's 25 resamples) resample the rows of each set with
replacement (`mupad.evaluation.stats.bootstrap`); the point value is always the metric on the
full sets. For KID, pairs of one original image drawn twice are left out of the within-set
terms (else k(x, x) enters and inflates every resample). FID has no such fix: duplicated
rows lower the effective sample size, so at small N bootstrap FIDs sit above the point value
— read the interval as the spread of the estimator, not as centred on it.

`uniform_noise_images` and `blurred_images` make the reference sets that anchor an FID scale:
FID(real, noise) is near the worst a generator can do, FID(real, blurred real) what losing
fine detail costs.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Callable

import numpy as np
import torch
from scipy import ndimage

from mupad.evaluation.stats import Estimate, EvaluationError, IntervalKind, bootstrap

logger = logging.getLogger(__name__)

DEFAULT_BOOTSTRAP_ITERATIONS = 25  # as in the paper
# Pooled sets up to this many rows get their KID kernel computed once (a (P, P) float64
# matrix: 4096 rows -> 128 MiB); larger pools compute kernel blocks per subset.
KID_PRECOMPUTE_MAX_ROWS = 4096


class SmallSamplePolicy(str, enum.Enum):
    """What FID does when a set has no more images than feature dimensions."""

    REFUSE = "refuse"
    ALLOW = "allow"


DEFAULT_SMALL_SAMPLE_POLICY = SmallSamplePolicy.REFUSE


# --------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------


def check_features(features: np.ndarray, what: str = "features", min_rows: int = 2) -> np.ndarray:
    """(N, D) finite features with N >= min_rows -> float64 array, or EvaluationError."""
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2:
        raise EvaluationError(f"{what} must be a 2-D (N, D) array, got shape {array.shape}")
    if array.shape[0] < min_rows:
        raise EvaluationError(
            f"{what}: {array.shape[0]} image(s) given; at least {min_rows} are needed"
        )
    if array.shape[1] < 1:
        raise EvaluationError(f"{what} have no feature dimensions (shape {array.shape})")
    bad = ~np.isfinite(array).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)[:5].tolist()
        raise EvaluationError(
            f"{what} contain NaN or infinite values in {int(bad.sum())} row(s), e.g. {rows}; "
            "re-extract the features (check the images and the extractor's weights)"
        )
    return array


def _check_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = check_features(a, "features of set A")
    b = check_features(b, "features of set B")
    if a.shape[1] != b.shape[1]:
        raise EvaluationError(
            f"the two sets have different feature dimensions ({a.shape[1]} vs {b.shape[1]}); "
            "extract both with the same extractor and settings"
        )
    return a, b


def small_sample_note(num_a: int, num_b: int, dim: int) -> str | None:
    """The caveat for an FID on rank-deficient covariances, or None when both N > D."""
    if min(num_a, num_b) > dim:
        return None
    return (
        f"FID on {num_a} vs {num_b} images of {dim}-d features: covariances are rank-deficient "
        f"(N <= D = {dim}); the value is biased upward by an amount that depends on N — compare "
        "only FIDs at equal N and features, prefer KID at this size"
    )


def check_small_sample(num_a: int, num_b: int, dim: int, policy: SmallSamplePolicy) -> str | None:
    """Apply the small-sample policy to set sizes: EvaluationError under REFUSE when either
    set has <= D images, else the caveat (or None when both N > D). Cheap: callers can
    check before extracting any features."""
    try:
        policy = SmallSamplePolicy(policy)
    except ValueError:
        choices = ", ".join(p.value for p in SmallSamplePolicy)
        raise EvaluationError(f"unknown small-sample policy {policy!r}; choose {choices}") from None
    note = small_sample_note(num_a, num_b, dim)
    if note is None:
        return None
    if policy is SmallSamplePolicy.REFUSE:
        raise EvaluationError(
            f"FID needs more images than feature dimensions in each set (more than {dim}), "
            f"got {num_a} and {num_b}. Use more images, or KID (unbiased at small N), or a "
            "lower-dimensional extractor (e.g. 'colour', 15-d), or accept a biased FID with "
            "the 'allow' small-sample policy (--small-sample allow)"
        )
    return note


# --------------------------------------------------------------------------------------
# FID
# --------------------------------------------------------------------------------------


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of (N, D) features, float64."""
    array = check_features(features)
    centred = array - array.mean(axis=0)
    return array.mean(axis=0), centred.T @ centred / (array.shape[0] - 1)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (rounding negatives clipped)."""
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def _check_covariance(cov: np.ndarray, dim: int, what: str) -> np.ndarray:
    cov = np.asarray(cov, dtype=np.float64)
    if cov.shape != (dim, dim):
        raise EvaluationError(f"{what} must be ({dim}, {dim}), got {cov.shape}")
    if not np.all(np.isfinite(cov)):
        raise EvaluationError(f"{what} contains NaN or infinite values")
    scale = max(float(np.abs(cov).max()), np.finfo(np.float64).tiny)
    if not np.allclose(cov, cov.T, rtol=0.0, atol=1e-9 * scale):
        raise EvaluationError(f"{what} is not symmetric; pass a covariance matrix")
    cov = (cov + cov.T) / 2.0
    values = np.linalg.eigvalsh(cov)
    if values[0] < -1e-8 * max(abs(values[-1]), 1.0):
        raise EvaluationError(f"{what} is not positive semi-definite (eigenvalue {values[0]:.3g})")
    return cov


def _combine(mean_term: float, trace_a: float, trace_b: float, cross: float) -> float:
    value = mean_term + trace_a + trace_b - 2.0 * cross
    # A squared Wasserstein distance is >= 0; tiny negatives are float rounding (equal sets).
    return max(float(value), 0.0)


def _frechet_from_psd(
    mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray
) -> float:
    """The closed form on checked float64 statistics with symmetric PSD covariances."""
    root_a = _psd_sqrt(cov_a)  # (D, D)
    middle = root_a @ cov_b @ root_a  # symmetric PSD, same eigenvalues as cov_a @ cov_b
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2.0)
    cross = float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())
    mean_term = float(np.sum((mu_a - mu_b) ** 2))
    return _combine(mean_term, float(np.trace(cov_a)), float(np.trace(cov_b)), cross)


def frechet_distance_from_stats(
    mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray
) -> float:
    """Fréchet distance between N(mu_a, cov_a) and N(mu_b, cov_b).

    The covariances must be symmetric positive semi-definite (checked, up to rounding).
    """
    mu_a = np.asarray(mu_a, dtype=np.float64)
    mu_b = np.asarray(mu_b, dtype=np.float64)
    if mu_a.ndim != 1 or mu_a.shape != mu_b.shape:
        raise EvaluationError(f"means must be two (D,) vectors, got {mu_a.shape}, {mu_b.shape}")
    if not (np.all(np.isfinite(mu_a)) and np.all(np.isfinite(mu_b))):
        raise EvaluationError("means contain NaN or infinite values")
    dim = mu_a.shape[0]
    cov_a = _check_covariance(cov_a, dim, "cov_a")
    cov_b = _check_covariance(cov_b, dim, "cov_b")
    return _frechet_from_psd(mu_a, cov_a, mu_b, cov_b)


def _frechet_sample_space(a: np.ndarray, b: np.ndarray) -> float:
    """The same distance via the nuclear norm of X_a X_b^T (cost O(N_a N_b (D + min N)))."""
    centred_a = a - a.mean(axis=0)  # (N_a, D)
    centred_b = b - b.mean(axis=0)  # (N_b, D)
    scale_a, scale_b = a.shape[0] - 1, b.shape[0] - 1
    singular = np.linalg.svd(centred_a @ centred_b.T, compute_uv=False)  # (min N,)
    cross = float(singular.sum()) / np.sqrt(scale_a * scale_b)
    mean_term = float(np.sum((a.mean(axis=0) - b.mean(axis=0)) ** 2))
    trace_a = float(np.sum(centred_a**2)) / scale_a
    trace_b = float(np.sum(centred_b**2)) / scale_b
    return _combine(mean_term, trace_a, trace_b, cross)


def _frechet_checked(a: np.ndarray, b: np.ndarray) -> float:
    dim = a.shape[1]
    if a.shape[0] * b.shape[0] <= dim * dim:
        return _frechet_sample_space(a, b)
    # Sample covariances are PSD by construction: no eigenvalue check needed.
    return _frechet_from_psd(*feature_statistics(a), *feature_statistics(b))


def frechet_distance(
    features_a: np.ndarray,
    features_b: np.ndarray,
    *,
    small_sample: SmallSamplePolicy = DEFAULT_SMALL_SAMPLE_POLICY,
) -> float:
    """FID between two feature sets (N_a, D) and (N_b, D); symmetric, >= 0, 0 for equal sets.

    Raises EvaluationError for fewer than 2 rows, non-finite values, different D, and
    (under `SmallSamplePolicy.REFUSE`) for N <= D in either set.
    """
    a, b = _check_pair(features_a, features_b)
    note = check_small_sample(a.shape[0], b.shape[0], a.shape[1], small_sample)
    if note is not None:
        logger.warning(note)
    return _frechet_checked(a, b)


def fid_with_ci(
    features_a: np.ndarray,
    features_b: np.ndarray,
    *,
    iterations: int = DEFAULT_BOOTSTRAP_ITERATIONS,
    confidence: float = 0.95,
    seed: int = 0,
    small_sample: SmallSamplePolicy = DEFAULT_SMALL_SAMPLE_POLICY,
) -> Estimate:
    """FID with a bootstrap interval centred on the value (`IntervalKind.NORMAL`: resamples
    repeat images, which biases FID upwards, so percentile intervals drift above the value);
    under the ALLOW policy with N <= D a short caveat is appended to the Estimate's `method`
    (the full one: `small_sample_note`)."""
    a, b = _check_pair(features_a, features_b)
    note = check_small_sample(a.shape[0], b.shape[0], a.shape[1], small_sample)
    estimate = bootstrap(
        _frechet_checked,
        a,
        b,
        iterations=iterations,
        confidence=confidence,
        seed=seed,
        interval=IntervalKind.NORMAL,
    )
    if note is None:
        return estimate
    caveat = f"rank-deficient covariances (N <= D = {a.shape[1]}): biased up, compare at equal N"
    return dataclasses.replace(estimate, method=f"{estimate.method}; {caveat}")


# --------------------------------------------------------------------------------------
# KID
# --------------------------------------------------------------------------------------

# kernel(rows_i, rows_j) -> (len(rows_i), len(rows_j)) kernel values between pool rows.
KernelBlock = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class _KIDSettings:
    """KID's kernel and subsets; `gamma=None` means 1 / D."""

    num_subsets: int = 100
    subset_size: int = 1000
    degree: int = 3
    gamma: float | None = None
    coef0: float = 1.0

    def __post_init__(self) -> None:
        if self.num_subsets < 1:
            raise EvaluationError(f"KID needs num_subsets >= 1, got {self.num_subsets}")
        if self.subset_size < 2:
            raise EvaluationError(f"KID needs subset_size >= 2, got {self.subset_size}")
        if self.degree < 1:
            raise EvaluationError(f"KID kernel degree must be >= 1, got {self.degree}")
        if self.gamma is not None and not self.gamma > 0:
            raise EvaluationError(f"KID gamma must be > 0, got {self.gamma}")


def _polynomial_kernel(settings: _KIDSettings, pool: np.ndarray) -> KernelBlock:
    gamma = settings.gamma if settings.gamma is not None else 1.0 / pool.shape[1]

    def block(rows_i: np.ndarray, rows_j: np.ndarray) -> np.ndarray:
        return (gamma * pool[rows_i] @ pool[rows_j].T + settings.coef0) ** settings.degree

    return block


def _pool_kernel(settings: _KIDSettings, pool: np.ndarray) -> KernelBlock:
    """The kernel between rows of `pool`: precomputed once when the pool is small enough
    (every subset and bootstrap resample then only indexes it), else computed per block."""
    kernel = _polynomial_kernel(settings, pool)
    if len(pool) > KID_PRECOMPUTE_MAX_ROWS:
        return kernel
    everything = np.arange(len(pool))
    full = kernel(everything, everything)  # (P, P)
    return lambda rows_i, rows_j: full[np.ix_(rows_i, rows_j)]


def _within_mean(kernel: KernelBlock, rows: np.ndarray) -> float:
    """Mean kernel value over pairs of distinct original rows.

    On a plain set this is the usual off-diagonal mean. In a bootstrap resample a row drawn
    twice would otherwise be paired with itself, adding the self-similarity k(x, x) and
    biasing the resampled KID upward; such pairs are left out.
    """
    distinct = rows[:, None] != rows[None, :]  # (m, m)
    if not distinct.any():
        raise EvaluationError(
            f"KID needs at least 2 distinct images per set; a bootstrap resample of "
            f"{len(rows)} images drew a single one — use more images"
        )
    return float(kernel(rows, rows)[distinct].mean())


def _mmd2_unbiased(kernel: KernelBlock, rows_a: np.ndarray, rows_b: np.ndarray) -> float:
    cross = float(kernel(rows_a, rows_b).mean())
    return _within_mean(kernel, rows_a) + _within_mean(kernel, rows_b) - 2.0 * cross


def _kid(
    kernel: KernelBlock,
    rows_a: np.ndarray,
    rows_b: np.ndarray,
    settings: _KIDSettings,
    seed: int,
) -> float:
    """Mean unbiased MMD^2 over subsets of m = min(subset_size, N_a, N_b) rows per set."""
    m = min(settings.subset_size, len(rows_a), len(rows_b))
    if m == len(rows_a) == len(rows_b):
        return _mmd2_unbiased(kernel, rows_a, rows_b)  # every subset is the whole set
    rng = np.random.default_rng(seed)
    values = [
        _mmd2_unbiased(
            kernel, rng.choice(rows_a, m, replace=False), rng.choice(rows_b, m, replace=False)
        )
        for _ in range(settings.num_subsets)
    ]
    return float(np.mean(values))


def kernel_inception_distance(
    features_a: np.ndarray,
    features_b: np.ndarray,
    num_subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    gamma: float | None = None,
    coef0: float = 1.0,
    *,
    seed: int = 0,
) -> float:
    """KID: unbiased polynomial-kernel MMD^2 averaged over subsets (see the module doc).

    `subset_size` is capped at the smaller set; both sets need >= 2 rows.
    """
    settings = _KIDSettings(num_subsets, subset_size, degree, gamma, coef0)
    a, b = _check_pair(features_a, features_b)
    kernel = _pool_kernel(settings, np.concatenate([a, b]))
    rows_a, rows_b = np.arange(len(a)), len(a) + np.arange(len(b))
    return _kid(kernel, rows_a, rows_b, settings, seed)


def kid_with_ci(
    features_a: np.ndarray,
    features_b: np.ndarray,
    *,
    num_subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    gamma: float | None = None,
    coef0: float = 1.0,
    iterations: int = DEFAULT_BOOTSTRAP_ITERATIONS,
    confidence: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """KID with a bootstrap percentile interval over resampled rows of both sets."""
    settings = _KIDSettings(num_subsets, subset_size, degree, gamma, coef0)
    a, b = _check_pair(features_a, features_b)
    kernel = _pool_kernel(settings, np.concatenate([a, b]))  # pool (N_a + N_b, D)

    def metric(rows_a: np.ndarray, rows_b: np.ndarray) -> float:
        return _kid(kernel, rows_a, rows_b, settings, seed)

    rows_a, rows_b = np.arange(len(a)), len(a) + np.arange(len(b))
    return bootstrap(
        metric, rows_a, rows_b, iterations=iterations, confidence=confidence, seed=seed
    )


# --------------------------------------------------------------------------------------
# Reference sets
# --------------------------------------------------------------------------------------


def uniform_noise_images(num_images: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Images of independent uniform uint8 pixels (N, 3, H, W): the 'no generator' anchor."""
    if num_images < 1 or height < 1 or width < 1:
        raise EvaluationError(
            f"noise images need positive sizes, got {num_images}x{height}x{width}"
        )
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(
        0, 256, (num_images, 3, height, width), generator=generator, dtype=torch.uint8
    )


def blurred_images(images: torch.Tensor, sigma_px: float = 3.0) -> torch.Tensor:
    """Gaussian blur of uint8 images (N, 3, H, W) with std `sigma_px` pixels (reflect borders)."""
    if not sigma_px > 0:
        raise EvaluationError(f"blur sigma must be > 0 pixels, got {sigma_px}")
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise EvaluationError(f"blurred_images needs uint8 (N, 3, H, W), got {images.dtype}")
    blurred = ndimage.gaussian_filter(
        images.numpy().astype(np.float32), sigma=(0, 0, sigma_px, sigma_px), mode="reflect"
    )
    return torch.from_numpy(np.clip(np.rint(blurred), 0, 255).astype(np.uint8))


__all__ = [
    "DEFAULT_BOOTSTRAP_ITERATIONS",
    "DEFAULT_SMALL_SAMPLE_POLICY",
    "SmallSamplePolicy",
    "blurred_images",
    "check_features",
    "check_small_sample",
    "feature_statistics",
    "fid_with_ci",
    "frechet_distance",
    "frechet_distance_from_stats",
    "kernel_inception_distance",
    "kid_with_ci",
    "small_sample_note",
    "uniform_noise_images",
]
