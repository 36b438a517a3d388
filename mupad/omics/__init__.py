"""Bulk and spatial RNA -> pathway scores, the RNA condition of MUPAD.

The pipeline (`expression_to_scores`, in `mupad.omics.pipeline`) reads an expression matrix
(samples x genes), normalises counts to TPM (or CPM when no gene lengths are given), drops
mitochondrial and housekeeping genes, applies log1p and scores every gene set of a GMT
collection per sample (single-sample GSEA or a mean z-score).

Modules: expression (readers, orientation, ids), normalize (TPM/CPM), filters (MT- and
housekeeping genes), genesets (GMT, `GeneSets`, bundled default), scoring (`score_pathways`),
pipeline, cli (`mupad omics score`). The names below are importable from here; pandas loads
on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "expression_to_scores": "mupad.omics.pipeline",
    "score_pathways": "mupad.omics.scoring",
    "ScoringMethod": "mupad.omics.scoring",
    "SsgseaNormalisation": "mupad.omics.scoring",
    "GeneSets": "mupad.omics.genesets",
    "load_gmt": "mupad.omics.genesets",
    "write_gmt": "mupad.omics.genesets",
    "default_gene_sets": "mupad.omics.genesets",
    "read_expression": "mupad.omics.expression",
    "normalise_counts": "mupad.omics.normalize",
    "drop_uninformative_genes": "mupad.omics.filters",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mupad.omics' has no attribute {name!r}")
