"""Train a SiT on a prepared shard folder (`mupad prepare`), reading cached latents.

The trainer never runs the VAE: batches come from the cached posterior moments (one sample
per step from the step's generator), and conditions from the cached text / image tokens and
RNA pathway scores. A shard folder without latents trains in pixel space on its `image`
field. Model widths (latent channels, size, condition dims, pathways) are read from the
shards' schema unless a full `model_config` is given.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mupad.applications.progress_samples import ProgressSamples
from mupad.config import (
    AlignmentConfig,
    CrossAttentionKind,
    ModelConfig,
    TeacherSource,
    TrainConfig,
    model_preset,
)
from mupad.data.shards import ShardError
from mupad.data.streaming import ShardBatches, ShardedDataset
from mupad.latents import load_codec
from mupad.models import SiT
from mupad.training.distributed import DistContext
from mupad.training.loop import Trainer, TrainResult, step_generator
from mupad.training.objectives import objective_model_config
from mupad.training.teacher import TeacherSpec, online_teacher, spec_from_token_shape

logger = logging.getLogger(__name__)

LATENT_KEY = "latent_moments"
IMAGE_KEY = "image"


@dataclass
class ShardRun:
    dataset: ShardedDataset
    model_config: ModelConfig
    result: TrainResult


# Shard field of each condition modality.
CONDITION_FIELDS = {"text": "text_tokens", "image": "image_tokens", "rna": "rna_scores"}


def condition_fields(
    schema: Mapping[str, Any], modalities: Sequence[str] | None
) -> dict[str, str | None]:
    """{modality: shard field or None}: every condition the shards hold (modalities=None),
    or exactly the requested ones (an error names any the shards lack)."""
    held = {m: f for m, f in CONDITION_FIELDS.items() if f in schema}
    if modalities is None:
        return {m: held.get(m) for m in CONDITION_FIELDS}
    unknown = sorted(set(modalities) - set(CONDITION_FIELDS))
    if unknown:
        raise ShardError(f"unknown condition(s) {unknown}; choose from {sorted(CONDITION_FIELDS)}")
    missing = sorted(m for m in modalities if m not in held)
    if missing:
        raise ShardError(
            f"the shards hold no {', '.join(missing)} condition (fields: {sorted(schema)})"
        )
    return {m: (held[m] if m in modalities else None) for m in CONDITION_FIELDS}


def model_widths(
    schema: Mapping[str, Any],
    *,
    use_latents: bool = True,
    modalities: Sequence[str] | None = None,
) -> dict[str, int]:
    """ModelConfig fields implied by a shard schema {field: {'shape', 'dtype'}} (condition
    widths only for the `modalities` used; None = all the shards hold)."""
    widths: dict[str, int] = {}
    if use_latents and LATENT_KEY in schema:
        channels2, height, _ = schema[LATENT_KEY]["shape"]  # (2C, h, w)
        widths.update(in_channels=channels2 // 2, sample_size=height)
    elif IMAGE_KEY in schema:
        shape = schema[IMAGE_KEY]["shape"]  # (3, S, S) or (S, S, 3)
        widths.update(in_channels=3, sample_size=shape[1] if shape[0] == 3 else shape[0])
    else:
        raise ShardError(
            f"the shards hold neither {LATENT_KEY!r} nor {IMAGE_KEY!r} (fields: {sorted(schema)}); "
            "re-run `mupad prepare` with latents or pixels"
        )
    fields = condition_fields(schema, modalities)
    if fields["text"]:
        widths["text_dim"] = schema[fields["text"]]["shape"][-1]
    if fields["image"]:
        widths["image_dim"] = schema[fields["image"]]["shape"][-1]
    if fields["rna"]:
        widths["rna_pathways"] = schema[fields["rna"]]["shape"][0]
    return widths


def prepare_settings(data: str | Path) -> dict[str, Any]:
    """The settings `mupad prepare` recorded in `<data>/summary.json` ({} for shards written
    another way): which VAE and encoders produced the cached latents and tokens."""
    summary = Path(data) / "summary.json"
    if not summary.is_file():
        return {}
    return json.loads(summary.read_text()).get("config", {})


def rna_metadata(data: str | Path, num_pathways: int) -> dict[str, Any]:
    """The run metadata that conditions a model on the shards' `rna_scores` later (read by
    `mupad.applications.rna_inputs.rna_spec`): pathway names in order, the gene sets the
    scores came from (path, None for the bundled collection, and digest) and the
    standardiser (None: the scores were used as stored). From `<data>/summary.json`."""
    summary = Path(data) / "summary.json"
    rna = json.loads(summary.read_text()).get("rna", {}) if summary.is_file() else {}
    names = rna.get("pathways")
    if not names or len(names) != num_pathways:
        logger.warning(
            "the shards in %s do not record the names of their %d pathways (prepare a CSV "
            "with rna_<pathway name> columns); generation will need --rna-pathways",
            data, num_pathways,
        )  # fmt: skip
        names = None
    gene_sets = rna.get("gene_sets")
    return {
        "rna_pathways": names,
        "rna_gene_sets": None if gene_sets in (None, "bundled") else gene_sets,
        "rna_gene_sets_sha256": rna.get("gene_sets_sha256"),
        "rna_standardiser": rna.get("standardiser"),
    }


def teacher_for_shards(
    schema: Mapping[str, Any], alignment: AlignmentConfig
) -> tuple[TeacherSpec | None, str | None, str | None]:
    """(teacher spec, shard field of cached teacher tokens, shard field of pixels) for an
    objective: cached features by default, the `image` pixels for an online teacher."""
    if not alignment.uses_teacher:
        return None, None, None
    if alignment.teacher_source is TeacherSource.ONLINE:
        if IMAGE_KEY not in schema:
            raise ShardError(
                f"an online teacher encodes the clean images, but the shards hold no "
                f"{IMAGE_KEY!r} field; re-run `mupad prepare --keep-pixels`, or use the cached "
                "teacher (`mupad prepare --image-encoder NAME`)"
            )
        return None, None, IMAGE_KEY
    field = alignment.teacher_field
    if field not in schema:
        raise ShardError(
            f"the {alignment.objective.value} objective aligns to cached teacher features, but "
            f"the shards hold no {field!r} field (fields: {sorted(schema)}); re-run `mupad "
            f"prepare --image-encoder {alignment.teacher}`, or pass --teacher-source online"
        )
    return spec_from_token_shape(schema[field]["shape"]), field, None


def train_on_shards(
    data: str | Path,
    out: str | Path,
    *,
    train_config: TrainConfig,
    preset: str = "S/2",
    backbone: Mapping[str, int] | None = None,
    model_config: ModelConfig | None = None,
    cross_attention: CrossAttentionKind = CrossAttentionKind.DECOUPLED,
    use_latents: bool = True,
    sample_latents: bool = True,
    latents: str | None = None,
    text_encoder: str | None = None,
    modalities: Sequence[str] | None = None,
    dist: DistContext | None = None,
    dihedral: bool = False,
    preview_images: int = 8,
    progress: bool = True,
) -> ShardRun:
    """Train on the shards under `data`; resumes if `out` already holds a run.

    `latents` / `text_encoder` name the VAE and text encoder the shards were prepared with;
    they are stored in the checkpoint metadata so samples can be decoded and prompted later.
    `backbone` overrides the preset's hidden_size / depth / num_heads (e.g. a shallower model
    for a CPU budget). `modalities` picks the condition streams (e.g. ["text"]; [] trains unconditionally);
    None uses every condition the shards hold. `dihedral` gives each tile a random flip /
    quarter turn (with its teacher grid; see `ShardBatches`).
    Under torchrun pass `dist=distributed.from_environment()`: every process reads the
    step's whole global batch (cheap with cached latents and tokens) and trains on its rows,
    so data order and noise are the same for any number of processes.
    """
    dataset = ShardedDataset(data, seed=train_config.seed)
    schema = dataset.schema
    alignment = train_config.alignment
    teacher, teacher_key, pixels_key = teacher_for_shards(schema, alignment)
    if model_config is None:
        widths = model_widths(schema, use_latents=use_latents, modalities=modalities)
        backbone = dict(backbone or {})
        if "rna_pathways" in widths:
            widths["rna_dim"] = model_preset(preset, **backbone).hidden_size
        model_config = model_preset(
            preset, cross_attention=cross_attention, **backbone, **widths
        )
    latent_key = LATENT_KEY if use_latents and LATENT_KEY in schema else None
    fields = condition_fields(schema, modalities)
    batches = ShardBatches(
        dataset,
        train_config.batch_size,
        latent_key=latent_key,
        sample_latents=sample_latents,
        text_key=fields["text"],
        image_cond_key=fields["image"],
        rna_key=fields["rna"],
        teacher_key=teacher_key,
        pixels_key=pixels_key,
        dihedral=dihedral,
    )
    trainer_device = dist.device if dist is not None else torch.device("cpu")
    teacher_online = online_teacher(alignment, trainer_device)
    if teacher_online is not None:
        teacher = teacher_online.spec
    model_config = objective_model_config(model_config, alignment, teacher)
    torch.manual_seed(train_config.seed)
    model = SiT(model_config)
    prepared = prepare_settings(data)
    latents = latents or prepared.get("latents")
    text_encoder = text_encoder or prepared.get("text_encoder")
    codec_name = latents if latent_key is not None else "identity"
    metadata: dict[str, Any] = {
        "data": str(data),
        "shard_fields": sorted(schema),
        "records_per_epoch": len(dataset),
        "latents": codec_name,
        "text_encoder": text_encoder,
        "image_encoder": prepared.get("image_encoder"),
        # µm/px of the training tiles (slides: the tiling target; tile folders: if given).
        "target_mpp": prepared.get("target_mpp")
        if "slides" in str(prepared.get("kind", "")).lower()
        else prepared.get("tile_mpp"),
        "objective": alignment.objective.value,
        "conditions": sorted(m for m, f in fields.items() if f),
        "dihedral": dihedral,
    }
    if fields["rna"]:
        metadata.update(rna_metadata(data, schema[fields["rna"]]["shape"][0]))
    sample_hook = None
    if train_config.sample_every:
        first = batches(0, step_generator(train_config.seed, 0))
        sample_hook = ProgressSamples(
            Path(out) / "samples",
            first.cond,
            min(preview_images, train_config.batch_size),
            load_codec(codec_name),
        )
    trainer = Trainer(
        model,
        train_config,
        out,
        batches,
        dist=dist,
        teacher=teacher,
        online=teacher_online,
        metadata=metadata,
        sample_hook=sample_hook,
        progress=progress,
    )
    try:
        result = trainer.train()
    finally:
        batches.close()
    return ShardRun(dataset=dataset, model_config=model_config, result=result)
