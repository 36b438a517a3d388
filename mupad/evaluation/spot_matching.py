"""RNA/ST conditioning fidelity: is a patch generated from a spot's pathway scores closer to
that spot's real patch than to other spots' patches?

    pairs = read_spot_pairs("pairs_val.csv")          # SpotPairs: keys, real patch paths, scores
    generated = generate_spot_tiles(model, pairs, per_spot, sample_config, out, seed=0)
    distances = feature_distances(generated_features, real_features, per_spot)   # (N, N)
    result = spot_matching(distances, iterations=25, seed=0)                     # SpotMatching

Held-out spots i = 1..N each have a real patch r_i and pathway scores s_i. The model, given
s_i alone, generates `per_spot` patches g_i. D[i, j] is the distance between spot i's
generated patches (the mean over them) and spot j's real patch, in one representation:

- image features: cosine distance 1 - cos(f(g), f(r)) of an extractor's global features;
- cell-type proportions: total-variation distance between the type proportions of the nuclei
  found in spot i's generated patches (pooled) and in r_j (spots with no nucleus in either
  their real or their generated patches are left out, and counted);
- nuclei density: |log(1 + density_g) - log(1 + density_r)|, densities in nuclei per mm².

From D (`spot_matching`):

- matched = mean_i D[i, i]; other = mean_i mean_{j != i} D[i, j]; gap = other - matched, > 0
  when the condition pulls a patch towards its own spot, with a bootstrap interval over
  spots (rows i resampled; each row's mean over j stays over every other spot);
- win rate = mean_i of the fraction of j != i with D[i, i] < D[i, j] (ties count 1/2): the
  AUC of telling the own spot from another by distance. A generator that ignores the RNA has
  an expected win rate of exactly 0.5, whatever the spots look like;
- top-k retrieval: the fraction of spots whose own real patch is among the k nearest real
  patches of its generated patches (chance k / N);
- a permutation test: the matched mean against mean_i D[i, pi(i)] over random permutations
  pi; one-sided p = (1 + #{null <= observed}) / (1 + draws).

Neighbouring spots of one section look alike, so "other spots" include near-duplicates of the
own spot; that makes the test conservative, not optimistic.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mupad.applications.batch_generate import FolderLayout, generate_records, named_seed
from mupad.applications.generation_model import GenerationModel
from mupad.applications.prompts import PromptRecord
from mupad.conditioning.base import EncoderError
from mupad.conditioning.rna import ScoreStandardiser
from mupad.conditions import Modality
from mupad.config import SampleConfig
from mupad.evaluation.celltypes import CellTypeProfile
from mupad.evaluation.images import ImageSet, load_image_set
from mupad.evaluation.stats import Estimate, EvaluationError, bootstrap

IMAGE_COLUMN = "image"
RNA_PREFIX = "rna_"  # the paired-files CSV of `mupad prepare`
SCORES_NAME = "spot_scores.csv"  # the scores table generation reads, written into the output
DEFAULT_TOP_K = (1, 5)


# --------------------------------------------------------------------------------------
# Held-out spots
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SpotPairs:
    """Held-out spots: a key, the real patch file and the pathway scores of each."""

    keys: tuple[str, ...]  # the CSV's image column, as written
    images: tuple[Path, ...]  # resolved real patch files
    scores: pd.DataFrame  # (N, P), index = keys, columns = the rna_* columns in file order

    def __len__(self) -> int:
        return len(self.keys)


def read_spot_pairs(path: str | Path, max_spots: int | None = None) -> SpotPairs:
    """Read the paired-files CSV `mupad prepare` takes (an `image` column, relative to the
    CSV's folder, and `rna_*` score columns) — the held-out split, never the training one.
    `max_spots` keeps the first spots in file order."""
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"spot pairs file {path} does not exist")
    try:
        table = pd.read_csv(path, dtype={IMAGE_COLUMN: str})
    except (OSError, ValueError) as error:
        raise EvaluationError(f"cannot read spot pairs {path}: {error}") from None
    rna_columns = [c for c in table.columns if str(c).startswith(RNA_PREFIX)]
    if IMAGE_COLUMN not in table.columns or not rna_columns:
        raise EvaluationError(
            f"{path} needs an {IMAGE_COLUMN!r} column and {RNA_PREFIX}* score columns (the "
            f"paired-files CSV of `mupad prepare`); it has {list(table.columns)[:6]}"
        )
    if max_spots is not None:
        if max_spots < 2:
            raise EvaluationError(f"--max-spots must be >= 2, got {max_spots}")
        table = table.iloc[:max_spots]
    if len(table) < 2:
        raise EvaluationError(f"{path} holds {len(table)} spot(s); matching needs at least 2")
    keys = tuple(str(k) for k in table[IMAGE_COLUMN])
    if len(set(keys)) != len(keys):
        raise EvaluationError(f"{path} lists a patch twice; each spot needs its own patch")
    scores = table.set_index(IMAGE_COLUMN)[rna_columns].apply(pd.to_numeric, errors="coerce")
    if not np.isfinite(scores.to_numpy(dtype=np.float64)).any(axis=1).all():
        bad = [k for k, row in zip(keys, scores.to_numpy()) if not np.isfinite(row).any()]
        raise EvaluationError(f"{path}: spot(s) {bad[:3]} have no finite pathway score")
    images = tuple((path.parent / k).resolve() for k in keys)
    missing = [str(p) for p in images if not p.is_file()]
    if missing:
        raise EvaluationError(
            f"{len(missing)} patch file(s) of {path} do not exist (e.g. {missing[0]}); image "
            "paths are read relative to the CSV's folder"
        )
    return SpotPairs(keys=keys, images=images, scores=scores)


def nearest_expression_patches(heldout: SpotPairs, reference: SpotPairs) -> tuple[Path, ...]:
    """Per held-out spot, the real patch of the reference (training) spot whose pathway scores
    are nearest: Euclidean distance over the pathways both tables hold, standardised with the
    reference spots' `ScoreStandardiser` (a missing held-out score sits at the mean). Scored
    like a generator's patches, these say how much of a spot's look its expression alone
    gives away to a retrieval with no generative model, the yardstick for the generator."""
    shared = [c for c in heldout.scores.columns if c in reference.scores.columns]
    if not shared:
        raise EvaluationError(
            "the reference pairs share no rna_* column with the held-out pairs; both must hold "
            "scores of the same pathways"
        )
    leaked = set(heldout.images) & set(reference.images)
    if leaked:
        raise EvaluationError(
            f"{len(leaked)} held-out patch(es) (e.g. {min(leaked)}) are also reference "
            "spots; the reference must be the training spots, disjoint from the held-out ones"
        )
    try:
        standardiser = ScoreStandardiser.fit(reference.scores[shared])
    except EncoderError as error:
        raise EvaluationError(f"reference pairs: {error}") from None
    z_ref = standardiser.transform(reference.scores[shared].to_numpy(dtype=np.float64))  # (M, P)
    z_held = np.nan_to_num(
        standardiser.transform(heldout.scores[shared].to_numpy(dtype=np.float64))
    )  # (N, P)
    squared = (z_held**2).sum(1)[:, None] - 2.0 * z_held @ z_ref.T + (z_ref**2).sum(1)[None, :]
    nearest = np.argmin(squared, axis=1)  # (N,)
    return tuple(reference.images[i] for i in nearest)


def spot_seed(seed: int, key: str) -> int:
    """A stable 63-bit seed per spot (independent of which other spots are evaluated)."""
    return named_seed(seed, f"spot:{key}")


def spot_ids(count: int) -> list[str]:
    """Folder-safe ids of the spots in order (keys may hold slashes)."""
    return [f"spot{i:05d}" for i in range(count)]


def generate_spot_tiles(
    model: GenerationModel,
    pairs: SpotPairs,
    per_spot: int,
    sample_config: SampleConfig,
    out: str | Path,
    *,
    seed: int,
    overwrite: bool = False,
    progress: bool = True,
) -> ImageSet:
    """`per_spot` patches per spot, each conditioned on the spot's scores alone (RNA stream
    only), written to `out/spot<i>/<k>.png`; returned in spot order (spot 0's patches first).
    The scores table the prompts read is written to `out/spot_scores.csv`."""
    if Modality.RNA.value not in model.streams:
        have = ", ".join(sorted(model.streams)) or "none (unconditional)"
        raise EvaluationError(
            f"the model at {model.model_dir} has no RNA stream (its condition streams: {have}); "
            "spot matching needs an RNA/ST-conditioned checkpoint"
        )
    if per_spot < 1:
        raise EvaluationError(f"--per-spot must be >= 1, got {per_spot}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = out / SCORES_NAME
    pairs.scores.to_csv(table)
    records = [
        PromptRecord(
            id=spot_id, seed=spot_seed(seed, key), num_images=per_spot, rna=table, rna_row=key
        )
        for spot_id, key in zip(spot_ids(len(pairs)), pairs.keys)
    ]
    layout = FolderLayout(out)  # out/spot<i>/<k>.png + the regeneration sidecar
    generate_records(
        model, records, sample_config, layout, modalities=(Modality.RNA,),
        overwrite=overwrite, progress=progress,
    )  # fmt: skip
    files = [layout.png(r, k) for r in records for k in range(per_spot)]
    return load_image_set(files, what="generated patches")


# --------------------------------------------------------------------------------------
# Distance matrices (N generated spots x N real spots)
# --------------------------------------------------------------------------------------


def _per_spot(per_image: np.ndarray, per_spot: int) -> np.ndarray:
    """(N * per_spot, M) distances of each generated image -> (N, M) means per spot."""
    if per_spot < 1 or per_image.shape[0] % per_spot:
        raise EvaluationError(
            f"{per_image.shape[0]} generated rows do not split into spots of {per_spot}"
        )
    return per_image.reshape(-1, per_spot, per_image.shape[1]).mean(axis=1)


def feature_distances(generated: np.ndarray, real: np.ndarray, per_spot: int = 1) -> np.ndarray:
    """Cosine distances: generated (N * per_spot, D), real (N, D) -> (N, N), spot-averaged."""
    if generated.ndim != 2 or real.ndim != 2 or generated.shape[1] != real.shape[1]:
        raise EvaluationError(
            f"feature arrays must be (rows, D) of one D, got {generated.shape} and {real.shape}"
        )

    def unit(x: np.ndarray) -> np.ndarray:
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        if np.any(norms == 0):
            raise EvaluationError("a feature vector is all zeros; its cosine is undefined")
        return x / norms

    per_image = 1.0 - unit(generated) @ unit(real).T  # (N * per_spot, N)
    distances = _per_spot(per_image, per_spot)
    if distances.shape[0] != distances.shape[1]:
        raise EvaluationError(
            f"{distances.shape[0]} generated spots but {distances.shape[1]} real ones"
        )
    return distances


@dataclasses.dataclass(frozen=True)
class CellDistances:
    """Cell-type distance matrices over the spots both of whose sides hold nuclei."""

    proportions: np.ndarray  # (S, S) total-variation distance of type proportions
    density: np.ndarray  # (N, N) |log1p(density_g) - log1p(density_r)|, every spot
    kept: np.ndarray  # (S,) indices of the spots in `proportions`
    generated_nuclei: np.ndarray  # (N,) nuclei per generated patch, spot mean
    real_nuclei: np.ndarray  # (N,) nuclei per real patch


def cell_distances(
    generated: CellTypeProfile, real: CellTypeProfile, per_spot: int = 1
) -> CellDistances:
    """Distances between each spot's pooled generated nuclei and every real patch's nuclei."""
    if generated.cell_types != real.cell_types:
        raise EvaluationError("generated and real profiles use different cell types")
    count = real.num_images
    if generated.num_images != count * per_spot:
        raise EvaluationError(
            f"{generated.num_images} generated profiles for {count} spots x {per_spot}"
        )
    pooled = generated.counts.reshape(count, per_spot, -1).sum(axis=1)  # (N, T)
    area = generated.image_area_mm2.reshape(count, per_spot).sum(axis=1)  # (N,)
    gen_density = np.log1p(pooled.sum(axis=1) / area)  # (N,)
    real_density = np.log1p(real.density_per_mm2())  # (N,)
    density = np.abs(gen_density[:, None] - real_density[None, :])
    totals_g, totals_r = pooled.sum(axis=1), real.counts.sum(axis=1)
    kept = np.flatnonzero((totals_g > 0) & (totals_r > 0))
    prop_g = pooled[kept] / totals_g[kept, None]  # (S, T)
    prop_r = real.counts[kept] / totals_r[kept, None]
    proportions = 0.5 * np.abs(prop_g[:, None, :] - prop_r[None, :, :]).sum(axis=2)  # (S, S)
    return CellDistances(
        proportions=proportions,
        density=density,
        kept=kept,
        generated_nuclei=pooled.sum(axis=1) / per_spot,
        real_nuclei=totals_r.astype(np.float64),
    )


# --------------------------------------------------------------------------------------
# Matching statistics
# --------------------------------------------------------------------------------------


def _row_stats(distances: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per spot i: D[i, i], mean_{j != i} D[i, j] and the win fraction over j != i."""
    count = distances.shape[0]
    own = np.diag(distances).copy()  # (N,)
    off = ~np.eye(count, dtype=bool)
    others = distances[off].reshape(count, count - 1)  # (N, N - 1)
    wins = (own[:, None] < others).mean(axis=1) + 0.5 * (own[:, None] == others).mean(axis=1)
    return own, others.mean(axis=1), wins


@dataclasses.dataclass(frozen=True)
class SpotMatching:
    """How much closer generated patches are to their own spot than to the others."""

    num_spots: int
    matched: Estimate  # mean_i D[i, i]
    other: Estimate  # mean_i mean_{j != i} D[i, j]
    gap: Estimate  # other - matched (paired over spots)
    win_rate: Estimate  # chance 0.5
    top_k: dict[int, Estimate]  # retrieval accuracy, chance k / N
    permutation_p: float  # one-sided, matched mean vs random pairings
    permutation_draws: int

    def metrics(self, prefix: str) -> dict[str, Estimate | float | int]:
        """Flat report metrics, each name prefixed (e.g. "features_")."""
        out: dict[str, Estimate | float | int] = {
            f"{prefix}num_spots": self.num_spots,
            f"{prefix}matched_distance": self.matched,
            f"{prefix}other_spots_distance": self.other,
            f"{prefix}gap": self.gap,
            f"{prefix}win_rate": self.win_rate,
            f"{prefix}win_rate_chance": 0.5,
            f"{prefix}permutation_p": self.permutation_p,
        }
        for k, estimate in self.top_k.items():
            out[f"{prefix}top{k}_retrieval"] = estimate
            out[f"{prefix}top{k}_chance"] = min(k, self.num_spots) / self.num_spots
        return out


def spot_matching(
    distances: np.ndarray,
    *,
    top_k: Sequence[int] = DEFAULT_TOP_K,
    iterations: int = 25,
    permutation_draws: int = 1000,
    seed: int = 0,
) -> SpotMatching:
    """Matching statistics of a square distance matrix D[generated spot i, real spot j]
    (see the module docstring). Intervals: bootstrap percentile over spots."""
    distances = np.asarray(distances, dtype=np.float64)
    if distances.ndim != 2 or distances.shape[0] != distances.shape[1]:
        raise EvaluationError(f"spot distances must be square (N, N), got {distances.shape}")
    count = distances.shape[0]
    if count < 2:
        raise EvaluationError(f"spot matching needs at least 2 spots, got {count}")
    if not np.all(np.isfinite(distances)):
        raise EvaluationError("spot distances hold NaN or infinite values")
    own, other, wins = _row_stats(distances)
    # Rank of the own real patch among all real patches, nearest first (ties pessimistic).
    ranks = (distances <= own[:, None]).sum(axis=1)  # (N,) >= 1
    common = {"iterations": iterations, "seed": seed}
    mean = np.mean
    top = {
        int(k): bootstrap(mean, (ranks <= k).astype(np.float64), **common) for k in top_k if k >= 1
    }
    rng = np.random.default_rng(seed)
    rows = np.arange(count)
    null = np.array(
        [distances[rows, rng.permutation(count)].mean() for _ in range(permutation_draws)]
    )
    p_value = float((1 + np.sum(null <= own.mean())) / (1 + permutation_draws))
    return SpotMatching(
        num_spots=count,
        matched=bootstrap(mean, own, **common),
        other=bootstrap(mean, other, **common),
        gap=bootstrap(lambda a, b: float(np.mean(a - b)), other, own, paired=True, **common),
        win_rate=bootstrap(mean, wins, **common),
        top_k=top,
        permutation_p=p_value,
        permutation_draws=permutation_draws,
    )


def describe_matching(result: SpotMatching) -> dict[str, Any]:
    """Plain JSON of a SpotMatching (for the command's stdout summary)."""
    return {
        name: value.to_dict() if isinstance(value, Estimate) else value
        for name, value in result.metrics("").items()
    }


__all__ = [
    "CellDistances",
    "SpotMatching",
    "SpotPairs",
    "cell_distances",
    "describe_matching",
    "feature_distances",
    "generate_spot_tiles",
    "nearest_expression_patches",
    "read_spot_pairs",
    "spot_ids",
    "spot_matching",
    "spot_seed",
]
