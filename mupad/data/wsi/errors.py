"""Exceptions of `mupad.data.wsi`; each message names the slide and says how to fix the input.

`SlideError` is a `ValueError` so that a caller looping over many slides can catch it, skip
the slide and count it, while programming errors (TypeError, ...) still surface.
"""

from __future__ import annotations

from mupad.errors import MupadError


class SlideError(MupadError, ValueError):
    """A slide cannot be used as given: corrupt, truncated, unsupported or unusable pixels."""


class MissingMppError(SlideError):
    """The slide does not record its resolution (µm/px) and none was passed (--slide-mpp)."""


class EmptyTissueError(SlideError):
    """The tissue mask of a slide is empty, or no tile holds enough tissue."""


class SlideBackendMissingError(MupadError, ImportError):
    """The reader library that a slide format needs is not installed (environment problem,
    deliberately not a SlideError so that it is not silently skipped slide after slide)."""
