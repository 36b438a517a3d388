"""Fixed-size shards of training records, and the manifest that lists them.

A dataset is a folder of shard files plus an index:

    root/
      <prefix>-000000.safetensors   one shard: `shard_size` records (a writer's last may be short)
      <prefix>-000001.safetensors
      shards.json                   shard-level index (file, n_records) + the field schema;
                                    O(number of shards), what the streaming loader reads
      manifest.parquet              one row per record: shard, offset, slide_id, x, y, label
                                    (.csv when pyarrow is missing); for analysis / filtering

One shard is ONE safetensors file, so it appears atomically (written to a hidden temporary
sibling, then renamed): a crash mid-write never leaves a visible, half-written shard.

* Tensor / array fields (image uint8, `latent_moments` (2C, h, w) = VAE posterior mean and
  logvar concatenated on the channel axis, `text_tokens` (T, D), `text_mask` (T,),
  `rna_scores` (P,), teacher features, ...) are stacked: `field -> (n, *shape)`. Every record
  of a shard must give the same tensor fields with the same shape and dtype.
* str / int / float / bool / None fields (caption, slide_id, x, y, label, ...) are kept per
  record, as JSON in the safetensors header metadata under the key "records".

Variable-length condition tokens are stored padded to a fixed maximum length with a boolean
mask field beside them (True = a real token); `pad_tokens` does that.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mupad.errors import MupadError
from mupad.fileio import atomic_file, atomic_write_text

logger = logging.getLogger(__name__)

SHARD_SUFFIX = ".safetensors"
INDEX_NAME = "shards.json"
MANIFEST_PARQUET = "manifest.parquet"
MANIFEST_CSV = "manifest.csv"
FORMAT_NAME = "mupad-shard"
FORMAT_VERSION = 1
MANIFEST_COLUMNS = ("slide_id", "x", "y", "label")

Scalar = str | int | float | bool | None
FieldValue = np.ndarray | torch.Tensor | str | int | float | bool | None


class ShardError(MupadError, ValueError):
    """A shard, record or shard folder is unusable; the message says how to fix it."""


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def pad_tokens(
    tokens: torch.Tensor | np.ndarray, max_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens (T, D) -> (padded (max_tokens, D), mask (max_tokens,) bool, True = real).

    Longer inputs are truncated to `max_tokens`.
    """
    tokens = torch.as_tensor(tokens)
    if tokens.dim() != 2:
        raise ShardError(f"tokens must be (tokens, dim), got shape {tuple(tokens.shape)}")
    length = min(tokens.shape[0], max_tokens)
    padded = tokens.new_zeros((max_tokens, tokens.shape[1]))  # (max_tokens, D)
    padded[:length] = tokens[:length]
    mask = torch.zeros(max_tokens, dtype=torch.bool)
    mask[:length] = True
    return padded, mask


def _is_tensor(value: object) -> bool:
    return isinstance(value, (torch.Tensor, np.ndarray))


def _scalar(name: str, value: object) -> Scalar:
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    raise ShardError(
        f"field {name!r} has type {type(value).__name__}; records hold tensors/arrays "
        "(stacked per shard) or str/int/float/bool/None (kept per record)"
    )


def shard_paths(root: str | Path, prefix: str | None = None) -> list[Path]:
    """Finished shard files under `root` (sorted by name); temporaries are never listed."""
    root = Path(root)
    pattern = f"{prefix}-*{SHARD_SUFFIX}" if prefix is not None else f"*{SHARD_SUFFIX}"
    return sorted(p for p in root.glob(pattern) if not p.name.startswith("."))


def _header(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
    except Exception as error:  # safetensors raises its own error types
        raise ShardError(
            f"{path} is not a readable safetensors shard ({error}); delete it and re-run the writer"
        ) from error
    if meta.get("format") != FORMAT_NAME:
        raise ShardError(
            f"{path} is a safetensors file but not a mupad shard (no '{FORMAT_NAME}' header)"
        )
    return meta


def read_shard_records(path: str | Path) -> list[dict[str, Scalar]]:
    """Per-record metadata of one shard, without reading its tensors."""
    return json.loads(_header(Path(path))["records"])


def read_shard_header(path: str | Path) -> dict[str, Any]:
    """{'n_records', 'fields': {name: {'shape', 'dtype'}}} of one shard, without its tensors."""
    meta = _header(Path(path))
    return {"n_records": int(meta["n_records"]), "fields": json.loads(meta["fields"])}


def read_shard(path: str | Path) -> tuple[dict[str, torch.Tensor], list[dict[str, Scalar]]]:
    """(tensors stacked (n, ...), per-record metadata) of one shard."""
    path = Path(path)
    meta = _header(path)
    with safe_open(str(path), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    return tensors, json.loads(meta["records"])


# --------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------


class ShardWriter:
    """Writes records into `root/<prefix>-NNNNNN.safetensors`, `shard_size` records each.

    Use one writer per rank / source with a distinct `prefix`. As a context manager the last
    (possibly short) shard is flushed on a clean exit; on an exception the buffered records
    are dropped and only the shards already completed stay visible.
    """

    def __init__(
        self, root: str | Path, prefix: str, shard_size: int = 1024, *, overwrite: bool = False
    ) -> None:
        if shard_size < 1:
            raise ShardError(f"shard_size must be >= 1, got {shard_size}")
        if not prefix or "/" in prefix or prefix.startswith("."):
            raise ShardError(f"prefix must be a plain, non-hidden file name part, got {prefix!r}")
        self.root = Path(root)
        self.prefix = prefix
        self.shard_size = shard_size
        self.root.mkdir(parents=True, exist_ok=True)
        existing = shard_paths(self.root, prefix)
        if existing and not overwrite:
            raise ShardError(
                f"{self.root} already holds {len(existing)} shard(s) with prefix {prefix!r}; use "
                "another prefix, delete them, or pass overwrite=True"
            )
        for path in existing:
            path.unlink()
        self._buffer: list[dict[str, FieldValue]] = []
        self._schema: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None
        self._written: list[Path] = []
        self._closed = False

    def __enter__(self) -> ShardWriter:  # noqa: PYI034
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if kind is None:
            self.close()
        else:
            self._buffer.clear()
            self._closed = True

    @property
    def paths(self) -> list[Path]:
        """Shards completed so far."""
        return list(self._written)

    def add(self, record: Mapping[str, FieldValue]) -> None:
        """Append one record; writes a shard whenever `shard_size` records are buffered."""
        if self._closed:
            raise ShardError("this ShardWriter is closed; open a new one to write more records")
        schema = {}
        kept: dict[str, FieldValue] = {}
        for name, value in record.items():
            if _is_tensor(value):
                tensor = torch.as_tensor(value)
                schema[name] = (tuple(tensor.shape), tensor.dtype)
                kept[name] = value
            else:
                kept[name] = _scalar(name, value)
        if self._schema is None:
            self._schema = schema
        elif schema != self._schema:
            raise ShardError(
                f"record {len(self._buffer)} of shard {len(self._written)} has tensor fields "
                f"{_describe(schema)} but earlier records have {_describe(self._schema)}; every "
                "record of a shard needs the same tensor fields, shapes and dtypes (pad "
                "variable-length tokens with pad_tokens)"
            )
        self._buffer.append(kept)
        if len(self._buffer) >= self.shard_size:
            self._flush()

    def close(self) -> list[Path]:
        """Flush the last (possibly short) shard; returns every shard path written."""
        if not self._closed:
            if self._buffer:
                self._flush()
            self._closed = True
        return self.paths

    def _flush(self) -> None:
        assert self._schema is not None
        tensors: dict[str, torch.Tensor] = {}
        for name in self._schema:
            tensors[name] = torch.stack(
                [torch.as_tensor(r[name]) for r in self._buffer]
            ).contiguous()  # (n, *shape)
        records = [{k: v for k, v in r.items() if k not in self._schema} for r in self._buffer]
        fields = {
            name: {"shape": list(shape), "dtype": str(dtype).removeprefix("torch.")}
            for name, (shape, dtype) in self._schema.items()
        }
        header = {
            "format": FORMAT_NAME,
            "version": str(FORMAT_VERSION),
            "n_records": str(len(self._buffer)),
            "fields": json.dumps(fields),
            "records": json.dumps(records),
        }
        final = self.root / f"{self.prefix}-{len(self._written):06d}{SHARD_SUFFIX}"
        _atomic_save(tensors, header, final)
        self._written.append(final)
        self._buffer = []
        self._schema = None
        logger.debug("wrote %s (%d records)", final, len(records))


def _describe(schema: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> str:
    return ", ".join(
        f"{k}{list(s)}:{str(d).removeprefix('torch.')}" for k, (s, d) in sorted(schema.items())
    )


def _atomic_save(tensors: dict[str, torch.Tensor], header: dict[str, str], final: Path) -> None:
    with atomic_file(final) as tmp:  # the umask's permissions, as open() would give
        save_file(tensors, str(tmp), metadata=header)


# --------------------------------------------------------------------------------------
# Index and manifest
# --------------------------------------------------------------------------------------


def _manifest_rows(
    shard: str, n_records: int, fields: str, records: list[dict[str, Scalar]]
) -> Iterator[dict[str, Any]]:
    for offset, record in enumerate(records):
        row: dict[str, Any] = {
            "shard": shard,
            "offset": offset,
            "n_records": n_records,
            "fields": fields,
        }
        for column in MANIFEST_COLUMNS:
            row[column] = record.get(column)
        yield row


def _manifest_schema():  # -> pyarrow.Schema
    import pyarrow as pa

    return pa.schema(
        [
            ("shard", pa.string()),
            ("offset", pa.int64()),
            ("n_records", pa.int64()),
            ("fields", pa.string()),
            ("slide_id", pa.string()),
            ("x", pa.int64()),
            ("y", pa.int64()),
            ("label", pa.int64()),
        ]
    )


def write_manifest(root: str | Path) -> Path:
    """Scan the finished shards under `root`; write `shards.json` (shard-level index, what
    `ShardedDataset` reads) and `manifest.parquet` (one row per record: shard, offset,
    n_records, fields, slide_id, x, y, label; `manifest.csv` if pyarrow is missing).

    Memory is O(one shard's metadata + number of shards). Returns the manifest path. `label`
    must be an integer class index (keep class names in another field).
    """
    root = Path(root)
    paths = shard_paths(root)
    if not paths:
        raise ShardError(
            f"no shards (*{SHARD_SUFFIX}) under {root}; write some with ShardWriter first"
        )
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        pa = pq = None
    final = root / (MANIFEST_PARQUET if pq is not None else MANIFEST_CSV)
    shards: list[dict[str, Any]] = []
    schema_fields: dict[str, Any] | None = None
    with atomic_file(final) as tmp:  # the umask's permissions, as open() would give
        if pq is not None:
            schema = _manifest_schema()
            sink: Any = pq.ParquetWriter(str(tmp), schema)
        else:
            handle = open(tmp, "w", newline="")  # noqa: SIM115 - closed in finally
            sink = csv.DictWriter(
                handle, fieldnames=["shard", "offset", "n_records", "fields", *MANIFEST_COLUMNS]
            )
            sink.writeheader()
        try:
            for path in paths:
                meta = _header(path)
                fields = json.loads(meta["fields"])
                if schema_fields is None:
                    schema_fields = fields
                elif fields != schema_fields:
                    raise ShardError(
                        f"{path.name} has tensor fields {fields} but {paths[0].name} has "
                        f"{schema_fields}; a dataset's shards must share one schema (write them "
                        "into separate folders)"
                    )
                n_records = int(meta["n_records"])
                records = json.loads(meta["records"])
                shards.append({"file": path.name, "n_records": n_records})
                rows = list(_manifest_rows(path.name, n_records, ",".join(sorted(fields)), records))
                if pq is not None:
                    try:
                        sink.write_table(pa.Table.from_pylist(rows, schema=schema))
                    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as error:
                        raise ShardError(
                            f"{path.name}: slide_id must be a string and x, y, label integers "
                            f"for the manifest ({error})"
                        ) from error
                else:
                    sink.writerows(rows)
        finally:
            if pq is not None:
                sink.close()
            else:
                handle.close()
    index = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "fields": schema_fields,
        "shards": shards,
    }
    atomic_write_text(root / INDEX_NAME, json.dumps(index))
    return final


def read_index(root: str | Path) -> dict[str, Any]:
    """The shard-level index of `root`: {'fields', 'shards': [{'file', 'n_records'}]}.

    Read from `shards.json` (written by `write_manifest`); without it the shard headers are
    scanned (slower for many shards).
    """
    root = Path(root)
    path = root / INDEX_NAME
    if path.exists():
        index = json.loads(path.read_text())
        if index.get("format") != FORMAT_NAME:
            raise ShardError(
                f"{path} is not a mupad shard index; re-create it with write_manifest({str(root)!r})"
            )
        return index
    paths = shard_paths(root)
    if not paths:
        raise ShardError(f"no shards (*{SHARD_SUFFIX}) and no {INDEX_NAME} under {root}")
    logger.warning(
        "%s has no %s; scanning %d shard headers (run write_manifest once)",
        root,
        INDEX_NAME,
        len(paths),
    )
    headers = [read_shard_header(p) for p in paths]
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "fields": headers[0]["fields"],
        "shards": [{"file": p.name, "n_records": h["n_records"]} for p, h in zip(paths, headers)],
    }


def stack_records(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Collate records: tensors stacked (B, ...), everything else as lists."""
    if not records:
        raise ShardError("cannot collate an empty list of records")
    out: dict[str, Any] = {}
    for name in records[0]:
        values = [r[name] for r in records]
        out[name] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out
