"""Prompt records: what one line of a prompt file (or the command line) asks to generate.

A record names any subset of the conditions — text, a reference image, an RNA source —
plus a seed, the number of images and optional guidance overrides. Files are CSV (a header
row, one record per row, empty cell = not given) or JSONL (one JSON object per line; blank
lines are skipped). Relative paths are relative to the prompt file's folder.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mupad.conditions import Modality
from mupad.config import ConfigError, SampleConfig
from mupad.errors import MupadError


class PromptError(MupadError, ValueError):
    """A prompt file or record is unusable; the message says which and how to fix it."""


# Field -> help text (also the CLI's description of the prompt-file columns).
RECORD_FIELDS: dict[str, str] = {
    "id": "output name prefix (default: the record's 1-based row number, 00001)",
    "seed": "random seed (default: --seed + row index)",
    "num_images": "images for this record (default: --num-images)",
    "text": "text condition (caption)",
    "image": "reference image (image condition)",
    "image_mpp": "µm/px of the reference image (resampled to the model's µm/px)",
    "rna": "pathway scores: .npy / .txt vector in the model's order, or a .csv/.tsv table",
    "rna_row": "row of a multi-row score table / sample of a multi-sample expression file",
    "rna_expression": "expression file, scored into pathway scores with the gene sets",
    "st_folder": "a `mupad st extract` output folder (with st_spot)",
    "st_spot": "spot barcode in st_folder/scores.csv (the RNA condition)",
    "guidance_schedule": "constant, linear or interval",
    "guidance_start": "guidance scale at t = 1 (noise)",
    "guidance_end": "guidance scale at t = 0 (data), linear schedule",
    "guidance_mode": "joint or per_modality",
    "image_scale": "per-modality guidance multiplier (per_modality mode)",
    "text_scale": "per-modality guidance multiplier (per_modality mode)",
    "rna_scale": "per-modality guidance multiplier (per_modality mode)",
}
_PATH_FIELDS = ("image", "rna", "rna_expression", "st_folder")
_INT_FIELDS = ("seed", "num_images")
_FLOAT_FIELDS = ("image_mpp",)
_GUIDANCE_FIELDS = {
    "guidance_schedule": "schedule",
    "guidance_start": "start",
    "guidance_end": "end",
    "guidance_mode": "mode",
    "image_scale": "image_scale",
    "text_scale": "text_scale",
    "rna_scale": "rna_scale",
}
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
MODALITY_NAMES = tuple(m.value for m in Modality)


@dataclasses.dataclass(frozen=True)
class PromptRecord:
    id: str
    seed: int
    num_images: int = 1
    text: str | None = None
    image: Path | None = None
    image_mpp: float | None = None
    rna: Path | None = None
    rna_row: str | None = None
    rna_expression: Path | None = None
    st_folder: Path | None = None
    st_spot: str | None = None
    guidance: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # GuidanceConfig fields

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise PromptError(
                f"record {self.id!r}: seed must be an integer >= 0, got {self.seed!r}"
            )
        if (
            isinstance(self.num_images, bool)
            or not isinstance(self.num_images, int)
            or self.num_images < 1
        ):
            raise PromptError(
                f"record {self.id!r}: num_images (--num-images) must be an integer >= 1, got "
                f"{self.num_images!r}"
            )
        if (self.st_folder is None) != (self.st_spot is None):
            raise PromptError(f"record {self.id!r}: st_folder and st_spot go together; give both")
        sources = [f for f in ("rna", "rna_expression", "st_spot") if getattr(self, f) is not None]
        if len(sources) > 1:
            raise PromptError(
                f"record {self.id!r} gives several RNA sources ({', '.join(sources)}); keep one"
            )
        if self.rna_row is not None and not (self.rna or self.rna_expression):
            raise PromptError(f"record {self.id!r}: rna_row needs rna or rna_expression")
        if self.image_mpp is not None and self.image is None:
            raise PromptError(f"record {self.id!r}: image_mpp is given without an image")
        unknown = set(self.guidance) - set(_GUIDANCE_FIELDS.values())
        if unknown:
            raise PromptError(f"record {self.id!r}: unknown guidance field(s) {sorted(unknown)}")

    @property
    def modalities(self) -> tuple[Modality, ...]:
        """The conditions this record gives, in enum order."""
        given = {
            Modality.TEXT: self.text is not None,
            Modality.IMAGE: self.image is not None,
            Modality.RNA: any(x is not None for x in (self.rna, self.rna_expression, self.st_spot)),
        }
        return tuple(m for m in Modality if given[m])

    def restricted(self, modalities: Iterable[Modality]) -> PromptRecord:
        """The record with only the given modalities' inputs kept."""
        keep = set(modalities)
        changes: dict[str, Any] = {}
        if Modality.TEXT not in keep:
            changes["text"] = None
        if Modality.IMAGE not in keep:
            changes.update(image=None, image_mpp=None)
        if Modality.RNA not in keep:
            changes.update(
                rna=None, rna_row=None, rna_expression=None, st_folder=None, st_spot=None
            )
        return dataclasses.replace(self, **changes)

    def sample_config(self, base: SampleConfig) -> SampleConfig:
        """`base` with this record's guidance overrides and seed."""
        try:
            guidance = dataclasses.replace(base.guidance, **dict(self.guidance))
        except (ConfigError, TypeError, ValueError) as error:
            raise PromptError(f"record {self.id!r}: bad guidance override: {error}") from None
        return dataclasses.replace(base, guidance=guidance, seed=self.seed)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON (paths absolute as stored; None fields left out)."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "guidance":
                out.update({_flat_guidance(k): v for k, v in value.items()})
            elif value is not None:
                out[field.name] = str(value) if isinstance(value, Path) else value
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PromptRecord:
        return record_from_fields(
            dict(data), base=Path("."), default_id="00001", defaults={}, check_id=False
        )


def _flat_guidance(name: str) -> str:
    return next(k for k, v in _GUIDANCE_FIELDS.items() if v == name)


def parse_modalities(text: str | Iterable[str] | None) -> tuple[Modality, ...] | None:
    """'text,image' -> (Modality.TEXT, Modality.IMAGE); None -> None (all given)."""
    if text is None:
        return None
    parts = text.split(",") if isinstance(text, str) else list(text)
    names = [p.strip().lower() for p in parts if p.strip()]
    unknown = [n for n in names if n not in MODALITY_NAMES]
    if unknown:
        raise PromptError(
            f"unknown modality {', '.join(map(repr, unknown))}; choose from "
            f"{', '.join(MODALITY_NAMES)}"
        )
    if not names:
        raise PromptError(f"no modality given; choose from {', '.join(MODALITY_NAMES)}")
    return tuple(m for m in Modality if m.value in names)


def _convert(field: str, value: Any, where: str) -> Any:
    """A raw cell/JSON value -> the record's type; '' and None mean 'not given'."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        if field in _INT_FIELDS:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(str(value).strip()) if isinstance(value, str) else int(value)
        if (
            field in _FLOAT_FIELDS
            or field in ("guidance_start", "guidance_end")
            or field.endswith("_scale")
        ):
            return float(value)
    except (TypeError, ValueError):
        kind = "an integer" if field in _INT_FIELDS else "a number"
        raise PromptError(f"{where}: {field} must be {kind}, got {value!r}") from None
    return str(value).strip() if field != "text" else str(value)


def record_from_fields(
    fields: dict[str, Any],
    *,
    base: Path,
    default_id: str,
    defaults: Mapping[str, Any],
    check_id: bool = True,
) -> PromptRecord:
    """Build and validate one record from raw fields (unknown fields are an error)."""
    where = f"record {fields.get('id') or default_id}"
    unknown = sorted(set(fields) - set(RECORD_FIELDS))
    if unknown:
        hint = (
            f"; conditions are {', '.join(MODALITY_NAMES)} (rna also as rna_expression or "
            "st_folder + st_spot)"
        )
        raise PromptError(
            f"{where}: unknown field(s) {unknown}{hint}. Known fields: {', '.join(RECORD_FIELDS)}"
        )
    values = {k: _convert(k, v, where) for k, v in fields.items()}
    values = {k: v for k, v in values.items() if v is not None}
    if "text" in values and not values["text"].strip():
        values.pop("text")
    for key, value in defaults.items():
        values.setdefault(key, value)
    record_id = str(values.pop("id", default_id))
    if check_id and not _SAFE_ID.match(record_id):
        raise PromptError(
            f"record id {record_id!r} is not a safe file-name prefix; use letters, digits, "
            "'.', '_' and '-' (not starting with '.', '_' or '-')"
        )
    for key in _PATH_FIELDS:
        if key in values:
            path = Path(values[key]).expanduser()
            values[key] = (path if path.is_absolute() else base / path).resolve()
    guidance = {_GUIDANCE_FIELDS[k]: values.pop(k) for k in list(values) if k in _GUIDANCE_FIELDS}
    if "seed" not in values:
        raise PromptError(f"{where}: no seed")
    record = PromptRecord(id=record_id, guidance=guidance, **values)
    if guidance:
        record.sample_config(SampleConfig())  # validate the overrides now
    return record


def _rows(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8-sig")
    if suffix in (".jsonl", ".ndjson", ".json"):
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise PromptError(f"{path} line {number} is not JSON: {error}") from None
            if not isinstance(row, dict):
                raise PromptError(f"{path} line {number}: expected a JSON object, got {row!r}")
            rows.append(row)
        return rows
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(text.splitlines(), delimiter="," if suffix == ".csv" else "\t")
        if reader.fieldnames is None:
            return []
        header = [name.strip() for name in reader.fieldnames]
        if "" in header or len(set(header)) != len(header):
            raise PromptError(f"{path}: the header has an empty or repeated column name")
        rows = []
        for number, row in enumerate(reader, start=2):
            if None in row:
                raise PromptError(f"{path} line {number} has more cells than the header")
            cells = {k.strip(): v for k, v in row.items()}
            if any((v or "").strip() for v in cells.values()):
                rows.append(cells)
        return rows
    raise PromptError(f"prompt file {path}: use .csv, .tsv or .jsonl")


def read_prompt_file(path: str | Path, *, seed: int = 0, num_images: int = 1) -> list[PromptRecord]:
    """Every record of a CSV/TSV/JSONL prompt file; defaults: seed + row index, num_images."""
    path = Path(path)
    if not path.is_file():
        raise PromptError(f"prompt file {path} does not exist")
    rows = _rows(path)
    if not rows:
        raise PromptError(
            f"prompt file {path} holds no records; give one record per line/row (fields: "
            f"{', '.join(RECORD_FIELDS)})"
        )
    width = max(5, len(str(len(rows))))
    records = [
        record_from_fields(
            row,
            base=path.parent.resolve(),
            default_id=f"{index + 1:0{width}d}",
            defaults={"seed": seed + index, "num_images": num_images},
        )
        for index, row in enumerate(rows)
    ]
    check_unique_ids(records)
    return records


def check_unique_ids(records: list[PromptRecord]) -> None:
    seen: set[str] = set()
    repeated: set[str] = set()
    for record in records:
        (repeated if record.id in seen else seen).add(record.id)
    if repeated:
        raise PromptError(
            f"record ids repeat: {sorted(repeated)[:5]}; every record needs its own id"
        )
