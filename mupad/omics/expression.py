"""Expression matrices: read files, orient them as samples x genes, clean gene ids.

Every reader returns a float64 DataFrame with one row per sample (string index) and one
column per gene (canonical ids, see `mupad.omics.ids`). Supported files: .csv, .tsv/.tab/
.txt (optionally .gz), .parquet/.pq, and AnnData .h5ad (obs x var = samples x genes).

Orientation of text/parquet tables is detected by which axis carries gene ids: Ensembl ids,
or symbols that appear in the bundled gene sets or housekeeping list. Pass `orientation`
explicitly when neither axis looks like genes (e.g. synthetic ids).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from mupad.config import parse_enum
from mupad.omics.errors import ExpressionError, GeneIdError
from mupad.omics.ids import (
    GeneIdKind,
    canonical_gene_ids,
    detect_gene_id_kind,
    is_ensembl_id,
    is_par_y,
)

logger = logging.getLogger(__name__)

_TEXT_SEPARATORS = {".csv": ",", ".tsv": "\t", ".tab": "\t", ".txt": "\t"}
_PARQUET = (".parquet", ".pq")
_H5AD = (".h5ad",)
# An axis counts as "genes" when at least this fraction of its labels are recognised genes.
_GENE_AXIS_MIN_FRACTION = 0.2


class Orientation(str, enum.Enum):
    AUTO = "auto"  # detect from the labels
    SAMPLES_X_GENES = "samples_x_genes"  # rows are samples, columns are genes
    GENES_X_SAMPLES = "genes_x_samples"  # rows are genes, columns are samples


def _suffix(path: Path) -> str:
    name = path.name.lower().removesuffix(".gz")
    return Path(name).suffix


def read_expression(
    path: str | Path,
    *,
    orientation: Orientation | str = Orientation.AUTO,
    gene_column: str | None = None,
    layer: str | None = None,
) -> pd.DataFrame:
    """Read an expression file into a samples x genes float64 DataFrame.

    Args:
        path: .csv/.tsv/.tab/.txt (optionally gzipped), .parquet/.pq or .h5ad.
        orientation: AUTO detects which axis holds genes; or give it explicitly.
        gene_column: tables: the column holding gene ids (rows are then genes; other
            non-numeric columns, e.g. descriptions, are dropped). AnnData: a `var` column to
            use as gene ids instead of `var_names`.
        layer: AnnData only: read `adata.layers[layer]` instead of `adata.X`.

    Raises ExpressionError (unreadable file, non-numeric values, NaN, negative values,
    repeated gene or sample ids) and GeneIdError (gene axis not recognisable).
    """
    path = Path(path)
    orientation = parse_enum(Orientation, orientation)
    if not path.is_file():
        raise ExpressionError(f"expression file {path} does not exist")
    suffix = _suffix(path)
    if suffix in _H5AD:
        table = _read_h5ad(path, gene_column=gene_column, layer=layer)
        if orientation is Orientation.AUTO:
            orientation = Orientation.SAMPLES_X_GENES  # AnnData convention: obs x var
    elif layer is not None:
        raise ExpressionError(f"layer={layer!r} applies to .h5ad files only, not {path.name}")
    elif suffix in _PARQUET:
        table = _read_parquet(path)
    elif suffix in _TEXT_SEPARATORS:
        table = _read_text(path, _TEXT_SEPARATORS[suffix])
    else:
        raise ExpressionError(
            f"unsupported expression file type {path.name!r}; use .csv, .tsv, .txt, .parquet "
            "or .h5ad"
        )
    if gene_column is not None and suffix not in _H5AD:
        table = _genes_from_column(table, gene_column, path)
        if orientation is Orientation.SAMPLES_X_GENES:
            raise ExpressionError(
                "gene_column makes rows genes; do not also pass orientation=samples_x_genes"
            )
        orientation = Orientation.GENES_X_SAMPLES
    return as_samples_by_genes(table, orientation, what=str(path))


def _read_text(path: Path, sep: str) -> pd.DataFrame:
    try:
        table = pd.read_csv(path, sep=sep, index_col=0)
        header = pd.read_csv(
            path, sep=sep, header=None, nrows=1, dtype=str, keep_default_na=False
        ).iloc[0]
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ExpressionError(f"cannot read {path} as a {sep!r}-separated table: {exc}") from exc
    # pandas renames a repeated column ("GENE" -> "GENE.1"); put the file's own labels back
    # so that a repeated gene (or sample) is refused like a repeated row.
    labels = [str(v) for v in header]
    if len(labels) == len(table.columns) + 1:
        labels = labels[1:]  # the first cell names the index column
    if len(labels) == len(table.columns):
        table.columns = pd.Index(labels)
    return table


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        table = pd.read_parquet(path)
    except ImportError as exc:
        raise ExpressionError(f"reading {path.name} needs pyarrow: `pip install pyarrow`") from exc
    except (OSError, ValueError) as exc:
        raise ExpressionError(f"cannot read {path} as parquet: {exc}") from exc
    if isinstance(table.index, pd.RangeIndex) and len(table.columns):
        first = table.columns[0]
        if not pd.api.types.is_numeric_dtype(table[first]):
            table = table.set_index(first)  # ids stored as the first column
    return table


def _read_h5ad(path: Path, *, gene_column: str | None, layer: str | None) -> pd.DataFrame:
    try:
        import anndata
    except ImportError as exc:
        raise ExpressionError(f"reading {path.name} needs anndata: `pip install anndata`") from exc
    adata = anndata.read_h5ad(path)
    if layer is None:
        matrix = adata.X
    elif layer in adata.layers:
        matrix = adata.layers[layer]
    else:
        raise ExpressionError(
            f"{path.name} has no layer {layer!r}; layers: {sorted(adata.layers) or 'none'}"
        )
    if matrix is None:
        raise ExpressionError(f"{path.name} has no expression matrix in X; pass layer=...")
    if hasattr(matrix, "toarray"):
        matrix = matrix.toarray()  # sparse -> dense (samples x genes)
    if gene_column is None:
        genes = list(adata.var_names)
    elif gene_column in adata.var.columns:
        genes = adata.var[gene_column].astype(str).tolist()
    else:
        raise ExpressionError(
            f"{path.name}: var has no column {gene_column!r}; columns: {list(adata.var.columns)}"
        )
    return pd.DataFrame(np.asarray(matrix), index=list(adata.obs_names), columns=genes)


def _genes_from_column(table: pd.DataFrame, gene_column: str, path: Path) -> pd.DataFrame:
    table = table.reset_index()
    if gene_column not in table.columns:
        raise ExpressionError(
            f"{path.name} has no column {gene_column!r}; columns: {list(table.columns)[:10]}"
        )
    table = table.set_index(gene_column)
    dropped = [c for c in table.columns if not pd.api.types.is_numeric_dtype(table[c])]
    if dropped:
        logger.info("%s: dropping non-numeric annotation column(s) %s", path.name, dropped)
    return table.drop(columns=dropped)


# --------------------------------------------------------------------------------------
# Orientation, ids, validation
# --------------------------------------------------------------------------------------


def _gene_fraction(labels: pd.Index, vocabulary: frozenset[str]) -> float:
    if len(labels) == 0:
        return 0.0
    ids = canonical_gene_ids(labels)
    return sum(is_ensembl_id(g) or g in vocabulary for g in ids) / len(ids)


def known_gene_vocabulary() -> frozenset[str]:
    """Symbols we can recognise without a database: bundled gene sets + housekeeping list."""
    from mupad.omics.filters import housekeeping_genes
    from mupad.omics.genesets import default_gene_sets

    return default_gene_sets().genes | housekeeping_genes()


def detect_orientation(table: pd.DataFrame) -> Orientation:
    """Which axis holds genes: the one with more recognised gene ids (>= 20% of labels)."""
    vocabulary = known_gene_vocabulary()
    rows = _gene_fraction(table.index, vocabulary)
    columns = _gene_fraction(table.columns, vocabulary)
    if max(rows, columns) >= _GENE_AXIS_MIN_FRACTION and rows != columns:
        found = Orientation.GENES_X_SAMPLES if rows > columns else Orientation.SAMPLES_X_GENES
        logger.info(
            "orientation %s (recognised genes: %.0f%% of rows, %.0f%% of columns)",
            found.value, 100 * rows, 100 * columns,
        )  # fmt: skip
        return found
    raise GeneIdError(
        f"cannot tell which axis holds genes: {100 * rows:.0f}% of the {table.shape[0]} row "
        f"labels and {100 * columns:.0f}% of the {table.shape[1]} column labels are recognised "
        "gene symbols or Ensembl ids. Pass orientation='genes_x_samples' or 'samples_x_genes' "
        "(CLI: --orientation)."
    )


def as_samples_by_genes(
    table: pd.DataFrame,
    orientation: Orientation | str = Orientation.AUTO,
    *,
    what: str = "expression",
) -> pd.DataFrame:
    """Orient a table as samples x genes, canonicalise gene ids and validate the values.

    GENCODE "_PAR_Y" duplicate rows are dropped. Raises ExpressionError for non-numeric,
    NaN/infinite or negative values and for repeated gene or sample ids.
    """
    orientation = parse_enum(Orientation, orientation)
    if table.shape[0] == 0 or table.shape[1] == 0:
        raise ExpressionError(f"{what}: the matrix is empty (shape {table.shape})")
    if orientation is Orientation.AUTO:
        orientation = detect_orientation(table)
    frame = table.T if orientation is Orientation.GENES_X_SAMPLES else table
    frame = frame.copy()
    par_y = [c for c in frame.columns if is_par_y(str(c))]
    if par_y:
        logger.info("%s: dropping %d GENCODE _PAR_Y gene ids", what, len(par_y))
        frame = frame.drop(columns=par_y)
    frame.columns = pd.Index(canonical_gene_ids(frame.columns), name="gene")
    frame.index = pd.Index([str(s) for s in frame.index], name="sample")
    _check_unique(frame.columns, "gene", what)
    _check_unique(frame.index, "sample", what)
    non_numeric = [c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])]
    if non_numeric:
        raise ExpressionError(
            f"{what}: non-numeric values in gene(s) {non_numeric[:5]}; the matrix must hold "
            "numbers only (for tables with annotation columns pass gene_column=...)"
        )
    frame = frame.astype(np.float64)
    check_values(frame, what=what)
    return frame


def _check_unique(labels: pd.Index, kind: str, what: str) -> None:
    repeated = labels[labels.duplicated()].unique()
    if len(repeated):
        counts = labels.value_counts()
        shown = ", ".join(f"{g!r} ({counts[g]}x)" for g in repeated[:5])
        more = f" and {len(repeated) - 5} more" if len(repeated) > 5 else ""
        hint = (
            "aggregate repeated genes first (e.g. sum their counts), or map ids to one kind"
            if kind == "gene"
            else "give every sample a unique name"
        )
        raise ExpressionError(
            f"{what}: {len(repeated)} {kind} id(s) repeat (after removing version suffixes "
            f"and upper-casing): {shown}{more}; {hint}"
        )


def check_values(
    frame: pd.DataFrame, *, what: str = "expression", allow_negative: bool = False
) -> None:
    """Raise ExpressionError for NaN/infinite values (and negative ones unless allowed)."""
    values = frame.to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ExpressionError(
            f"{what}: {int(bad.sum())} missing or infinite value(s), first at sample "
            f"{frame.index[row]!r}, gene {frame.columns[col]!r}; fill them (e.g. 0 for counts) "
            "or drop those genes/samples"
        )
    if not allow_negative:
        negative = values < 0
        if negative.any():
            row, col = np.argwhere(negative)[0]
            raise ExpressionError(
                f"{what}: {int(negative.sum())} negative value(s), first {values[row, col]:g} "
                f"at sample {frame.index[row]!r}, gene {frame.columns[col]!r}; expression must "
                "be counts or TPM/CPM (>= 0), not log-ratios or z-scores"
            )


# --------------------------------------------------------------------------------------
# Id mapping
# --------------------------------------------------------------------------------------


def load_gene_mapping(source: str | Path | pd.DataFrame | Mapping[str, str]) -> dict[str, str]:
    """A gene-id mapping (from -> to), canonicalised.

    `source`: a dict; a DataFrame whose first two columns are (from, to); a .csv/.tsv/.txt
    table with a header and those two columns; or a GTF (Ensembl gene_id -> gene_name).
    """
    from mupad.omics.gtf import gene_mapping_from_gtf, is_gtf

    if isinstance(source, Mapping):
        pairs = list(source.items())
    elif isinstance(source, pd.DataFrame):
        pairs = list(zip(source.iloc[:, 0], source.iloc[:, 1]))
    else:
        path = Path(source)
        if not path.is_file():
            raise GeneIdError(f"gene-id mapping file {path} does not exist")
        if is_gtf(path):
            return gene_mapping_from_gtf(path)
        sep = "," if _suffix(path) == ".csv" else "\t"
        table = pd.read_csv(path, sep=sep, dtype=str)
        if table.shape[1] < 2:
            raise GeneIdError(
                f"{path.name}: a mapping table needs two columns (from id, to id), found "
                f"{table.shape[1]}; check the separator ({sep!r} for this file type)"
            )
        pairs = list(zip(table.iloc[:, 0], table.iloc[:, 1]))
    mapping = {
        key: value
        for key, value in zip(
            canonical_gene_ids(a for a, _ in pairs), canonical_gene_ids(b for _, b in pairs)
        )
        if key not in ("", "NAN") and value not in ("", "NAN")
    }
    if not mapping:
        raise GeneIdError("the gene-id mapping is empty (no rows with both ids)")
    return mapping


def orient_mapping(mapping: Mapping[str, str], source_kind: GeneIdKind) -> dict[str, str]:
    """`mapping` keyed by ids of `source_kind`: as given, or inverted when its values are."""
    if detect_gene_id_kind(list(mapping), what="mapping keys") is source_kind:
        return dict(mapping)
    if detect_gene_id_kind(list(mapping.values()), what="mapping values") is source_kind:
        inverted: dict[str, str] = {}
        for key, value in mapping.items():
            inverted.setdefault(value, key)  # first entry wins for one-to-many
        return inverted
    raise GeneIdError(
        f"the gene-id mapping has no {source_kind.value} ids on either side; it cannot "
        f"translate {source_kind.value} ids"
    )


def map_gene_ids(
    frame: pd.DataFrame,
    mapping: Mapping[str, str],
    *,
    sum_repeats: bool = True,
    what: str = "expression",
) -> pd.DataFrame:
    """Rename genes (columns) through `mapping`; unmapped genes are dropped.

    Genes that map to the same id are summed (`sum_repeats`, right for counts and TPM, which
    add up) or averaged (for values already on a log scale).
    """
    mapped = [mapping.get(g) for g in frame.columns]
    keep = [m is not None for m in mapped]
    matched = sum(keep)
    if matched == 0:
        example = list(mapping)[:3]
        raise GeneIdError(
            f"{what}: none of the {frame.shape[1]} gene ids (e.g. {list(frame.columns[:3])}) "
            f"is in the mapping table (whose ids look like {example}); check that the table "
            "maps from the expression's id kind"
        )
    if matched < frame.shape[1]:
        logger.warning(
            "%s: %d of %d genes have no entry in the mapping table and were dropped",
            what, frame.shape[1] - matched, frame.shape[1],
        )  # fmt: skip
    kept = frame.loc[:, keep]
    kept.columns = pd.Index([m for m in mapped if m is not None], name="gene")
    if kept.columns.has_duplicates:
        logger.info("%s: combining genes that map to the same id", what)
        grouped = kept.T.groupby(level=0, sort=False)
        kept = (grouped.sum() if sum_repeats else grouped.mean()).T
        kept.columns.name = "gene"
    return kept
