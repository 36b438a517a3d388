"""What `mupad prepare` reads: slide folders, tile folders and paired-file manifests.

Every input becomes a sorted list of `Source`s, the unit of work, of resumption and of
distribution over ranks (`sources[rank::world_size]`):

  slides   one slide file, or every file under the folder whose suffix is in
           `mupad.data.wsi.SLIDE_SUFFIXES` (recursively); one source per slide, id = its
           relative path without suffix ("/" -> "__", "-" -> "_"), tiled on tissue later.
           A folder is slides when it holds a slide-only format or a TIFF that is a slide
           (pyramidal, tiled, OME or large: `mupad.data.wsi.looks_like_slide`).
  tiles    an ImageFolder layout `root/<class_name>/<tile>.png|jpg|tif...`; label = the
           class's index in sorted order, caption = `captions[<class>/<file>]`, else
           `captions[<class>]`, else the class name. Images directly in `root` get label -1.
           Tiles are cut into chunks of `tiles_per_source`: ids `tiles_00000`, ...
  paired   a CSV manifest (see `PAIRED_COLUMNS`); rows in file order, chunked like tiles:
           ids `paired_00000`, ...

A tile or row is read with `read_tile_image`; an unreadable one raises `CorruptInputError`,
which the runner counts and skips.
"""

from __future__ import annotations

import csv
import enum
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from mupad.data.tiles import IMAGE_SUFFIXES, UnreadableTileError, open_rgb
from mupad.errors import MupadError

PAIRED_COLUMNS = {
    "image": "required: path of the image (absolute, or relative to the CSV's folder)",
    "caption": "optional: the text condition ('' = no caption)",
    "label": "optional: an integer class label, or a class name (names get sorted indices)",
    "rna_file": "optional: path of a pathway-score vector (.npy, or .csv/.tsv/.txt numbers)",
    "rna_<name>": "optional: any number of columns, one pathway score each, in column order "
    "(empty = missing; rows without any RNA get NaN scores, i.e. RNA absent); the names "
    "after 'rna_' are recorded as the pathway names",
}
RNA_PREFIX = "rna_"
RNA_FILE_COLUMN = "rna_file"
UNKNOWN = -1  # label, x, y or mpp that a source does not know


class PrepareError(MupadError, ValueError):
    """The input of `mupad prepare` is unusable; the message says how to fix it."""


class CorruptInputError(MupadError, ValueError):
    """One tile, row or slide cannot be read; it is skipped and counted, never fatal."""


class SourceKind(str, enum.Enum):
    AUTO = "auto"
    SLIDES = "slides"
    TILES = "tiles"
    PAIRED = "paired"


@dataclass(frozen=True)
class TileItem:
    """One image of a tile folder or a paired manifest."""

    path: Path
    key: str  # unique, stable name of the record (relative path, or "row-<n>")
    caption: str = ""
    label: int = UNKNOWN
    class_name: str = ""
    rna_scores: tuple[float, ...] | None = None
    rna_file: Path | None = None


@dataclass(frozen=True)
class Source:
    """A unit of work: one slide, or a chunk of tiles / manifest rows."""

    source_id: str
    kind: SourceKind
    path: Path  # the slide file, the tile folder or the CSV
    items: tuple[TileItem, ...] = field(default=())
    rna_length: int = 0  # P of a manifest with RNA (rows without RNA get P NaNs), else 0
    # The P pathway names, in order: the `rna_<name>` columns of a manifest without
    # `rna_file`s; () when unknown.
    rna_names: tuple[str, ...] = ()

    def fingerprint(self) -> str:
        """A digest of what this source reads (changes if files are added or replaced)."""
        digest = hashlib.sha256(f"{self.kind.value}|{self.path}".encode())
        if self.kind is SourceKind.SLIDES:
            stat = self.path.stat() if self.path.exists() else None
            digest.update(f"|{stat.st_size if stat else -1}".encode())
        for item in self.items:
            digest.update(
                f"|{item.key}|{item.path}|{item.caption}|{item.label}|{item.rna_file}|"
                f"{item.rna_scores}".encode()
            )
        return digest.hexdigest()[:16]


def _slide_suffixes() -> frozenset[str]:
    from mupad.data.wsi import SLIDE_SUFFIXES

    return frozenset(s.lower() for s in SLIDE_SUFFIXES)


def safe_id(text: str) -> str:
    """A file-name-safe source id: '/' -> '__', any character but A-Z a-z 0-9 . _ -> '_'.

    Ids never contain '-', so no source's shard prefix (`<id>-NNNNNN.safetensors`) can match
    another source's shards.
    """
    text = text.replace("\\", "/").replace("/", "__")
    return re.sub(r"[^A-Za-z0-9._]", "_", text).strip(".") or "source"


def detect_kind(path: Path) -> SourceKind:
    """csv file -> paired; one slide or image file -> slides; a folder holding a slide (a
    slide-only format such as .svs/.ndpi, or a pyramidal/tiled/large/OME TIFF) -> slides;
    any other folder -> tiles."""
    if path.is_file():
        if path.suffix.lower() == ".csv":
            return SourceKind.PAIRED
        if path.suffix.lower() in _slide_suffixes():
            return SourceKind.SLIDES
        raise PrepareError(
            f"{path} is neither a slide ({', '.join(sorted(_slide_suffixes()))}) nor a .csv "
            f"manifest; pass a slide, a folder of slides or tiles, or a CSV with columns "
            f"{', '.join(PAIRED_COLUMNS)}"
        )
    files = [p for p in path.rglob("*") if p.is_file()]
    slide_only = _slide_suffixes() - IMAGE_SUFFIXES
    if any(p.suffix.lower() in slide_only for p in files):
        return SourceKind.SLIDES
    if any(_looks_like_slide(p) for p in _largest_tiffs(files)):
        return SourceKind.SLIDES
    return SourceKind.TILES


# TIFFs opened to tell slides from tiles: the largest files only (a slide is far bigger
# than a tile), so that a folder of 100k TIFF tiles is not opened file by file.
TIFFS_CHECKED = 3


def _largest_tiffs(files: list[Path]) -> list[Path]:
    tiffs = [p for p in files if p.suffix.lower() in (".tif", ".tiff")]
    return sorted(tiffs, key=lambda p: p.stat().st_size, reverse=True)[:TIFFS_CHECKED]


def _looks_like_slide(path: Path) -> bool:
    from mupad.data.wsi import looks_like_slide

    return looks_like_slide(path)


def discover_sources(
    path: str | Path,
    kind: SourceKind | str = SourceKind.AUTO,
    *,
    captions: dict[str, str] | None = None,
    tiles_per_source: int = 1024,
) -> list[Source]:
    """The sorted sources of `path` (see the module docstring)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise PrepareError(f"input {path} does not exist")
    if tiles_per_source < 1:
        raise PrepareError(f"tiles_per_source must be >= 1, got {tiles_per_source}")
    kind = SourceKind(kind)
    if kind is SourceKind.AUTO:
        kind = detect_kind(path)
    if kind is SourceKind.SLIDES:
        return _slide_sources(path)
    if kind is SourceKind.TILES:
        items = _tile_items(path, captions or {})
    else:
        items = _paired_items(path)
    prefix = "tiles" if kind is SourceKind.TILES else "paired"
    rna_length = _rna_length(items)
    names = _rna_names(path) if kind is SourceKind.PAIRED and rna_length else ()
    if any(item.rna_file is not None for item in items) or len(names) != rna_length:
        names = ()
    return [
        Source(
            f"{prefix}_{i // tiles_per_source:05d}",
            kind,
            path,
            tuple(items[i : i + tiles_per_source]),
            rna_length,
            names,
        )
        for i in range(0, len(items), tiles_per_source)
    ]


def _rna_names(csv_path: Path) -> tuple[str, ...]:
    """The pathway names of a manifest's `rna_<name>` columns, in column order."""
    with csv_path.open(newline="") as handle:
        columns = next(csv.reader(handle), [])
    return tuple(
        c[len(RNA_PREFIX) :] for c in columns if c.startswith(RNA_PREFIX) and c != RNA_FILE_COLUMN
    )


def _slide_sources(root: Path) -> list[Source]:
    suffixes = _slide_suffixes()
    if root.is_file():
        if root.suffix.lower() not in suffixes:
            raise PrepareError(
                f"{root} is not a slide ({', '.join(sorted(suffixes))}); pass a slide file or "
                "a folder of slides"
            )
        return [Source(safe_id(Path(root.name).stem), SourceKind.SLIDES, root)]
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
    if not files:
        raise PrepareError(
            f"no slides ({', '.join(sorted(suffixes))}) under {root}; for a tile folder pass "
            "--kind tiles"
        )
    sources, seen = [], set()
    for file in files:
        base = safe_id(str(file.relative_to(root).with_suffix("")))
        source_id, n = base, 1
        while source_id in seen:  # a.svs and a.ndpi -> a, a_2
            n += 1
            source_id = f"{base}_{n}"
        seen.add(source_id)
        sources.append(Source(source_id, SourceKind.SLIDES, file))
    return sources


def _tile_items(root: Path, captions: dict[str, str]) -> list[TileItem]:
    if not root.is_dir():
        raise PrepareError(f"tile folder {root} does not exist or is not a folder")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    groups: list[tuple[str, int, Path]] = [("", UNKNOWN, root)]
    groups += [(d.name, label, d) for label, d in enumerate(class_dirs)]
    items = []
    for class_name, label, folder in groups:
        files = sorted(
            p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        for file in files:
            key = file.relative_to(root).as_posix()
            caption = captions.get(key, captions.get(class_name, class_name))
            items.append(TileItem(file, key, caption, label, class_name))
    if not items:
        raise PrepareError(
            f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}; expected "
            "root/<class_name>/<tile>.png"
        )
    return items


def _paired_items(csv_path: Path) -> list[TileItem]:
    try:
        with csv_path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            columns = list(reader.fieldnames or [])
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise PrepareError(f"cannot read the manifest {csv_path}: {exc}") from exc
    if "image" not in columns:
        raise PrepareError(
            f"manifest {csv_path} has no 'image' column (columns: {columns}); expected: "
            + "; ".join(f"{k} ({v})" for k, v in PAIRED_COLUMNS.items())
        )
    if not rows:
        raise PrepareError(f"manifest {csv_path} has no rows")
    rna_columns = [c for c in columns if c.startswith(RNA_PREFIX) and c != RNA_FILE_COLUMN]
    labels = [(row.get("label") or "").strip() for row in rows]
    names: list[str] = []
    if any(v and not _is_int(v) for v in labels):
        names = sorted({v for v in labels if v})
    base = csv_path.parent
    items = []
    for n, (row, label_text) in enumerate(zip(rows, labels, strict=True)):
        image = (row.get("image") or "").strip()
        if not image:
            raise PrepareError(f"{csv_path} row {n + 2}: the 'image' cell is empty")
        label, class_name = UNKNOWN, ""
        if label_text:
            label = names.index(label_text) if names else int(label_text)
            class_name = label_text if names else ""
        rna_scores = None
        cells = [(row.get(c) or "").strip() for c in rna_columns]
        if any(cells):  # empty cells = missing scores (NaN); all empty = no RNA
            try:
                rna_scores = tuple(float(c) if c else float("nan") for c in cells)
            except ValueError as exc:
                raise PrepareError(
                    f"{csv_path} row {n + 2}: RNA score columns must be numbers ({exc})"
                ) from exc
        rna_file = (row.get(RNA_FILE_COLUMN) or "").strip()
        items.append(
            TileItem(
                path=_resolve(base, image),
                key=f"row-{n:07d}",
                caption=(row.get("caption") or "").strip(),
                label=label,
                class_name=class_name,
                rna_scores=rna_scores,
                rna_file=_resolve(base, rna_file) if rna_file else None,
            )
        )
    return items


def _rna_length(items: list[TileItem]) -> int:
    """P, from the first row whose RNA scores can be read; 0 when no row has any."""
    for item in items:
        if item.rna_scores is None and item.rna_file is None:
            continue
        try:
            vector = rna_vector(item)
        except CorruptInputError:
            continue
        if vector is not None:
            return int(vector.shape[0])
    return 0


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _resolve(base: Path, name: str) -> Path:
    path = Path(name).expanduser()
    return path if path.is_absolute() else base / path


def load_captions(path: str | Path | None) -> dict[str, str]:
    """A JSON object: class name or '<class>/<file>' -> caption."""
    if path is None:
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PrepareError(f"cannot read captions JSON {path}: {exc}") from exc
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise PrepareError(
            f"captions JSON {path} must be an object mapping class names (or '<class>/<file>') "
            'to caption strings, e.g. {"TUMOR": "H&E, colorectal adenocarcinoma"}'
        )
    return {str(k): v for k, v in data.items()}


def read_tile_image(path: Path, tile_size: int) -> np.ndarray:
    """An image file -> uint8 (tile_size, tile_size, 3), resized (bicubic) if needed.

    Raises CorruptInputError for a missing, truncated or undecodable file.
    """
    try:
        rgb = open_rgb(path)
    except UnreadableTileError as exc:
        raise CorruptInputError(exc.reason) from exc
    if rgb.size != (tile_size, tile_size):
        rgb = rgb.resize((tile_size, tile_size), Image.Resampling.BICUBIC)
    return np.asarray(rgb, dtype=np.uint8)


def read_rna_file(path: Path) -> np.ndarray:
    """A pathway-score vector from .npy (no pickles) or a text file of numbers -> float32 (P,)."""
    try:
        if path.suffix.lower() == ".npy":
            values = np.load(path, allow_pickle=False)
        else:
            delimiter = "," if path.suffix.lower() == ".csv" else None
            values = np.loadtxt(path, delimiter=delimiter, dtype=np.float32, ndmin=1)
    except (OSError, ValueError) as exc:
        raise CorruptInputError(f"RNA file {path}: {type(exc).__name__}: {exc}") from exc
    return np.asarray(values, dtype=np.float32).reshape(-1)


def rna_vector(item: TileItem) -> np.ndarray | None:
    """The item's RNA scores (P,) float32: the `rna_*` columns, then the `rna_file`."""
    parts: Sequence[np.ndarray] = []
    if item.rna_scores is not None:
        parts = [np.asarray(item.rna_scores, dtype=np.float32)]
    if item.rna_file is not None:
        parts = [*parts, read_rna_file(item.rna_file)]
    return np.concatenate(parts) if parts else None
