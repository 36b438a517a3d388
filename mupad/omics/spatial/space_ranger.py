"""Read a 10x Visium Space Ranger output folder.

Layout (the folder may be `outs/` itself or the run folder that contains `outs/`):

    spatial/tissue_positions.parquet | tissue_positions.csv (header, SR >= 2.0)
            | tissue_positions_list.csv (no header, SR < 2.0)     first found in this order
    spatial/scalefactors_json.json    spot_diameter_fullres, tissue_hires_scalef, tissue_lowres_scalef
    spatial/tissue_hires_image.png, tissue_lowres_image.png
    filtered_feature_bc_matrix.h5  or  filtered_feature_bc_matrix/ (matrix.mtx.gz, features.tsv.gz,
                                                                    barcodes.tsv.gz)   h5 first

Which image patches are cut from: the full-resolution H&E passed as `image=` (Space Ranger
does not copy it into `outs/`), else `tissue_hires_image.png`, else
`tissue_lowres_image.png` (or the level forced with `image_level=`); the down-sampled
images are placed with their scale factor. `detected_tissue_image.jpg` is a QC overlay and
is never used. Micrometres per full-res pixel: `mpp=` if given, else
55 µm / `spot_diameter_fullres` (a Visium spot is 55 µm across).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from mupad.omics.spatial.errors import (
    BarcodeMismatchError,
    MissingSpatialFileError,
    ScaleFactorError,
    SpatialDataError,
)
from mupad.omics.spatial.matrix import (
    FeatureMatrix,
    gene_expression_counts,
    read_10x_h5,
    read_mtx_folder,
)
from mupad.omics.spatial.spots import (
    ImageLevel,
    MppSource,
    SpatialKind,
    SpatialSample,
    SpotImage,
    SpotTable,
)

logger = logging.getLogger(__name__)

VISIUM_SPOT_DIAMETER_UM = 55.0
POSITION_FILES = ("tissue_positions.parquet", "tissue_positions.csv", "tissue_positions_list.csv")
POSITION_COLUMNS = (
    "barcode",
    "in_tissue",
    "array_row",
    "array_col",
    "pxl_row_in_fullres",
    "pxl_col_in_fullres",
)
SCALEFACTORS_FILE = "scalefactors_json.json"
LEVEL_IMAGES = {
    ImageLevel.HIRES: "tissue_hires_image.png",
    ImageLevel.LOWRES: "tissue_lowres_image.png",
}
LEVEL_SCALE_KEYS = {
    ImageLevel.HIRES: "tissue_hires_scalef",
    ImageLevel.LOWRES: "tissue_lowres_scalef",
}
SPOT_DIAMETER_KEY = "spot_diameter_fullres"


def resolve_outs(folder: str | Path) -> Path:
    """The folder that holds `spatial/` (accepts the run folder with an `outs/` inside)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingSpatialFileError(f"Space Ranger folder {folder} does not exist")
    for candidate in (folder, folder / "outs"):
        if (candidate / "spatial").is_dir():
            return candidate
    if any((folder / name).is_file() for name in POSITION_FILES):
        return folder.parent if folder.name == "spatial" else folder
    raise MissingSpatialFileError(
        f"{folder} has no spatial/ folder; pass a Space Ranger output folder (the one with "
        "spatial/ and filtered_feature_bc_matrix[.h5], usually <run>/outs)"
    )


def _spatial_dir(outs: Path) -> Path:
    return outs / "spatial" if (outs / "spatial").is_dir() else outs


def find_positions_file(spatial: Path) -> Path:
    for name in POSITION_FILES:
        if (spatial / name).is_file():
            return spatial / name
    raise MissingSpatialFileError(
        f"no spot positions in {spatial}: expected one of {', '.join(POSITION_FILES)}"
    )


def read_positions(path: str | Path) -> SpotTable:
    """A tissue positions file in any of the three Space Ranger forms -> SpotTable."""
    path = Path(path)
    if not path.is_file():
        raise MissingSpatialFileError(f"positions file {path} does not exist")
    if path.suffix == ".parquet":
        try:
            frame = pd.read_parquet(path)
        except ImportError as err:
            raise SpatialDataError(
                f"reading {path.name} needs pyarrow: `pip install pyarrow`, or use the "
                "tissue_positions.csv of the same run"
            ) from err
    else:
        with path.open() as handle:
            first = handle.readline().split(",")[0].strip().strip('"')
        has_header = first == "barcode"
        frame = pd.read_csv(
            path, header=0 if has_header else None, names=None if has_header else POSITION_COLUMNS
        )
    missing = [c for c in POSITION_COLUMNS if c not in frame.columns]
    if missing:
        raise SpatialDataError(
            f"{path} lacks column(s) {missing}; a Space Ranger positions file has "
            f"{', '.join(POSITION_COLUMNS)}"
        )
    try:
        numeric = frame[list(POSITION_COLUMNS[1:])].apply(pd.to_numeric, errors="raise")
    except (ValueError, TypeError) as err:
        raise SpatialDataError(f"{path} has non-numeric positions: {err}") from err
    return SpotTable.build(
        barcodes=frame["barcode"].astype(str).tolist(),
        array_row=numeric["array_row"].to_numpy(),
        array_col=numeric["array_col"].to_numpy(),
        x_fullres_px=numeric["pxl_col_in_fullres"].to_numpy(),
        y_fullres_px=numeric["pxl_row_in_fullres"].to_numpy(),
        in_tissue=numeric["in_tissue"].to_numpy() == 1,
    )


def read_scalefactors(path: str | Path) -> dict[str, float]:
    """`scalefactors_json.json` -> {key: positive float} (keys that are present)."""
    path = Path(path)
    if not path.is_file():
        raise MissingSpatialFileError(
            f"scale factors {path} do not exist; copy {SCALEFACTORS_FILE} from the Space Ranger "
            "run's outs/spatial/"
        )
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ScaleFactorError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise ScaleFactorError(f"{path} must hold a JSON object of scale factors")
    factors: dict[str, float] = {}
    for key, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not np.isfinite(value) or value <= 0:
            raise ScaleFactorError(f"{path}: {key} = {value} must be a positive number")
        factors[key] = float(value)
    return factors


def find_matrix(outs: Path) -> Path:
    """`filtered_feature_bc_matrix.h5` if present, else the `filtered_feature_bc_matrix/` folder."""
    h5 = outs / "filtered_feature_bc_matrix.h5"
    if h5.is_file():
        return h5
    folder = outs / "filtered_feature_bc_matrix"
    if folder.is_dir():
        return folder
    raise MissingSpatialFileError(
        f"no count matrix in {outs}: expected filtered_feature_bc_matrix.h5 or the "
        "filtered_feature_bc_matrix/ folder (matrix.mtx.gz, features.tsv.gz, barcodes.tsv.gz)"
    )


def read_feature_matrix(path: str | Path) -> FeatureMatrix:
    """An `.h5` file or a Matrix Market folder."""
    path = Path(path)
    if path.is_dir():
        return read_mtx_folder(path)
    if path.suffix in (".h5", ".hdf5"):
        return read_10x_h5(path)
    if not path.exists():
        raise MissingSpatialFileError(f"matrix {path} does not exist")
    raise SpatialDataError(f"{path}: expected a 10x .h5 file or a matrix.mtx folder")


def _choose_image(
    spatial: Path, factors: dict[str, float], image: Path | None, level: ImageLevel | None
) -> SpotImage | None:
    if image is not None:
        image = Path(image)
        if not image.is_file():
            raise MissingSpatialFileError(f"image {image} does not exist")
        if level not in (None, ImageLevel.FULLRES):
            raise SpatialDataError(
                f"image= is the full-resolution image; drop image_level={level.value} or image="
            )
        return SpotImage(image, ImageLevel.FULLRES, 1.0)
    if level is ImageLevel.FULLRES:
        raise MissingSpatialFileError(
            "image_level=fullres needs the full-resolution H&E (Space Ranger's --image input): "
            "pass image=<path> (CLI: --image)"
        )
    levels = [level] if level is not None else [ImageLevel.HIRES, ImageLevel.LOWRES]
    for candidate in levels:
        path = spatial / LEVEL_IMAGES[candidate]
        if not path.is_file():
            continue
        key = LEVEL_SCALE_KEYS[candidate]
        if key not in factors:
            raise ScaleFactorError(
                f"{spatial / SCALEFACTORS_FILE} has no '{key}', needed to place spots on "
                f"{path.name}; use the scale factors file of the same Space Ranger run, or pass "
                "the full-resolution image with image=... (CLI: --image)"
            )
        return SpotImage(path, candidate, factors[key])
    if level is not None:
        raise MissingSpatialFileError(f"{spatial / LEVEL_IMAGES[level]} does not exist")
    return None


def _match_barcodes(
    spots: SpotTable, matrix_barcodes: pd.Index, matrix_path: Path, positions: Path
) -> None:
    unknown = matrix_barcodes.difference(spots.barcodes)
    if len(unknown):
        hint = ""
        if all("-" not in b for b in unknown[:20]) and any("-" in b for b in spots.barcodes[:20]):
            hint = " (the positions have a '-1' style suffix and the matrix does not)"
        raise BarcodeMismatchError(
            f"{len(unknown)} of {len(matrix_barcodes)} barcodes of {matrix_path} are not in "
            f"{positions} (e.g. {sorted(unknown)[:3]}){hint}; the matrix and spatial/ must "
            "come from the same Space Ranger run"
        )


def read_space_ranger(
    folder: str | Path,
    *,
    image: str | Path | None = None,
    image_level: ImageLevel | None = None,
    matrix: str | Path | None = None,
    mpp: float | None = None,
) -> SpatialSample:
    """Read positions, scale factors, counts and pick the image of a Space Ranger folder.

    `mpp` (µm per full-resolution pixel) overrides 55 µm / spot_diameter_fullres. Spots in
    the positions file without counts (normally the off-tissue spots, since the filtered
    matrix holds tissue spots only) are listed in `spots_without_counts`; matrix barcodes
    missing from the positions raise `BarcodeMismatchError`.
    """
    outs = resolve_outs(folder)
    spatial = _spatial_dir(outs)
    positions_path = find_positions_file(spatial)
    spots = read_positions(positions_path)
    scale_path = spatial / SCALEFACTORS_FILE
    if scale_path.is_file():
        factors = read_scalefactors(scale_path)
    elif image is not None and mpp is not None:
        factors = {}  # full-res image + given mpp: nothing to scale
    else:
        raise MissingSpatialFileError(
            f"{scale_path} does not exist; it maps spots to the hires/lowres images and gives "
            "the spot diameter in pixels. Copy it from the same run, or pass both the "
            "full-resolution image (--image) and its µm per pixel (--mpp)"
        )
    spot_image = _choose_image(spatial, factors, Path(image) if image else None, image_level)

    matrix_path = Path(matrix) if matrix is not None else find_matrix(outs)
    features = read_feature_matrix(matrix_path)
    counts, genes, matrix_stats = gene_expression_counts(features)
    barcodes = pd.Index(features.barcodes, name="barcode")
    if barcodes.has_duplicates:
        raise SpatialDataError(
            f"{matrix_path} lists barcode(s) twice, e.g. {barcodes[barcodes.duplicated()][:3].tolist()}"
        )
    _match_barcodes(spots, barcodes, matrix_path, positions_path)
    without = spots.barcodes.difference(barcodes, sort=False)

    notes = [
        f"positions: {positions_path.name}",
        f"matrix: {matrix_path.name}",
        f"image: {spot_image.path.name if spot_image else 'none'}",
    ]
    if mpp is not None:
        if not mpp > 0:
            raise ScaleFactorError(f"mpp must be a positive number of µm per pixel, got {mpp}")
        fullres_mpp, source = float(mpp), MppSource.GIVEN
    elif SPOT_DIAMETER_KEY in factors:
        fullres_mpp = VISIUM_SPOT_DIAMETER_UM / factors[SPOT_DIAMETER_KEY]
        source = MppSource.SPOT_DIAMETER
    else:
        fullres_mpp, source = None, None
    notes.extend(f"{k}={v:g}" for k, v in sorted(factors.items()))
    notes.extend(f"{k}={v}" for k, v in matrix_stats.items())
    logger.info(
        "read %s: %d spots with counts, %d genes, %d position rows without counts",
        outs,
        counts.shape[0],
        counts.shape[1],
        len(without),
    )
    return SpatialSample(
        name=outs.parent.name if outs.name == "outs" else outs.name,
        kind=SpatialKind.VISIUM,
        source=outs,
        spots=spots.select(barcodes),
        matrix=counts,
        genes=genes,
        image=spot_image,
        fullres_mpp=fullres_mpp,
        mpp_source=source,
        spot_diameter_um=VISIUM_SPOT_DIAMETER_UM,
        spots_without_counts=tuple(without),
        notes=tuple(notes),
    )
