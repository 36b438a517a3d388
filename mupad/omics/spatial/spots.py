"""What a spatial transcriptomics sample is, once read: spots, counts and the image they sit on.

Coordinates are always kept in **full-resolution pixels** (the frame of the image the
spots were registered to: Space Ranger's `pxl_*_in_fullres`, HER2ST's `pixel_x/pixel_y`).
An image at another resolution carries its `scale` (image px per full-res px, Space
Ranger's `tissue_hires_scalef` / `tissue_lowres_scalef`), and `fullres_mpp` turns
full-res pixels into micrometres.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from mupad.omics.spatial.errors import SpatialDataError

# Above this many cells (spots x genes) `SpatialSample.counts` uses pandas' sparse dtype.
SPARSE_ABOVE_ENTRIES = 20_000_000
SPOT_COLUMNS = ("array_row", "array_col", "x_fullres_px", "y_fullres_px", "in_tissue")


class SpatialKind(str, enum.Enum):
    """Folder layouts that `mupad st extract` reads."""

    VISIUM = "visium"  # a Space Ranger output folder (`outs/` or its parent)
    HER2ST = "her2st"  # counts/<section>.tsv.gz + spots/<section>_selection.tsv + images/
    HEST = "hest"  # HEST-1k: st/<id>.h5ad + wsis/<id>.tif + metadata/<id>.json


class ImageLevel(str, enum.Enum):
    """Which image of a sample the patches are cut from."""

    FULLRES = "fullres"  # the image the spots were registered to (scale 1)
    HIRES = "hires"  # Space Ranger tissue_hires_image.png (tissue_hires_scalef)
    LOWRES = "lowres"  # Space Ranger tissue_lowres_image.png (tissue_lowres_scalef)


class MppSource(str, enum.Enum):
    """Where the micrometres-per-pixel of the full-resolution frame came from."""

    GIVEN = "given"  # the caller passed mpp=...
    SPOT_DIAMETER = "spot_diameter_fullres"  # Visium: 55 µm / spot_diameter_fullres
    ARRAY_PITCH = "array_pitch"  # legacy ST: 200 µm spot pitch / fitted px per array step
    METADATA = "metadata"  # HEST-1k: pixel_size_um_* of metadata/<id>.json


@dataclass(frozen=True)
class SpotTable:
    """One row per spot, indexed by barcode.

    Columns: `array_row`, `array_col` (int, position on the capture array),
    `x_fullres_px`, `y_fullres_px` (float, spot centre in full-resolution pixels; x is the
    column, y the row) and `in_tissue` (bool).
    """

    frame: pd.DataFrame

    def __post_init__(self) -> None:
        missing = [c for c in SPOT_COLUMNS if c not in self.frame.columns]
        if missing:
            raise SpatialDataError(
                f"spot table lacks column(s) {missing}; needs {list(SPOT_COLUMNS)}"
            )
        if self.frame.index.has_duplicates:
            dup = self.frame.index[self.frame.index.duplicated()].unique()[:5].tolist()
            raise SpatialDataError(
                f"spot barcodes are not unique (e.g. {dup}); each spot must appear once in the "
                "positions file"
            )
        xy = self.frame[["x_fullres_px", "y_fullres_px"]].to_numpy(dtype=float)
        if not np.isfinite(xy).all():
            bad = self.frame.index[~np.isfinite(xy).all(axis=1)][:5].tolist()
            raise SpatialDataError(
                f"spot pixel coordinates are missing or not numbers for e.g. {bad}; fix the "
                "positions file"
            )

    @classmethod
    def build(
        cls,
        barcodes: list[str] | pd.Index,
        array_row: np.ndarray,
        array_col: np.ndarray,
        x_fullres_px: np.ndarray,
        y_fullres_px: np.ndarray,
        in_tissue: np.ndarray,
    ) -> SpotTable:
        frame = pd.DataFrame(
            {
                "array_row": np.asarray(array_row, dtype=np.int64),
                "array_col": np.asarray(array_col, dtype=np.int64),
                "x_fullres_px": np.asarray(x_fullres_px, dtype=np.float64),
                "y_fullres_px": np.asarray(y_fullres_px, dtype=np.float64),
                "in_tissue": np.asarray(in_tissue).astype(bool),
            },
            index=pd.Index([str(b) for b in barcodes], name="barcode"),
        )
        return cls(frame)

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def barcodes(self) -> pd.Index:
        return self.frame.index

    def select(self, barcodes: pd.Index | list[str]) -> SpotTable:
        """The rows of `barcodes`, in that order (all must exist)."""
        return SpotTable(self.frame.loc[list(barcodes)])


@dataclass(frozen=True)
class SpotImage:
    """An image file and how its pixels relate to the full-resolution frame."""

    path: Path
    level: ImageLevel
    scale: float  # image px per full-res px (1.0 for the full-res image)


@dataclass(frozen=True)
class SpatialSample:
    """A read sample: spots with counts, the counts, the image and the pixel size.

    The counts are held as a sparse matrix `matrix` (spots x genes, rows in the order of
    `spots`, columns `genes` = unique gene symbols; duplicated symbols are summed).
    `counts` gives them as a pandas DataFrame, with pandas' sparse dtype when large.
    """

    name: str
    kind: SpatialKind
    source: Path
    spots: SpotTable  # spots that have counts, same order as the matrix rows
    matrix: sp.csr_matrix  # (spots, genes) raw counts
    genes: pd.Index  # (genes,) unique gene symbols
    image: SpotImage | None
    fullres_mpp: float | None  # µm per full-resolution pixel; None when unknown
    mpp_source: MppSource | None
    spot_diameter_um: float
    spots_without_counts: tuple[str, ...] = ()  # positions rows with no matrix row
    notes: tuple[str, ...] = field(default=())  # what the reader decided, for summary.json

    def __post_init__(self) -> None:
        if self.matrix.shape != (len(self.spots), len(self.genes)):
            raise SpatialDataError(
                f"internal: counts matrix {self.matrix.shape} does not match "
                f"{len(self.spots)} spots x {len(self.genes)} genes"
            )
        if self.genes.has_duplicates:
            raise SpatialDataError("internal: gene symbols must be unique (sum duplicates first)")

    @property
    def num_spots(self) -> int:
        return len(self.spots)

    @functools.cached_property
    def counts(self) -> pd.DataFrame:
        """Spots x genes raw counts (index = barcodes); sparse dtype above SPARSE_ABOVE_ENTRIES."""
        index = pd.Index(self.spots.barcodes, name="barcode")
        columns = pd.Index(self.genes, name="gene")
        if self.matrix.shape[0] * self.matrix.shape[1] > SPARSE_ABOVE_ENTRIES:
            return pd.DataFrame.sparse.from_spmatrix(self.matrix, index=index, columns=columns)
        return pd.DataFrame(self.matrix.toarray(), index=index, columns=columns)

    def rows(self, barcodes: pd.Index | list[str]) -> np.ndarray:
        """Row positions of `barcodes` in the matrix (all must exist)."""
        return self.spots.barcodes.get_indexer(pd.Index(barcodes))
