"""Read one section of the HER2ST layout (legacy Spatial Transcriptomics, Andersson et al. 2021).

    <root>/counts/<section>.tsv(.gz)        rows = spots "{x}x{y}", columns = gene symbols, raw counts
    <root>/spots/<section>_selection.tsv    x, y (array), [new_x, new_y], pixel_x, pixel_y, selected
    <root>/images/<section>_*.jpg|png|tif   the full-resolution H&E the pixel coordinates refer to

Barcodes are "{x}x{y}"; `selected == 1` marks spots under tissue. Legacy ST spots are
100 µm wide on a 200 µm pitch and the images carry no pixel size, so unless `mpp` is given
it is estimated from the spot grid: a least-squares fit of pixel ~ array coordinates gives
pixels per array step, and mpp = 200 µm / that step (an estimate, recorded as such).
"""

from __future__ import annotations

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
from mupad.omics.spatial.matrix import merge_duplicate_symbols
from mupad.omics.spatial.spots import (
    ImageLevel,
    MppSource,
    SpatialKind,
    SpatialSample,
    SpotImage,
    SpotTable,
)

logger = logging.getLogger(__name__)

ST_SPOT_DIAMETER_UM = 100.0
ST_SPOT_PITCH_UM = 200.0
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
SPOT_FILE_COLUMNS = ("x", "y", "pixel_x", "pixel_y")


def list_her2st_sections(root: str | Path) -> list[str]:
    """Sections that have all three parts (counts, spots, image) under `root`."""
    root = Path(root)
    sections = []
    for spot_file in sorted((root / "spots").glob("*_selection.tsv")):
        name = spot_file.name[: -len("_selection.tsv")]
        has_counts = any((root / "counts" / f"{name}.tsv{z}").is_file() for z in ("", ".gz"))
        if has_counts and _section_images(root, name):
            sections.append(name)
    return sections


def _section_images(root: Path, section: str) -> list[Path]:
    folder = root / "images"
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_SUFFIXES
        and (p.stem == section or p.name.startswith(f"{section}_"))
    )


def estimate_pitch_px(spots: pd.DataFrame) -> tuple[float, float]:
    """Pixels per array step along x and y from a least-squares fit of pixel ~ array coords."""
    ax = spots["new_x"] if "new_x" in spots else spots["x"]
    ay = spots["new_y"] if "new_y" in spots else spots["y"]
    design = np.column_stack([ax, ay, np.ones(len(spots))]).astype(float)  # (N, 3)
    if len(spots) < 3 or np.linalg.matrix_rank(design) < 3:
        raise ScaleFactorError(
            "too few spots (or all on one line) to estimate the pixel size from the spot grid; "
            "pass mpp=<µm per pixel> (CLI: --mpp)"
        )
    pixels = spots[["pixel_x", "pixel_y"]].to_numpy(dtype=float)  # (N, 2)
    coef, *_ = np.linalg.lstsq(design, pixels, rcond=None)  # rows: d/dx, d/dy, offset
    step_x = float(np.hypot(*coef[0]))
    step_y = float(np.hypot(*coef[1]))
    residual = pixels - design @ coef
    rms = float(np.sqrt((residual**2).sum(axis=1).mean()))
    if rms > 0.25 * min(step_x, step_y):
        logger.warning(
            "spot pixels fit the array grid poorly (rms %.1f px vs step %.1f px); the "
            "estimated mpp is unreliable, pass mpp=...",
            rms,
            min(step_x, step_y),
        )
    return step_x, step_y


def read_her2st(section: str, root: str | Path, *, mpp: float | None = None) -> SpatialSample:
    """Counts, spot table and H&E of one HER2ST section (e.g. "B4") under `root`."""
    root = Path(root)
    counts_path = next(
        (
            p
            for p in (root / "counts" / f"{section}.tsv.gz", root / "counts" / f"{section}.tsv")
            if p.is_file()
        ),
        None,
    )
    spots_path = root / "spots" / f"{section}_selection.tsv"
    images = _section_images(root, section)
    missing = []
    if counts_path is None:
        missing.append(f"counts/{section}.tsv.gz")
    if not spots_path.is_file():
        missing.append(f"spots/{section}_selection.tsv")
    if not images:
        missing.append(f"images/{section}_*.jpg")
    if missing:
        available = list_her2st_sections(root) if root.is_dir() else []
        raise MissingSpatialFileError(
            f"HER2ST section '{section}' under {root} lacks {', '.join(missing)}; "
            f"complete sections there: {available or 'none'}"
        )
    if len(images) > 1:
        raise SpatialDataError(
            f"several images match section '{section}': {[p.name for p in images]}; keep one"
        )
    assert counts_path is not None

    table = pd.read_csv(spots_path, sep="\t")
    lacking = [c for c in SPOT_FILE_COLUMNS if c not in table.columns]
    if lacking:
        raise SpatialDataError(
            f"{spots_path} lacks column(s) {lacking}; expected x, y, pixel_x, pixel_y, selected"
        )
    barcodes = [f"{int(x)}x{int(y)}" for x, y in zip(table["x"], table["y"])]
    selected = (
        table["selected"].to_numpy() == 1 if "selected" in table else np.ones(len(table), bool)
    )
    spots = SpotTable.build(
        barcodes=barcodes,
        array_row=table["y"].to_numpy(),
        array_col=table["x"].to_numpy(),
        x_fullres_px=table["pixel_x"].to_numpy(),
        y_fullres_px=table["pixel_y"].to_numpy(),
        in_tissue=selected,
    )

    try:
        raw = pd.read_csv(counts_path, sep="\t", index_col=0)
    except (ValueError, OSError) as err:
        raise SpatialDataError(f"cannot read counts {counts_path}: {err}") from err
    raw.index = raw.index.astype(str)
    if raw.index.has_duplicates:
        raise SpatialDataError(
            f"{counts_path} lists spot(s) twice, e.g. {raw.index[raw.index.duplicated()][:3].tolist()}"
        )
    values = raw.to_numpy()
    if not np.issubdtype(values.dtype, np.number) or (values < 0).any():
        raise SpatialDataError(f"{counts_path} must hold non-negative numeric counts")
    counts, genes, merged = merge_duplicate_symbols(values, raw.columns)
    unknown = raw.index.difference(spots.barcodes)
    if len(unknown):
        raise BarcodeMismatchError(
            f"{len(unknown)} of {len(raw)} spots of {counts_path.name} are not in "
            f"{spots_path.name} (e.g. {sorted(unknown)[:3]}); rows must be named "
            "'{x}x{y}' after the spot file's x and y"
        )
    without = spots.barcodes.difference(raw.index, sort=False)
    if len(without):
        logger.info("%s: %d spot(s) have no counts and are left out", section, len(without))

    if mpp is not None:
        if not mpp > 0:
            raise ScaleFactorError(f"mpp must be a positive number of µm per pixel, got {mpp}")
        fullres_mpp, source = float(mpp), MppSource.GIVEN
        notes = [f"mpp given: {mpp:g}"]
    else:
        step_x, step_y = estimate_pitch_px(table)
        if abs(step_x - step_y) > 0.05 * max(step_x, step_y):
            logger.warning(
                "%s: spot pitch differs along x (%.1f px) and y (%.1f px); using the mean",
                section,
                step_x,
                step_y,
            )
        fullres_mpp = ST_SPOT_PITCH_UM / ((step_x + step_y) / 2)
        source = MppSource.ARRAY_PITCH
        pitch = f"{step_x:.2f} px (x), {step_y:.2f} px (y) per {ST_SPOT_PITCH_UM:g} µm"
        notes = [f"array pitch {pitch} -> estimated mpp {fullres_mpp:.4f}"]
    notes.append(f"duplicate_symbols_merged={merged}")
    return SpatialSample(
        name=section,
        kind=SpatialKind.HER2ST,
        source=root,
        spots=spots.select(raw.index),
        matrix=counts,
        genes=genes,
        image=SpotImage(images[0], ImageLevel.FULLRES, 1.0),
        fullres_mpp=fullres_mpp,
        mpp_source=source,
        spot_diameter_um=ST_SPOT_DIAMETER_UM,
        spots_without_counts=tuple(without),
        notes=tuple(notes),
    )
