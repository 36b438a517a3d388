"""Gene identifiers: symbols vs Ensembl ids, and the canonical form used for matching.

Canonical form (applied to expression genes and gene-set members alike): surrounding
whitespace removed, upper case, and an Ensembl id's version suffix dropped
("ENSG00000141510.16" -> "ENSG00000141510"). Matching is exact on the canonical form, so
"Tp53"/"TP53" and "ensg00000141510.3"/"ENSG00000141510" meet.
"""

from __future__ import annotations

import enum
import logging
import re
from collections.abc import Iterable

from mupad.omics.errors import GeneIdError

logger = logging.getLogger(__name__)

# Ensembl gene ids of any species: ENSG (human), ENSMUSG (mouse), ... 11 digits, optional
# ".version" and the GENCODE "_PAR_Y" suffix of Y-chromosome pseudo-autosomal copies.
_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{11}(\.\d+)?(_PAR_Y)?$", re.IGNORECASE)
_VERSION = re.compile(r"\.\d+$")
PAR_Y_SUFFIX = "_PAR_Y"


class GeneIdKind(str, enum.Enum):
    SYMBOL = "symbol"  # HGNC-style gene symbols (TP53, MT-CO1, ...)
    ENSEMBL = "ensembl"  # Ensembl gene ids (ENSG00000141510), version suffix ignored


def is_ensembl_id(gene: str) -> bool:
    """True for an Ensembl gene id, with or without a version suffix."""
    return bool(_ENSEMBL.match(str(gene).strip()))


def is_par_y(gene: str) -> bool:
    """True for GENCODE's "_PAR_Y" duplicate ids of pseudo-autosomal genes on chromosome Y."""
    return str(gene).strip().upper().endswith(PAR_Y_SUFFIX)


def canonical_gene_id(gene: object) -> str:
    """The matching key of one gene id (stripped, upper case, Ensembl version removed)."""
    text = str(gene).strip().upper()
    if _ENSEMBL.match(text):
        text = _VERSION.sub("", text.removesuffix(PAR_Y_SUFFIX)) + (
            PAR_Y_SUFFIX if text.endswith(PAR_Y_SUFFIX) else ""
        )
    return text


def canonical_gene_ids(genes: Iterable[object]) -> list[str]:
    return [canonical_gene_id(g) for g in genes]


def detect_gene_id_kind(genes: Iterable[object], *, what: str = "genes") -> GeneIdKind:
    """Whether ids are Ensembl gene ids or symbols (majority vote; mixed ids are logged).

    Raises GeneIdError when there are no ids at all.
    """
    ids = [str(g) for g in genes]
    if not ids:
        raise GeneIdError(f"{what}: no gene ids to inspect; the gene axis is empty")
    fraction = sum(is_ensembl_id(g) for g in ids) / len(ids)
    kind = GeneIdKind.ENSEMBL if fraction >= 0.5 else GeneIdKind.SYMBOL
    if 0.05 < fraction < 0.95:
        logger.warning(
            "%s: %.0f%% of %d ids look like Ensembl ids and the rest do not; treating all as "
            "%s ids (ids of the other kind will not match any gene set)",
            what, 100 * fraction, len(ids), kind.value,
        )  # fmt: skip
    return kind
