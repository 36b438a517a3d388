"""Condition encoders behind one interface: `encode(batch) -> (tokens (B, T, D), mask (B, T))`.

Importing this package is cheap: heavy libraries (transformers) load when an encoder is built.
"""

from mupad.conditioning.base import ConditionEncoder, EncoderError, WeightsNotFoundError
from mupad.conditioning.registry import (
    cache_root,
    encoder_names,
    get_encoder,
    register_encoder,
    register_weights_location,
    resolve_weights,
)
from mupad.conditioning.text import DEFAULT_MAX_LENGTH, DEFAULT_TEXT_MODEL, TextEncoder

__all__ = [
    "DEFAULT_MAX_LENGTH",
    "DEFAULT_TEXT_MODEL",
    "ConditionEncoder",
    "EncoderError",
    "TextEncoder",
    "WeightsNotFoundError",
    "cache_root",
    "encoder_names",
    "get_encoder",
    "register_encoder",
    "register_weights_location",
    "resolve_weights",
]
