"""Counts -> log1p(TPM) (with gene lengths) or log1p(CPM) (without, with a warning).

TPM_g = 1e6 * (c_g / L_g) / sum_h (c_h / L_h) with L in kilobases; CPM_g = 1e6 * c_g / sum_h c_h.
Both are computed over the genes of the matrix as given (before any gene filtering), then
log1p is applied: x -> ln(1 + x). Genes without a length are dropped before TPM.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from mupad.omics.errors import ExpressionError, GeneIdError
from mupad.omics.expression import check_values
from mupad.omics.gtf import gene_lengths_from_gtf, is_gtf
from mupad.omics.ids import GeneIdKind, canonical_gene_ids, detect_gene_id_kind

logger = logging.getLogger(__name__)

SCALE = 1e6  # per million


def _totals(values: np.ndarray, index: pd.Index, what: str) -> np.ndarray:
    totals = values.sum(axis=1, keepdims=True)  # (S, 1)
    empty = np.flatnonzero(totals[:, 0] <= 0)
    if empty.size:
        names = [str(index[i]) for i in empty[:5]]
        raise ExpressionError(
            f"{what}: {empty.size} sample(s) have no counts at all (e.g. {names}); drop them "
            "before normalising"
        )
    return totals


def counts_to_cpm(counts: pd.DataFrame) -> pd.DataFrame:
    """Counts per million (samples x genes)."""
    check_values(counts, what="counts")
    values = counts.to_numpy(dtype=np.float64)  # (S, G)
    return pd.DataFrame(
        values / _totals(values, counts.index, "counts") * SCALE,
        index=counts.index, columns=counts.columns,
    )  # fmt: skip


def counts_to_tpm(counts: pd.DataFrame, gene_lengths: pd.Series) -> pd.DataFrame:
    """Transcripts per million (samples x genes) from counts and gene lengths in bases.

    Genes without a (positive) length are dropped, with a warning giving their number.
    """
    check_values(counts, what="counts")
    lengths = _clean_lengths(gene_lengths)
    matched = counts.columns.isin(lengths.index)
    if not matched.any():
        raise GeneIdError(
            f"none of the {counts.shape[1]} genes has a length: expression genes look like "
            f"{list(counts.columns[:3])}, gene-length ids like {list(lengths.index[:3])}; give "
            "lengths keyed by the same id kind (symbols or Ensembl ids)"
        )
    if not matched.all():
        logger.warning(
            "TPM: %d of %d genes have no gene length and were dropped",
            int((~matched).sum()), counts.shape[1],
        )  # fmt: skip
    kept = counts.loc[:, matched]
    kilobases = lengths.reindex(kept.columns).to_numpy(dtype=np.float64) / 1e3  # (G,)
    rate = kept.to_numpy(dtype=np.float64) / kilobases[None, :]  # (S, G) reads per kb
    return pd.DataFrame(
        rate / _totals(rate, kept.index, "counts") * SCALE, index=kept.index, columns=kept.columns
    )


def _clean_lengths(gene_lengths: pd.Series) -> pd.Series:
    lengths = pd.Series(
        pd.to_numeric(gene_lengths, errors="coerce").to_numpy(dtype=np.float64),
        index=canonical_gene_ids(gene_lengths.index),
    )
    bad = ~np.isfinite(lengths.to_numpy()) | (lengths.to_numpy() <= 0)
    if bad.any():
        logger.warning("gene lengths: ignoring %d non-positive or missing lengths", int(bad.sum()))
        lengths = lengths[~bad]
    if lengths.index.has_duplicates:
        repeated = lengths.index[lengths.index.duplicated()].unique()[:5].tolist()
        raise ExpressionError(
            f"gene lengths: ids repeat (e.g. {repeated}); give one length per gene"
        )
    if lengths.empty:
        raise ExpressionError("gene lengths: no usable (positive) length")
    return lengths


def scale_counts(counts: pd.DataFrame, gene_lengths: pd.Series | None = None) -> pd.DataFrame:
    """Counts (samples x genes) -> TPM with gene lengths, else CPM (with a logged warning)."""
    if gene_lengths is not None:
        return counts_to_tpm(counts, gene_lengths)
    logger.warning(
        "no gene lengths given: normalising to CPM instead of TPM; pass a gene-length table "
        "or a GTF for TPM"
    )
    return counts_to_cpm(counts)


def normalise_counts(counts: pd.DataFrame, gene_lengths: pd.Series | None = None) -> pd.DataFrame:
    """Counts (samples x genes) -> log1p(TPM) with gene lengths, else log1p(CPM) (warned)."""
    return np.log1p(scale_counts(counts, gene_lengths))


def load_gene_lengths(path: str | Path, id_kind: GeneIdKind | None = None) -> pd.Series:
    """Gene lengths in bases from a GTF (union of exons) or a two-column table (id, length).

    Tables (.csv comma-, anything else tab-separated) have a header row; the first column is
    the gene id and the second the length. For a GTF, `id_kind` picks the key: Ensembl gene
    ids (default) or symbols (gene_name).
    """
    path = Path(path)
    if not path.is_file():
        raise ExpressionError(f"gene-length file {path} does not exist")
    if is_gtf(path):
        return gene_lengths_from_gtf(path, id_kind or GeneIdKind.ENSEMBL)
    sep = "," if path.name.lower().removesuffix(".gz").endswith(".csv") else "\t"
    table = pd.read_csv(path, sep=sep)
    if table.shape[1] < 2:
        raise ExpressionError(
            f"{path.name}: a gene-length table needs two columns (gene id, length in bases), "
            f"found {table.shape[1]}; check the separator ({sep!r} for this file type)"
        )
    lengths = pd.Series(table.iloc[:, 1].to_numpy(), index=table.iloc[:, 0].astype(str))
    if id_kind is not None and detect_gene_id_kind(lengths.index, what=path.name) is not id_kind:
        raise GeneIdError(
            f"{path.name} holds {detect_gene_id_kind(lengths.index).value} ids but "
            f"{id_kind.value} ids were needed; use a table keyed by {id_kind.value} ids"
        )
    return _clean_lengths(lengths)
