"""10x feature-barcode matrices (HDF5 or Matrix Market folder) -> spots x genes counts.

Both forms store genes x barcodes; we return barcodes x genes. Only features of type
"Gene Expression" are kept (antibody capture etc. are dropped). Gene symbols that occur
more than once (distinct Ensembl ids sharing a symbol) are summed into one column, so the
columns are unique symbols as pathway scoring expects.
"""

from __future__ import annotations

import gzip
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from mupad.omics.spatial.errors import MissingSpatialFileError, SpatialDataError

logger = logging.getLogger(__name__)

GENE_EXPRESSION = "Gene Expression"


@dataclass(frozen=True)
class FeatureMatrix:
    """Counts straight from the file, before symbols are merged."""

    counts: sp.csr_matrix  # (barcodes, features) integer counts
    barcodes: tuple[str, ...]
    feature_ids: tuple[str, ...]
    feature_names: tuple[str, ...]
    feature_types: tuple[str, ...]
    path: Path


def _first_existing(folder: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    return None


def _read_lines(path: Path) -> list[list[str]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as handle:  # type: ignore[operator]
        return [line.rstrip("\n").split("\t") for line in handle if line.strip()]


def read_mtx_folder(folder: str | Path) -> FeatureMatrix:
    """`matrix.mtx(.gz)` + `features.tsv(.gz)` (or v2 `genes.tsv`) + `barcodes.tsv(.gz)`."""
    import scipy.io

    folder = Path(folder)
    matrix_path = _first_existing(folder, ("matrix.mtx.gz", "matrix.mtx"))
    features_path = _first_existing(
        folder, ("features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv")
    )
    barcodes_path = _first_existing(folder, ("barcodes.tsv.gz", "barcodes.tsv"))
    missing = [
        name
        for name, path in (
            ("matrix.mtx(.gz)", matrix_path),
            ("features.tsv(.gz)", features_path),
            ("barcodes.tsv(.gz)", barcodes_path),
        )
        if path is None
    ]
    if missing:
        raise MissingSpatialFileError(
            f"{folder} lacks {', '.join(missing)}; a Space Ranger matrix folder holds "
            "matrix.mtx.gz, features.tsv.gz and barcodes.tsv.gz"
        )
    assert matrix_path and features_path and barcodes_path
    try:
        matrix = scipy.io.mmread(matrix_path)
    except (ValueError, OSError) as err:
        raise SpatialDataError(f"cannot read the Matrix Market file {matrix_path}: {err}") from err
    features = _read_lines(features_path)
    barcodes = [row[0] for row in _read_lines(barcodes_path)]
    n_features, n_barcodes = matrix.shape
    if len(features) != n_features or len(barcodes) != n_barcodes:
        raise SpatialDataError(
            f"{matrix_path.name} is {n_features} features x {n_barcodes} barcodes but "
            f"{features_path.name} lists {len(features)} and {barcodes_path.name} "
            f"{len(barcodes)}; the three files must come from the same Space Ranger run"
        )
    ids = tuple(row[0] for row in features)
    names = tuple(row[1] if len(row) > 1 else row[0] for row in features)
    types = tuple(row[2] if len(row) > 2 else GENE_EXPRESSION for row in features)
    counts = sp.csr_matrix(sp.coo_matrix(matrix).T)  # (barcodes, features)
    return FeatureMatrix(counts, tuple(barcodes), ids, names, types, matrix_path)


def _decode(values: np.ndarray) -> tuple[str, ...]:
    return tuple(v.decode() if isinstance(v, bytes) else str(v) for v in values)


def read_10x_h5(path: str | Path) -> FeatureMatrix:
    """A 10x HDF5 matrix: Cell Ranger/Space Ranger >= 3 (`/matrix`) or v2 (`/<genome>`)."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise MissingSpatialFileError(f"matrix file {path} does not exist")
    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        raise SpatialDataError(f"{path} is not a readable HDF5 file: {err}") from err
    with handle:
        if "matrix" in handle:
            group = handle["matrix"]
            feats = group.get("features")
            if feats is None:
                raise SpatialDataError(f"{path}: /matrix has no 'features' group (not a 10x h5)")
            ids = _decode(feats["id"][:])
            names = _decode(feats["name"][:])
            types = (
                _decode(feats["feature_type"][:])
                if "feature_type" in feats
                else (GENE_EXPRESSION,) * len(ids)
            )
        else:
            genomes = [k for k in handle if isinstance(handle[k], h5py.Group)]
            if len(genomes) != 1 or "genes" not in handle[genomes[0]]:
                raise SpatialDataError(
                    f"{path} is not a 10x feature-barcode matrix (expected a /matrix group, or "
                    f"one genome group with 'genes'; found {list(handle)})"
                )
            group = handle[genomes[0]]
            ids = _decode(group["genes"][:])
            names = _decode(group["gene_names"][:])
            types = (GENE_EXPRESSION,) * len(ids)
        needed = [k for k in ("data", "indices", "indptr", "shape", "barcodes") if k not in group]
        if needed:
            raise SpatialDataError(f"{path}: matrix group lacks {needed}; the file is incomplete")
        n_features, n_barcodes = (int(v) for v in group["shape"][:])
        matrix = sp.csc_matrix(
            (group["data"][:], group["indices"][:], group["indptr"][:]),
            shape=(n_features, n_barcodes),
        )
        barcodes = _decode(group["barcodes"][:])
    if len(ids) != n_features or len(barcodes) != n_barcodes:
        raise SpatialDataError(
            f"{path}: shape {n_features}x{n_barcodes} disagrees with {len(ids)} features and "
            f"{len(barcodes)} barcodes"
        )
    return FeatureMatrix(sp.csr_matrix(matrix.T), barcodes, ids, names, types, path)


def merge_duplicate_symbols(
    counts: sp.spmatrix | np.ndarray, symbols: list[str] | tuple[str, ...] | pd.Index
) -> tuple[sp.csr_matrix, pd.Index, int]:
    """Sum the columns of `counts` (spots x features) that share a symbol.

    Returns the (spots, unique symbols) CSR matrix, the unique symbols in first-seen order,
    and how many columns were merged away.
    """
    codes, unique = pd.factorize(pd.Index([str(s) for s in symbols]))
    matrix = sp.csr_matrix(counts)
    merged = len(codes) - len(unique)
    if merged:
        # (features, unique symbols) indicator; counts @ it sums columns sharing a symbol
        indicator = sp.csr_matrix(
            (np.ones(len(codes), dtype=matrix.dtype), (np.arange(len(codes)), codes)),
            shape=(len(codes), len(unique)),
        )
        matrix = sp.csr_matrix(matrix @ indicator)
    return matrix, pd.Index(unique, name="gene"), merged


def gene_expression_counts(matrix: FeatureMatrix) -> tuple[sp.csr_matrix, pd.Index, dict[str, int]]:
    """Keep "Gene Expression" features, merge duplicate symbols -> (counts, genes, statistics)."""
    keep = np.array([t == GENE_EXPRESSION for t in matrix.feature_types])
    if not keep.any():
        raise SpatialDataError(
            f"{matrix.path} has no '{GENE_EXPRESSION}' features (types: "
            f"{sorted(set(matrix.feature_types))})"
        )
    names = [n for n, k in zip(matrix.feature_names, keep) if k]
    counts, genes, merged = merge_duplicate_symbols(matrix.counts[:, np.flatnonzero(keep)], names)
    stats = {
        "features_in_file": len(matrix.feature_ids),
        "non_gene_expression_features_dropped": int((~keep).sum()),
        "duplicate_symbols_merged": merged,
        "genes": len(genes),
    }
    if merged:
        logger.info("%s: summed %d features that share a gene symbol", matrix.path.name, merged)
    return counts, genes, stats
