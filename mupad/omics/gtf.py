"""GTF annotation -> per-gene lengths and an Ensembl id -> symbol table.

Gene length = the number of bases covered by the union of the gene's exons (overlapping
exons of different transcripts counted once); this is the "union exon" length commonly used
for TPM of gene-level counts. Only `exon` lines are read; the gene id comes from the
`gene_id` attribute (version suffix dropped) and the symbol from `gene_name`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from mupad.omics.errors import ExpressionError
from mupad.omics.ids import GeneIdKind, canonical_gene_ids

_GTF_COLUMNS = ["seqname", "source", "feature", "start", "end", "score", "strand", "frame", "attr"]


def is_gtf(path: str | Path) -> bool:
    name = Path(path).name.lower().removesuffix(".gz")
    return name.endswith((".gtf", ".gff2"))


def read_gtf_exons(path: str | Path) -> pd.DataFrame:
    """Exon rows of a GTF (optionally gzipped): columns gene_id, gene_name, start, end."""
    path = Path(path)
    if not path.is_file():
        raise ExpressionError(f"GTF file {path} does not exist")
    try:
        table = pd.read_csv(
            path, sep="\t", comment="#", header=None, names=_GTF_COLUMNS,
            usecols=["feature", "start", "end", "attr"], dtype={"feature": str, "attr": str},
        )  # fmt: skip
    except (pd.errors.ParserError, ValueError, UnicodeDecodeError) as exc:
        raise ExpressionError(f"{path} is not a readable GTF (9 tab-separated columns): {exc}")
    exons = table[table["feature"] == "exon"]
    if exons.empty:
        raise ExpressionError(
            f"{path} has no 'exon' lines; gene lengths need a GTF with exon features"
        )
    gene_id = exons["attr"].str.extract(r'gene_id "([^"]+)"', expand=False)
    gene_name = exons["attr"].str.extract(r'gene_name "([^"]+)"', expand=False)
    if gene_id.isna().all():
        raise ExpressionError(f"{path}: exon lines carry no gene_id attribute")
    out = pd.DataFrame(
        {
            "gene_id": gene_id.fillna(""),
            "gene_name": gene_name.fillna(""),
            "start": exons["start"].astype(np.int64),
            "end": exons["end"].astype(np.int64),
        }
    )
    return out[out["gene_id"] != ""].reset_index(drop=True)


def union_exon_lengths(exons: pd.DataFrame, key: str = "gene_id") -> pd.Series:
    """Bases covered by the union of each gene's exons (1-based inclusive coordinates)."""
    ordered = exons.sort_values([key, "start", "end"], kind="stable").reset_index(drop=True)
    reach = ordered.groupby(key, sort=False)["end"].cummax()  # furthest end so far per gene
    previous_reach = reach.groupby(ordered[key], sort=False).shift()
    new_block = previous_reach.isna() | (ordered["start"] > previous_reach)
    block = new_block.cumsum()
    spans = ordered.groupby(block).agg(
        gene=(key, "first"), start=("start", "min"), end=("end", "max")
    )
    lengths = (spans["end"] - spans["start"] + 1).groupby(spans["gene"]).sum()
    lengths.index.name = None
    return lengths.astype(np.float64)


def gene_lengths_from_gtf(path: str | Path, id_kind: GeneIdKind = GeneIdKind.ENSEMBL) -> pd.Series:
    """Union-exon length (bases) per gene, keyed by canonical Ensembl id or by symbol.

    Symbols shared by several Ensembl genes get the length of the longest of them.
    """
    exons = read_gtf_exons(path)
    exons["gene_id"] = canonical_gene_ids(exons["gene_id"])
    lengths = union_exon_lengths(exons)
    if id_kind is GeneIdKind.ENSEMBL:
        return lengths
    names = exons.drop_duplicates("gene_id").set_index("gene_id")["gene_name"]
    by_symbol = pd.Series(lengths.values, index=canonical_gene_ids(names.reindex(lengths.index)))
    by_symbol = by_symbol[by_symbol.index != ""]
    return by_symbol.groupby(level=0).max()


def gene_mapping_from_gtf(path: str | Path) -> dict[str, str]:
    """Canonical Ensembl gene id -> canonical symbol, from a GTF's gene_id/gene_name."""
    exons = read_gtf_exons(path)
    pairs = exons.drop_duplicates("gene_id")
    pairs = pairs[pairs["gene_name"] != ""]
    return dict(zip(canonical_gene_ids(pairs["gene_id"]), canonical_gene_ids(pairs["gene_name"])))
