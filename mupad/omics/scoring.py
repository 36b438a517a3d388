"""Per-sample pathway scores: single-sample GSEA and a mean z-score.

ssGSEA (Barbie et al., Nature 2009; the variant of GSVA's `ssgsea` and gseapy's `ssgsea`
with its defaults sample_norm_method="rank", weight 0.25):
  for one sample, genes j = 1..N get average ranks r_j of their expression (1 = lowest); the
  genes are walked from the highest rank down. For a gene set S with n members among the N
  genes, the running sum after position i is
      P_hit(i) - P_miss(i),
      P_hit(i)  = sum of w_j over members up to i / sum of w_j over all members, w_j = r_j^0.25
      P_miss(i) = (non-members up to i) / (N - n),
  and the raw enrichment score ES is the SUM of the running sum over all N positions (not its
  maximum deviation, as in GSEA). Summing first over positions gives the closed form used here:
      ES = sum_S(w_j r_j) / sum_S(w_j) - (N(N+1)/2 - sum_S(r_j)) / (N - n),
  so scores cost two sparse products instead of N-step walks. Tied values share their average
  rank, which makes ES the mean over every order of the tied genes (walk implementations,
  including gseapy's, instead follow whatever order their sort leaves ties in); without ties
  the two coincide. Scaling the ranks (gseapy uses 10000 r / N) cancels in the weights.

  `SsgseaNormalisation` picks the output scale: RAW is ES (gseapy's "ES"); UNIVERSE is ES / N,
  in [-1, 1] and independent of the other samples (the default, so a sample's score does not
  depend on its batch); RANGE is ES / (max ES - min ES) over the whole output matrix, the
  `ssgsea.norm` of GSVA and gseapy's "NES" (depends on every sample and set scored together).

Mean z-score (after Lee et al., PLoS Comput Biol 2008): every gene is standardised across
the samples (mean 0, sample standard deviation 1; constant genes give 0), and a set's score
is the mean z of its members. It needs at least two samples and depends on the cohort.

Gene sets keep only members present in the expression; sets with fewer than `min_size` (or
more than `max_size`) present members are left out, with a warning.
"""

from __future__ import annotations

import dataclasses
import enum
import logging

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from mupad.config import parse_enum
from mupad.omics.errors import ExpressionError, GeneSetError
from mupad.omics.expression import check_values
from mupad.omics.genesets import GeneSets
from mupad.omics.ids import canonical_gene_ids, detect_gene_id_kind

logger = logging.getLogger(__name__)

SSGSEA_WEIGHT = 0.25  # exponent alpha of the rank weights (Barbie et al. 2009)
DEFAULT_MIN_SIZE = 5
# Work on blocks of samples so that block x genes stays around this many float64 values.
_BLOCK_VALUES = 4_000_000


class ScoringMethod(str, enum.Enum):
    SSGSEA = "ssgsea"  # single-sample GSEA (rank based, per sample)
    ZSCORE = "zscore"  # mean of per-gene z-scores across samples (cohort based)


class SsgseaNormalisation(str, enum.Enum):
    RAW = "raw"  # ES as defined above (gseapy "ES")
    UNIVERSE = "universe"  # ES / N, per sample, in [-1, 1]
    RANGE = "range"  # ES / (max - min) over the whole output (GSVA ssgsea.norm, gseapy "NES")


@dataclasses.dataclass(frozen=True)
class GeneSetMatch:
    """Gene sets restricted to the genes of an expression matrix.

    `members` concatenates, set after set, the column indices of each set's present genes;
    `offsets[k]` is where set k starts and `sizes[k]` how many it has.
    """

    names: tuple[str, ...]
    members: np.ndarray  # (nnz,) int64 column indices into the expression
    offsets: np.ndarray  # (K,) int64
    sizes: np.ndarray  # (K,) int64
    num_genes: int  # N, genes in the expression

    def sums(self, values: np.ndarray) -> np.ndarray:
        """Per-set sums of `values` (B, N) over each set's members -> (B, K)."""
        return np.add.reduceat(values[:, self.members], self.offsets, axis=1)


def match_gene_sets(
    genes: pd.Index | list[str],
    gene_sets: GeneSets,
    *,
    min_size: int = DEFAULT_MIN_SIZE,
    max_size: int | None = None,
) -> GeneSetMatch:
    """Restrict `gene_sets` to `genes` (canonical ids) and drop sets outside [min, max] size.

    Raises GeneSetError when no set keeps enough genes, saying how many genes matched.
    """
    if min_size < 1:
        raise GeneSetError(f"min_size must be >= 1, got {min_size}")
    if max_size is not None and max_size < min_size:
        raise GeneSetError(f"max_size ({max_size}) must be >= min_size ({min_size})")
    column = {g: i for i, g in enumerate(genes)}
    names, members, sizes, skipped = [], [], [], []
    for name, set_genes in gene_sets.items():
        present = [column[g] for g in set_genes if g in column]
        too_big = max_size is not None and len(present) > max_size
        if len(present) < min_size or too_big:
            skipped.append(name)
            continue
        names.append(name)
        members.extend(present)
        sizes.append(len(present))
    if not names:
        raise GeneSetError(_no_overlap_message(list(genes), gene_sets, min_size))
    if skipped:
        too_few = "none" if min_size == 1 else f"fewer than {min_size}"
        too_many = "" if max_size is None else f" (or more than {max_size})"
        logger.warning(
            "%d of %d gene sets left out: %s%s of their genes are in the expression (e.g. %s)",
            len(skipped), len(gene_sets), too_few, too_many, skipped[:3],
        )  # fmt: skip
    sizes_array = np.asarray(sizes, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes_array)[:-1]]).astype(np.int64)
    return GeneSetMatch(
        names=tuple(names),
        members=np.asarray(members, dtype=np.int64),
        offsets=offsets,
        sizes=sizes_array,
        num_genes=len(column),
    )


def _no_overlap_message(genes: list[str], gene_sets: GeneSets, min_size: int) -> str:
    in_any = sum(g in gene_sets.genes for g in genes)
    gene_set = set(genes)
    overlaps = {name: sum(g in gene_set for g in members) for name, members in gene_sets.items()}
    best = max(overlaps, key=overlaps.__getitem__)
    message = (
        f"no gene set has at least {min_size} of its genes in the expression: {in_any} of the "
        f"{len(genes)} expression genes appear in any of the {len(gene_sets)} sets (largest "
        f"overlap: set {best!r}, {overlaps[best]} of its {len(gene_sets[best])} genes)."
    )
    if genes:
        expression_kind = detect_gene_id_kind(genes, what="expression genes")
        set_kind = gene_sets.id_kind
        if expression_kind is not set_kind:
            return message + (
                f" The expression uses {expression_kind.value} ids but the gene sets use "
                f"{set_kind.value} ids: map the expression ids with a mapping table (e.g. "
                "a GTF, --gene-map) or use gene sets of the same id kind."
            )
    return message + " Check the species and gene ids, or lower min_size."


# --------------------------------------------------------------------------------------
# Ranks and the two scores
# --------------------------------------------------------------------------------------


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks within each row (B, N), 1 = smallest, ties sharing their average rank."""
    batch, n = values.shape
    order = np.argsort(values, axis=1, kind="stable")  # (B, N)
    ordered = np.take_along_axis(values, order, axis=1)
    starts = np.ones((batch, n), dtype=bool)  # first element of each run of equal values
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    flat_starts = starts.ravel()
    run_of = np.cumsum(flat_starts) - 1  # (B*N,) run index of every sorted element
    run_begin = np.flatnonzero(flat_starts)  # (R,) flat position where each run begins
    run_length = np.diff(np.append(run_begin, flat_starts.size))  # (R,)
    run_rank = run_begin % n + (run_length + 1) / 2.0  # average 1-based rank of each run
    rows = np.arange(batch)[:, None] * n
    ranks = np.empty(batch * n, dtype=np.float64)
    ranks[(rows + order).ravel()] = run_rank[run_of]
    return ranks.reshape(batch, n)


def _ssgsea_block(values: np.ndarray, match: GeneSetMatch, weight: float) -> np.ndarray:
    """Raw ES of a block of samples (B, N) -> (B, K)."""
    n = match.num_genes
    ranks = average_ranks(values)  # (B, N)
    weights = ranks**weight if weight else np.ones_like(ranks)
    sum_w = match.sums(weights)  # (B, K)
    sum_wr = match.sums(weights * ranks)
    sum_r = match.sums(ranks)
    hits = sum_wr / sum_w
    misses = (n * (n + 1) / 2.0 - sum_r) / (n - match.sizes)[None, :]
    return hits - misses


def _blocks(num_samples: int, num_genes: int) -> list[slice]:
    size = max(1, _BLOCK_VALUES // max(num_genes, 1))
    return [slice(i, min(i + size, num_samples)) for i in range(0, num_samples, size)]


def score_pathways(
    expression: pd.DataFrame,
    gene_sets: GeneSets,
    method: ScoringMethod | str = ScoringMethod.SSGSEA,
    *,
    min_size: int = DEFAULT_MIN_SIZE,
    max_size: int | None = None,
    normalisation: SsgseaNormalisation | str = SsgseaNormalisation.UNIVERSE,
    weight: float = SSGSEA_WEIGHT,
    progress: bool = False,
) -> pd.DataFrame:
    """Score every gene set for every sample.

    Args:
        expression: samples x genes (e.g. log1p TPM); any finite values (negative allowed).
            Gene ids are matched in canonical form (upper case, no Ensembl version).
        gene_sets: the collection to score; output columns follow its order.
        method: SSGSEA or ZSCORE (see the module docstring for the exact definitions).
        min_size, max_size: keep sets with this many genes present in the expression.
        normalisation: ssGSEA output scale (RAW, UNIVERSE = ES / N, RANGE = GSVA/gseapy NES).
        weight: ssGSEA rank-weight exponent alpha (0.25; 0 gives the unweighted walk).
        progress: show a progress bar over blocks of samples.

    Returns a float64 DataFrame: one row per sample (the expression's index), one column per
    kept gene set.
    """
    method = parse_enum(ScoringMethod, method)
    normalisation = parse_enum(SsgseaNormalisation, normalisation)
    if expression.shape[0] == 0 or expression.shape[1] == 0:
        raise ExpressionError(f"the expression matrix is empty (shape {expression.shape})")
    if weight < 0:
        raise GeneSetError(f"weight must be >= 0, got {weight}")
    genes = pd.Index(canonical_gene_ids(expression.columns))
    if genes.has_duplicates:
        repeated = genes[genes.duplicated()].unique()[:5].tolist()
        raise ExpressionError(
            f"gene ids repeat in the expression (e.g. {repeated}); aggregate or drop repeats"
        )
    values = expression.to_numpy(dtype=np.float64)  # (S, N)
    check_values(
        pd.DataFrame(values, index=expression.index, columns=genes),
        what="expression",
        allow_negative=True,
    )
    match = match_gene_sets(genes, gene_sets, min_size=min_size, max_size=max_size)
    if method is ScoringMethod.SSGSEA:
        full = match.sizes >= match.num_genes
        if full.any():
            raise GeneSetError(
                f"gene set(s) {[match.names[k] for k in np.flatnonzero(full)][:3]} contain every "
                "expression gene, so ssGSEA has no background; set max_size or score more genes"
            )
    elif values.shape[0] < 2:
        raise ExpressionError(
            "the z-score method standardises genes across samples and needs at least 2 "
            "samples; use method='ssgsea' for a single sample"
        )
    else:
        mean = values.mean(axis=0)
        std = values.std(axis=0, ddof=1)
        scale = np.where(std > 0, std, np.inf)  # constant genes -> z = 0

    scores = np.empty((values.shape[0], len(match.names)), dtype=np.float64)  # (S, K)
    blocks = _blocks(values.shape[0], match.num_genes)
    for block in tqdm(blocks, desc=f"{method.value} scores", unit="block", disable=not progress):
        if method is ScoringMethod.SSGSEA:
            scores[block] = _ssgsea_block(values[block], match, weight)
        else:
            z = (values[block] - mean) / scale  # (B, N)
            scores[block] = match.sums(z) / match.sizes[None, :]
    if method is ScoringMethod.SSGSEA:
        if normalisation is SsgseaNormalisation.UNIVERSE:
            scores /= match.num_genes
        elif normalisation is SsgseaNormalisation.RANGE:
            spread = scores.max() - scores.min()
            if spread > 0:
                scores /= spread
    out = pd.DataFrame(
        scores, index=expression.index, columns=pd.Index(match.names, name="gene_set")
    )
    out.attrs.update(
        method=method.value,
        normalisation=normalisation.value if method is ScoringMethod.SSGSEA else "",
        num_genes=match.num_genes,
    )
    return out
