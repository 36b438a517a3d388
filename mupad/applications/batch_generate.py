"""Generate images for prompt records, with a sidecar per image that regenerates it exactly.

    report = generate_records(GenerationModel(settings), records, SampleConfig(), FlatLayout(out))
    result = regenerate("out/00001_0.json", "again/")

Batching and seeds: a record's `num_images` images are sampled in chunks of
`settings.batch_size` (default: all at once). Chunk c of a record with seed s is sampled with
SampleConfig.seed = s for c = 0 and `chunk_seed(s, c)` after; its conditions are the
record's (encoded once) repeated over the chunk. A sidecar stores the chunk's exact
SampleConfig, the chunk size and the image's position in it, so sampling that chunk again
gives the same pixels (same software and device; the sidecar records both).

Writes: every PNG and sidecar is written under a temporary name and renamed, the PNG first,
so an image counts as done once its sidecar exists. Every record is checked (model streams,
input files, reference image size, output clashes) before anything is generated. A rerun
skips images whose sidecar matches the request and refuses to replace different ones
unless `overwrite=True`.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

import mupad
from mupad.applications.generate import generate
from mupad.applications.generation_model import GenerationModel, GenerationSettings
from mupad.applications.prompts import PromptError, PromptRecord
from mupad.applications.provenance import file_sha256, save_png_atomic
from mupad.conditions import Conditions, Modality
from mupad.config import SampleConfig, from_dict, to_dict
from mupad.errors import MupadError
from mupad.fileio import atomic_write_text

logger = logging.getLogger(__name__)

SIDECAR_FORMAT = "mupad.generated_image"
SIDECAR_VERSION = 1


class RegenerationError(MupadError, ValueError):
    """A sidecar cannot be regenerated as recorded (other weights, changed inputs, ...)."""


class Layout(Protocol):
    """Where the k-th image of a record (and its sidecar, if any) goes."""

    def png(self, record: PromptRecord, index: int) -> Path: ...

    def sidecar(self, record: PromptRecord, index: int) -> Path | None: ...


@dataclasses.dataclass(frozen=True)
class FlatLayout:
    """out/<record id>_<k>.png with out/<record id>_<k>.json beside it."""

    out: Path

    def png(self, record: PromptRecord, index: int) -> Path:
        return Path(self.out) / f"{record.id}_{index}.png"

    def sidecar(self, record: PromptRecord, index: int) -> Path | None:
        return Path(self.out) / f"{record.id}_{index}.json"


@dataclasses.dataclass(frozen=True)
class FolderLayout:
    """out/<record id>/<k>.png (k zero-padded to 4 digits) with <k>.json beside it: one
    folder per record, for evaluation sets (a class, a spot) generated record by record."""

    out: Path

    def png(self, record: PromptRecord, index: int) -> Path:
        return Path(self.out) / record.id / f"{index:04d}.png"

    def sidecar(self, record: PromptRecord, index: int) -> Path | None:
        return Path(self.out) / record.id / f"{index:04d}.json"


def named_seed(seed: int, name: str) -> int:
    """A stable 63-bit seed for one named record under a base seed: independent of which
    other records are generated with it (a class, a spot)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def chunk_seed(seed: int, chunk: int) -> int:
    """The sampler seed of chunk `chunk` of a record seeded `seed` (chunk 0: the seed itself;
    later chunks: a SeedSequence hash, so consecutive record seeds never share noise)."""
    if chunk == 0:
        return seed
    state = np.random.SeedSequence([seed, chunk]).generate_state(1, dtype=np.uint64)[0]
    return int(state) >> 1


@dataclasses.dataclass(frozen=True)
class Slot:
    """One image to write."""

    record: PromptRecord
    index: int  # k, 0-based, within the record
    chunk: int
    batch_size: int  # images in the chunk
    batch_index: int  # position within the chunk
    sample_config: SampleConfig  # the chunk's, exact
    png: Path
    sidecar: Path | None
    fingerprint: str


@dataclasses.dataclass
class GenerationReport:
    written: list[Path] = dataclasses.field(default_factory=list)
    skipped: list[Path] = dataclasses.field(default_factory=list)
    records: int = 0


def _fingerprint(
    record: PromptRecord, settings: GenerationSettings, config: SampleConfig, weights: str,
    batch: tuple[int, int],
) -> str:  # fmt: skip
    """What decides an image (the device only changes rounding, so it is left out)."""
    return _digest(record.to_json(), settings.to_dict(), to_dict(config), weights, batch)


def _digest(
    record: dict[str, Any], settings: dict[str, Any], config: dict[str, Any], weights: str,
    batch: Sequence[int],
) -> str:  # fmt: skip
    payload = {
        "record": record,
        "settings": {k: v for k, v in settings.items() if k != "device"},
        "sample_config": config,
        "weights_sha256": weights,
        "batch": list(batch),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def plan_record(
    model: GenerationModel, record: PromptRecord, base: SampleConfig, layout: Layout
) -> list[list[Slot]]:
    """The record's images, grouped in sampler chunks."""
    config = record.sample_config(base)
    size = model.settings.batch_size or record.num_images
    chunks = []
    for chunk, start in enumerate(range(0, record.num_images, size)):
        count = min(size, record.num_images - start)
        chunk_config = dataclasses.replace(config, seed=chunk_seed(record.seed, chunk))
        chunks.append(
            [
                Slot(
                    record=record,
                    index=start + i,
                    chunk=chunk,
                    batch_size=count,
                    batch_index=i,
                    sample_config=chunk_config,
                    png=layout.png(record, start + i),
                    sidecar=layout.sidecar(record, start + i),
                    fingerprint=_fingerprint(
                        record, model.settings, chunk_config, model.weights_sha256, (count, i)
                    ),
                )
                for i in range(count)
            ]
        )
    return chunks


def _done(slot: Slot, overwrite: bool) -> bool:
    """True if the slot's output exists for this very request; errors on a different one."""
    if overwrite:
        return False
    if slot.sidecar is None:
        return slot.png.is_file()
    if not slot.sidecar.is_file():
        return False  # a PNG without its sidecar is an interrupted write: redone
    try:
        existing = json.loads(slot.sidecar.read_text()).get("fingerprint")
    except (json.JSONDecodeError, OSError):
        existing = None
    if existing == slot.fingerprint:
        return slot.png.is_file()  # a lost PNG is made again
    raise PromptError(
        f"{slot.png} already exists from a different prompt or configuration; pass "
        "--overwrite to replace it, or write to another --out folder"
    )


def restrict(
    model: GenerationModel, records: Sequence[PromptRecord], modalities: Iterable[Modality] | None
) -> list[PromptRecord]:
    """Keep only the chosen condition modalities of every record (None: all given)."""
    if modalities is None:
        return list(records)
    chosen = tuple(modalities)
    lacking = [m.value for m in chosen if m.value not in model.streams]
    if lacking:
        have = ", ".join(sorted(model.streams)) or "none"
        raise PromptError(
            f"--conditions asks for {', '.join(lacking)} but the model has no stream for it; "
            f"its condition streams are: {have}"
        )
    return [r.restricted(chosen) for r in records]


def sample_chunk(
    model: GenerationModel, cond: Conditions | None, config: SampleConfig, count: int
) -> torch.Tensor:
    """uint8 images (count, 3, H, W) for a batch-of-one condition repeated `count` times."""
    batch = cond.index(torch.zeros(count, dtype=torch.long)) if cond is not None else None
    return generate(
        model.model,
        batch,
        config,
        batch_size=count,
        codec=model.codec,
        size=model.latent_side,
        bf16=model.settings.bf16,
    )


def _sidecar(model: GenerationModel, slot: Slot, encoded: Any, image_sha: str) -> dict[str, Any]:
    return {
        "format": SIDECAR_FORMAT,
        "version": SIDECAR_VERSION,
        "image": slot.png.name,
        "image_sha256": image_sha,
        "record": slot.record.to_json(),
        "seed": slot.record.seed,
        "index": slot.index,
        "batch": {"chunk": slot.chunk, "size": slot.batch_size, "index": slot.batch_index},
        "sample_config": to_dict(slot.sample_config),
        "settings": model.settings.to_dict(),
        "conditions": {
            "modalities": [m.value for m in slot.record.modalities],
            "sha256": encoded.checksum,
        },
        "inputs": encoded.inputs,
        "model": model.describe(),
        "software": {
            "mupad": mupad.__version__,
            "torch": torch.__version__,
            "device": model.device,
        },
        "fingerprint": slot.fingerprint,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _write(model: GenerationModel, slot: Slot, image: torch.Tensor, encoded: Any) -> None:
    save_png_atomic(image, slot.png)
    if slot.sidecar is not None:
        sidecar = _sidecar(model, slot, encoded, file_sha256(slot.png))
        atomic_write_text(slot.sidecar, json.dumps(sidecar, indent=2) + "\n")


def generate_records(
    model: GenerationModel,
    records: Sequence[PromptRecord],
    base: SampleConfig,
    layout: Layout,
    *,
    modalities: Iterable[Modality] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    on_checked: Callable[[], None] | None = None,
) -> GenerationReport:
    """Check every record, then generate and write the images that are not done yet.

    `on_checked` runs once every record passed its checks, before the first image."""
    if not records:
        raise PromptError("no prompt records to generate")
    records = restrict(model, records, modalities)
    plans = []
    for record in records:  # every check before any work
        model.check_record(record)
        chunks = plan_record(model, record, base, layout)
        todo = [[slot for slot in chunk if not _done(slot, overwrite)] for chunk in chunks]
        plans.append((record, chunks, todo))
    if on_checked is not None:
        on_checked()
    report = GenerationReport(records=len(records))
    total = sum(r.num_images for r in records)
    bar = tqdm(total=total, desc="generate", unit="img", disable=not progress)
    try:
        for record, chunks, todo in plans:
            bar.set_postfix_str(record.id)
            missing_pngs = {slot.png for missing in todo for slot in missing}
            skipped = [
                slot.png for chunk in chunks for slot in chunk if slot.png not in missing_pngs
            ]
            report.skipped.extend(skipped)
            bar.update(len(skipped))
            if not any(todo):
                continue
            encoded = model.encode(record)
            for chunk, missing in zip(chunks, todo):
                if not missing:
                    continue
                # The whole chunk is sampled (its noise depends on its size); only the missing
                # images are written.
                images = sample_chunk(model, encoded.cond, chunk[0].sample_config, len(chunk))
                for slot in missing:
                    _write(model, slot, images[slot.batch_index], encoded)
                    report.written.append(slot.png)
                bar.update(len(missing))
    finally:
        bar.close()
    return report


# --------------------------------------------------------------------------------------
# Exact regeneration
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Regeneration:
    png: Path
    sidecar: Path
    identical: bool  # the new PNG's bytes equal the recorded image's
    conditions_match: bool  # the inputs encoded to the recorded condition checksum


def read_sidecar(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise RegenerationError(f"sidecar {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise RegenerationError(f"sidecar {path} is not JSON: {error}") from None
    if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT:
        raise RegenerationError(f"{path} is not a mupad generation sidecar")
    if data.get("version") != SIDECAR_VERSION:
        raise RegenerationError(
            f"sidecar version {data.get('version')} is not supported (this mupad reads "
            f"version {SIDECAR_VERSION})"
        )
    return data


def _check_unedited(data: dict[str, Any], path: Path) -> None:
    """Refuse a sidecar whose record, seeds or sampler settings were changed after it was
    written: regenerating from it would write a sidecar claiming what was not used."""
    try:
        record, config, batch = data["record"], data["sample_config"], data["batch"]
        seed, chunk = record["seed"], int(batch["chunk"])
        seeds_agree = data.get("seed", seed) == seed and config.get("seed") == chunk_seed(
            int(seed), chunk
        )
        recorded = data.get("fingerprint")
        digest = _digest(
            record, data["settings"], config, data["model"]["weights_sha256"],
            (int(batch["size"]), int(batch["index"])),
        )  # fmt: skip
    except (KeyError, TypeError, ValueError) as error:
        raise RegenerationError(f"{path} is not a complete generation sidecar ({error})") from None
    if not seeds_agree or (recorded is not None and recorded != digest):
        raise RegenerationError(
            f"{path} was edited after it was written (its seed, record or sampler settings no "
            "longer match its fingerprint); --from-sidecar only regenerates an image exactly. "
            "For another seed or settings, run `mupad generate` with the prompt options and "
            "--seed"
        )


def regenerate(
    sidecar_path: str | Path,
    out: str | Path,
    *,
    checkpoint: str | Path | None = None,
    device: str | None = None,
    model: GenerationModel | None = None,
) -> Regeneration:
    """Sample the image a sidecar describes again, into `out/<same name>.png` (+ sidecar).

    The weights must hash as recorded and every input file as recorded (else
    RegenerationError). `checkpoint` points at moved weights; `device` runs elsewhere (exact
    only on the device and software recorded under "software").
    """
    sidecar_path = Path(sidecar_path)
    data = read_sidecar(sidecar_path)
    _check_unedited(data, sidecar_path)
    settings = GenerationSettings.from_dict(
        data["settings"], checkpoint=str(checkpoint) if checkpoint else None, device=device
    )
    model = model or GenerationModel(settings)
    if model.weights_sha256 != data["model"]["weights_sha256"]:
        raise RegenerationError(
            f"the weights at {model.model_dir} are not the ones {sidecar_path.name} was made "
            f"with (sha256 {model.weights_sha256[:12]}... vs {data['model']['weights_sha256'][:12]}"
            "...); point --checkpoint at the original weights"
        )
    for name, info in data.get("inputs", {}).items():
        if "sha256" in info and file_sha256(info["path"]) != info["sha256"]:
            raise RegenerationError(
                f"the {name} input {info['path']} changed since {sidecar_path.name} was written"
            )
    record = PromptRecord.from_json(data["record"])
    encoded = model.encode(record)
    conditions_match = encoded.checksum == data["conditions"]["sha256"]
    if not conditions_match:
        logger.warning(
            "the inputs of %s encode differently now (another encoder version or device); the "
            "image will differ", sidecar_path.name,
        )  # fmt: skip
    config = from_dict(SampleConfig, data["sample_config"])
    batch = data["batch"]
    images = sample_chunk(model, encoded.cond, config, int(batch["size"]))
    out = Path(out)
    png = out / data["image"]
    save_png_atomic(images[int(batch["index"])], png)
    new_sha = file_sha256(png)
    new_sidecar = {
        **data,
        "image_sha256": new_sha,
        "settings": model.settings.to_dict(),
        "software": {
            "mupad": mupad.__version__,
            "torch": torch.__version__,
            "device": model.device,
        },
        "regenerated_from": str(sidecar_path.resolve()),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    sidecar_out = png.with_suffix(".json")
    atomic_write_text(sidecar_out, json.dumps(new_sidecar, indent=2) + "\n")
    return Regeneration(
        png=png,
        sidecar=sidecar_out,
        identical=new_sha == data["image_sha256"],
        conditions_match=conditions_match,
    )
