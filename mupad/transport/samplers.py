"""Samplers: integrate a velocity field from noise (t = 1) to data (t = 0), or back.

Time convention and interpolant: see `paths` (t = 0 data, t = 1 noise, dx/dt = v).

- `euler_ode` / `heun_ode`: the probability-flow ODE dx/dt = v(x, t), first / second order.
- `euler_maruyama_sde`: Euler–Maruyama on the reverse-time SDE with the same marginals,
  followed by one noise-free Euler step onto t = 0 (the paper's default, 250 steps).
- `reverse_ode`: data -> noise along the same ODE (t = 0 up to t = 1), for inversion.
- `sample`: dispatches on `SampleConfig.sampler` through `SAMPLERS` and applies guidance.

Common behaviour: the velocity function is called as v(x (B, ...), t (B,), cond); every
call within a step shares one t across the batch. The time grid is built in fp64; times
are handed to v in at least fp32 (`velocity.time_dtype`), step sizes stay Python floats,
and the state is kept in the dtype of the input. Samplers run under `torch.no_grad`
(not inference_mode, whose tensors cannot later enter autograd). `progress=True` shows a
tqdm bar; `callback(step_index, t, x)` is called after every step with the time reached.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from mupad.conditions import Conditions
from mupad.config import SampleConfig, SamplerKind, parse_enum
from mupad.errors import MupadError
from mupad.transport import paths
from mupad.transport.guidance import guided
from mupad.transport.velocity import VelocityFn, time_dtype

StepCallback = Callable[[int, float, torch.Tensor], None]


class SamplerError(MupadError, ValueError):
    """A sampler was asked for something it cannot do; the message says how to fix it."""


def time_grid(num_steps: int, t_start: float = 1.0, t_end: float = 0.0) -> torch.Tensor:
    """Uniform times from t_start to t_end inclusive, in fp64: (num_steps + 1,)."""
    if num_steps < 1:
        raise SamplerError(f"num_steps must be >= 1, got {num_steps}")
    for name, value in (("t_start", t_start), ("t_end", t_end)):
        if not 0.0 <= value <= 1.0:
            raise SamplerError(f"{name} must lie in [0, 1], got {value}")
    return torch.linspace(t_start, t_end, num_steps + 1, dtype=torch.float64)


def _velocity(
    velocity_fn: VelocityFn, x: torch.Tensor, t: float, cond: Conditions | None
) -> torch.Tensor:
    """v(x, t) with t broadcast to (B,); the result is checked and cast to x's dtype."""
    t_batch = torch.full((x.shape[0],), t, dtype=time_dtype(x.dtype), device=x.device)  # (B,)
    v = velocity_fn(x, t_batch, cond)
    if v.shape != x.shape:
        raise SamplerError(
            f"the velocity function returned shape {tuple(v.shape)} for input "
            f"{tuple(x.shape)}; it must return a tensor shaped like its input"
        )
    return v.to(x.dtype)


def _steps(num_steps: int, progress: bool, desc: str):
    return tqdm(range(num_steps), desc=desc, disable=not progress, leave=False)


def _check_state(x: torch.Tensor) -> None:
    if not x.is_floating_point():
        raise SamplerError(f"the sampler state must be floating point, got {x.dtype}")


def _integrate_ode(
    velocity_fn: VelocityFn,
    x: torch.Tensor,
    cond: Conditions | None,
    grid: torch.Tensor,
    second_order: bool,
    progress: bool,
    callback: StepCallback | None,
    desc: str,
) -> torch.Tensor:
    """Explicit Euler or Heun (trapezoidal predictor-corrector) along `grid`, either direction."""
    _check_state(x)
    times = grid.tolist()  # fp64 Python floats
    for i in _steps(len(times) - 1, progress, desc):
        t_now, t_next = times[i], times[i + 1]
        h = t_next - t_now  # negative when sampling (1 -> 0), positive when inverting
        v_now = _velocity(velocity_fn, x, t_now, cond)
        if second_order:
            # Full Heun on every step, the last included: for the linear path the velocity is
            # regular at both ends (at t = 0 it is E[eps | x0 = x] - x = -x; at t = 1 it is
            # x - E[x0]), so the corrector never evaluates a singular point. (The score is
            # singular at t = 0, but the ODE never needs it.)
            x_pred = x + h * v_now
            v_next = _velocity(velocity_fn, x_pred, t_next, cond)
            x = x + (0.5 * h) * (v_now + v_next)
        else:
            x = x + h * v_now
        if callback is not None:
            callback(i, t_next, x)
    return x


@torch.no_grad()
def euler_ode(
    velocity_fn: VelocityFn,
    noise: torch.Tensor,
    cond: Conditions | None = None,
    num_steps: int = 50,
    *,
    t_start: float = 1.0,
    t_end: float = 0.0,
    progress: bool = False,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """First-order ODE sampler: x <- x + (t_next - t) v(x, t); num_steps evaluations."""
    grid = time_grid(num_steps, t_start, t_end)
    return _integrate_ode(velocity_fn, noise, cond, grid, False, progress, callback, "euler")


@torch.no_grad()
def heun_ode(
    velocity_fn: VelocityFn,
    noise: torch.Tensor,
    cond: Conditions | None = None,
    num_steps: int = 50,
    *,
    t_start: float = 1.0,
    t_end: float = 0.0,
    progress: bool = False,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Second-order ODE sampler (Heun); 2 * num_steps evaluations (the last step included)."""
    grid = time_grid(num_steps, t_start, t_end)
    return _integrate_ode(velocity_fn, noise, cond, grid, True, progress, callback, "heun")


def _standard_normal(
    like: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """eps ~ N(0, I) shaped like `like`, drawn on the generator's device in >= fp32 and then
    cast, so one seed gives the same noise for fp32 and bf16 states and on any device."""
    device = generator.device if generator is not None else like.device
    z = torch.randn(like.shape, generator=generator, dtype=time_dtype(like.dtype), device=device)
    return z.to(device=like.device, dtype=like.dtype)


@torch.no_grad()
def euler_maruyama_sde(
    velocity_fn: VelocityFn,
    noise: torch.Tensor,
    cond: Conditions | None = None,
    num_steps: int = 250,
    *,
    diffusion_scale: float = 1.0,
    last_step_size: float = 0.04,
    generator: torch.Generator | None = None,
    progress: bool = False,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Euler–Maruyama on the reverse-time SDE whose marginals match the ODE's.

    Running time backwards (dt < 0),

        dx = [v(x, t) - 1/2 g^2(t) score(x, t)] dt + g(t) dW,    g^2(t) = diffusion_scale * t

    has the same marginals p_t as dx/dt = v for every g (Fokker–Planck), with the score taken
    from the velocity (`paths.score_from_velocity`). Drift and diffusion are evaluated at the
    start of each step, so the score is only ever needed at t > 0.

    Steps: with last_step_size > 0, num_steps - 1 stochastic steps on a uniform grid from
    t = 1 to t = last_step_size, then ONE deterministic Euler step from last_step_size to 0,
    so the output carries no fresh noise (num_steps evaluations in all; num_steps = 1 is a
    single Euler step from 1 to 0). With last_step_size = 0 all num_steps steps are
    stochastic and end at t = 0. Noise comes from `generator` (deterministic given its seed).
    """
    _check_state(noise)
    if num_steps < 1:
        raise SamplerError(f"num_steps must be >= 1, got {num_steps}")
    if not 0.0 <= last_step_size < 1.0:
        raise SamplerError(f"last_step_size must be in [0, 1), got {last_step_size}")
    if diffusion_scale < 0.0:
        raise SamplerError(f"diffusion_scale must be >= 0, got {diffusion_scale}")

    if last_step_size > 0.0:
        num_stochastic = num_steps - 1
        final_start = last_step_size if num_stochastic > 0 else 1.0
    else:
        num_stochastic, final_start = num_steps, 0.0
    stochastic_times = (
        time_grid(num_stochastic, 1.0, final_start).tolist() if num_stochastic > 0 else [1.0]
    )

    x = noise
    bar = tqdm(total=num_steps, desc="sde", disable=not progress, leave=False)
    for i in range(num_stochastic):
        t_now, t_next = stochastic_times[i], stochastic_times[i + 1]
        h = t_next - t_now  # < 0
        v = _velocity(velocity_fn, x, t_now, cond)
        g2 = diffusion_scale * t_now
        score = paths.score_from_velocity(x, v, torch.tensor(t_now, dtype=torch.float64))
        drift = v - (0.5 * g2) * score
        x = x + h * drift + math.sqrt(g2 * abs(h)) * _standard_normal(x, generator)
        bar.update(1)
        if callback is not None:
            callback(i, t_next, x)
    if final_start > 0.0:
        v = _velocity(velocity_fn, x, final_start, cond)
        x = x + (0.0 - final_start) * v
        bar.update(1)
        if callback is not None:
            callback(num_stochastic, 0.0, x)
    bar.close()
    return x


@torch.no_grad()
def reverse_ode(
    velocity_fn: VelocityFn,
    x0: torch.Tensor,
    cond: Conditions | None = None,
    num_steps: int = 50,
    *,
    method: SamplerKind | str = SamplerKind.EULER,
    t_start: float = 0.0,
    t_end: float = 1.0,
    progress: bool = False,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Inversion: integrate dx/dt = v from t_start (data, 0) up to t_end (noise, 1).

    Sampling the result with the same ODE solver, steps and conditions maps it back to
    (approximately) x0. `t_end` < 1 gives a partially noised latent for editing.
    """
    kind = parse_enum(SamplerKind, method)
    if kind is SamplerKind.SDE:
        raise SamplerError("reverse_ode needs a deterministic method: 'euler' or 'heun', not 'sde'")
    if t_end < t_start:
        raise SamplerError(f"reverse_ode runs forward in time; got t_start={t_start} > t_end={t_end}")
    grid = time_grid(num_steps, t_start, t_end)
    return _integrate_ode(
        velocity_fn, x0, cond, grid, kind is SamplerKind.HEUN, progress, callback, "invert"
    )


# --------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------

# (velocity_fn, noise, cond, config, generator, progress, callback) -> samples
SamplerRunner = Callable[..., torch.Tensor]


def _ode_runner(integrator: Callable[..., torch.Tensor]) -> SamplerRunner:
    """Adapt a deterministic integrator to the runner signature (it needs no generator)."""

    def run(
        fn: VelocityFn,
        noise: torch.Tensor,
        cond: Conditions | None,
        config: SampleConfig,
        generator: torch.Generator | None,
        progress: bool,
        callback: StepCallback | None,
    ) -> torch.Tensor:
        return integrator(fn, noise, cond, config.num_steps, progress=progress, callback=callback)

    return run


def _run_sde(
    fn: VelocityFn,
    noise: torch.Tensor,
    cond: Conditions | None,
    config: SampleConfig,
    generator: torch.Generator | None,
    progress: bool,
    callback: StepCallback | None,
) -> torch.Tensor:
    return euler_maruyama_sde(
        fn,
        noise,
        cond,
        config.num_steps,
        diffusion_scale=config.diffusion_scale,
        last_step_size=config.last_step_size,
        generator=generator,
        progress=progress,
        callback=callback,
    )


SAMPLERS: dict[SamplerKind, SamplerRunner] = {
    SamplerKind.EULER: _ode_runner(euler_ode),
    SamplerKind.HEUN: _ode_runner(heun_ode),
    SamplerKind.SDE: _run_sde,
}


def sample(
    velocity_fn: VelocityFn,
    noise: torch.Tensor,
    cond: Conditions | None = None,
    config: SampleConfig | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Generate from `noise` (B, ...) at t = 1 with the configured sampler and guidance.

    `config.num_steps` counts steps: Euler and SDE make that many velocity evaluations,
    Heun twice as many (each evaluation is one forward call, or one batched guided call).
    Without a generator, SDE noise comes from a CPU generator seeded with `config.seed`,
    so the same config gives the same samples.
    """
    config = config if config is not None else SampleConfig()
    if cond is not None:
        cond.validate(noise.shape[0])
    if generator is None:
        generator = torch.Generator(device="cpu").manual_seed(config.seed)
    runner = SAMPLERS.get(config.sampler)
    if runner is None:
        choices = ", ".join(k.value for k in SAMPLERS)
        raise SamplerError(f"no sampler registered for {config.sampler!r}; choose one of: {choices}")
    fn = guided(velocity_fn, config.guidance)
    return runner(fn, noise, cond, config, generator, progress, callback)


__all__ = [
    "SAMPLERS",
    "SamplerError",
    "StepCallback",
    "euler_maruyama_sde",
    "euler_ode",
    "heun_ode",
    "reverse_ode",
    "sample",
    "time_grid",
]
