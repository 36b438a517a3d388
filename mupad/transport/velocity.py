"""The one callable contract between networks and the transport maths.

A velocity function maps a state, a time and optional conditions to the velocity
dx/dt at that state (time convention: see `paths`):

    v(x: (B, ...), t: (B,), cond: Conditions | None) -> (B, ...) like x

The network never knows which sampler or guidance rule calls it; samplers and guidance
only ever see this callable.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mupad.conditions import Conditions

VelocityFn = Callable[[torch.Tensor, torch.Tensor, "Conditions | None"], torch.Tensor]


def time_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of times passed to a velocity function for states of `dtype`.

    At least fp32: bf16/fp16 cannot resolve nearby times (their spacing near 1 is 2^-8 or
    2^-11), which would merge the steps of a 250-step sampler.
    """
    return torch.promote_types(dtype, torch.float32)


__all__ = ["VelocityFn", "time_dtype"]
