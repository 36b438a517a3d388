"""Few-shot augmentation: N class-consistent variations of every real image of a labelled folder.

    augment_folder("fewshot/", model, "augmented/", per_image=8, sample_config=SampleConfig())

Input: an ImageFolder layout `data/<class>/<image>` (.png/.jpg/.tif/...). Each real image
is one prompt record: its image embedding (image condition) and its class caption (text
condition) — captions from `captions` ({class: caption}), else the run's own captions
(tile runs record class_names + captions), else `default_caption(class)`. Output, ready for
torchvision's ImageFolder or `mupad.data.tiles.load_tile_folder`:

    out/<class>/<stem>_aug<k>.png   k = 0..N-1, synthetic
    out/<class>/<image name>        the real image, copied as is (include_real=True)
    out/index.csv                   path, class, kind (real/synthetic), source, seed, k, caption
    out/augment.json                checkpoint + weights hash, settings, sample config, captions

Seeds: the image's seed is derived from (seed, class, file name), so adding images to the
folder never changes the others' outputs. Each image's record is the same as a `mupad
generate` record (image=<source>, text=<caption>, seed, num_images=N), so any variation
can be regenerated with `mupad generate` and the same settings. Resumable: existing
variations are skipped; a rerun with other settings into the same folder is refused unless
`overwrite=True`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from mupad.applications.batch_generate import GenerationReport, generate_records
from mupad.applications.generation_model import GenerationModel
from mupad.applications.prompts import PromptError, PromptRecord
from mupad.conditions import Modality
from mupad.config import SampleConfig, to_dict
from mupad.data.tiles import IMAGE_SUFFIXES, TileFolderError
from mupad.fileio import atomic_file, atomic_write_text
from mupad.training.captioned_tiles import default_caption

INDEX_NAME = "index.csv"
CONFIG_NAME = "augment.json"
DEFAULT_CONDITIONS = (Modality.IMAGE, Modality.TEXT)


@dataclasses.dataclass(frozen=True)
class FewShotImage:
    path: Path
    class_name: str


@dataclasses.dataclass
class AugmentResult:
    out: Path
    index: Path
    report: GenerationReport
    real_copied: int


def scan_fewshot(data: str | Path) -> list[FewShotImage]:
    """Every image of `data/<class>/`, in sorted order; stems must be unique per class."""
    data = Path(data)
    if not data.is_dir():
        raise TileFolderError(f"few-shot folder {data} does not exist")
    classes = sorted(p for p in data.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise TileFolderError(f"{data} has no class subfolders; expected {data}/<class>/<image>")
    images = []
    for folder in classes:
        files = sorted(
            p for p in folder.iterdir()
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
        )  # fmt: skip
        stems = [p.stem for p in files]
        repeated = sorted({s for s in stems if stems.count(s) > 1})
        if repeated:
            raise TileFolderError(
                f"{folder} has several images with the stem(s) {repeated[:3]} (e.g. a.png and "
                "a.jpg); their variations would share names, rename one"
            )
        images += [FewShotImage(path=p.resolve(), class_name=folder.name) for p in files]
    if not images:
        raise TileFolderError(
            f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in the class folders of {data}"
        )
    return images


def image_seed(seed: int, image: FewShotImage) -> int:
    """A stable 63-bit seed for one real image (independent of the other images)."""
    key = f"{seed}:{image.class_name}/{image.path.name}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") >> 1


def class_captions(
    class_names: list[str], model: GenerationModel, captions: Mapping[str, str] | None
) -> dict[str, str]:
    """Class -> caption: the given map, else the run's own captions, else the default."""
    captions = dict(captions or {})
    unknown = sorted(set(captions) - set(class_names))
    if unknown:
        raise PromptError(
            f"the captions name class(es) {unknown} that the folder does not have (classes: "
            f"{class_names})"
        )
    trained = dict(
        zip(model.metadata.get("class_names") or [], model.metadata.get("captions") or [])
    )
    return {c: captions.get(c) or trained.get(c) or default_caption(c) for c in class_names}


@dataclasses.dataclass(frozen=True)
class _AugmentLayout:
    out: Path
    names: Mapping[str, tuple[str, str]]  # record id -> (class, stem)

    def png(self, record: PromptRecord, index: int) -> Path:
        class_name, stem = self.names[record.id]
        return self.out / class_name / f"{stem}_aug{index}.png"

    def sidecar(self, record: PromptRecord, index: int) -> Path | None:
        return None


def _copy_atomic(source: Path, target: Path) -> None:
    with atomic_file(target) as tmp:  # the umask's permissions, as open() would give
        shutil.copyfile(source, tmp)


def _check_config(out: Path, config: dict[str, Any], overwrite: bool) -> None:
    """Refuse to mix outputs of different settings in one folder."""
    path = out / CONFIG_NAME
    if overwrite or not path.is_file():
        return
    try:
        previous = json.loads(path.read_text())
    except json.JSONDecodeError:
        previous = {}
    keys = ("weights_sha256", "settings", "sample_config", "per_image", "seed", "conditions")
    if any(previous.get(k) != config.get(k) for k in keys):
        raise PromptError(
            f"{out} holds an augmentation made with other settings ({path}); pass --overwrite "
            "to replace its images, or write to another --out folder"
        )


def augment_folder(
    data: str | Path,
    model: GenerationModel,
    out: str | Path,
    *,
    per_image: int,
    sample_config: SampleConfig,
    captions: Mapping[str, str] | None = None,
    include_real: bool = False,
    mpp: float | None = None,
    seed: int = 0,
    modalities: tuple[Modality, ...] = DEFAULT_CONDITIONS,
    overwrite: bool = False,
    progress: bool = True,
) -> AugmentResult:
    """Write `per_image` variations of every real image (+ the reals, optionally) and an index."""
    if per_image < 1:
        raise PromptError(f"per_image must be >= 1, got {per_image}")
    out = Path(out)
    images = scan_fewshot(data)
    class_names = sorted({i.class_name for i in images})
    caption_of = class_captions(class_names, model, captions)
    records, names = [], {}
    for number, image in enumerate(images):
        record_id = f"{number:06d}"
        names[record_id] = (image.class_name, image.path.stem)
        records.append(
            PromptRecord(
                id=record_id,
                seed=image_seed(seed, image),
                num_images=per_image,
                text=caption_of[image.class_name],
                image=image.path,
                image_mpp=mpp,
            )
        )
    config = {
        "data": str(Path(data).resolve()),
        "checkpoint": model.settings.checkpoint,
        "weights_sha256": model.weights_sha256,
        "settings": model.settings.to_dict(),
        "sample_config": to_dict(sample_config),
        "per_image": per_image,
        "seed": seed,
        "mpp": mpp,
        "conditions": [m.value for m in modalities],
        "captions": caption_of,
        "include_real": include_real,
    }
    _check_config(out, config, overwrite)
    layout = _AugmentLayout(out, names)

    def record_config() -> None:  # before the first image, so a rerun knows the settings
        atomic_write_text(out / CONFIG_NAME, json.dumps(config, indent=2) + "\n")

    report = generate_records(
        model, records, sample_config, layout,
        modalities=modalities, overwrite=overwrite, progress=progress, on_checked=record_config,
    )  # fmt: skip
    rows, copied = [], 0
    use_text = Modality.TEXT in modalities
    for record, image in zip(records, images):
        if include_real:
            target = out / image.class_name / image.path.name
            if overwrite or not target.is_file():
                _copy_atomic(image.path, target)
                copied += 1
            rows.append(_row(out, target, image, "real", None, None, ""))
        for k in range(per_image):
            png = layout.png(record, k)
            caption = (record.text or "") if use_text else ""
            rows.append(_row(out, png, image, "synthetic", record.seed, k, caption))
    index = out / INDEX_NAME
    atomic_write_text(index, pd.DataFrame(rows).to_csv(index=False))
    return AugmentResult(out=out, index=index, report=report, real_copied=copied)


def _row(
    out: Path, path: Path, image: FewShotImage, kind: str, seed: int | None, k: int | None,
    caption: str,
) -> dict[str, Any]:  # fmt: skip
    return {
        "path": path.relative_to(out).as_posix(),
        "class": image.class_name,
        "kind": kind,
        "source": str(image.path),
        "seed": "" if seed is None else seed,
        "k": "" if k is None else k,
        "caption": caption,
    }
