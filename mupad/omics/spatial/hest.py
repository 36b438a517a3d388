"""Read a HEST-1k sample: AnnData spots + counts, the whole-slide image, the pixel size.

Layout (the HEST-1k download; one folder may hold many samples, chosen by id):

    st/<id>.h5ad            X: spots x genes raw counts, var_names: gene symbols,
                            obsm['spatial']: (N, 2) spot centres (x, y) in WSI level-0 px,
                            obs: in_tissue, array_row, array_col (optional)
    wsis/<id>.tif           the pyramidal H&E the spots are registered to (or .tiff/.svs)
    metadata/<id>.json      pixel_size_um_embedded / pixel_size_um_estimated (µm/px of the
                            WSI), spot_diameter (µm; Visium 55)

µm/px: `mpp=` if given, else the embedded pixel size, else the estimated one (HEST checks
both against the spot pitch; the embedded one is the scanner's own).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from mupad.omics.spatial.errors import (
    MissingSpatialFileError,
    ScaleFactorError,
    SpatialDataError,
)
from mupad.omics.spatial.matrix import merge_duplicate_symbols
from mupad.omics.spatial.spots import (
    ImageLevel,
    MppSource,
    SpatialKind,
    SpatialSample,
    SpotImage,
    SpotTable,
)

HEST_FOLDERS = ("st", "wsis")
WSI_SUFFIXES = (".tif", ".tiff", ".ome.tif", ".svs")
PIXEL_SIZE_KEYS = ("pixel_size_um_embedded", "pixel_size_um_estimated")
DEFAULT_SPOT_DIAMETER_UM = 55.0  # Visium


def is_hest_folder(folder: Path) -> bool:
    return all((folder / name).is_dir() for name in HEST_FOLDERS)


def list_hest_samples(root: str | Path) -> list[str]:
    """Sample ids with an st/<id>.h5ad under `root`, sorted."""
    return sorted(p.stem for p in (Path(root) / "st").glob("*.h5ad"))


def _wsi(root: Path, sample: str) -> Path | None:
    candidates = (root / "wsis" / f"{sample}{suffix}" for suffix in WSI_SUFFIXES)
    return next((path for path in candidates if path.is_file()), None)


def _metadata(root: Path, sample: str) -> dict:
    path = root / "metadata" / f"{sample}.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SpatialDataError(
            f"cannot read HEST metadata {path}: {err}; fix or remove it"
        ) from err
    if not isinstance(data, dict):
        raise SpatialDataError(f"HEST metadata {path} must be a JSON object")
    return data


def _number(value: object) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def _pixel_size(meta: dict, mpp: float | None, sample: str) -> tuple[float, str]:
    if mpp is not None:
        if not mpp > 0:
            raise ScaleFactorError(f"mpp must be a positive number of µm per pixel, got {mpp}")
        return float(mpp), f"mpp given: {mpp:g}"
    for key in PIXEL_SIZE_KEYS:
        value = _number(meta.get(key))
        if value is not None:
            return value, f"{key} from metadata/{sample}.json: {value:g}"
    raise ScaleFactorError(
        f"HEST sample {sample}: metadata/{sample}.json gives no pixel size "
        f"({' or '.join(PIXEL_SIZE_KEYS)}); pass it with --mpp (µm per WSI pixel)"
    )


def read_hest(sample: str, root: str | Path, *, mpp: float | None = None) -> SpatialSample:
    """Counts, spots (level-0 px of the WSI), WSI and pixel size of HEST sample `sample`."""
    import anndata

    root = Path(root)
    h5ad = root / "st" / f"{sample}.h5ad"
    wsi = _wsi(root, sample)
    missing = [f"st/{sample}.h5ad"] if not h5ad.is_file() else []
    if wsi is None:
        missing.append(f"wsis/{sample}.tif")
    if missing:
        raise MissingSpatialFileError(
            f"HEST sample '{sample}' under {root} lacks {', '.join(missing)}; samples there: "
            f"{list_hest_samples(root) or 'none'}"
        )
    assert wsi is not None
    try:
        adata = anndata.read_h5ad(h5ad)
    except (OSError, KeyError, ValueError) as err:
        raise SpatialDataError(f"cannot read {h5ad}: {err}; download the sample again") from err
    if "spatial" not in adata.obsm:
        raise SpatialDataError(
            f"{h5ad} has no obsm['spatial'] (spot centres in WSI pixels); it is not a HEST "
            "sample, or was saved without its coordinates"
        )
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)  # (N, 2) x, y level-0 px
    if xy.ndim != 2 or xy.shape[1] < 2:
        raise SpatialDataError(f"{h5ad}: obsm['spatial'] must be (spots, 2), got {xy.shape}")
    obs = adata.obs
    n = adata.n_obs
    column = lambda name, default: obs[name].to_numpy() if name in obs else default  # noqa: E731
    spots = SpotTable.build(
        barcodes=adata.obs_names,
        array_row=column("array_row", np.zeros(n, np.int64)),
        array_col=column("array_col", np.zeros(n, np.int64)),
        x_fullres_px=xy[:, 0],
        y_fullres_px=xy[:, 1],
        in_tissue=column("in_tissue", np.ones(n, bool)),
    )
    raw = adata.raw.to_adata() if adata.raw is not None else adata
    counts = sp.csr_matrix(raw.X)
    if counts.nnz and (counts.data < 0).any():
        raise SpatialDataError(f"{h5ad}: X must hold raw (non-negative) counts")
    matrix, genes, merged = merge_duplicate_symbols(counts, list(raw.var_names))
    meta = _metadata(root, sample)
    fullres_mpp, note = _pixel_size(meta, mpp, sample)
    spot_um = _number(meta.get("spot_diameter")) or DEFAULT_SPOT_DIAMETER_UM
    return SpatialSample(
        name=sample,
        kind=SpatialKind.HEST,
        source=root,
        spots=spots,
        matrix=matrix,
        genes=genes,
        image=SpotImage(wsi, ImageLevel.FULLRES, 1.0),
        fullres_mpp=fullres_mpp,
        mpp_source=MppSource.GIVEN if mpp is not None else MppSource.METADATA,
        spot_diameter_um=spot_um,
        notes=(note, f"spot_diameter_um={spot_um:g}", f"duplicate_symbols_merged={merged}"),
    )
