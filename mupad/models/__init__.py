"""The network: the SiT backbone with decoupled (or shared) cross-attention."""

from mupad.models.errors import CheckpointError, ModelInputError
from mupad.models.sit import SiT, SiTOutput, build_model

__all__ = ["CheckpointError", "ModelInputError", "SiT", "SiTOutput", "build_model"]
