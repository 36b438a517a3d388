"""The transport maths: interpolant and time convention (`paths`), training loss,
samplers and classifier-free guidance. Networks enter only as velocity callables
v(x, t, cond) (see `velocity.VelocityFn`)."""

from mupad.transport import paths
from mupad.transport.guidance import GuidanceError, GuidanceSchedule, GuidedVelocity, guided
from mupad.transport.losses import NoisyBatch, flow_matching_loss, make_noisy_batch, velocity_loss
from mupad.transport.samplers import (
    SAMPLERS,
    SamplerError,
    StepCallback,
    euler_maruyama_sde,
    euler_ode,
    heun_ode,
    reverse_ode,
    sample,
    time_grid,
)
from mupad.transport.velocity import VelocityFn, time_dtype

__all__ = [
    "SAMPLERS",
    "GuidanceError",
    "GuidanceSchedule",
    "GuidedVelocity",
    "NoisyBatch",
    "SamplerError",
    "StepCallback",
    "VelocityFn",
    "euler_maruyama_sde",
    "euler_ode",
    "flow_matching_loss",
    "guided",
    "heun_ode",
    "make_noisy_batch",
    "paths",
    "reverse_ode",
    "sample",
    "time_dtype",
    "time_grid",
    "velocity_loss",
]
