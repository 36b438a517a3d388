"""Train a SiT on a prepared shard folder (`mupad prepare`), reading cached latents.

The trainer never runs the VAE: batches come from the cached posterior moments (one sample
per step from the step's generator), and conditions from the cached text / image tokens and
RNA pathway scores. A shard folder without latents trains in pixel space on its `image`
field. Model widths (latent channels, size, condition dims, pathways) are read from the
shards' schema unless a full `model_config` is given.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mupad.config import CrossAttentionKind, ModelConfig, TrainConfig, model_preset
from mupad.data.shards import ShardError
from mupad.data.streaming import ShardBatches, ShardedDataset
from mupad.models import SiT
from mupad.training.loop import Trainer, TrainResult

LATENT_KEY = "latent_moments"
IMAGE_KEY = "image"


@dataclass
class ShardRun:
    dataset: ShardedDataset
    model_config: ModelConfig
    result: TrainResult


def model_widths(schema: Mapping[str, Any], *, use_latents: bool = True) -> dict[str, int]:
    """ModelConfig fields implied by a shard schema {field: {'shape', 'dtype'}}."""
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
    if "text_tokens" in schema:
        widths["text_dim"] = schema["text_tokens"]["shape"][-1]
    if "image_tokens" in schema:
        widths["image_dim"] = schema["image_tokens"]["shape"][-1]
    if "rna_scores" in schema:
        widths["rna_pathways"] = schema["rna_scores"]["shape"][0]
    return widths


def train_on_shards(
    data: str | Path,
    out: str | Path,
    *,
    train_config: TrainConfig,
    preset: str = "S/2",
    model_config: ModelConfig | None = None,
    cross_attention: CrossAttentionKind = CrossAttentionKind.DECOUPLED,
    use_latents: bool = True,
    sample_latents: bool = True,
    latents: str | None = None,
    text_encoder: str | None = None,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> ShardRun:
    """Train on the shards under `data`; resumes if `out` already holds a run.

    `latents` / `text_encoder` name the VAE and text encoder the shards were prepared with;
    they are stored in the checkpoint metadata so samples can be decoded and prompted later.
    `rank` / `world_size` pick this process's disjoint part of every epoch.
    """
    dataset = ShardedDataset(data, seed=train_config.seed, rank=rank, world_size=world_size)
    schema = dataset.schema
    if model_config is None:
        widths = model_widths(schema, use_latents=use_latents)
        if "rna_pathways" in widths:
            widths["rna_dim"] = model_preset(preset).hidden_size
        model_config = model_preset(preset, cross_attention=cross_attention, **widths)
    latent_key = LATENT_KEY if use_latents and LATENT_KEY in schema else None
    batches = ShardBatches(
        dataset, train_config.batch_size, latent_key=latent_key, sample_latents=sample_latents
    )
    torch.manual_seed(train_config.seed)
    model = SiT(model_config)
    metadata: dict[str, Any] = {
        "data": str(data),
        "shard_fields": sorted(schema),
        "records_per_epoch": len(dataset),
        "latents": latents if latent_key is not None else "identity",
        "text_encoder": text_encoder,
    }
    trainer = Trainer(model, train_config, out, batches, metadata=metadata, progress=progress)
    try:
        result = trainer.train()
    finally:
        batches.close()
    return ShardRun(dataset=dataset, model_config=model_config, result=result)
