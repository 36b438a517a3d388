"""Web form -> prompt records -> the generation engine, one generation at a time.

Framework-free: `app.py` passes the form's text fields and the uploads it saved into the
request's job folder; this module validates them against the checkpoint and the limits,
builds `PromptRecord`s and runs `generate_records` (the engine behind `mupad generate`:
same conditions, PNGs and sidecar JSONs) on a single worker thread.

Seeds: image k of a request with seed s is its own record with seed s + k and one image,
as row k of a `mupad generate --prompts` file with `--seed s` — so that seed alone gives
the same tile again, here or with `mupad generate --seed <s + k>` and the same inputs.
Seeds stay below 2^53 so the page's JavaScript shows them exactly.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import enum
import json
import logging
import math
import re
import secrets
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from PIL import Image

from mupad.applications.batch_generate import FlatLayout, generate_records
from mupad.applications.generation_model import GenerationModel, GenerationSettings
from mupad.applications.prompts import PromptRecord
from mupad.applications.provenance import save_png_atomic
from mupad.applications.reference_images import inspect_reference_image
from mupad.conditions import Modality
from mupad.config import (
    ConfigError,
    GuidanceConfig,
    GuidanceScheduleKind,
    SampleConfig,
    SamplerKind,
    parse_enum,
)
from mupad.data.tiles import IMAGE_SUFFIXES, bundled_kather_dir
from mupad.errors import MupadError

logger = logging.getLogger(__name__)

KATHER_MPP = 0.495  # µm/px of the bundled tiles (mupad/assets/kather2016/ATTRIBUTION.md)
DEFAULT_STEPS = 50  # the page's default: the paper's 250 is slow on a CPU
MAX_SEED = 2**53 - 1  # the largest integer a JavaScript number holds exactly
RANDOM_SEED_BELOW = 2**31  # random seeds stay short enough to read and retype
JOB_ID = re.compile(r"[0-9a-f]{32}")  # uuid4().hex

# Form field -> the condition it belongs to (None: a sampler setting).
FORM_FIELDS: dict[str, Modality | None] = {
    "text": Modality.TEXT,
    "tile": Modality.IMAGE,
    "image": Modality.IMAGE,
    "image_mpp": Modality.IMAGE,
    "rna": Modality.RNA,
    "rna_kind": Modality.RNA,
    "rna_row": Modality.RNA,
    "guidance": None,
    "guidance_schedule": None,
    "sampler": None,
    "steps": None,
    "num_images": None,
    "seed": None,
}
# Upload fields -> accepted file-name endings (the engine reads files by their suffix).
UPLOAD_SUFFIXES: dict[str, tuple[str, ...]] = {
    "image": (*sorted(IMAGE_SUFFIXES), ".webp"),
    "rna": (
        ".npy", ".txt", ".csv", ".tsv", ".tab", ".txt.gz", ".csv.gz", ".tsv.gz", ".tab.gz",
        ".parquet", ".pq", ".h5ad",
    ),
}  # fmt: skip


class RnaKind(str, enum.Enum):
    SCORES = "scores"  # pathway scores in the model's order (or a table with named columns)
    EXPRESSION = "expression"  # an expression profile, scored with the model's gene sets


class RequestError(MupadError, ValueError):
    """A form is unusable (HTTP 400); the message says what to change."""


class BusyError(MupadError, RuntimeError):
    """Too many requests already wait for the generator (HTTP 503)."""


@dataclasses.dataclass(frozen=True)
class ServeLimits:
    """What one request may ask for; every limit is checked before any work."""

    max_upload_bytes: int = 10 * 2**20  # the whole request body
    max_images: int = 4
    max_steps: int = 250
    max_image_pixels: int = 25_000_000  # 5000 x 5000 px: a decoded upload stays < 100 MB
    max_caption_chars: int = 2000
    max_guidance: float = 20.0
    max_queue: int = 4  # requests waiting behind the running one; more -> BusyError
    keep_jobs: int = 100  # job folders kept on disk, the oldest removed first

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            low = 0 if field.name in ("max_queue", "max_guidance") else 1
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= low):
                raise ConfigError(f"{field.name} must be a number >= {low}, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class SavedUpload:
    """An uploaded file, already written into the job's inputs folder."""

    field: str
    filename: str  # as the browser named it (shown in messages)
    path: Path  # inputs/<field><suffix>


@dataclasses.dataclass(frozen=True)
class Job:
    id: str  # 32 hex digits
    folder: Path

    @property
    def inputs(self) -> Path:
        return self.folder / "inputs"


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    records: tuple[PromptRecord, ...]  # one per image: seeds s, s + 1, ...
    sample_config: SampleConfig
    random_seed: bool  # the form left the seed blank

    @property
    def seed(self) -> int:
        return self.records[0].seed


@dataclasses.dataclass(frozen=True)
class GeneratedImage:
    index: int
    seed: int  # this image's own seed (see the module docstring)
    png: Path
    sidecar: Path

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "seed": self.seed,
            "png": self.png.name,
            "sidecar": self.sidecar.name,
        }


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    job: str
    seed: int
    random_seed: bool
    modalities: tuple[str, ...]
    images: tuple[GeneratedImage, ...]
    elapsed_s: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "seed": self.seed,
            "random_seed": self.random_seed,
            "modalities": list(self.modalities),
            "images": [image.to_dict() for image in self.images],
            "elapsed_s": round(self.elapsed_s, 3),
        }


def upload_suffix(field: str, filename: str) -> str:
    """The accepted ending of an upload's file name (lower case), else RequestError."""
    if field not in UPLOAD_SUFFIXES:
        raise RequestError(
            f"{field!r} is not a file field; upload files as {' or '.join(UPLOAD_SUFFIXES)}"
        )
    name = filename.lower()
    suffix = max((s for s in UPLOAD_SUFFIXES[field] if name.endswith(s)), key=len, default=None)
    if suffix is None:
        raise RequestError(
            f"{filename!r}: the {field} upload must be one of {', '.join(UPLOAD_SUFFIXES[field])}"
        )
    return suffix


def bundled_tiles() -> dict[str, Path]:
    """'<class>/<file>' -> path of every bundled Kather tile (the page's reference picker)."""
    root = bundled_kather_dir()
    return {
        f"{path.parent.name}/{path.name}": path
        for path in sorted(root.glob("*/*"))
        if path.suffix.lower() in IMAGE_SUFFIXES
    }


def _pixel_count(path: Path) -> int | None:
    """Width x height from the file header (no decoding); None when unreadable here (the
    engine's own check then reports why)."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        try:
            with tifffile.TiffFile(path) as tif:
                width, height = tif.pages[0].imagewidth, tif.pages[0].imagelength
        except (OSError, ValueError, IndexError, tifffile.TiffFileError):
            return None
    return int(width) * int(height)


def _text(fields: Mapping[str, str], name: str) -> str | None:
    value = fields.get(name)
    return value if value is not None and value.strip() else None


def _number(
    fields: Mapping[str, str],
    name: str,
    kind: type[int | float],
    default: float | None,
    low: float,
    high: float,
) -> Any:
    """A number field in [low, high], or `default` when blank."""
    raw = _text(fields, name)
    if raw is None:
        return default
    try:
        value = kind(raw.strip())
    except ValueError:
        noun = "a whole number" if kind is int else "a number"
        raise RequestError(f"{name} must be {noun}, got {raw!r}") from None
    if not (math.isfinite(value) and low <= value <= high):
        raise RequestError(f"{name} must be between {low} and {high}, got {raw.strip()}")
    return value


class GenerationService:
    """A loaded checkpoint that turns validated forms into generated tiles, one at a time."""

    def __init__(
        self,
        settings: GenerationSettings,
        root: Path,
        limits: ServeLimits = ServeLimits(),
    ) -> None:
        self.model = GenerationModel(settings)
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.limits = limits
        self.streams = tuple(m for m in Modality if m.value in self.model.streams)
        self.tiles = bundled_tiles() if Modality.IMAGE in self.streams else {}
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mupad-gen")
        self._lock = threading.Lock()
        self._pending = 0  # submitted and not finished, the running one included
        self._warm_up()

    # ------------------------------------------------------------------------------
    # Start-up and description
    # ------------------------------------------------------------------------------

    def _warm_up(self) -> None:
        """Load the text/image encoders now (else the first request waits for them) and
        check that their token widths fit the model's streams."""
        if not {Modality.TEXT, Modality.IMAGE} & set(self.streams):
            return
        with tempfile.TemporaryDirectory() as folder:
            image = None
            if Modality.IMAGE in self.streams:
                image = Path(folder) / "warm-up.png"
                side = self.model.tile_px
                save_png_atomic(np.full((side, side, 3), 200, np.uint8), image)
            text = "warm-up" if Modality.TEXT in self.streams else None
            self.model.encode(PromptRecord(id="warm-up", seed=0, text=text, image=image))

    @property
    def default_steps(self) -> int:
        return min(DEFAULT_STEPS, self.limits.max_steps)

    def describe(self) -> dict[str, Any]:
        """What the page shows and the client may send (GET /api/info)."""
        captions = self.model.metadata.get("captions") or []
        return {
            "checkpoint": self.model.settings.checkpoint,
            "model_dir": str(self.model.model_dir),
            "streams": [m.value for m in self.streams],
            "tile_px": self.model.tile_px,
            "model_mpp": self.model.model_mpp,
            "codec": self.model.codec_spec,
            "device": self.model.device,
            "captions": [str(c) for c in captions],
            "tiles": list(self.tiles),
            "samplers": [s.value for s in SamplerKind],
            "guidance_schedules": [s.value for s in GuidanceScheduleKind],
            "rna_kinds": [k.value for k in RnaKind],
            "upload_suffixes": {k: list(v) for k, v in UPLOAD_SUFFIXES.items()},
            "defaults": {
                "guidance": GuidanceConfig().start,
                "guidance_schedule": GuidanceConfig().schedule.value,
                "sampler": SampleConfig().sampler.value,
                "steps": self.default_steps,
                "num_images": 1,
            },
            "limits": self.limits.to_dict(),
        }

    # ------------------------------------------------------------------------------
    # Jobs
    # ------------------------------------------------------------------------------

    def new_job(self) -> Job:
        job_id = uuid.uuid4().hex  # matches JOB_ID
        job = Job(id=job_id, folder=self.root / job_id)
        job.inputs.mkdir(parents=True)
        return job

    def job_file(self, job_id: str, name: str) -> Path | None:
        """An output file of a job, or None (ids and names are checked by the caller)."""
        path = self.root / job_id / name
        return path if path.is_file() else None

    def discard(self, job: Job) -> None:
        shutil.rmtree(job.folder, ignore_errors=True)

    def _prune(self, keep: Job) -> None:
        """Keep the newest `keep_jobs` job folders (never touching other folders in root)."""
        jobs = [
            p
            for p in self.root.iterdir()
            if p.is_dir() and JOB_ID.fullmatch(p.name) and p.name != keep.id
        ]
        jobs.sort(key=lambda p: p.stat().st_mtime)
        for old in jobs[: max(0, len(jobs) + 1 - self.limits.keep_jobs)]:
            shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------------------------
    # Forms -> requests
    # ------------------------------------------------------------------------------

    def _streams_text(self) -> str:
        return ", ".join(m.value for m in self.streams) or "none (an unconditional model)"

    def prepare(
        self, fields: Mapping[str, str], uploads: Mapping[str, SavedUpload]
    ) -> GenerationRequest:
        """Validate a form against the checkpoint and the limits (cheap: headers only)."""
        limits = self.limits
        for name in (*fields, *uploads):
            if name not in FORM_FIELDS:
                raise RequestError(
                    f"unknown field {name!r}; the conditions of this checkpoint are "
                    f"{self._streams_text()} (fields: {', '.join(FORM_FIELDS)})"
                )
        for name, modality in FORM_FIELDS.items():
            given = name in uploads or _text(fields, name) is not None
            if given and modality is not None and modality not in self.streams:
                raise RequestError(
                    f"this checkpoint has no {modality.value} condition (field {name!r}); "
                    f"its conditions are {self._streams_text()}"
                )
        for name in UPLOAD_SUFFIXES:
            if _text(fields, name) is not None:
                raise RequestError(f"{name!r} must be a file upload")

        text = _text(fields, "text")
        if text is not None and len(text) > limits.max_caption_chars:
            raise RequestError(
                f"the caption has {len(text)} characters; the limit is {limits.max_caption_chars}"
            )
        image, image_mpp = self._reference(fields, uploads)
        rna = uploads.get("rna")
        rna_kind = parse_enum(RnaKind, _text(fields, "rna_kind") or RnaKind.SCORES.value)
        num_images = _number(fields, "num_images", int, 1, 1, limits.max_images)
        steps = _number(fields, "steps", int, self.default_steps, 1, limits.max_steps)
        seed = _number(fields, "seed", int, None, 0, MAX_SEED - (num_images - 1))
        random_seed = seed is None
        if random_seed:
            seed = secrets.randbelow(RANDOM_SEED_BELOW)
        guidance = GuidanceConfig(
            schedule=parse_enum(
                GuidanceScheduleKind,
                _text(fields, "guidance_schedule") or GuidanceConfig().schedule.value,
            ),
            start=_number(
                fields, "guidance", float, GuidanceConfig().start, 0.0, limits.max_guidance
            ),
        )
        sampler = parse_enum(SamplerKind, _text(fields, "sampler") or SampleConfig().sampler.value)
        records = tuple(
            PromptRecord(
                id=f"seed{seed + k}",
                seed=seed + k,
                text=text,
                image=image,
                image_mpp=image_mpp,
                rna=rna.path if rna and rna_kind is RnaKind.SCORES else None,
                rna_expression=rna.path if rna and rna_kind is RnaKind.EXPRESSION else None,
                rna_row=_text(fields, "rna_row"),
            )
            for k in range(num_images)
        )
        sample_config = SampleConfig(sampler=sampler, num_steps=steps, guidance=guidance)
        return GenerationRequest(records, sample_config, random_seed)

    def _reference(
        self, fields: Mapping[str, str], uploads: Mapping[str, SavedUpload]
    ) -> tuple[Path | None, float | None]:
        """(reference image, its µm/px) from an upload or a bundled tile, checked."""
        tile, upload = _text(fields, "tile"), uploads.get("image")
        mpp = _number(fields, "image_mpp", float, None, 1e-3, 1e3)
        if tile is not None and upload is not None:
            raise RequestError("give a reference image upload or a bundled tile, not both")
        if tile is not None:
            if tile not in self.tiles:
                raise RequestError(f"{tile!r} is not a bundled tile (GET /api/info lists them)")
            if mpp is None and self.model.model_mpp is not None:
                mpp = KATHER_MPP  # resampled to the model's scale
            path = self.tiles[tile]
        elif upload is not None:
            path = upload.path
            pixels = _pixel_count(path)
            if pixels is not None and pixels > self.limits.max_image_pixels:
                raise RequestError(
                    f"{upload.filename} has {pixels:,} pixels; the limit is "
                    f"{self.limits.max_image_pixels:,} (send a tile, not a slide)"
                )
        else:
            return None, mpp
        inspect_reference_image(path, self.model.tile_px, mpp=mpp, model_mpp=self.model.model_mpp)
        return path, mpp

    # ------------------------------------------------------------------------------
    # Generation
    # ------------------------------------------------------------------------------

    def submit(
        self, job: Job, request: GenerationRequest
    ) -> concurrent.futures.Future[GenerationResult]:
        """Queue a request on the single generation thread (BusyError when the queue is
        full). Input errors found while encoding surface from the future."""
        with self._lock:
            if self._pending > self.limits.max_queue:
                raise BusyError(
                    f"{self._pending} generations are running or waiting; try again shortly"
                )
            self._pending += 1
        future = self._worker.submit(self._run, job, request)
        future.add_done_callback(self._finished)
        return future

    def _finished(self, _: concurrent.futures.Future) -> None:
        with self._lock:
            self._pending -= 1

    def _run(self, job: Job, request: GenerationRequest) -> GenerationResult:
        start = time.perf_counter()
        report = generate_records(
            self.model, request.records, request.sample_config, FlatLayout(job.folder),
            progress=False,
        )  # fmt: skip
        images = []
        for index, png in enumerate(report.written):  # in record order
            sidecar = png.with_suffix(".json")
            seed = int(json.loads(sidecar.read_text())["seed"])
            images.append(GeneratedImage(index, seed, png, sidecar))
        self._prune(keep=job)
        return GenerationResult(
            job=job.id,
            seed=request.seed,
            random_seed=request.random_seed,
            modalities=tuple(m.value for m in request.records[0].modalities),
            images=tuple(images),
            elapsed_s=time.perf_counter() - start,
        )

    def user_message(self, error: BaseException, uploads: Mapping[str, SavedUpload]) -> str:
        """The error's message with server-side upload paths replaced by the file names."""
        message = str(error)
        for upload in uploads.values():
            message = message.replace(str(upload.path), upload.filename)
        return message.replace(str(self.root), "<uploads>")

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)
