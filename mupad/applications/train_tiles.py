"""Train on a labelled tile folder with class captions, and sample a trained run from prompts.

The run's metadata (latent codec, text encoder, captions) travels in every checkpoint, so
`sample_prompts` needs nothing but the checkpoint folder.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mupad.applications.figures import save_grid
from mupad.applications.generate import generate
from mupad.conditioning import get_encoder
from mupad.config import (
    ConfigError,
    CrossAttentionKind,
    ModelConfig,
    SampleConfig,
    TeacherSource,
    TrainConfig,
    model_preset,
    to_dict,
)
from mupad.data.tiles import TileFolderError, TileSet, load_tile_folder
from mupad.latents import LatentCodec, load_codec
from mupad.models import SiT
from mupad.models.errors import CheckpointError
from mupad.training.captioned_tiles import (
    CaptionBank,
    CaptionedCropBatches,
    default_caption,
    encode_captions,
)
from mupad.training.checkpoint import latest_checkpoint
from mupad.training.distributed import DistContext
from mupad.training.loop import BatchFn, TrainBatch, Trainer, TrainResult
from mupad.training.objectives import objective_model_config
from mupad.training.teacher import online_teacher


@dataclass
class TileRun:
    tiles: TileSet
    bank: CaptionBank
    codec: LatentCodec
    result: TrainResult


def _encoded(batch_fn: BatchFn, codec: LatentCodec) -> BatchFn:
    """Wrap a pixel batch function so the trainer sees latents."""

    def encode(step: int, generator: torch.Generator) -> TrainBatch:
        batch = batch_fn(step, generator)
        with torch.no_grad():
            return dataclasses.replace(batch, x0=codec.encode(batch.x0), pixels=batch.pixels)

    return encode


def train_on_tile_folder(
    data: str | Path,
    out: str | Path,
    *,
    train_config: TrainConfig,
    preset: str = "S/4",
    backbone: Mapping[str, int] | None = None,
    model_config: ModelConfig | None = None,
    crop: int = 64,
    latents: str = "identity",
    cross_attention: CrossAttentionKind = CrossAttentionKind.DECOUPLED,
    text_encoder: str = "minilm",
    captions: dict[str, str] | None = None,
    dist: DistContext | None = None,
    progress: bool = True,
    init_from: str | Path | None = None,
    skip_bad_tiles: bool = False,
) -> TileRun:
    """Train a caption-conditioned SiT on `data/<class>/<tile>` crops; resumes if `out` has a run.

    `backbone` overrides the preset's hidden_size / depth / num_heads. `init_from` (a run, checkpoint or model folder) warm-starts a fresh run from those weights
    (its model config, with `sample_size` set to this crop); the optimizer, EMA and step start
    anew. Once `out` has a checkpoint of its own, the run resumes from it and `init_from`
    only has to name the same weights. Unreadable tiles stop the run before step 1 with their
    names, or with `skip_bad_tiles` are left out (named in a warning and the run's metadata).
    """
    tiles = load_tile_folder(data, skip_bad=skip_bad_tiles)
    height, width = tiles.images.shape[-2:]
    if not 1 <= crop <= min(height, width):
        raise TileFolderError(
            f"--crop {crop} does not fit the {height}x{width} px tiles of {data}; pass a crop "
            f"between 1 and {min(height, width)}"
        )
    captions = captions or {}
    texts = [captions.get(name, default_caption(name)) for name in tiles.class_names]
    encoder = get_encoder(text_encoder)
    bank = encode_captions(texts, encoder)
    codec = load_codec(latents)
    if crop % codec.downsample:
        raise ConfigError(
            f"--crop {crop} is not a multiple of the codec's downsample {codec.downsample}"
        )
    initial = None
    if init_from is not None:
        if model_config is not None:
            raise ConfigError("give either model_config or init_from (whose config is used)")
        initial = _initial_weights(Path(init_from), crop // codec.downsample)
        model_config = initial[0]
        if (
            model_config.text_dim != encoder.dim
            or model_config.in_channels != codec.latent_channels
        ):
            raise ConfigError(
                f"{init_from} takes {model_config.in_channels}-channel inputs and "
                f"{model_config.text_dim}-wide text tokens, but the {latents!r} codec gives "
                f"{codec.latent_channels} channels and the {text_encoder!r} encoder {encoder.dim}-"
                "wide tokens; use the codec and text encoder the pretrained run was trained with"
            )
    if model_config is None:
        model_config = model_preset(
            preset,
            **dict(backbone or {}),
            in_channels=codec.latent_channels,
            text_dim=encoder.dim,
            cross_attention=cross_attention,
            sample_size=crop // codec.downsample,
        )
    alignment = train_config.alignment
    if alignment.uses_teacher and alignment.teacher_source is not TeacherSource.ONLINE:
        raise ConfigError(
            f"the {alignment.objective.value} objective needs teacher features; a tile folder "
            "has no cached ones: pass --teacher-source online, or `mupad prepare` the folder "
            "with --image-encoder and train on the shards"
        )
    teacher = online_teacher(alignment, dist.device if dist is not None else "cpu")
    model_config = objective_model_config(
        model_config, alignment, teacher.spec if teacher is not None else None
    )
    torch.manual_seed(train_config.seed)
    model = SiT(model_config)
    if initial is not None:
        _load_initial_weights(model, initial[1], Path(init_from))  # type: ignore[arg-type]
    batches: BatchFn = CaptionedCropBatches(
        tiles, bank, crop, train_config.batch_size, keep_pixels=teacher is not None
    )
    if latents not in ("identity", "pixels"):
        batches = _encoded(batches, codec)
    metadata: dict[str, Any] = {
        "data": str(data),
        "latents": str(latents),
        "text_encoder": text_encoder,
        "class_names": list(tiles.class_names),
        "captions": texts,
        "crop": crop,
    }
    if tiles.skipped:
        metadata["skipped_tiles"] = [str(path) for path in tiles.skipped]
    if init_from is not None:
        metadata["init_from"] = str(init_from)
    trainer = Trainer(
        model,
        train_config,
        out,
        batches,
        dist=dist,
        teacher=teacher.spec if teacher is not None else None,
        online=teacher,
        metadata=metadata,
        progress=progress,
    )
    return TileRun(tiles=tiles, bank=bank, codec=codec, result=trainer.train())


_CLS_PREFIXES = ("cls_embed.", "cls_head.")


def _initial_weights(path: Path, sample_size: int) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(model config, weights) of a pretrained run / checkpoint / model folder."""
    model_dir, _ = _resolve_checkpoint(path)
    pretrained = SiT.from_pretrained(model_dir)
    config = dataclasses.replace(pretrained.config, sample_size=sample_size)
    return config, pretrained.state_dict()


def _load_initial_weights(model: SiT, weights: dict[str, torch.Tensor], source: Path) -> None:
    """Copy pretrained weights into a freshly built model. A CLS-token model may warm-start a
    CLS-free one (its CLS layers are dropped); any other difference is an error."""
    expected = model.state_dict()
    if not model.config.cls_dim:
        weights = {k: v for k, v in weights.items() if not k.startswith(_CLS_PREFIXES)}
    missing = sorted(set(expected) - set(weights))
    wrong = sorted(k for k in set(expected) & set(weights) if expected[k].shape != weights[k].shape)
    if missing or wrong or set(weights) - set(expected):
        raise ConfigError(
            f"the weights in {source} do not fit the model being trained (missing "
            f"{missing[:4]}, shape mismatches {wrong[:4]}); the objective or conditions differ "
            "from the pretrained run's"
        )
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in weights.items()})


def _resolve_checkpoint(path: Path) -> tuple[Path, dict[str, Any]]:
    """A run folder, a checkpoint folder or its ema/ -> (model folder, run metadata)."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(
                f"{path} has no finished checkpoint yet; let the run write one (see "
                "--checkpoint-every) or pass a checkpoint folder"
            )
        path = latest
    state_file = next(
        (p / "train_state.json" for p in (path, path.parent) if (p / "train_state.json").exists()),
        None,
    )
    metadata = json.loads(state_file.read_text())["extra"] if state_file else {}
    model_dir = path / "ema" if (path / "ema" / "model.safetensors").exists() else path
    if not state_file:
        from mupad.applications.default_model import read_model_metadata

        metadata = read_model_metadata(model_dir) or {}  # a packaged model folder
    return model_dir, metadata


def sample_prompts(
    checkpoint: str | Path,
    prompts: Sequence[str],
    num_per_prompt: int,
    sample_config: SampleConfig,
    out: str | Path,
) -> Path:
    """Generate `num_per_prompt` images per prompt into a PNG grid + a sidecar JSON."""
    if num_per_prompt < 1:
        raise ConfigError(f"--num (images per prompt) must be >= 1, got {num_per_prompt}")
    if not prompts:
        raise ConfigError("give at least one --prompt")
    model_dir, metadata = _resolve_checkpoint(Path(checkpoint))
    model = SiT.from_pretrained(model_dir)
    encoder = get_encoder(metadata.get("text_encoder", "minilm"))
    bank = encode_captions(list(prompts), encoder)
    labels = torch.arange(len(prompts)).repeat_interleave(num_per_prompt)
    codec = load_codec(metadata.get("latents", "identity"))
    images = generate(model, bank.conditions(labels), sample_config, codec=codec, progress=True)
    out = Path(out)
    save_grid(images, out, columns=num_per_prompt)
    sidecar = {
        "checkpoint": str(model_dir),
        "prompts": list(prompts),
        "num_per_prompt": num_per_prompt,
        "sample_config": to_dict(sample_config),
        "model_config": to_dict(model.config),
    }
    out.with_suffix(".json").write_text(json.dumps(sidecar, indent=2) + "\n")
    return out
