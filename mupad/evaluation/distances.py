"""FID and KID of two feature sets, and the two reference points that make them readable —
shared by the evaluation commands (`mupad evaluate images`, `mupad evaluate generator`).

`settings` carries the command's choices: bootstrap (resamples), seed, small_sample (policy),
kid_subsets, kid_subset_size, blur_sigma (px), cache_dir, progress.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from mupad.evaluation.features import FeatureExtractor, cached_features
from mupad.evaluation.fid import blurred_images, fid_with_ci, kid_with_ci, uniform_noise_images
from mupad.evaluation.images import ImageSet
from mupad.evaluation.stats import Estimate


def fid_and_kid(a: np.ndarray, b: np.ndarray, settings: Mapping[str, Any]) -> dict[str, Estimate]:
    """{"fid": ..., "kid": ...} of feature sets a (N_a, D) and b (N_b, D), with intervals."""
    common = {"iterations": settings["bootstrap"], "seed": settings["seed"]}
    return {
        "fid": fid_with_ci(a, b, small_sample=settings["small_sample"], **common),
        "kid": kid_with_ci(
            a, b, num_subsets=settings["kid_subsets"], subset_size=settings["kid_subset_size"],
            **common,
        ),
    }  # fmt: skip


def reference_points(
    real: ImageSet,
    real_features: np.ndarray,
    extractor: FeatureExtractor,
    settings: Mapping[str, Any],
) -> dict[str, Estimate]:
    """FID/KID of the real set against as many uniform-noise images (near the worst score)
    and against itself Gaussian-blurred by `blur_sigma` px (what losing fine detail costs):
    keys fid_real_vs_noise, kid_real_vs_noise, fid_real_vs_blurred, kid_real_vs_blurred."""
    height, width = real.images.shape[2:]
    anchors = {
        "noise": uniform_noise_images(len(real), height, width, seed=settings["seed"]),
        "blurred": blurred_images(real.images, settings["blur_sigma"]),
    }
    metrics: dict[str, Estimate] = {}
    for label, images in anchors.items():
        anchor = ImageSet(images=images, paths=(), labels=None, class_names=())
        features = cached_features(
            anchor, extractor, settings["cache_dir"], progress=settings["progress"]
        )
        for metric, value in fid_and_kid(real_features, features, settings).items():
            metrics[f"{metric}_real_vs_{label}"] = value
    return metrics
