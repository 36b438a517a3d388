"""MUSK (Stanford Li lab, BEiT-3 large, 384 px) as an image encoder.

Needs the `musk` package (`pip install fairscale git+https://github.com/lilab-stanford/MUSK`)
and timm (hence torchvision); both are imported when the encoder is built. Importing
`musk.modeling` registers `musk_large_patch16_384` with timm, which builds the network. Weights:
`model.safetensors` of the gated Hugging Face repo xiangjx/musk, in a folder (or the file itself)
passed as `weights`, or in `$MUPAD_CACHE/musk`; loaded by mupad (safetensors, or a `.bin` read
with `torch.load(weights_only=True)`).

The documented vision call `model(image=x, with_head=False, out_norm=False, ms_aug=False,
return_global=False)[0]` returns the vision encoder states [CLS, 24x24 patches] (width 1024):

    global_token = embedding = CLS     (B, 1024)  (= the call with return_global=True)
    patches                            (B, 24, 24, 1024)
    encode tokens = [CLS, 576 patches] (B, 577, 1024)

No projection head, no L2 norm, no multiscale augmentation (MUSK's `ms_aug=True` 2048-d
linear-probe feature is not offered: it has no patch grid).

Preprocessing (`MUSK_PREPROCESSING`, as MUSK's README): shorter side -> 384 bicubic (antialias),
centre crop 384, mean = std = 0.5 (timm's "Inception" normalisation).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from mupad.conditioning.base import EncoderError
from mupad.conditioning.image_encoders.base import (
    ImageEncoder,
    ImageFeatures,
    require,
    split_tokens,
)
from mupad.conditioning.image_encoders.preprocessing import (
    HALF_MEAN,
    HALF_STD,
    Interpolation,
    Preprocessing,
)
from mupad.conditioning.image_encoders.timm_vit import TIMM_INSTALL
from mupad.conditioning.image_encoders.weights import (
    locate_weights_file,
    mismatch_summary,
    read_state_dict,
)

logger = logging.getLogger(__name__)

MUSK_NAME = "musk"
MUSK_ARCHITECTURE = "musk_large_patch16_384"
MUSK_FILES = ("model.safetensors", "pytorch_model.bin")
MUSK_INSTALL = (
    "`pip install fairscale git+https://github.com/lilab-stanford/MUSK` (MUSK is not on PyPI; "
    "it needs timm, which needs torchvision)"
)
MUSK_HINT = (
    "xiangjx/musk (gated: accept its terms on huggingface.co), e.g. `huggingface-cli download "
    "xiangjx/musk model.safetensors --local-dir <folder>` on a machine with access"
)
MUSK_PREPROCESSING = Preprocessing(
    size=384, interpolation=Interpolation.BICUBIC, mean=HALF_MEAN, std=HALF_STD
)
MUSK_PATCH = 16
# Buffers that MUSK's own loader also tolerates being absent from a checkpoint.
_IGNORABLE_MISSING = ("relative_position_index",)


class MuskEncoder(ImageEncoder):
    """MUSK vision encoder: [CLS, 24x24 patch] states of width 1024; CLS as the embedding.

    Args:
        weights: explicit weights file or its folder; None looks in `$MUPAD_CACHE/musk`.
        model: an already-built MUSK model (skips weight resolution; custom loading, tests).
        device, dtype, batch_size: where, in which precision and how many images per pass.
    """

    def __init__(
        self,
        weights: str | Path | None = None,
        *,
        model: torch.nn.Module | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str = torch.float32,
        batch_size: int = 16,
    ) -> None:
        self.name = MUSK_NAME
        self._set_runtime(device, dtype, batch_size)
        self.preprocessing = MUSK_PREPROCESSING
        self.path: Path | None = None
        if model is None:
            self.path = locate_weights_file(MUSK_NAME, weights, MUSK_FILES, MUSK_HINT)
            timm = require("timm", TIMM_INSTALL, "the musk image encoder")
            require("musk.modeling", MUSK_INSTALL, "the musk image encoder")  # registers the model
            model = timm.create_model(MUSK_ARCHITECTURE, pretrained=False)
            self._load(model, read_state_dict(self.path))
        self.model = model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        side = self.preprocessing.size // MUSK_PATCH
        self.grid_size = (side, side)
        self.dim = self.embedding_dim = int(self.model.args.encoder_embed_dim)
        logger.info("image encoder %s: %s, %s", self.name, self.path, self.describe())

    def _load(self, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        try:
            result = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shape mismatches raise even with strict=False
            raise EncoderError(
                f"the weights in {self.path} do not fit MUSK: {exc}; are they xiangjx/musk's?"
            ) from exc
        missing = [
            key for key in result.missing_keys if not any(s in key for s in _IGNORABLE_MISSING)
        ]
        if missing:
            raise EncoderError(
                f"the weights in {self.path} do not fit MUSK "
                f"({mismatch_summary(missing, result.unexpected_keys)}); are they xiangjx/musk's?"
            )
        if result.unexpected_keys:
            logger.warning(
                "musk: ignored %d unexpected checkpoint key(s), e.g. %s",
                len(result.unexpected_keys), result.unexpected_keys[:3],
            )  # fmt: skip

    def _forward(self, inputs: torch.Tensor) -> ImageFeatures:
        states = self.model(
            image=inputs, with_head=False, out_norm=False, ms_aug=False, return_global=False
        )[0]  # (b, 1 + h*w, 1024)
        cls, patches = split_tokens(states, 1, self.grid_size, self.name)
        return ImageFeatures(global_token=cls, patches=patches, embedding=cls)
