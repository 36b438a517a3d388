"""Exceptions of `mupad.omics.spatial`; each message says what is wrong and how to fix it."""

from __future__ import annotations

from mupad.omics.errors import OmicsError


class SpatialDataError(OmicsError):
    """A spatial transcriptomics folder or one of its files is unusable as given."""


class MissingSpatialFileError(SpatialDataError, FileNotFoundError):
    """A file the reader needs (positions, scale factors, matrix, image) is not there."""


class ScaleFactorError(SpatialDataError):
    """A scale factor needed to map spots to image pixels or micrometres is missing or invalid."""


class BarcodeMismatchError(SpatialDataError):
    """The count matrix holds spots (barcodes) that the positions table does not know."""


class SpotImageError(SpatialDataError):
    """The tissue image cannot be used as it is (alpha channel, 16-bit, not RGB, unreadable)."""


class SpotsOutsideImageError(SpatialDataError):
    """Some spots' patches reach beyond the image border."""

    def __init__(self, message: str, barcodes: tuple[str, ...]) -> None:
        super().__init__(message)
        self.barcodes = barcodes


class OutputExistsError(SpatialDataError, FileExistsError):
    """The output folder exists and holds something that would be replaced."""
