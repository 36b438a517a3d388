"""Spots -> (H&E patch, pathway scores) pairs on disk: the ST training/conditioning set.

`extract_spots` reads a Visium (Space Ranger) folder or a HER2ST section, cuts one
`patch_um`-wide patch around every spot centre, resamples it to `size` x `size` px, scores
each spot's counts against the gene sets with the bulk pipeline's own functions
(normalise -> drop uninformative genes -> score), and writes

    out_dir/patches/<barcode>.png   one RGB patch per spot
    out_dir/scores.csv              spots x gene sets (index = barcode)
    out_dir/manifest.csv            barcode, patch path, coordinates, in_tissue, mpp, ...
    out_dir/summary.json            what was read, decided, skipped and why

All checks run before anything is written, and the folder is assembled under a temporary
name and renamed at the end, so a failure leaves no partial output.

Gene symbols: matching to gene sets is by upper-cased symbol (the canonical form of
`mupad.omics.ids`). For human counts against human sets that is exact. Mouse-style
symbols ("Actb") would match human sets only through upper-casing, which is an
*approximate* orthology (most 1:1 orthologs share the symbol, many do not: H2-* vs HLA-*,
species-specific families). That is refused unless `uppercase_symbols=True`, and the
overlap is reported either way.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm.auto import tqdm

from mupad.config import parse_enum
from mupad.fileio import atomic_directory
from mupad.omics.filters import drop_uninformative_genes
from mupad.omics.genesets import GeneSets, default_gene_sets, load_gmt
from mupad.omics.ids import canonical_gene_id
from mupad.omics.normalize import normalise_counts
from mupad.omics.scoring import ScoringMethod, score_pathways
from mupad.omics.spatial.errors import (
    MissingSpatialFileError,
    OutputExistsError,
    ScaleFactorError,
    SpatialDataError,
    SpotsOutsideImageError,
)
from mupad.omics.spatial.her2st import list_her2st_sections, read_her2st
from mupad.omics.spatial.hest import is_hest_folder, list_hest_samples, read_hest
from mupad.omics.spatial.images import (
    PatchBox,
    TissueImage,
    cut_patch,
    open_tissue_image,
    patch_box,
)
from mupad.omics.spatial.matrix import merge_duplicate_symbols
from mupad.omics.spatial.space_ranger import read_space_ranger, resolve_outs
from mupad.omics.spatial.spots import ImageLevel, SpatialKind, SpatialSample

logger = logging.getLogger(__name__)

TOOL_NAME = "mupad st extract"
DEFAULT_PATCH_UM = 55.0
DEFAULT_SIZE = 256
SCORE_CHUNK_SPOTS = 512  # spots normalised and scored at a time (bounds dense memory)
MOUSE_STYLE_MIN_FRACTION = 0.5  # of alphabetic symbols in "Abc1" case -> mouse-style
ENLARGE_WARN_FACTOR = 4.0
PNG_COMPRESS_LEVEL = 1  # lossless either way; level 1 is ~4x faster than 6 on H&E texture  # warn when patches are upsampled more than this
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


class SymbolStyle(str, enum.Enum):
    HUMAN = "human-like (upper case)"
    MOUSE = "mouse-like (capitalised, e.g. Actb)"


def detect_kind(folder: str | Path) -> SpatialKind:
    """Visium (Space Ranger), HER2ST or HEST-1k layout, from the folder's contents."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingSpatialFileError(f"{folder} does not exist or is not a folder")
    if is_hest_folder(folder):
        return SpatialKind.HEST
    if all((folder / sub).is_dir() for sub in ("counts", "spots", "images")):
        return SpatialKind.HER2ST
    try:
        resolve_outs(folder)
    except MissingSpatialFileError:
        raise SpatialDataError(
            f"{folder} is neither a Space Ranger output (spatial/ + filtered_feature_bc_matrix), "
            "a HER2ST folder (counts/, spots/, images/) nor a HEST-1k folder (st/, wsis/, "
            "metadata/); pass the right folder or kind="
        ) from None
    return SpatialKind.VISIUM


def load_sample(
    folder: str | Path,
    *,
    kind: SpatialKind | None = None,
    section: str | None = None,
    image: str | Path | None = None,
    image_level: ImageLevel | None = None,
    mpp: float | None = None,
) -> SpatialSample:
    """Read a Visium folder, one HER2ST section or one HEST-1k sample (`section` = its id);
    the layout is auto-detected unless `kind` is given."""
    kind = detect_kind(folder) if kind is None else parse_enum(SpatialKind, kind)
    if kind is SpatialKind.HEST:
        return _load_hest(folder, section, image, image_level, mpp)
    if kind is SpatialKind.HER2ST:
        if image is not None or image_level is not None:
            raise SpatialDataError(
                "image/image_level apply to Visium; HER2ST uses images/<section>_*"
            )
        if section is None:
            sections = list_her2st_sections(folder)
            if len(sections) != 1:
                raise SpatialDataError(
                    f"{folder} holds HER2ST sections {sections or 'none'}; choose one with "
                    "section=... (CLI: --section)"
                )
            section = sections[0]
        return read_her2st(section, folder, mpp=mpp)
    if section is not None:
        raise SpatialDataError("section= applies to HER2ST folders only")
    return read_space_ranger(folder, image=image, image_level=image_level, mpp=mpp)


def _load_hest(
    folder: str | Path,
    sample: str | None,
    image: str | Path | None,
    image_level: ImageLevel | None,
    mpp: float | None,
) -> SpatialSample:
    if image is not None or image_level is not None:
        raise SpatialDataError("image/image_level apply to Visium; HEST uses wsis/<id>.tif")
    if sample is None:
        samples = list_hest_samples(folder)
        if len(samples) != 1:
            raise SpatialDataError(
                f"{folder} holds HEST samples {samples or 'none'}; choose one with "
                "section=... (CLI: --section)"
            )
        sample = samples[0]
    return read_hest(sample, folder, mpp=mpp)


def symbol_style(genes: Sequence[str]) -> tuple[SymbolStyle, float]:
    """Mouse-style symbols are capitalised (Actb, Cd74); human ones upper case (ACTB)."""
    alphabetic = [g for g in genes if any(c.isalpha() for c in g)]
    if not alphabetic:
        return SymbolStyle.HUMAN, 0.0
    capitalised = sum(g[0].isupper() and any(c.islower() for c in g[1:]) for g in alphabetic)
    fraction = capitalised / len(alphabetic)
    style = SymbolStyle.MOUSE if fraction >= MOUSE_STYLE_MIN_FRACTION else SymbolStyle.HUMAN
    return style, fraction


def check_symbols(genes: Sequence[str], uppercase_symbols: bool) -> tuple[SymbolStyle, float]:
    """Refuse mouse-style symbols against (human) gene sets unless upper-casing is accepted."""
    style, fraction = symbol_style(list(genes))
    if style is SymbolStyle.MOUSE and not uppercase_symbols:
        example = next((g for g in genes if g[:1].isupper() and g[1:2].islower()), "")
        raise SpatialDataError(
            f"{fraction:.0%} of the gene symbols look mouse-style (e.g. {example!r}); gene sets "
            "are matched by upper-cased symbol, which across species is only an approximate "
            "orthology. Pass uppercase_symbols=True (CLI: --uppercase-symbols) to accept that, "
            "ideally with a gene-set file for the same species (--gene-sets)"
        )
    return style, fraction


@dataclass(frozen=True)
class ScoreResult:
    scores: pd.DataFrame  # (spots, gene sets)
    report: dict[str, Any]


def _resolve_gene_sets(gene_sets: GeneSets | str | Path | None) -> GeneSets:
    if gene_sets is None:
        return default_gene_sets()
    if isinstance(gene_sets, GeneSets):
        return gene_sets
    return load_gmt(gene_sets)


def score_spots(
    counts: pd.DataFrame,
    gene_sets: GeneSets,
    method: ScoringMethod | str = ScoringMethod.SSGSEA,
    *,
    uppercase_symbols: bool = False,
    progress: bool = False,
) -> ScoreResult:
    """Pathway scores of spots (rows of raw `counts`, spots x gene symbols; dense or sparse).

    See `score_count_matrix` for the steps.
    """
    if all(isinstance(t, pd.SparseDtype) for t in counts.dtypes) and counts.shape[1]:
        matrix = sp.csr_matrix(counts.sparse.to_coo())
    else:
        matrix = sp.csr_matrix(counts.to_numpy())
    return score_count_matrix(
        matrix, counts.index, counts.columns, gene_sets, method,
        uppercase_symbols=uppercase_symbols, progress=progress,
    )  # fmt: skip


def score_count_matrix(
    counts: sp.csr_matrix,
    barcodes: pd.Index,
    genes: pd.Index,
    gene_sets: GeneSets,
    method: ScoringMethod | str = ScoringMethod.SSGSEA,
    *,
    uppercase_symbols: bool = False,
    progress: bool = False,
) -> ScoreResult:
    """Pathway scores of spots with the bulk RNA pipeline's steps:
    log1p CPM per spot -> drop mitochondrial/housekeeping genes -> `score_pathways`.

    `counts` is (spots, genes) raw counts with rows `barcodes` and columns `genes`.
    ssGSEA scores each spot on its own, so spots go through in chunks of
    `SCORE_CHUNK_SPOTS` (bounding the dense memory; results do not depend on chunking).
    The z-score method standardises genes across spots, so all spots are scored together
    and the scores depend on which spots were extracted.
    """
    method = parse_enum(ScoringMethod, method)
    if counts.shape[0] == 0:
        raise SpatialDataError("no spots to score: the counts table has no rows")
    genes = pd.Index([str(g) for g in genes])
    style, fraction = check_symbols(genes, uppercase_symbols)
    # Sum symbols that collide once canonical (upper case) so the gene columns stay unique.
    matrix, canonical, merged = merge_duplicate_symbols(
        counts, [canonical_gene_id(g) for g in genes]
    )
    chunk = SCORE_CHUNK_SPOTS if method is ScoringMethod.SSGSEA else counts.shape[0]
    starts = range(0, counts.shape[0], chunk)

    # Spot counts are UMIs (no transcript-length bias), so CPM is the right scale; the bulk
    # normaliser's "no gene lengths -> CPM" warning is expected here and silenced, and the
    # scorer's "sets left out" warning is shown for the first chunk only (it is the same).
    chunks: list[pd.DataFrame] = []
    overlap: frozenset[str] = frozenset()
    genes_after_filter = 0
    bar = tqdm(starts, desc="scoring spots", unit="chunk", disable=not progress or len(starts) < 2)
    for start in bar:
        rows = slice(start, min(start + chunk, counts.shape[0]))
        dense = pd.DataFrame(
            matrix[rows].toarray().astype(np.float64), index=barcodes[rows], columns=canonical
        )  # (chunk, genes)
        with _drop_log_messages("mupad.omics.normalize", "no gene lengths given"):
            expression = drop_uninformative_genes(normalise_counts(dense))
        if not chunks:
            genes_after_filter = expression.shape[1]
            overlap = gene_sets.genes.intersection(expression.columns)
        repeat = "gene sets left out" if chunks else "\0"  # "\0" never occurs: drop nothing
        with _drop_log_messages("mupad.omics.scoring", repeat):
            one_pass = len(starts) == 1
            chunks.append(
                score_pathways(expression, gene_sets, method, progress=progress and one_pass)
            )
    scores = pd.concat(chunks)
    scores.index.name = "barcode"
    per_set = np.array([len(overlap.intersection(m)) for m in gene_sets.values()])
    sizes = np.array([len(m) for m in gene_sets.values()])
    report = {
        "gene_sets_source": gene_sets.source or "in-memory",
        "gene_sets_sha256": gene_sets.sha256,
        "gene_sets": len(gene_sets),
        "gene_sets_scored": scores.shape[1],
        "method": method.value,
        "normalisation": "log1p CPM per spot (UMI counts: no gene-length correction)",
        "symbol_style": style.value,
        "mouse_style_fraction": round(fraction, 4),
        "symbol_matching": (
            "upper-cased symbols (approximate cross-species orthology)"
            if style is SymbolStyle.MOUSE
            else "upper-cased symbols (same species)"
        ),
        "genes_in_counts": len(genes),
        "genes_merged_by_case": merged,
        "genes_after_filtering": genes_after_filter,
        "genes_in_gene_sets": len(gene_sets.genes),
        "genes_overlapping": len(overlap),
        "set_overlap_fraction_min": round(float((per_set / sizes).min()), 4),
        "set_overlap_fraction_median": round(float(np.median(per_set / sizes)), 4),
        "sets_without_overlap": int((per_set == 0).sum()),
    }
    if method is ScoringMethod.ZSCORE:
        report["note"] = "z-scores are relative to the spots extracted together"
    logger.info(
        "scored %d spots on %d gene sets; %d of %d gene-set genes found in the counts",
        len(scores), scores.shape[1], len(overlap), len(gene_sets.genes),
    )  # fmt: skip
    return ScoreResult(scores, report)


class _DropMessage(logging.Filter):
    def __init__(self, fragment: str) -> None:
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


@contextlib.contextmanager
def _drop_log_messages(logger_name: str, fragment: str) -> Iterator[None]:
    """Hide records of `logger_name` whose message contains `fragment`, inside the block."""
    target = logging.getLogger(logger_name)
    drop = _DropMessage(fragment)
    target.addFilter(drop)
    try:
        yield
    finally:
        target.removeFilter(drop)


def _patch_names(barcodes: pd.Index) -> list[str]:
    names, seen = [], set()
    for barcode in barcodes:
        stem = _UNSAFE.sub("_", barcode) or "spot"
        name, k = stem, 1
        while name in seen:
            k += 1
            name = f"{stem}_{k}"
        seen.add(name)
        names.append(f"{name}.png")
    return names


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise OutputExistsError(f"{out_dir} exists and is a file; choose another output folder")
    if not any(out_dir.iterdir()):
        return
    summary = out_dir / "summary.json"
    ours = False
    if summary.is_file():
        try:
            ours = json.loads(summary.read_text()).get("tool") == TOOL_NAME
        except (json.JSONDecodeError, AttributeError):
            ours = False
    if not ours:
        raise OutputExistsError(
            f"{out_dir} exists and is not an earlier `{TOOL_NAME}` output; choose an empty or "
            "new folder (it would be replaced as a whole)"
        )
    if not overwrite:
        raise OutputExistsError(
            f"{out_dir} holds an earlier extraction; pass overwrite=True (CLI: --overwrite) to "
            "replace it"
        )


def _outside_message(
    num_spots: int,
    outside: list[tuple[str, PatchBox]],
    image: TissueImage,
    side_px: float,
) -> str:
    shown = ", ".join(
        f"{b} (box x {box.left:.0f}..{box.right:.0f}, y {box.top:.0f}..{box.bottom:.0f})"
        for b, box in outside[:5]
    )
    more = f" and {len(outside) - 5} more" if len(outside) > 5 else ""
    return (
        f"{len(outside)} of {num_spots} spots have a patch ({side_px:.1f} px wide) that "
        f"leaves the {image.width}x{image.height} px image {image.path.name}: "
        f"{shown}{more}. Pass skip_outside=True (CLI: --skip-outside) to leave them out, use a "
        "smaller patch_um, or check that the image and positions belong together"
    )


def extract_spots(
    source: str | Path | SpatialSample,
    out_dir: str | Path,
    *,
    kind: SpatialKind | None = None,
    section: str | None = None,
    image: str | Path | None = None,
    image_level: ImageLevel | None = None,
    patch_um: float = DEFAULT_PATCH_UM,
    size: int = DEFAULT_SIZE,
    gene_sets: GeneSets | str | Path | None = None,
    method: ScoringMethod | str = ScoringMethod.SSGSEA,
    mpp: float | None = None,
    skip_outside: bool = False,
    uppercase_symbols: bool = False,
    barcodes: Sequence[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write patches + scores + manifest for every spot with counts; returns manifest.csv.

    `source` is a folder (Visium or HER2ST, see `load_sample`) or an already read sample.
    `mpp` is µm per pixel of the full-resolution frame (overrides the scale factors);
    `barcodes` restricts the spots. Raises (before writing anything) on missing files or
    scale factors, unusable images, spots outside the image (unless `skip_outside`) and an
    existing output folder that is not ours (or ours without `overwrite`).
    """
    method = parse_enum(ScoringMethod, method)
    if not patch_um > 0:
        raise SpatialDataError(
            f"patch_um (--patch-um) must be a positive size in µm, got {patch_um}"
        )
    if size < 8:
        raise SpatialDataError(f"size (--size) must be at least 8 px, got {size}")
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite)
    if isinstance(source, SpatialSample):
        sample = source
        if mpp is not None:
            raise SpatialDataError("pass mpp= to load_sample, not with an already read sample")
    else:
        sample = load_sample(
            source, kind=kind, section=section, image=image, image_level=image_level, mpp=mpp
        )
    if barcodes is not None:
        unknown = pd.Index(barcodes).difference(sample.spots.barcodes)
        if len(unknown):
            raise SpatialDataError(
                f"{len(unknown)} requested barcode(s) have no counts in {sample.name}, e.g. "
                f"{unknown[:3].tolist()}"
            )
        chosen = list(dict.fromkeys(barcodes))
    else:
        chosen = list(sample.spots.barcodes)
    if sample.fullres_mpp is None:
        raise ScaleFactorError(
            f"the pixel size of {sample.source} is unknown: its scalefactors_json.json has no "
            "'spot_diameter_fullres'; pass mpp=<µm per full-resolution pixel> (CLI: --mpp)"
        )
    if sample.image is None:
        raise MissingSpatialFileError(
            f"{sample.source} has no tissue image (spatial/tissue_hires_image.png or "
            "tissue_lowres_image.png); pass the full-resolution H&E with image= (CLI: --image)"
        )
    gene_sets = _resolve_gene_sets(gene_sets)
    check_symbols(sample.genes, uppercase_symbols)  # fail before touching the image
    source_mpp = sample.fullres_mpp / sample.image.scale  # µm per pixel of the image used
    side_px = patch_um / source_mpp  # patch side in image pixels
    if side_px < 1:
        raise SpatialDataError(
            f"a {patch_um:g} µm patch is {side_px:.2f} px in {sample.image.path.name} "
            f"({source_mpp:.2f} µm/px): smaller than one pixel; use a larger patch_um or a "
            "higher-resolution image"
        )
    spots = sample.spots.frame.loc[chosen]
    xs = spots["x_fullres_px"].to_numpy() * sample.image.scale
    ys = spots["y_fullres_px"].to_numpy() * sample.image.scale
    boxes = [patch_box(x, y, side_px) for x, y in zip(xs, ys)]
    warnings: list[str] = []
    enlarge = size / side_px
    if enlarge > ENLARGE_WARN_FACTOR:
        warnings.append(
            f"patches are enlarged {enlarge:.1f}x from {side_px:.1f} px of "
            f"{sample.image.path.name}: they hold only {source_mpp:.2f} µm/px of detail"
        )
        logger.warning(warnings[-1])

    with open_tissue_image(sample.image.path) as tissue:
        outside = [
            (b, box) for b, box in zip(chosen, boxes) if not box.inside(tissue.width, tissue.height)
        ]
        image_wh = (tissue.width, tissue.height)
        if outside and not skip_outside:
            raise SpotsOutsideImageError(
                _outside_message(len(chosen), outside, tissue, side_px),
                tuple(b for b, _ in outside),
            )
        skipped = {b: "patch leaves the image" for b, _ in outside}
        chosen_rows = sample.rows(chosen)
        totals = np.asarray(sample.matrix[chosen_rows].sum(axis=1)).ravel()
        detected = np.diff(sample.matrix[chosen_rows].indptr)
        for barcode in np.asarray(chosen)[totals <= 0]:
            skipped.setdefault(str(barcode), "no counts (cannot be normalised or scored)")
        keep = np.array([b not in skipped for b in chosen])
        if not keep.any():
            reasons = pd.Series(list(skipped.values())).value_counts().to_dict()
            raise SpatialDataError(
                f"no spot of {sample.name} is left to extract; skipped: {reasons}"
            )
        if skipped:
            logger.warning("skipping %d spot(s); reasons in summary.json", len(skipped))
        kept = spots.index[keep]
        kept_boxes = [box for box, k in zip(boxes, keep) if k]
        scored = score_count_matrix(
            sample.matrix[chosen_rows[keep]], kept, sample.genes, gene_sets, method,
            uppercase_symbols=uppercase_symbols, progress=progress,
        )  # fmt: skip
        names = _patch_names(kept)

        with atomic_directory(out_dir) as tmp:
            patch_dir = tmp / "patches"
            patch_dir.mkdir()
            bar = tqdm(
                list(zip(names, kept_boxes)), desc="patches", unit="spot", disable=not progress
            )
            for name, box in bar:
                cut_patch(tissue, box, size).save(
                    patch_dir / name, compress_level=PNG_COMPRESS_LEVEL
                )
            scored.scores.to_csv(tmp / "scores.csv")
            manifest = pd.DataFrame(
                {
                    "barcode": kept,
                    "patch": [f"patches/{n}" for n in names],
                    "x_fullres_px": spots.loc[kept, "x_fullres_px"].to_numpy(),
                    "y_fullres_px": spots.loc[kept, "y_fullres_px"].to_numpy(),
                    "x_image_px": xs[keep],
                    "y_image_px": ys[keep],
                    "array_row": spots.loc[kept, "array_row"].to_numpy(),
                    "array_col": spots.loc[kept, "array_col"].to_numpy(),
                    "in_tissue": spots.loc[kept, "in_tissue"].to_numpy(),
                    "patch_um": patch_um,
                    "source_side_px": side_px,
                    "source_mpp": source_mpp,
                    "patch_mpp": patch_um / size,
                    "total_counts": totals[keep],
                    "genes_detected": detected[keep],
                }
            )
            manifest.to_csv(tmp / "manifest.csv", index=False)
            summary = {
                "tool": TOOL_NAME,
                "kind": sample.kind.value,
                "sample": sample.name,
                "source": str(sample.source),
                "image": {
                    "path": str(sample.image.path),
                    "level": sample.image.level.value,
                    "scale_to_fullres": sample.image.scale,
                    "width_px": image_wh[0],
                    "height_px": image_wh[1],
                },
                "fullres_mpp": sample.fullres_mpp,
                "mpp_source": sample.mpp_source.value if sample.mpp_source else None,
                "source_mpp": source_mpp,
                "spot_diameter_um": sample.spot_diameter_um,
                "patch_um": patch_um,
                "patch_size_px": size,
                "patch_mpp": patch_um / size,
                "source_side_px": side_px,
                "spots_with_counts": sample.num_spots,
                "spots_requested": len(chosen),
                "spots_written": int(keep.sum()),
                "spots_in_tissue_written": int(spots.loc[kept, "in_tissue"].sum()),
                "skipped": [{"barcode": b, "reason": r} for b, r in skipped.items()],
                "positions_without_counts": len(sample.spots_without_counts),
                "scoring": scored.report,
                "warnings": warnings,
                "reader_notes": list(sample.notes),
            }
            (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return out_dir / "manifest.csv"
