"""Image encoders, one module each; `mupad.conditioning.image` is the public entry point.

Importing this package is cheap: timm, CONCH and MUSK load only when their encoder is built.
"""

from mupad.conditioning.image_encoders.base import (
    ImageEncoder,
    ImageFeatures,
    MissingDependencyError,
)
from mupad.conditioning.image_encoders.conch import ConchEncoder
from mupad.conditioning.image_encoders.inception import InceptionEncoder
from mupad.conditioning.image_encoders.musk import MuskEncoder
from mupad.conditioning.image_encoders.preprocessing import (
    ImageInputError,
    Interpolation,
    Preprocessing,
)
from mupad.conditioning.image_encoders.timm_vit import (
    TIMM_SPECS,
    GlobalPool,
    TimmViTEncoder,
    TimmViTSpec,
)

__all__ = [
    "TIMM_SPECS",
    "ConchEncoder",
    "GlobalPool",
    "ImageEncoder",
    "ImageFeatures",
    "ImageInputError",
    "InceptionEncoder",
    "Interpolation",
    "MissingDependencyError",
    "MuskEncoder",
    "Preprocessing",
    "TimmViTEncoder",
    "TimmViTSpec",
]
