"""Training batches from a labelled tile folder, each class described by a caption.

The captions are encoded once (token states + padding mask); a batch gathers the tokens of
each crop's class. Everything random comes from the step's generator, so batches are
reproducible and a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mupad.conditions import Conditions, ConditionStream
from mupad.data.tiles import TileSet, random_crops
from mupad.errors import MupadError
from mupad.training.loop import TrainBatch


class CaptionFileError(MupadError, ValueError):
    """A captions file is unreadable or not a JSON object {class: caption}."""


def read_captions(path: str | Path) -> dict[str, str]:
    """{class folder name: caption} from a JSON file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CaptionFileError(f"cannot read captions {path}: {error}") from None
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise CaptionFileError(f"{path} must be a JSON object {{class: caption}}")
    return data


def default_caption(class_name: str) -> str:
    """'03_complex_stroma' -> 'H&E histology: complex stroma'."""
    words = class_name.split("_")
    if words and words[0].isdigit():
        words = words[1:]
    return "H&E histology: " + " ".join(w.lower() for w in words if w)


@dataclass(frozen=True)
class CaptionBank:
    captions: tuple[str, ...]
    tokens: torch.Tensor  # (K, T, D) token states, one row per class
    mask: torch.Tensor  # (K, T) bool

    def conditions(self, labels: torch.Tensor) -> Conditions:
        """Text conditions for a batch of class labels (B,)."""
        return Conditions.build(
            text=ConditionStream.from_tokens(self.tokens[labels], self.mask[labels])
        )


def encode_captions(captions: Sequence[str], encoder) -> CaptionBank:
    tokens, mask = encoder.encode(list(captions))
    return CaptionBank(tuple(captions), tokens.float().cpu(), mask.bool().cpu())


class CaptionedCropBatches:
    """`batch_fn(step, generator)` for the Trainer: random crops + their class captions."""

    def __init__(
        self,
        tiles: TileSet,
        bank: CaptionBank,
        crop: int,
        batch_size: int,
        *,
        keep_pixels: bool = False,
    ) -> None:
        if len(bank.captions) != len(tiles.class_names):
            raise ValueError(
                f"{len(bank.captions)} captions for {len(tiles.class_names)} classes"
            )
        self.tiles, self.bank, self.crop, self.batch_size = tiles, bank, crop, batch_size
        self.keep_pixels = keep_pixels  # also hand the crops over as `pixels` (online teacher)

    def __call__(self, step: int, generator: torch.Generator) -> TrainBatch:
        images, index = random_crops(self.tiles, self.crop, self.batch_size, generator)
        return TrainBatch(
            x0=images,
            cond=self.bank.conditions(self.tiles.labels[index]),
            pixels=images if self.keep_pixels else None,
        )
