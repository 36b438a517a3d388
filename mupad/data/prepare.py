"""`mupad prepare`: slides / tiles / paired files -> shards, distributed and resumable.

    summary = prepare_dataset("slides/", "shards/", PrepareConfig(latents="vae/"))

Layout of the output folder:

    out/<source_id>-NNNNNN.safetensors   shards (mupad.data.shards), one prefix per source
    out/shards.json, out/manifest.parquet written by rank 0 at the end (write_manifest)
    out/summary.json                     what was written, skipped and why, corrupt inputs
    out/prepare/done/<source_id>.done.json  a finished source (written atomically after its
                                         shards closed); a rerun skips it
    out/prepare/rank-NNNNN.json          one rank's results of the last run (merged by rank 0)

Distribution: under `torchrun` (RANK / WORLD_SIZE / LOCAL_RANK in the environment) every
rank takes `sources[rank::world_size]` of the sorted sources; a process group (gloo on CPU,
nccl on CUDA) is started only when world_size > 1, for the final barriers.

Resumption: a source with a done marker whose fingerprint (inputs + settings) matches is
skipped; any other source first deletes its shards left by an interrupted run, then is
written again, so nothing is lost or duplicated.

Bad input: a slide that cannot be opened or tiled (`SlideError`, `OSError`) fails on its
own; a tile or image that cannot be read is skipped. Both are logged, counted and listed in
the summary; the run goes on.

Per record (all optional fields are present in every record of a run, or in none):
    image           uint8 (3, S, S)            unless latents are cached (or keep_pixels)
    latent_moments  (2C, S/f, S/f) float16/32  VAE posterior [mean, logvar] in the codec's
                                               scaled space (see LATENT_SPACE)
    caption         str                        text condition ('' = none)
    text_tokens     (T, D), text_mask (T,) bool  cached text encoder states (T = max length;
                                               an empty caption has an all-False mask)
    image_tokens    (1 + h*w, D)               cached image encoder tokens (global + grid)
    rna_scores      (P,) float32               paired manifests with RNA columns / files

Slides are tiled on a tissue grid, or at the patches of a TRIDENT/CLAM coords .h5 (`coords`:
tiles cover each patch's level-0 square, resized to tile_size; tissue_fraction None). With
`export_features` each slide's image-encoder global embeddings are also written as
<export_features>/<image_encoder>/<slide>.h5 (mupad.data.prepare_export).
    label int (-1 = none), class_name str, slide_id str | None, x, y int | None (level-0 px),
    mpp float | None (of the tile), tissue_fraction float | None, source_id str, key str
    (unique per record: '<slide_id>:<x>:<y>', the tile's relative path or 'row-<n>').
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mupad.data.prepare_encode import FEATURE_DTYPES, RecordEncoder
from mupad.data.prepare_sources import (
    CorruptInputError,
    PrepareError,
    Source,
    SourceKind,
    TileItem,
    discover_sources,
    load_captions,
    read_tile_image,
    rna_vector,
)
from mupad.fileio import atomic_write_text

logger = logging.getLogger(__name__)

STATE_DIR = "prepare"
SUMMARY_NAME = "summary.json"
DONE_SUFFIX = ".done.json"
LATENT_SPACE = (
    "latent_moments = [mean, logvar] of the VAE posterior in the codec's SCALED space "
    "(mupad.latents.encode_moments): z = mean + exp(logvar / 2) * eps is already "
    "(z_vae - shift) * scale; train with latent_scale=1, latent_shift=0"
)

__all__ = [
    "CorruptInputError",
    "NothingPreparedError",
    "PrepareConfig",
    "PrepareError",
    "PrepareSummary",
    "SourceResult",
    "prepare_dataset",
]


@dataclass(frozen=True)
class PrepareConfig:
    """Settings of one `prepare` run (all but the last four enter each source's fingerprint)."""

    kind: SourceKind = SourceKind.AUTO
    tile_size: int = 256  # px; tiles of a tile folder / manifest are resized to this
    target_mpp: float = 0.5  # slides are tiled at this resolution (µm/px)
    min_tissue: float = 0.5  # fraction of a slide tile that must be tissue
    slide_mpp: float | None = None  # µm/px for slides that do not record it
    tile_mpp: float | None = None  # µm/px of tile-folder / manifest images, if known
    captions: Path | None = None  # JSON: class name or '<class>/<file>' -> caption
    latents: str | None = None  # AutoencoderKL folder / cache name; None = store pixels
    keep_pixels: bool = False  # store `image` next to `latent_moments`
    feature_dtype: str = "float16"  # cached latents / tokens: float16, bfloat16, float32
    text_encoder: str | None = None  # e.g. "minilm": cache text_tokens / text_mask
    text_max_length: int = 77
    image_encoder: str | None = None  # e.g. "inception": cache image_tokens
    shard_size: int = 1024  # records per shard
    tiles_per_source: int = 4096  # tile-folder / manifest images per source (unit of work)
    coords: Path | None = None  # TRIDENT/CLAM patches .h5 (or a folder of them) instead of a grid
    export_features: Path | None = None  # write <dir>/<image_encoder>/<slide>.h5 features
    # Not part of the fingerprint: recorded in the summary only.
    rna_gene_sets: str | None = None  # GMT the manifest's RNA scores came from, or "bundled"
    # Not part of the fingerprint: they change speed, not results.
    batch_size: int = 32  # tiles per encoder batch
    device: str = "auto"  # auto = cuda:<LOCAL_RANK> when available, else cpu
    progress: bool = True
    barrier_timeout_s: float = 24 * 3600.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", SourceKind(self.kind))
        if self.feature_dtype not in FEATURE_DTYPES:
            raise PrepareError(
                f"--feature-dtype must be one of {', '.join(FEATURE_DTYPES)}, got "
                f"{self.feature_dtype!r}"
            )
        for name in ("tile_size", "shard_size", "tiles_per_source", "batch_size"):
            if getattr(self, name) < 1:
                raise PrepareError(f"{_option(name)} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise PrepareError(f"--min-tissue must lie in [0, 1], got {self.min_tissue}")
        for name in ("target_mpp", "slide_mpp", "tile_mpp"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise PrepareError(f"{_option(name)} must be a positive µm/px, got {value}")
        if self.coords is not None and not Path(self.coords).exists():
            raise PrepareError(
                f"--coords {self.coords}: no such file or folder; give a TRIDENT/CLAM patches "
                ".h5 or a folder of them"
            )
        if self.export_features is not None and self.image_encoder is None:
            raise PrepareError("--export-features needs --image-encoder (the features to export)")
        if self.keep_pixels and self.latents is None:
            raise PrepareError("--keep-pixels needs --latents (pixels are stored anyway without)")

    def fingerprint(self) -> dict[str, Any]:
        """The settings that change what is written (JSON-ready)."""
        skip = {"batch_size", "device", "progress", "barrier_timeout_s", "rna_gene_sets"}
        return {
            f.name: (str(v) if isinstance(v, (Path, SourceKind)) else v)
            for f in dataclasses.fields(self)
            if f.name not in skip
            for v in [getattr(self, f.name)]
        }


def _option(name: str) -> str:
    """The command-line option of a PrepareConfig field (tile_size -> --tile-size)."""
    return "--" + name.replace("_", "-")


@dataclass
class SourceResult:
    """What happened to one source in this run."""

    source_id: str
    path: str
    status: str  # written | already_done | empty | failed
    tiles: int = 0
    shards: list[str] = field(default_factory=list)
    corrupt: list[dict[str, str]] = field(default_factory=list)  # {path, error}
    reason: str = ""


@dataclass
class PrepareSummary:
    """The merged outcome of a run (what summary.json holds)."""

    out: str
    world_size: int
    sources: int
    written: list[str]
    already_done: list[str]
    empty: list[dict[str, str]]
    failed: list[dict[str, str]]
    tiles_written: int  # by this run
    tiles_total: int  # in all finished sources
    corrupt_count: int
    corrupt: list[dict[str, str]]
    manifest: str | None
    config: dict[str, Any] = field(default_factory=dict)  # PrepareConfig.fingerprint()
    latent_space: str = ""  # what `latent_moments` hold (see LATENT_SPACE)
    # How `rna_scores` were made, for the models trained on them (see `rna_provenance`):
    # pathways (names in order, or None), gene_sets, gene_sets_sha256, standardiser.
    rna: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def read(cls, out: str | Path) -> PrepareSummary:
        return cls(**json.loads((Path(out) / SUMMARY_NAME).read_text()))


# --------------------------------------------------------------------------------------
# Distribution
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def dist_env() -> DistEnv:
    """RANK / WORLD_SIZE / LOCAL_RANK as set by torchrun (single process when unset)."""
    try:
        env = DistEnv(
            rank=int(os.environ.get("RANK", "0")),
            world_size=int(os.environ.get("WORLD_SIZE", "1")),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        )
    except ValueError as exc:
        raise PrepareError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers: {exc}") from exc
    if env.world_size < 1 or not 0 <= env.rank < env.world_size:
        raise PrepareError(f"RANK {env.rank} is outside WORLD_SIZE {env.world_size}")
    return env


def _resolve_device(spec: str, env: DistEnv) -> torch.device:
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", env.local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    return torch.device(spec)


def _init_process_group(env: DistEnv, device: torch.device, timeout_s: float) -> bool:
    """Start gloo (CPU) / nccl (CUDA) when world_size > 1; True if we started it."""
    import torch.distributed as dist

    if env.world_size == 1 or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise PrepareError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend,
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    logger.info("rank %d/%d: %s process group", env.rank, env.world_size, backend)
    return True


def _barrier(env: DistEnv, device: torch.device) -> None:
    import torch.distributed as dist

    if env.world_size > 1:
        if device.type == "cuda":
            dist.barrier(device_ids=[device.index])
        else:
            dist.barrier()


# --------------------------------------------------------------------------------------
# Reading one source's tiles
# --------------------------------------------------------------------------------------

Tile = tuple[np.ndarray, dict[str, Any]]  # uint8 (S, S, 3), scalar fields


class _Corrupt:
    """A tile that could not be read: (path, error text)."""

    def __init__(self, path: str, error: str) -> None:
        self.path, self.error = path, error


def _slide_tiles(
    source: Source, config: PrepareConfig, sizes: list[int], geometry: dict[str, Any] | None = None
) -> Iterator[Tile | _Corrupt]:
    """The slide's tiles: a tissue grid, or the patches of `config.coords` when given.
    `geometry` (if passed) receives the slide id and tile side in level-0 px."""
    from mupad.data.wsi import SlideError, open_slide, read_tile

    try:
        slide = open_slide(source.path, mpp=config.slide_mpp)
    except OSError as exc:
        raise CorruptInputError(f"cannot open the slide: {type(exc).__name__}: {exc}") from exc
    with slide:
        try:
            coords = _plan_slide(slide, config)
        except OSError as exc:
            raise CorruptInputError(f"cannot tile the slide: {type(exc).__name__}: {exc}") from exc
        sizes.append(len(coords))
        if geometry is not None:
            geometry.update(slide_id=slide.slide_id, size_level0=coords[0].size_level0)
        given_mpp = slide.mpp * coords[0].size_level0 / config.tile_size  # with --coords
        for coord in coords:
            where = f"{source.path} x={coord.x} y={coord.y}"
            try:
                tile = read_tile(slide, coord, tile_size=config.tile_size)
            except (SlideError, OSError) as exc:
                yield _Corrupt(where, f"{type(exc).__name__}: {exc}")
                continue
            yield tile, {
                "slide_id": slide.slide_id,
                "x": int(coord.x),
                "y": int(coord.y),
                "mpp": float(config.target_mpp if config.coords is None else given_mpp),
                "tissue_fraction": (
                    None if math.isnan(coord.tissue_fraction) else float(coord.tissue_fraction)
                ),
                "key": f"{slide.slide_id}:{coord.x}:{coord.y}",
                "label": -1,
                "class_name": "",
                "caption": "",
            }


def _plan_slide(slide: Any, config: PrepareConfig) -> list[Any]:
    """TileCoords of a slide: from its TRIDENT/CLAM patches file, or a tissue grid."""
    from mupad.data.wsi import plan_tiles

    if config.coords is None:
        return plan_tiles(
            slide,
            tile_size=config.tile_size,
            target_mpp=config.target_mpp,
            min_tissue=config.min_tissue,
        )
    from mupad.data.patch_coords import (
        PatchFormatError,
        coords_file_for,
        read_patch_coords,
        slide_tile_coords,
    )

    try:
        patches = read_patch_coords(coords_file_for(config.coords, slide.slide_id))
        return slide_tile_coords(patches, slide, config.tile_size)
    except PatchFormatError as exc:
        raise CorruptInputError(f"--coords: {exc}") from exc


def _item_tiles(
    source: Source, config: PrepareConfig, sizes: list[int]
) -> Iterator[Tile | _Corrupt]:
    sizes.append(len(source.items))
    for item in source.items:
        try:
            tile = read_tile_image(item.path, config.tile_size)
            rna = _rna_or_nan(item, source.rna_length)
        except CorruptInputError as exc:
            yield _Corrupt(str(item.path), str(exc))
            continue
        yield tile, _item_fields(item, config, rna)


def _rna_or_nan(item: TileItem, length: int) -> np.ndarray | None:
    """The item's RNA scores (P,); NaNs (= absent) for a row without; None if no row has any."""
    if length == 0:
        return None
    rna = rna_vector(item)
    if rna is None:
        return np.full(length, np.nan, dtype=np.float32)
    if rna.shape[0] != length:
        raise CorruptInputError(
            f"{rna.shape[0]} RNA scores, but the manifest's rows have {length}; give every row "
            "the same pathways"
        )
    return rna


def _item_fields(item: TileItem, config: PrepareConfig, rna: np.ndarray | None) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "slide_id": None,
        "x": None,
        "y": None,
        "mpp": config.tile_mpp,
        "tissue_fraction": None,
        "key": item.key,
        "label": int(item.label),
        "class_name": item.class_name,
        "caption": item.caption,
    }
    if rna is not None:
        fields["rna_scores"] = torch.from_numpy(rna)
    return fields


# --------------------------------------------------------------------------------------
# One source
# --------------------------------------------------------------------------------------


def _state(out: Path) -> Path:
    return out / STATE_DIR


def _done_path(out: Path, source_id: str) -> Path:
    return _state(out) / "done" / f"{source_id}{DONE_SUFFIX}"


def _own_shards(out: Path, source_id: str) -> list[Path]:
    """Shard files (finished or temporary) of one source: `<id>-NNNNNN.safetensors`."""
    pattern = re.compile(rf"^\.?{re.escape(source_id)}-\d+\.safetensors(\.tmp-.*)?$")
    return sorted(p for p in out.iterdir() if pattern.match(p.name))


def _read_done(out: Path, source: Source, fingerprint: str) -> dict[str, Any] | None:
    path = _done_path(out, source.source_id)
    if not path.is_file():
        return None
    try:
        done = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        logger.warning("unreadable done marker %s: redoing %s", path, source.source_id)
        return None
    if done.get("fingerprint") != fingerprint:
        logger.warning(
            "%s was finished with other inputs or settings: redoing it", source.source_id
        )
        return None
    if not all((out / name).is_file() for name in done.get("shards", [])):
        logger.warning("%s lost some of its shards: redoing it", source.source_id)
        return None
    return done


def _source_fingerprint(source: Source, config: PrepareConfig) -> str:
    settings = json.dumps(config.fingerprint(), sort_keys=True)
    return hashlib.sha256(f"{source.fingerprint()}|{settings}".encode()).hexdigest()[:16]


def _finish_source(out: Path, result: SourceResult, fingerprint: str) -> None:
    """Mark a source finished (atomically, after its shards are closed)."""
    marker = {**dataclasses.asdict(result), "fingerprint": fingerprint}
    atomic_write_text(_done_path(out, result.source_id), json.dumps(marker, indent=1))


def _flush(writer: Any, encoder: RecordEncoder, batch: list[Tile], export: Any = None) -> None:
    tiles = np.stack([tile for tile, _ in batch])  # (B, S, S, 3)
    tensors = encoder(tiles, [fields["caption"] for _, fields in batch])
    for i, (_, fields) in enumerate(batch):
        writer.add({**fields, **{name: value[i] for name, value in tensors.items()}})
    if export is not None:
        export.add([fields for _, fields in batch], tensors)


def process_source(
    source: Source,
    out: Path,
    config: PrepareConfig,
    encoder_factory: Callable[[], RecordEncoder],
    position: int = 1,
) -> SourceResult:
    """Write one source's shards and its done marker (or report why it was skipped)."""
    from mupad.data.shards import ShardWriter

    fingerprint = _source_fingerprint(source, config)
    done = _read_done(out, source, fingerprint)
    if done is not None:
        return SourceResult(
            source.source_id,
            str(source.path),
            "already_done",
            tiles=int(done.get("tiles", 0)),
            shards=list(done.get("shards", [])),
            corrupt=list(done.get("corrupt", [])),
            reason=f"finished by an earlier run ({done.get('status', 'written')})",
        )
    _done_path(out, source.source_id).unlink(missing_ok=True)
    for stale in _own_shards(out, source.source_id):
        logger.info("removing %s, left by an interrupted run", stale.name)
        stale.unlink()

    result = SourceResult(source.source_id, str(source.path), "written")
    sizes: list[int] = []
    geometry: dict[str, Any] = {}
    export = None
    if config.export_features is not None and source.kind is SourceKind.SLIDES:
        from mupad.data.prepare_export import FeatureExport

        export = FeatureExport(Path(config.export_features), str(config.image_encoder))
    tiles = (
        _slide_tiles(source, config, sizes, geometry)
        if source.kind is SourceKind.SLIDES
        else _item_tiles(source, config, sizes)
    )
    bar = None
    try:
        with ShardWriter(out, source.source_id, shard_size=config.shard_size) as writer:
            batch: list[Tile] = []
            for tile in tiles:
                if bar is None:
                    bar = tqdm(
                        total=sizes[0] if sizes else None,
                        desc=source.source_id,
                        unit="tile",
                        position=position,
                        leave=False,
                        disable=not config.progress,
                    )
                bar.update(1)
                if isinstance(tile, _Corrupt):
                    logger.warning("skipping corrupt tile %s: %s", tile.path, tile.error)
                    result.corrupt.append({"path": tile.path, "error": tile.error})
                    continue
                batch.append(tile)
                if len(batch) == config.batch_size:
                    _flush(writer, encoder_factory(), batch, export)
                    result.tiles += len(batch)
                    batch = []
            if batch:
                _flush(writer, encoder_factory(), batch, export)
                result.tiles += len(batch)
            shards = writer.close()
        if export is not None and geometry:
            export.write(geometry["slide_id"], config.tile_size, geometry["size_level0"])
    except _bad_input_errors() as exc:
        for partial in _own_shards(out, source.source_id):
            partial.unlink()
        if _is_empty_tissue(exc):
            result = SourceResult(
                source.source_id, str(source.path), "empty", reason=f"{type(exc).__name__}: {exc}"
            )
            _finish_source(out, result, fingerprint)  # deterministic: not redone
            logger.info("%s: no tissue (%s)", source.source_id, exc)
            return result
        reason = f"{type(exc).__name__}: {exc}"
        logger.warning("skipping %s: %s", source.path, reason)
        # A missing resolution is a setting to give (--slide-mpp), not a corrupt file.
        corrupt = [] if _is_missing_mpp(exc) else [{"path": str(source.path), "error": reason}]
        return SourceResult(
            source.source_id, str(source.path), "failed", corrupt=corrupt, reason=reason
        )
    finally:
        if bar is not None:
            bar.close()
    result.shards = [p.name for p in shards]
    if result.tiles == 0:
        result.status = "empty"
        result.reason = "no readable tiles" if result.corrupt else "no tiles"
    _finish_source(out, result, fingerprint)
    return result


def _bad_input_errors() -> tuple[type[Exception], ...]:
    from mupad.data.wsi import SlideError

    return (SlideError, CorruptInputError)


def _is_empty_tissue(exc: Exception) -> bool:
    from mupad.data.wsi import EmptyTissueError

    return isinstance(exc, EmptyTissueError)


def _is_missing_mpp(exc: Exception) -> bool:
    from mupad.data.wsi import MissingMppError

    return isinstance(exc, MissingMppError)


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


def prepare_dataset(
    input_path: str | Path, out: str | Path, config: PrepareConfig | None = None
) -> PrepareSummary:
    """Turn `input_path` (slide folder, tile folder or paired CSV) into shards under `out`.

    Run it the same way again to resume. Under torchrun every rank calls this; all ranks
    return the merged summary.
    """
    config = config or PrepareConfig()
    out = Path(out).expanduser()
    env = dist_env()
    device = _resolve_device(config.device, env)
    started = _init_process_group(env, device, config.barrier_timeout_s)
    try:
        sources = discover_sources(
            input_path,
            config.kind,
            captions=load_captions(config.captions),
            tiles_per_source=config.tiles_per_source,
        )
        rna = rna_provenance(sources, config.rna_gene_sets)  # a bad GMT fails before any work
        slides = any(source.kind is SourceKind.SLIDES for source in sources)
        if (config.coords is not None or config.export_features is not None) and not slides:
            raise PrepareError(
                "--coords and --export-features apply to slides (patch coordinates are level-0 "
                f"slide pixels), but {input_path} holds none; leave them out"
            )
        out.mkdir(parents=True, exist_ok=True)  # only once the inputs are known to be usable
        mine = sources[env.rank :: env.world_size]
        logger.info(
            "rank %d/%d: %d of %d sources", env.rank, env.world_size, len(mine), len(sources)
        )
        built: list[RecordEncoder] = []

        def encoder_factory() -> RecordEncoder:
            if not built:
                built.append(RecordEncoder(config, device))
            return built[0]

        results = []
        overall = tqdm(
            mine,
            desc=f"prepare rank {env.rank}/{env.world_size}",
            unit="source",
            position=0,
            disable=not config.progress,
        )
        for source in overall:
            results.append(process_source(source, out, config, encoder_factory))
            overall.set_postfix(tiles=sum(r.tiles for r in results))
        overall.close()
        rank_file = _state(out) / f"rank-{env.rank:05d}.json"
        atomic_write_text(rank_file, json.dumps([dataclasses.asdict(r) for r in results]))
        _barrier(env, device)
        if env.rank == 0:
            summary = _merge(out, env.world_size, len(sources), config, rna)
            atomic_write_text(out / SUMMARY_NAME, summary.to_json())
            _log_summary(summary)
        _barrier(env, device)
        summary = PrepareSummary.read(out)
        if summary.tiles_total == 0:
            raise NothingPreparedError(_nothing_prepared(input_path, out, summary))
        return summary
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()


class NothingPreparedError(PrepareError):
    """Every source failed or held no tiles: the run wrote no records."""


def _nothing_prepared(input_path: str | Path, out: Path, summary: PrepareSummary) -> str:
    parts = [f"nothing was prepared from {input_path}: {summary.sources} source(s)"]
    if summary.failed:
        first = summary.failed[0]
        parts.append(
            f"{len(summary.failed)} failed (first: {first['path']}: {first['reason']})"
        )
    if summary.empty:
        first = summary.empty[0]
        hint = "; lower --min-tissue" if "EmptyTissueError" in first["reason"] else ""
        parts.append(
            f"{len(summary.empty)} without tiles (first: {first['source_id']}: "
            f"{first['reason']}{hint})"
        )
    if summary.corrupt_count:
        first = summary.corrupt[0]
        parts.append(
            f"{summary.corrupt_count} unreadable input(s) (first: {first['path']}: "
            f"{first['error']})"
        )
    return "; ".join(parts) + f"; details in {out / SUMMARY_NAME}"


def rna_provenance(sources: list[Source], gene_sets: str | None) -> dict[str, Any]:
    """What a model trained on the sources' `rna_scores` needs to be conditioned later:
    the pathway names in order (None when unknown), the gene sets the scores came from
    (`gene_sets`: a GMT path or "bundled"; None = not given) with their digest, and the
    standardiser applied (None: the shards hold the scores as given). {} without RNA."""
    has_rna = bool(sources) and sources[0].rna_length > 0
    digest = None
    if gene_sets is not None:
        from mupad.omics.errors import OmicsError
        from mupad.omics.pipeline import resolve_gene_sets

        if not has_rna:
            raise PrepareError(
                "--rna-gene-sets describes RNA scores, but the input holds none (a paired CSV "
                "with rna_<pathway> columns or an rna_file column); leave the option out"
            )
        try:
            digest = resolve_gene_sets(None if gene_sets == "bundled" else gene_sets).sha256
        except OmicsError as exc:
            raise PrepareError(f"--rna-gene-sets {gene_sets}: {exc}") from exc
    if not has_rna:
        return {}
    return {
        "pathways": list(sources[0].rna_names) or None,
        "gene_sets": gene_sets,
        "gene_sets_sha256": digest,
        "standardiser": None,
    }


def _merge(
    out: Path, world_size: int, n_sources: int, config: PrepareConfig, rna: dict[str, Any]
) -> PrepareSummary:
    from mupad.data.shards import ShardError, write_manifest

    results: list[SourceResult] = []
    for rank in range(world_size):
        path = _state(out) / f"rank-{rank:05d}.json"
        results += [SourceResult(**r) for r in json.loads(path.read_text())]
    results.sort(key=lambda r: r.source_id)
    manifest = None
    if any(r.shards for r in results):
        try:
            manifest = str(write_manifest(out).name)
        except ShardError as exc:
            raise PrepareError(f"could not index the shards in {out}: {exc}") from exc
    corrupt = [
        {"source_id": r.source_id, **c} for r in results for c in r.corrupt
    ]
    return PrepareSummary(
        out=str(out),
        world_size=world_size,
        sources=n_sources,
        written=[r.source_id for r in results if r.status == "written"],
        already_done=[r.source_id for r in results if r.status == "already_done"],
        empty=[
            {"source_id": r.source_id, "reason": r.reason} for r in results if r.status == "empty"
        ],
        failed=[
            {"source_id": r.source_id, "path": r.path, "reason": r.reason}
            for r in results
            if r.status == "failed"
        ],
        tiles_written=sum(r.tiles for r in results if r.status == "written"),
        tiles_total=sum(r.tiles for r in results),
        corrupt_count=len(corrupt),
        corrupt=corrupt,
        manifest=manifest,
        config=config.fingerprint(),
        latent_space=LATENT_SPACE if config.latents is not None else "",
        rna=rna,
    )


def _log_summary(summary: PrepareSummary) -> None:
    logger.info(
        "prepare: %d sources (%d written, %d already done, %d empty, %d failed), %d tiles "
        "written, %d in total, %d corrupt inputs skipped",
        summary.sources, len(summary.written), len(summary.already_done), len(summary.empty),
        len(summary.failed), summary.tiles_written, summary.tiles_total, summary.corrupt_count,
    )  # fmt: skip
    for failure in summary.failed:
        logger.warning("failed: %s (%s)", failure["path"], failure["reason"])
