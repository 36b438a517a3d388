"""Exceptions raised by `mupad.omics`; every message says what is wrong and how to fix it."""

from __future__ import annotations

from mupad.errors import MupadError


class OmicsError(MupadError, ValueError):
    """Base class: an omics input (expression, gene ids, gene sets) is unusable as given."""


class ExpressionError(OmicsError):
    """An expression matrix is malformed (unreadable, NaN, negative, duplicated genes, ...)."""


class GeneIdError(OmicsError):
    """Gene identifiers cannot be recognised or mapped (symbols vs Ensembl ids)."""


class GeneSetError(OmicsError):
    """A gene-set collection is malformed, or does not overlap the expression genes."""
