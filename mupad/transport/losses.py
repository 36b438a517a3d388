"""Flow-matching training targets and the velocity regression loss.

Everything about the interpolant (which time is data, which is noise, what the target
velocity is) comes from `paths`; this module only draws the random pieces and compares.
"""

from __future__ import annotations

import dataclasses

import torch

from mupad.conditions import Conditions
from mupad.transport import paths
from mupad.transport.velocity import VelocityFn, time_dtype


@dataclasses.dataclass(frozen=True)
class NoisyBatch:
    """One flow-matching training batch built from clean data x0."""

    x_t: torch.Tensor  # (B, ...) the interpolant at time t
    t: torch.Tensor  # (B,) times in [0, 1)
    noise: torch.Tensor  # (B, ...) eps ~ N(0, I)
    target: torch.Tensor  # (B, ...) the velocity the network must predict


def make_noisy_batch(
    x0: torch.Tensor,
    generator: torch.Generator | None = None,
    t: torch.Tensor | None = None,
    *,
    logit_normal: tuple[float, float] | None = None,
) -> NoisyBatch:
    """Draw t ~ U[0, 1) and eps ~ N(0, I) and build (x_t, target) for clean data x0 (B, ...).

    With a generator the result is deterministic: the times are drawn first, then the
    noise, both from `generator` (on the generator's device, then moved to x0's device, so a
    CPU generator gives the same batch whatever device x0 lives on). Pass `t` (B,) to fix the
    times (then only the noise is drawn).
    """
    if not x0.is_floating_point():
        raise TypeError(f"x0 must be a floating point tensor, got {x0.dtype}")
    batch = x0.shape[0]
    if t is None:
        t = paths.sample_training_times(batch, generator=generator, logit_normal=logit_normal)
    t = torch.as_tensor(t).to(device=x0.device, dtype=time_dtype(x0.dtype))
    if t.dim() == 0:
        t = t.expand(batch)
    if tuple(t.shape) != (batch,):
        raise ValueError(f"t must have shape (batch,) = ({batch},), got {tuple(t.shape)}")
    noise_device = generator.device if generator is not None else x0.device
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=noise_device)
    noise = noise.to(x0.device)  # (B, ...)
    return NoisyBatch(
        x_t=paths.interpolate(x0, noise, t),
        t=t,
        noise=noise,
        target=paths.velocity_target(x0, noise),
    )


def velocity_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error, computed in fp32 whatever the inputs' dtype: (B,)."""
    if prediction.shape != target.shape:
        raise ValueError(
            f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in "
            "shape; the network must output a velocity shaped like its input"
        )
    diff = prediction.float() - target.float()  # (B, ...)
    return diff.square().reshape(diff.shape[0], -1).mean(dim=1)


def flow_matching_loss(
    velocity_fn: VelocityFn,
    x0: torch.Tensor,
    cond: Conditions | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Mean velocity regression loss of `velocity_fn` on a fresh noisy batch of x0: scalar."""
    batch = make_noisy_batch(x0, generator=generator)
    prediction = velocity_fn(batch.x_t, batch.t, cond)
    return velocity_loss(prediction, batch.target).mean()


__all__ = ["NoisyBatch", "flow_matching_loss", "make_noisy_batch", "velocity_loss"]
