"""Drop genes that carry no pathway signal: mitochondrial genes and housekeeping genes.

Mitochondrial genes are symbols starting with "MT-" (MT-CO1, MT-ND4, ...). The bundled
housekeeping list (mupad/assets/genesets/housekeeping_core_human.txt, see SOURCE.md there)
is a short core list; pass your own list for the full Eisenberg & Levanon (2013) table.
Both filters match gene symbols: on Ensembl ids they drop nothing (a warning says so).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

import pandas as pd

from mupad.omics.errors import ExpressionError
from mupad.omics.ids import GeneIdKind, canonical_gene_ids, detect_gene_id_kind

logger = logging.getLogger(__name__)

MITOCHONDRIAL_PREFIX = "MT-"
HOUSEKEEPING_FILE = "housekeeping_core_human.txt"


def read_gene_list(path: str | Path) -> frozenset[str]:
    """One gene per line ('#' comments and blank lines ignored; extra columns ignored)."""
    path = Path(path)
    if not path.is_file():
        raise ExpressionError(f"gene list {path} does not exist")
    genes = []
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.split("#", 1)[0].strip()
        if text:
            genes.append(text.replace(",", "\t").split("\t")[0])
    if not genes:
        raise ExpressionError(f"gene list {path} is empty")
    return frozenset(canonical_gene_ids(genes))


@functools.lru_cache(maxsize=1)
def housekeeping_genes() -> frozenset[str]:
    """The bundled core housekeeping genes (canonical symbols)."""
    return read_gene_list(
        Path(str(resources.files("mupad") / "assets" / "genesets" / HOUSEKEEPING_FILE))
    )


def mitochondrial_genes(genes: Iterable[str]) -> list[str]:
    """The ids among `genes` that are mitochondrially encoded (symbols starting with MT-)."""
    return [g for g in genes if str(g).upper().startswith(MITOCHONDRIAL_PREFIX)]


def drop_uninformative_genes(
    expression: pd.DataFrame,
    *,
    mitochondrial: bool = True,
    housekeeping: bool | Iterable[str] = True,
) -> pd.DataFrame:
    """Drop mitochondrial and housekeeping genes (columns) from a samples x genes frame.

    Args:
        mitochondrial: drop genes whose symbol starts with "MT-".
        housekeeping: True drops the bundled core list, False keeps every gene, and an
            iterable of gene ids drops those instead.
    """
    if isinstance(housekeeping, bool):
        housekeeping_set = housekeeping_genes() if housekeeping else frozenset()
    else:
        housekeeping_set = frozenset(canonical_gene_ids(housekeeping))
    genes = expression.columns
    if len(genes) and detect_gene_id_kind(genes) is GeneIdKind.ENSEMBL:
        logger.warning(
            "gene filters match symbols but the genes are Ensembl ids: no mitochondrial or "
            "housekeeping gene was dropped; map ids to symbols first to filter them"
        )
    canonical = canonical_gene_ids(genes)
    drop_mt = set(mitochondrial_genes(canonical)) if mitochondrial else set()
    drop_hk = {g for g in canonical if g in housekeeping_set}
    keep = [g not in drop_mt and g not in drop_hk for g in canonical]
    if not any(keep):
        raise ExpressionError(
            "every gene is mitochondrial or housekeeping; nothing is left to score. Check the "
            "gene ids, or turn the filters off (mitochondrial=False, housekeeping=False)"
        )
    logger.info(
        "dropped %d mitochondrial and %d housekeeping genes; %d genes left",
        len(drop_mt), len(drop_hk - drop_mt), sum(keep),
    )  # fmt: skip
    return expression.loc[:, keep]
