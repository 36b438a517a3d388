"""Spatial transcriptomics: read Visium / HER2ST spots, cut one H&E patch per spot, score it.

    sample = load_sample("visium_run/outs")              # or read_space_ranger / read_her2st
    manifest = extract_spots("visium_run/outs", "st_pairs")   # patches + scores + manifest

See `extract.py` for what is written and how gene symbols are matched, `space_ranger.py`
and `her2st.py` for the layouts, and `images.py` for which images are accepted.
"""

from mupad.omics.spatial.errors import (
    BarcodeMismatchError,
    MissingSpatialFileError,
    OutputExistsError,
    ScaleFactorError,
    SpatialDataError,
    SpotImageError,
    SpotsOutsideImageError,
)
from mupad.omics.spatial.extract import (
    detect_kind,
    extract_spots,
    load_sample,
    score_count_matrix,
    score_spots,
    symbol_style,
)
from mupad.omics.spatial.her2st import list_her2st_sections, read_her2st
from mupad.omics.spatial.hest import list_hest_samples, read_hest
from mupad.omics.spatial.images import check_image, open_tissue_image
from mupad.omics.spatial.matrix import read_10x_h5, read_mtx_folder
from mupad.omics.spatial.space_ranger import read_positions, read_scalefactors, read_space_ranger
from mupad.omics.spatial.spots import (
    ImageLevel,
    MppSource,
    SpatialKind,
    SpatialSample,
    SpotImage,
    SpotTable,
)

__all__ = [
    "BarcodeMismatchError",
    "ImageLevel",
    "MissingSpatialFileError",
    "MppSource",
    "OutputExistsError",
    "ScaleFactorError",
    "SpatialDataError",
    "SpatialKind",
    "SpatialSample",
    "SpotImage",
    "SpotImageError",
    "SpotTable",
    "SpotsOutsideImageError",
    "check_image",
    "detect_kind",
    "extract_spots",
    "list_her2st_sections",
    "list_hest_samples",
    "load_sample",
    "open_tissue_image",
    "read_10x_h5",
    "read_her2st",
    "read_hest",
    "read_mtx_folder",
    "read_positions",
    "read_scalefactors",
    "read_space_ranger",
    "score_count_matrix",
    "score_spots",
    "symbol_style",
]
