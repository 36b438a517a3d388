"""Metrics for generated histology: FID/KID with intervals, similarity, mIF correlation,
cell-type fidelity, biomarker AUC, few-shot and retrieval benchmarks (`mupad evaluate`)."""

from mupad.evaluation.fid import (
    SmallSamplePolicy,
    fid_with_ci,
    frechet_distance,
    frechet_distance_from_stats,
    kernel_inception_distance,
    kid_with_ci,
)
from mupad.evaluation.stats import Estimate, EvaluationError, IntervalKind, bootstrap

__all__ = [
    "Estimate",
    "EvaluationError",
    "IntervalKind",
    "SmallSamplePolicy",
    "bootstrap",
    "fid_with_ci",
    "frechet_distance",
    "frechet_distance_from_stats",
    "kernel_inception_distance",
    "kid_with_ci",
]
