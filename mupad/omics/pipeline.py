"""One call from an expression matrix to pathway scores.

    counts -> TPM (gene lengths given) or CPM (warned) -> gene ids mapped to the gene sets'
    kind if they differ -> mitochondrial + housekeeping genes dropped -> log1p -> scores

TPM/CPM are computed over every gene of the input, before filtering (as the paper orders
it: counts -> TPM -> drop genes -> scores). Repeated ids after mapping are summed on the
linear scale, before log1p.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from mupad.omics.errors import GeneIdError
from mupad.omics.expression import (
    Orientation,
    as_samples_by_genes,
    load_gene_mapping,
    map_gene_ids,
    orient_mapping,
    read_expression,
)
from mupad.omics.filters import drop_uninformative_genes
from mupad.omics.genesets import GeneSets, default_gene_sets, load_gmt
from mupad.omics.gtf import is_gtf
from mupad.omics.ids import GeneIdKind, detect_gene_id_kind
from mupad.omics.normalize import load_gene_lengths, scale_counts
from mupad.omics.scoring import (
    DEFAULT_MIN_SIZE,
    ScoringMethod,
    SsgseaNormalisation,
    score_pathways,
)

logger = logging.getLogger(__name__)

GeneMapSource = str | Path | pd.DataFrame | Mapping[str, str]


def resolve_gene_sets(gene_sets: GeneSets | str | Path | None) -> GeneSets:
    """GeneSets as given, loaded from a GMT path, or the bundled default for None."""
    if gene_sets is None:
        return default_gene_sets()
    if isinstance(gene_sets, GeneSets):
        return gene_sets
    return load_gmt(gene_sets)


def expression_to_scores(
    source: str | Path | pd.DataFrame,
    gene_sets: GeneSets | str | Path | None = None,
    gene_lengths: pd.Series | str | Path | None = None,
    method: ScoringMethod | str = ScoringMethod.SSGSEA,
    *,
    normalise: bool = True,
    gene_map: GeneMapSource | None = None,
    orientation: Orientation | str = Orientation.AUTO,
    mitochondrial: bool = True,
    housekeeping: bool | Iterable[str] = True,
    min_size: int = DEFAULT_MIN_SIZE,
    max_size: int | None = None,
    normalisation: SsgseaNormalisation | str = SsgseaNormalisation.UNIVERSE,
    progress: bool = False,
) -> pd.DataFrame:
    """Expression (file or DataFrame) -> pathway scores (samples x gene sets).

    Args:
        source: an expression file (see `read_expression`) or a DataFrame in either
            orientation; values are raw counts (or already normalised, see `normalise`).
        gene_sets: GeneSets, a GMT path, or None for the bundled WikiPathways collection.
        gene_lengths: a Series (gene -> bases), a GTF or a two-column table; enables TPM.
        method: SSGSEA or ZSCORE.
        normalise: True for counts (-> log1p TPM/CPM); False when the values are already
            normalised and log-scaled (e.g. log TPM), which are then scored as they are.
        gene_map: mapping between symbols and Ensembl ids (table, GTF, dict), needed when
            the expression and the gene sets use different id kinds. A GTF given as
            `gene_lengths` serves as the mapping when none is given.
        orientation: of a table; AUTO detects it.
        mitochondrial, housekeeping: gene filters (see `drop_uninformative_genes`).
        min_size, max_size, normalisation, progress: see `score_pathways`.
    """
    sets = resolve_gene_sets(gene_sets)
    if isinstance(source, pd.DataFrame):
        expression = as_samples_by_genes(source, orientation)
    else:
        expression = read_expression(source, orientation=orientation)
    expression_kind = detect_gene_id_kind(expression.columns, what="expression genes")

    if normalise:
        expression = scale_counts(expression, _resolve_lengths(gene_lengths, expression_kind))
    elif gene_lengths is not None:
        raise GeneIdError("gene_lengths are only used with normalise=True; drop one of them")

    set_kind = sets.id_kind
    if expression_kind is not set_kind:
        mapping = _resolve_mapping(gene_map, gene_lengths, expression_kind, set_kind)
        expression = map_gene_ids(expression, mapping, sum_repeats=normalise)
    expression = drop_uninformative_genes(
        expression, mitochondrial=mitochondrial, housekeeping=housekeeping
    )
    if normalise:
        expression = np.log1p(expression)
    return score_pathways(
        expression, sets, method,
        min_size=min_size, max_size=max_size, normalisation=normalisation, progress=progress,
    )  # fmt: skip


def _resolve_lengths(
    gene_lengths: pd.Series | str | Path | None, expression_kind: GeneIdKind
) -> pd.Series | None:
    if gene_lengths is None or isinstance(gene_lengths, pd.Series):
        return gene_lengths
    return load_gene_lengths(gene_lengths, id_kind=expression_kind)


def _resolve_mapping(
    gene_map: GeneMapSource | None,
    gene_lengths: object,
    expression_kind: GeneIdKind,
    set_kind: GeneIdKind,
) -> dict[str, str]:
    if gene_map is None and isinstance(gene_lengths, (str, Path)) and is_gtf(gene_lengths):
        gene_map = gene_lengths  # the GTF's gene_id/gene_name pairs
    if gene_map is None:
        raise GeneIdError(
            f"the expression uses {expression_kind.value} ids but the gene sets use "
            f"{set_kind.value} ids; pass a mapping table (two columns: Ensembl id, symbol; "
            "or a GTF) as gene_map / --gene-map, or gene sets with "
            f"{expression_kind.value} ids"
        )
    return orient_mapping(load_gene_mapping(gene_map), expression_kind)
