"""Exceptions raised by the network: bad inputs to `SiT.forward` and unusable checkpoints."""

from __future__ import annotations

from mupad.errors import MupadError


class ModelInputError(MupadError, ValueError):
    """An input to the network has the wrong shape, dtype, range or content.

    The message names the argument, what was expected and what was given.
    """


class CheckpointError(MupadError, ValueError):
    """A model folder cannot be loaded: missing, incomplete, or written for another config."""
