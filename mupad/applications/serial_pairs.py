"""Patch pairs from serial sections: an H&E section and an IHC section of the next cut.

Serial sections are not the same tissue restained: they are cut a few µm apart, so they
must be registered. Here the registration is one affine map fitted by least squares to
matched landmarks (e.g. the ANHIR/CIMA landmark CSVs), with its residual reported in px;
then patch pairs are sampled over tissue: an H&E patch at (x, y) and the IHC pixels at the
affinely mapped location, resampled (bilinear) into the H&E patch's frame, so the two
patches show (approximately) the same tissue at the same orientation.

    he, ihc = load_section(he_path), load_section(ihc_path)
    fit = fit_affine(read_landmarks(he_csv, scale=0.1), read_landmarks(ihc_csv, scale=0.1))
    pairs = sample_patch_pairs(he, ihc, fit.matrix, PairSamplingConfig(patch_size=64))
    split = region_split(pairs, he.width, he.height, seed=0)   # train / held-out regions
    write_pairs(pairs, "pairs/", split)                        # pairs/he/*.png, pairs/ihc/*.png

Coordinates are level-0 pixels, x to the right and y down; an affine `matrix` (2, 3) maps
H&E points to IHC points: [x_ihc, y_ihc] = matrix @ [x_he, y_he, 1]. Everything random
comes from one numpy generator seeded with `seed`.

A pairs folder (`write_pairs` / `read_pairs`) is `he/<name>.png` + `ihc/<name>.png` with the
same names, and an optional `pairs.json` (coordinates, split, registration). Any folder of
matched tiles in that layout (e.g. the BCI dataset's HE/IHC tiles) can be read the same way.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mupad.data.tiles import IMAGE_SUFFIXES
from mupad.data.wsi import MissingMppError, Slide, open_slide
from mupad.data.wsi.tissue import tissue_mask_from_rgb
from mupad.errors import MupadError
from mupad.fileio import atomic_directory

logger = logging.getLogger(__name__)

SPLIT_TRAIN = "train"
SPLIT_HELDOUT = "heldout"
PAIRS_FILE = "pairs.json"
# Plain images without a recorded resolution are read at this nominal µm/px: pairing works
# in pixels and never uses it (the section's `mpp` stays None).
_NOMINAL_MPP = 1.0
_THUMBNAIL_SIZE = 2048


class PairingError(MupadError, ValueError):
    """Landmarks, images or sampling settings that cannot give patch pairs; says how to fix it."""


# --------------------------------------------------------------------------------------
# Sections: an image in memory or an opened slide
# --------------------------------------------------------------------------------------


class Section:
    """One section to read regions from: an RGB array (H, W, 3) uint8 or an opened `Slide`.

    `mpp` is the level-0 µm/px when known (None for a plain image without resolution).
    The tissue mask is computed once, on a thumbnail of at most 2048 px.
    """

    def __init__(
        self, source: np.ndarray | Slide, mpp: float | None = None, name: str = ""
    ) -> None:
        if isinstance(source, np.ndarray):
            if source.ndim != 3 or source.shape[2] != 3 or source.dtype != np.uint8:
                raise PairingError(
                    f"a section array must be uint8 (H, W, 3) RGB, got {source.dtype} "
                    f"{tuple(source.shape)}"
                )
            self._array: np.ndarray | None = source
            self._slide: Slide | None = None
            self.height, self.width = source.shape[:2]
        else:
            self._array, self._slide = None, source
            self.width, self.height = source.width, source.height
            mpp = source.mpp if mpp is None else mpp
        self.mpp = mpp
        self.name = name
        self._mask: tuple[np.ndarray, float] | None = None

    def read(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        """Level-0 box with top-left (x, y) -> uint8 (height, width, 3); outside is white."""
        if self._slide is not None:
            return self._slide.read_region(x, y, 0, width, height)
        assert self._array is not None
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, self.width), min(y + height, self.height)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._array[y0:y1, x0:x1]
        return out

    def thumbnail(self, max_size: int = _THUMBNAIL_SIZE) -> np.ndarray:
        if self._slide is not None:
            return self._slide.thumbnail(max_size)
        assert self._array is not None
        scale = min(1.0, max_size / max(self.width, self.height))
        if scale == 1.0:
            return self._array
        size = (max(1, round(self.width * scale)), max(1, round(self.height * scale)))
        return np.asarray(Image.fromarray(self._array).resize(size, Image.Resampling.BOX))

    def tissue_mask(self) -> tuple[np.ndarray, float]:
        """(bool mask (h, w) at thumbnail scale, thumbnail px per level-0 px)."""
        if self._mask is None:
            thumb = self.thumbnail()
            self._mask = (tissue_mask_from_rgb(thumb), thumb.shape[1] / self.width)
        return self._mask

    def tissue_fraction(self, x: float, y: float, width: float, height: float) -> float:
        """Fraction of tissue in a level-0 box (from the thumbnail mask; 0 outside)."""
        mask, scale = self.tissue_mask()
        x0, y0 = math.floor(x * scale), math.floor(y * scale)
        x1, y1 = (
            max(x0 + 1, math.ceil((x + width) * scale)),
            max(y0 + 1, math.ceil((y + height) * scale)),
        )
        inside = mask[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)]
        return float(inside.sum()) / float((x1 - x0) * (y1 - y0))

    def close(self) -> None:
        if self._slide is not None:
            self._slide.close()


def load_section(path: str | Path, mpp: float | None = None) -> Section:
    """Open an image or whole-slide file as a Section (`mupad.data.wsi.open_slide`).

    Plain JPEG/PNG files that do not record µm/px are opened anyway (pairing works in
    pixels); their `mpp` is then None unless given.
    """
    path = Path(path)
    try:
        slide = open_slide(path, mpp)
        known = mpp if mpp is not None else slide.mpp
    except MissingMppError:
        slide = open_slide(path, _NOMINAL_MPP)
        known = None
    section = Section(slide, name=path.stem)
    section.mpp = known
    return section


# --------------------------------------------------------------------------------------
# Landmarks and the affine fit
# --------------------------------------------------------------------------------------


def read_landmarks(path: str | Path, scale: float = 1.0) -> np.ndarray:
    """A landmark CSV -> (N, 2) float64 (x, y) in level-0 px of the image used.

    The ANHIR/CIMA layout is a header ` ,X,Y` and one row `index,x,y` per landmark; a file
    with only X,Y columns works too. Rows are matched across files by order. `scale`
    multiplies the coordinates (CIMA landmarks are at 50 % scale: use 0.1 for the 5 % images).
    """
    path = Path(path)
    if not path.is_file():
        raise PairingError(f"landmark file {path} does not exist")
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise PairingError(f"landmark file {path} is empty")
    header = [h.strip().lower() for h in lines[0].split(",")]
    if "x" not in header or "y" not in header:
        raise PairingError(
            f"{path}: the header must name X and Y columns (e.g. ' ,X,Y'), got {lines[0]!r}"
        )
    ix, iy = header.index("x"), header.index("y")
    points = []
    for number, line in enumerate(lines[1:], start=2):
        cells = line.split(",")
        try:
            points.append((float(cells[ix]), float(cells[iy])))
        except (IndexError, ValueError) as exc:
            raise PairingError(f"{path}, line {number}: cannot read x, y from {line!r}") from exc
    if not points:
        raise PairingError(f"{path} has a header but no landmarks")
    return np.asarray(points, dtype=np.float64) * float(scale)


@dataclass(frozen=True)
class AffineFit:
    """An affine map H&E -> IHC (level-0 px) and how well it fits the landmarks."""

    matrix: np.ndarray  # (2, 3): [x_ihc, y_ihc] = matrix @ [x_he, y_he, 1]
    residual_rms_px: float  # root-mean-square landmark error after the fit, IHC px
    residual_max_px: float
    loo_rms_px: float  # leave-one-out RMS error (what a new point would see), IHC px
    num_landmarks: int

    def apply(self, points: np.ndarray) -> np.ndarray:
        """(N, 2) H&E points -> (N, 2) IHC points."""
        points = np.asarray(points, dtype=np.float64)
        return points @ self.matrix[:, :2].T + self.matrix[:, 2]

    def to_dict(self) -> dict[str, Any]:
        return {
            "matrix": self.matrix.tolist(),
            "residual_rms_px": self.residual_rms_px,
            "residual_max_px": self.residual_max_px,
            "loo_rms_px": self.loo_rms_px,
            "num_landmarks": self.num_landmarks,
        }


def _lstsq_affine(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    design = np.concatenate([src, np.ones((len(src), 1))], axis=1)  # (N, 3)
    solution, *_ = np.linalg.lstsq(design, dst, rcond=None)  # (3, 2)
    return solution.T  # (2, 3)


def fit_affine(he_points: np.ndarray, ihc_points: np.ndarray) -> AffineFit:
    """Least-squares affine from H&E landmarks (N, 2) to the matching IHC landmarks (N, 2)."""
    he_points = np.asarray(he_points, dtype=np.float64)
    ihc_points = np.asarray(ihc_points, dtype=np.float64)
    if he_points.shape != ihc_points.shape or he_points.ndim != 2 or he_points.shape[1] != 2:
        raise PairingError(
            f"landmarks must be two (N, 2) arrays of the same N, got {he_points.shape} and "
            f"{ihc_points.shape}; the two files must list the same landmarks in the same order"
        )
    count = len(he_points)
    if count < 3:
        raise PairingError(f"an affine fit needs at least 3 landmark pairs, got {count}")
    centred = he_points - he_points.mean(axis=0)
    if np.linalg.matrix_rank(centred, tol=1e-6 * max(1.0, float(np.abs(centred).max()))) < 2:
        raise PairingError("the H&E landmarks are collinear; an affine map is not determined")
    matrix = _lstsq_affine(he_points, ihc_points)
    design = np.concatenate([he_points, np.ones((count, 1))], axis=1)
    errors = np.linalg.norm(design @ matrix.T - ihc_points, axis=1)  # (N,)
    loo = []
    if count > 3:
        for i in range(count):
            keep = np.arange(count) != i
            held = _lstsq_affine(he_points[keep], ihc_points[keep])
            loo.append(float(np.linalg.norm(held @ design[i] - ihc_points[i])))
    return AffineFit(
        matrix=matrix,
        residual_rms_px=float(np.sqrt(np.mean(errors**2))),
        residual_max_px=float(errors.max()),
        loo_rms_px=float(np.sqrt(np.mean(np.square(loo)))) if loo else float("nan"),
        num_landmarks=count,
    )


# --------------------------------------------------------------------------------------
# Sampling pairs
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairSamplingConfig:
    patch_size: int = 64  # side of both patches, px (H&E level 0; IHC in the H&E frame)
    num_pairs: int = 512  # random mode: pairs to draw; grid mode: at most this many (0 = all)
    grid: bool = False  # a regular grid (stride = patch_size) instead of random positions
    min_tissue: float = 0.5  # tissue fraction of the H&E patch (thumbnail tissue mask)
    min_ihc_signal: float = 0.1  # non-glass fraction of the IHC patch (skips tears, glass)
    seed: int = 0
    max_attempts_factor: int = 50  # random mode gives up after num_pairs * this draws

    def __post_init__(self) -> None:
        if self.patch_size < 8:
            raise PairingError(f"patch_size must be >= 8 px, got {self.patch_size}")
        if self.num_pairs < 0:
            raise PairingError(f"num_pairs must be >= 0, got {self.num_pairs}")
        if not (0.0 <= self.min_tissue <= 1.0 and 0.0 <= self.min_ihc_signal <= 1.0):
            raise PairingError(
                f"min_tissue and min_ihc_signal must be in [0, 1], got {self.min_tissue}, "
                f"{self.min_ihc_signal}"
            )
        if not self.grid and self.num_pairs == 0:
            raise PairingError("random sampling needs num_pairs >= 1 (0 means 'all' in grid mode)")


@dataclass
class PatchPairs:
    """Registered patch pairs: he[i] and ihc[i] show the same place of the serial sections."""

    he: np.ndarray  # (N, S, S, 3) uint8
    ihc: np.ndarray  # (N, S, S, 3) uint8, resampled into the H&E patch's frame
    he_xy: np.ndarray  # (N, 2) int64 top-left of the H&E patch, H&E level-0 px
    ihc_xy: np.ndarray  # (N, 2) float64 the H&E patch centre mapped into the IHC section
    names: list[str]
    tissue: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (N,) H&E tissue fraction
    info: dict[str, Any] = field(default_factory=dict)  # registration and sampling settings

    def __len__(self) -> int:
        return len(self.names)

    def subset(self, rows: np.ndarray | list[int]) -> PatchPairs:
        rows = np.asarray(rows, dtype=np.int64)
        return PatchPairs(
            he=self.he[rows],
            ihc=self.ihc[rows],
            he_xy=self.he_xy[rows],
            ihc_xy=self.ihc_xy[rows],
            names=[self.names[i] for i in rows],
            tissue=self.tissue[rows] if len(self.tissue) else self.tissue,
            info=dict(self.info),
        )


def warp_patch(section: Section, matrix: np.ndarray, x: int, y: int, size: int) -> np.ndarray:
    """The IHC pixels under the H&E box (x, y, size) mapped by `matrix` -> uint8 (size, size, 3).

    Output pixel (u, v) samples the section at matrix @ [x + u, y + v, 1] (bilinear); the
    IHC region around the mapped box is read once and warped with PIL.
    """
    corners = np.array([[x, y], [x + size, y], [x, y + size], [x + size, y + size]], float)
    mapped = corners @ matrix[:, :2].T + matrix[:, 2]  # (4, 2)
    left, top = math.floor(mapped[:, 0].min()) - 2, math.floor(mapped[:, 1].min()) - 2
    right, bottom = math.ceil(mapped[:, 0].max()) + 2, math.ceil(mapped[:, 1].max()) + 2
    region = section.read(left, top, right - left, bottom - top)  # (h, w, 3)
    a, b, c = matrix[0]
    d, e, f = matrix[1]
    # Output (u, v) -> region coordinates (the offset of the box folded into c and f).
    coefficients = (a, b, a * x + b * y + c - left, d, e, d * x + e * y + f - top)
    warped = Image.fromarray(region).transform(
        (size, size),
        Image.Transform.AFFINE,
        coefficients,
        Image.Resampling.BILINEAR,
        fillcolor=(255, 255, 255),
    )
    return np.asarray(warped, dtype=np.uint8)


def _mapped_inside(matrix: np.ndarray, x: int, y: int, size: int, section: Section) -> bool:
    corners = np.array([[x, y], [x + size, y], [x, y + size], [x + size, y + size]], float)
    mapped = corners @ matrix[:, :2].T + matrix[:, 2]
    return bool(
        (mapped[:, 0] >= 0).all()
        and (mapped[:, 1] >= 0).all()
        and (mapped[:, 0] <= section.width).all()
        and (mapped[:, 1] <= section.height).all()
    )


# A pixel is glass when it is bright and grey: mean RGB >= GLASS_GREY and max - min channel
# < GLASS_SPREAD. A fixed rule, not Otsu: pale IHC stains (little saturation anywhere) would
# make a per-slide Otsu threshold land inside the tissue.
GLASS_GREY = 225
GLASS_SPREAD = 25


def non_glass_fraction(patch: np.ndarray) -> float:
    """Fraction of the pixels of a uint8 (h, w, 3) patch that are not bright grey glass."""
    pixels = patch.astype(np.int16)
    grey = pixels.mean(axis=-1)
    spread = pixels.max(axis=-1) - pixels.min(axis=-1)
    return float(((grey < GLASS_GREY) | (spread >= GLASS_SPREAD)).mean())


def _candidates(he: Section, config: PairSamplingConfig, rng: np.random.Generator):
    """Top-left positions to try: the grid in a seeded random order, or random draws."""
    size = config.patch_size
    if he.width < size or he.height < size:
        raise PairingError(
            f"the H&E section ({he.width}x{he.height} px) is smaller than one {size}-px patch"
        )
    if config.grid:
        xs = np.arange(0, he.width - size + 1, size)
        ys = np.arange(0, he.height - size + 1, size)
        grid = np.array([(x, y) for y in ys for x in xs], dtype=np.int64)
        yield from grid  # raster order: a grid is deterministic without shuffling
        return
    attempts = max(1, config.num_pairs) * config.max_attempts_factor
    for _ in range(attempts):
        yield np.array(
            [rng.integers(0, he.width - size + 1), rng.integers(0, he.height - size + 1)]
        )


def sample_patch_pairs(
    he: Section, ihc: Section, matrix: np.ndarray, config: PairSamplingConfig | None = None
) -> PatchPairs:
    """Patch pairs over tissue: H&E box (x, y) and the IHC pixels at the mapped place.

    A position is kept when the H&E patch reaches `min_tissue` (its thumbnail tissue mask),
    the mapped box lies inside the IHC section and the warped IHC patch is at least
    `min_ihc_signal` non-glass (`non_glass_fraction`). Random mode draws positions until `num_pairs`
    are kept (raising PairingError if too few are found); grid mode keeps every qualifying
    grid cell in raster order (the first `num_pairs`, when > 0). Deterministic given `seed`.
    """
    config = config or PairSamplingConfig()
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape != (2, 3):
        raise PairingError(f"the affine matrix must be (2, 3), got {matrix.shape}")
    rng = np.random.default_rng(config.seed)
    size = config.patch_size
    kept: list[tuple[int, int, float]] = []
    ihc_patches: list[np.ndarray] = []
    for x, y in _candidates(he, config, rng):
        x, y = int(x), int(y)
        if not _mapped_inside(matrix, x, y, size, ihc):
            continue
        fraction = he.tissue_fraction(x, y, size, size)
        if fraction < config.min_tissue:
            continue
        ihc_patch = warp_patch(ihc, matrix, x, y, size)
        if non_glass_fraction(ihc_patch) < config.min_ihc_signal:
            continue
        kept.append((x, y, fraction))
        ihc_patches.append(ihc_patch)
        if config.num_pairs and len(kept) >= config.num_pairs:
            break
    if not kept or (not config.grid and len(kept) < config.num_pairs):
        raise PairingError(
            f"found {len(kept)} of {config.num_pairs or 'any'} patch pairs with >= "
            f"{config.min_tissue:.0%} H&E tissue and >= {config.min_ihc_signal:.0%} IHC signal; "
            "lower min_tissue or patch_size, ask for fewer pairs, or check that the landmarks "
            "map the H&E onto the IHC section"
        )
    he_patches = np.stack([he.read(x, y, size, size) for x, y, _ in kept])
    he_xy = np.array([(x, y) for x, y, _ in kept], dtype=np.int64)
    centres = he_xy.astype(np.float64) + size / 2.0
    return PatchPairs(
        he=he_patches,
        ihc=np.stack(ihc_patches),
        he_xy=he_xy,
        ihc_xy=centres @ matrix[:, :2].T + matrix[:, 2],
        names=[f"pair_{i:05d}_x{x}_y{y}" for i, (x, y, _) in enumerate(kept)],
        tissue=np.array([f for _, _, f in kept]),
        info={
            "patch_size": size,
            "grid": config.grid,
            "min_tissue": config.min_tissue,
            "min_ihc_signal": config.min_ihc_signal,
            "seed": config.seed,
            "matrix": matrix.tolist(),
            "he": he.name,
            "ihc": ihc.name,
            "he_size": [he.width, he.height],
            "mpp": he.mpp,
        },
    )


def region_split(
    pairs: PatchPairs,
    width: int,
    height: int,
    *,
    blocks: tuple[int, int] = (4, 4),
    heldout_fraction: float = 0.25,
    seed: int = 0,
) -> np.ndarray:
    """Split pairs by region: the H&E section is cut into blocks (columns, rows); a seeded
    random `heldout_fraction` of the blocks is held out.

    Returns a (N,) array of "train" / "heldout" / "" per pair: a pair whose centre lies in a
    held-out block is held out; a pair whose box touches no held-out block is for training;
    the rest straddle a border and are dropped (""), so no training pixel lies in a held-out
    block (up to the registration error on the IHC side).
    """
    columns, rows = blocks
    if columns < 1 or rows < 1 or columns * rows < 2:
        raise PairingError(f"need at least 2 blocks to split by region, got {blocks}")
    if not 0.0 < heldout_fraction < 1.0:
        raise PairingError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    count = columns * rows
    num_heldout = min(count - 1, max(1, round(heldout_fraction * count)))
    rng = np.random.default_rng(seed)
    held = np.zeros(count, dtype=bool)
    held[rng.choice(count, size=num_heldout, replace=False)] = True
    block_w, block_h = width / columns, height / rows
    size = int(pairs.info.get("patch_size", pairs.he.shape[1]))

    def block_of(x: float, y: float) -> int:
        return min(int(y // block_h), rows - 1) * columns + min(int(x // block_w), columns - 1)

    split = np.full(len(pairs), "", dtype=object)
    for i, (x, y) in enumerate(pairs.he_xy):
        if held[block_of(x + size / 2, y + size / 2)]:
            split[i] = SPLIT_HELDOUT
            continue
        touched = {block_of(cx, cy) for cx in (x, x + size - 1) for cy in (y, y + size - 1)}
        if not any(held[b] for b in touched):
            split[i] = SPLIT_TRAIN
    pairs.info["region_split"] = {
        "blocks": [columns, rows],
        "heldout_blocks": np.flatnonzero(held).tolist(),
        "heldout_fraction": heldout_fraction,
        "seed": seed,
    }
    return split.astype(str)


# --------------------------------------------------------------------------------------
# Pairs folders
# --------------------------------------------------------------------------------------


def write_pairs(pairs: PatchPairs, folder: str | Path, split: np.ndarray | None = None) -> Path:
    """Write `folder/he/<name>.png`, `folder/ihc/<name>.png` and `folder/pairs.json` (atomic)."""
    folder = Path(folder)
    if split is not None and len(split) != len(pairs):
        raise PairingError(f"split has {len(split)} entries for {len(pairs)} pairs")
    with atomic_directory(folder) as tmp:
        (tmp / "he").mkdir()
        (tmp / "ihc").mkdir()
        records = []
        for i, name in enumerate(pairs.names):
            Image.fromarray(pairs.he[i]).save(tmp / "he" / f"{name}.png")
            Image.fromarray(pairs.ihc[i]).save(tmp / "ihc" / f"{name}.png")
            record: dict[str, Any] = {
                "name": name,
                "he_xy": pairs.he_xy[i].tolist(),
                "ihc_xy": pairs.ihc_xy[i].tolist(),
            }
            if len(pairs.tissue):
                record["tissue"] = float(pairs.tissue[i])
            if split is not None:
                record["split"] = str(split[i])
            records.append(record)
        (tmp / PAIRS_FILE).write_text(
            json.dumps({"info": pairs.info, "pairs": records}, indent=2) + "\n"
        )
    return folder


def _read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def read_pairs(folder: str | Path) -> tuple[PatchPairs, np.ndarray | None]:
    """A pairs folder -> (pairs, split or None).

    Images are matched by relative path under `he/` and `ihc/` (sorted); with a
    `pairs.json`, its order, coordinates and split are used.
    """
    folder = Path(folder)
    he_dir, ihc_dir = folder / "he", folder / "ihc"
    if not he_dir.is_dir() or not ihc_dir.is_dir():
        raise PairingError(
            f"{folder} is not a pairs folder: it needs he/ and ihc/ subfolders holding "
            "matched tiles with the same file names (written by `mupad staining pairs`)"
        )
    meta_file = folder / PAIRS_FILE
    info: dict[str, Any] = {}
    split = None
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        info = meta.get("info", {})
        records = meta["pairs"]
        names = [r["name"] for r in records]
        he_files = [he_dir / f"{n}.png" for n in names]
        ihc_files = [ihc_dir / f"{n}.png" for n in names]
        if all("split" in r for r in records):
            split = np.array([r["split"] for r in records]).astype(str)
        he_xy = np.array([r.get("he_xy", [0, 0]) for r in records], dtype=np.int64)
        ihc_xy = np.array([r.get("ihc_xy", [0.0, 0.0]) for r in records], dtype=np.float64)
    else:
        he_map = {
            p.relative_to(he_dir).with_suffix(""): p
            for p in sorted(he_dir.rglob("*"))
            if p.suffix.lower() in IMAGE_SUFFIXES
        }
        ihc_map = {
            p.relative_to(ihc_dir).with_suffix(""): p
            for p in sorted(ihc_dir.rglob("*"))
            if p.suffix.lower() in IMAGE_SUFFIXES
        }
        common = sorted(set(he_map) & set(ihc_map))
        if len(common) < len(he_map) or len(common) < len(ihc_map):
            logger.warning(
                "%s: %d he/ and %d ihc/ tiles, %d matched by name; the rest are ignored",
                folder,
                len(he_map),
                len(ihc_map),
                len(common),
            )
        names = [str(key) for key in common]
        he_files = [he_map[key] for key in common]
        ihc_files = [ihc_map[key] for key in common]
        he_xy = np.zeros((len(names), 2), dtype=np.int64)
        ihc_xy = np.zeros((len(names), 2), dtype=np.float64)
    if not names:
        raise PairingError(f"{folder}: no matched he/ and ihc/ tiles")
    missing = [str(p) for p in he_files + ihc_files if not p.is_file()]
    if missing:
        raise PairingError(f"{folder}: pairs.json lists tiles that are missing: {missing[:3]}")
    he = [_read_rgb(p) for p in he_files]
    ihc = [_read_rgb(p) for p in ihc_files]
    shapes = {a.shape for a in he + ihc}
    if len(shapes) != 1:
        raise PairingError(
            f"{folder}: all tiles must share one size, found {sorted(shapes)}; resize them first"
        )
    return (
        PatchPairs(
            he=np.stack(he),
            ihc=np.stack(ihc),
            he_xy=he_xy,
            ihc_xy=ihc_xy,
            names=names,
            info=info,
        ),
        split,
    )


def grid_tiles(
    section: Section, tile_size: int, min_tissue: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping tissue tiles of one section -> (tiles (N, S, S, 3) uint8, xy (N, 2))."""
    if section.width < tile_size or section.height < tile_size:
        raise PairingError(
            f"the section ({section.width}x{section.height} px) is smaller than one "
            f"{tile_size}-px tile"
        )
    xy = []
    for y in range(0, section.height - tile_size + 1, tile_size):
        for x in range(0, section.width - tile_size + 1, tile_size):
            if section.tissue_fraction(x, y, tile_size, tile_size) >= min_tissue:
                xy.append((x, y))
    if not xy:
        raise PairingError(
            f"no {tile_size}-px tile of {section.name or 'the section'} holds >= "
            f"{min_tissue:.0%} tissue; lower min_tissue"
        )
    tiles = np.stack([section.read(x, y, tile_size, tile_size) for x, y in xy])
    return tiles, np.array(xy, dtype=np.int64)
