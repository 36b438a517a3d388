"""A trained model ready to generate: weights, decoder, encoders and how records become conditions.

    settings = GenerationSettings(checkpoint="runs/x")       # + encoder/scale options
    model = GenerationModel(settings)
    model.check_record(record)                                # cheap checks, before any work
    encoded = model.encode(record)                            # Conditions for a batch of one

The checkpoint is a run folder, a checkpoint folder (its ema/ weights are used when
present) or a plain `SiT.save_pretrained` folder. Encoders, the latent codec and the
model's µm/px come from the options in `GenerationSettings` when given, else from the run's
metadata ("text_encoder", "image_encoder", "latents", "target_mpp", "rna_pathways",
"rna_standardiser"), else the defaults (minilm, inception, pixel space, unknown µm/px).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path
from typing import Any

import torch

from mupad.applications.prompts import PromptError, PromptRecord
from mupad.applications.provenance import conditions_sha256, file_sha256
from mupad.applications.reference_images import inspect_reference_image, load_reference_image
from mupad.applications.rna_inputs import (
    RnaInputError,
    RnaSpec,
    describe_names,
    rna_spec,
    rna_stream,
    scores_from_expression,
    scores_from_file,
    scores_from_st,
)
from mupad.conditions import Conditions, ConditionStream, Modality
from mupad.data.tiles import to_unit_range

logger = logging.getLogger(__name__)

DEFAULT_TEXT_ENCODER = "minilm"
DEFAULT_IMAGE_ENCODER = "inception"


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """Everything besides the prompt record and SampleConfig that decides the output."""

    checkpoint: str
    text_encoder: str | None = None
    image_encoder: str | None = None
    latents: str | None = None
    model_mpp: float | None = None
    rna_pathways: str | None = None
    rna_standardiser: str | None = None
    gene_sets: str | None = None
    size: int | None = None  # latent side; None = the model's sample_size
    bf16: bool = False
    device: str = "cpu"
    batch_size: int | None = None  # images per sampler call; None = all images of a record

    def __post_init__(self) -> None:
        for name in ("checkpoint", "rna_pathways", "rna_standardiser", "gene_sets"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, str(Path(value).expanduser().resolve()))
        if self.batch_size is not None and self.batch_size < 1:
            raise PromptError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.size is not None and self.size < 1:
            raise PromptError(f"size must be >= 1, got {self.size}")
        if self.model_mpp is not None and not self.model_mpp > 0:
            raise PromptError(f"model_mpp must be positive (µm/px), got {self.model_mpp}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides: Any) -> GenerationSettings:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise PromptError(
                f"unknown generation settings {sorted(unknown)} (another mupad version?)"
            )
        return cls(**{**data, **{k: v for k, v in overrides.items() if v is not None}})


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is present, else 'cpu'; anything else as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


@functools.lru_cache(maxsize=8)
def _encoder(name: str, device: str) -> Any:
    """One instance per (encoder, device) for the whole process (loading is the slow part)."""
    from mupad.conditioning import get_encoder

    return get_encoder(name, device=device)


@dataclasses.dataclass(frozen=True)
class EncodedRecord:
    cond: Conditions | None  # batch of one; None = unconditional
    inputs: dict[str, Any]  # provenance of every input (paths, hashes, conversions)
    checksum: str  # conditions_sha256(cond)


class GenerationModel:
    """A loaded model plus everything needed to turn prompt records into its conditions."""

    def __init__(self, settings: GenerationSettings) -> None:
        from mupad.applications.train_tiles import _resolve_checkpoint
        from mupad.latents import load_codec
        from mupad.models import SiT

        self.settings = settings
        self.device = resolve_device(settings.device)
        self.model_dir, self.metadata = _resolve_checkpoint(Path(settings.checkpoint))
        # Weights may be stored in bf16 (the packaged model is, to stay small); they are
        # computed in fp32 unless --bf16 asks for autocast, which not every CPU runs fast.
        self.model = SiT.from_pretrained(self.model_dir, map_location=self.device).float().eval()
        self.config = self.model.config
        self.codec_spec = str(settings.latents or self.metadata.get("latents") or "identity")
        self.codec = load_codec(self.codec_spec, device=self.device)
        self.streams: dict[str, int] = self.config.condition_dims  # modality -> token width
        self.text_encoder_name = str(
            settings.text_encoder or self.metadata.get("text_encoder") or DEFAULT_TEXT_ENCODER
        )
        self.image_encoder_name = str(
            settings.image_encoder or self.metadata.get("image_encoder") or DEFAULT_IMAGE_ENCODER
        )
        target = settings.model_mpp or self.metadata.get("target_mpp")
        self.model_mpp = float(target) if target else None
        self.latent_side = settings.size or self.config.sample_size
        if self.latent_side % self.config.patch_size:
            raise PromptError(
                f"size {self.latent_side} is not a multiple of the model's patch size "
                f"{self.config.patch_size}"
            )
        self.tile_px = self.latent_side * self.codec.downsample

    # ----------------------------------------------------------------------------------
    # Descriptions for sidecars
    # ----------------------------------------------------------------------------------

    @functools.cached_property
    def weights_sha256(self) -> str:
        from mupad.models.sit import WEIGHTS_NAME

        return file_sha256(self.model_dir / WEIGHTS_NAME)

    @functools.cached_property
    def rna(self) -> RnaSpec:
        return rna_spec(
            self.config,
            self.metadata,
            pathways=self.settings.rna_pathways,
            standardiser=self.settings.rna_standardiser,
            gene_sets=self.settings.gene_sets,
        )

    def describe(self) -> dict[str, Any]:
        from mupad.config import to_dict

        encoders: dict[str, Any] = {}
        if "text" in self.streams:
            encoders["text"] = self.text_encoder_name
        if "image" in self.streams:
            encoders["image"] = self.image_encoder_name
        if "rna" in self.streams:
            encoders["rna"] = {
                **self.rna.describe(),
                "names_sha256": describe_names(self.rna.names),
            }
        return {
            "checkpoint": self.settings.checkpoint,
            "model_dir": str(self.model_dir),
            "weights_sha256": self.weights_sha256,
            "config": to_dict(self.config),
            "streams": sorted(self.streams),
            "codec": self.codec_spec,
            "model_mpp": self.model_mpp,
            "tile_px": self.tile_px,
            "encoders": encoders,
        }

    # ----------------------------------------------------------------------------------
    # Records -> conditions
    # ----------------------------------------------------------------------------------

    def _streams_text(self) -> str:
        return ", ".join(sorted(self.streams)) or "none (an unconditional model)"

    def check_record(self, record: PromptRecord) -> None:
        """Fail fast, before anything is generated: the model has a stream for every
        condition the record gives, and its input files exist and can be used."""
        lacking = [m.value for m in record.modalities if m.value not in self.streams]
        if lacking:
            raise PromptError(
                f"record {record.id!r} gives a {' and '.join(lacking)} condition but the model "
                f"({self.model_dir}) has no stream for it; its condition streams are: "
                f"{self._streams_text()}. Drop that input (or --conditions)"
            )
        if record.image is not None:
            inspect_reference_image(
                record.image, self.tile_px, mpp=record.image_mpp, model_mpp=self.model_mpp
            )
        for path in (record.rna, record.rna_expression):
            if path is not None and not Path(path).is_file():
                raise RnaInputError(f"record {record.id!r}: RNA file {path} does not exist")
        if record.st_folder is not None and not (Path(record.st_folder) / "scores.csv").is_file():
            raise RnaInputError(
                f"record {record.id!r}: {record.st_folder} has no scores.csv; give the output "
                "folder of `mupad st extract`"
            )
        if Modality.RNA in record.modalities:
            _ = self.rna  # pathway names / standardiser problems surface now

    def _encoder(self, name: str, modality: Modality) -> Any:
        encoder = _encoder(name, self.device)
        if encoder.modality is not modality:
            raise PromptError(
                f"{name!r} is a {encoder.modality.value} encoder, not {modality.value}"
            )
        width = self.streams[modality.value]
        if encoder.dim != width:
            raise PromptError(
                f"the {modality.value} encoder {name!r} gives {encoder.dim}-wide tokens but the "
                f"model's {modality.value} stream takes {width}; pass the encoder the model was "
                f"trained with (--{modality.value}-encoder)"
            )
        return encoder

    def encode(self, record: PromptRecord) -> EncodedRecord:
        """The record's conditions for a batch of one, with the provenance of every input."""
        self.check_record(record)
        streams: dict[str, ConditionStream] = {}
        inputs: dict[str, Any] = {}
        if record.text is not None:
            tokens, mask = self._encoder(self.text_encoder_name, Modality.TEXT).encode(
                [record.text]
            )
            streams["text"] = ConditionStream.from_tokens(tokens.float().cpu(), mask.bool().cpu())
            inputs["text"] = {"text": record.text, "encoder": self.text_encoder_name}
        if record.image is not None:
            reference = load_reference_image(
                record.image, self.tile_px, mpp=record.image_mpp, model_mpp=self.model_mpp
            )
            encoder = self._encoder(self.image_encoder_name, Modality.IMAGE)
            pixels = to_unit_range(reference.pixels[None]).to(self.device)  # (1, 3, S, S)
            tokens, mask = encoder.encode(pixels)
            streams["image"] = ConditionStream.from_tokens(tokens.float().cpu(), mask.bool().cpu())
            inputs["image"] = {
                "path": str(record.image),
                "sha256": file_sha256(record.image),
                "source_size": list(reference.source_size),
                "source_mode": reference.source_mode,
                "conversions": list(reference.conversions),
                "mpp": record.image_mpp,
                "model_mpp": self.model_mpp,
                "tile_px": self.tile_px,
                "encoder": self.image_encoder_name,
            }
        if Modality.RNA in record.modalities:
            streams["rna"], inputs["rna"] = self._rna(record)
        cond = Conditions.build(**streams) if streams else None
        return EncodedRecord(cond=cond, inputs=inputs, checksum=conditions_sha256(cond))

    def _rna(self, record: PromptRecord) -> tuple[ConditionStream, dict[str, Any]]:
        spec = self.rna
        if record.rna is not None:
            scores = scores_from_file(record.rna, spec, record.rna_row)
            info = {"source": "scores", "path": str(record.rna), "row": record.rna_row}
            hashed = Path(record.rna)
        elif record.rna_expression is not None:
            scores = scores_from_expression(record.rna_expression, spec, record.rna_row)
            info = {
                "source": "expression",
                "path": str(record.rna_expression),
                "row": record.rna_row,
            }
            hashed = Path(record.rna_expression)
        else:
            scores = scores_from_st(record.st_folder, record.st_spot, spec)  # type: ignore[arg-type]
            hashed = Path(record.st_folder) / "scores.csv"  # type: ignore[arg-type]
            info = {"source": "st_spot", "path": str(hashed), "spot": record.st_spot}
        stream = rna_stream(scores, spec, f"record {record.id!r} RNA")
        info.update(
            sha256=file_sha256(hashed),
            pathways=spec.width,
            pathways_scored=int(stream.mask.sum()),
            standardised=spec.standardiser is not None,
        )
        return stream, info
