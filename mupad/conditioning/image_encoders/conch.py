"""CONCH (Mahmood Lab, ViT-B/16 CoCa vision tower at 448 px) as an image encoder.

The `conch` package is not on PyPI: `pip install git+https://github.com/Mahmoodlab/CONCH.git`
(it needs timm, hence torchvision). It is imported when the encoder is built. Weights: the
`pytorch_model.bin` of the gated Hugging Face repo MahmoodLab/CONCH, in a folder (or the file
itself) passed as `weights`, or in `$MUPAD_CACHE/conch`. The model is built through CONCH's
documented call `create_model_from_pretrained("conch_ViT-B-16", checkpoint_path=<file>)`.

One forward pass gives both outputs: the documented image embedding
`model.encode_image(x, proj_contrast=False, normalize=False)` (the attention-pooled contrastive
token before its projection, 512-d), while a forward hook on the vision trunk (a timm ViT whose
output is [CLS, 28x28 patches] after the final norm) captures the token states:

    global_token = trunk CLS                 (B, 768)
    patches      = trunk patch tokens        (B, 28, 28, 768)
    embedding    = encode_image(..., proj_contrast=False, normalize=False)   (B, 512)
    encode tokens = [trunk CLS, 784 patches] (B, 785, 768)

Preprocessing (`CONCH_PREPROCESSING`, as CONCH's own transform): shorter side -> 448 bicubic,
centre crop 448, OpenAI-CLIP mean/std.
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
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    Interpolation,
    Preprocessing,
)
from mupad.conditioning.image_encoders.weights import locate_weights_file

logger = logging.getLogger(__name__)

CONCH_NAME = "conch"
CONCH_CONFIG = "conch_ViT-B-16"
CONCH_FILES = ("pytorch_model.bin",)
CONCH_INSTALL = (
    "`pip install git+https://github.com/Mahmoodlab/CONCH.git` (CONCH is not on PyPI; it needs "
    "timm, which needs torchvision)"
)
CONCH_HINT = (
    "MahmoodLab/CONCH (gated: accept its terms on huggingface.co), e.g. `huggingface-cli "
    "download MahmoodLab/CONCH pytorch_model.bin --local-dir <folder>` on a machine with access"
)
CONCH_PREPROCESSING = Preprocessing(
    size=448, interpolation=Interpolation.BICUBIC, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD
)


class ConchEncoder(ImageEncoder):
    """CONCH vision tower: 512-d image embedding, [CLS, 28x28] trunk tokens of width 768.

    Args:
        weights: explicit `pytorch_model.bin` or its folder; None looks in `$MUPAD_CACHE/conch`.
        model: an already-built CONCH CoCa model (skips weight resolution; custom loading, tests).
        device, dtype, batch_size: where, in which precision and how many images per pass.
    """

    def __init__(
        self,
        weights: str | Path | None = None,
        *,
        model: torch.nn.Module | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str = torch.float32,
        batch_size: int = 32,
    ) -> None:
        self.name = CONCH_NAME
        self._set_runtime(device, dtype, batch_size)
        self.preprocessing = CONCH_PREPROCESSING
        self.path: Path | None = None
        if model is None:
            self.path = locate_weights_file(CONCH_NAME, weights, CONCH_FILES, CONCH_HINT)
            conch = require("conch.open_clip_custom", CONCH_INSTALL, "the conch image encoder")
            try:
                model, _ = conch.create_model_from_pretrained(
                    CONCH_CONFIG, checkpoint_path=str(self.path)
                )
            except (OSError, RuntimeError, ValueError, KeyError) as exc:
                raise EncoderError(
                    f"CONCH could not load {self.path}: {exc}. Is it MahmoodLab/CONCH's "
                    "pytorch_model.bin?"
                ) from exc
        self.model = model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        trunk = self.model.visual.trunk
        self._trunk = trunk
        self.num_prefix_tokens = int(getattr(trunk, "num_prefix_tokens", 1))
        patch = trunk.patch_embed.patch_size
        patch_side = patch if isinstance(patch, int) else patch[0]
        side = self.preprocessing.size // patch_side
        self.grid_size = (side, side)
        self.dim = int(trunk.embed_dim)
        self.embedding_dim = int(self.model.embed_dim)
        logger.info("image encoder %s: %s, %s", self.name, self.path, self.describe())

    def _forward(self, inputs: torch.Tensor) -> ImageFeatures:
        captured: list[torch.Tensor] = []
        handle = self._trunk.register_forward_hook(
            lambda _module, _args, output: captured.append(output)
        )
        try:
            embedding = self.model.encode_image(inputs, proj_contrast=False, normalize=False)
        finally:
            handle.remove()
        if len(captured) != 1:
            raise EncoderError(
                f"conch: expected one pass through the vision trunk, saw {len(captured)}; this "
                "CONCH version's encode_image differs from the documented one"
            )
        states = captured[0]  # (b, 1 + h*w, 768)
        cls, patches = split_tokens(states, self.num_prefix_tokens, self.grid_size, self.name)
        return ImageFeatures(global_token=cls, patches=patches, embedding=embedding)
