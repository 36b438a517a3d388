"""The transport maths: interpolant, loss, ODE/SDE samplers, inversion and dispatch.

The analytic case: data x0 ~ N(mu, s^2) independently per dimension. Then the exact
velocity field of the linear path x_t = (1 - t) x0 + t eps is

    v*(x, t) = -mu + (t - (1 - t) s^2) / ((1 - t)^2 s^2 + t^2) * (x - (1 - t) mu),

and its probability-flow ODE maps noise eps (t = 1) to x0 = mu + s * eps (t = 0) exactly, so
solver errors can be measured without a numerical reference.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from mupad.conditions import Conditions
from mupad.config import GuidanceConfig, SampleConfig, SamplerKind
from mupad.transport import (
    SAMPLERS,
    SamplerError,
    euler_maruyama_sde,
    euler_ode,
    flow_matching_loss,
    heun_ode,
    make_noisy_batch,
    paths,
    reverse_ode,
    sample,
    time_grid,
    velocity_loss,
)

MU = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)  # (D,)
STD = torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64)  # (D,)


pytestmark = pytest.mark.usefixtures("one_thread")


def gaussian_velocity(mu: torch.Tensor, std: torch.Tensor):
    """The exact velocity field for data N(mu, std^2) per dimension (last axis)."""

    def v(x: torch.Tensor, t: torch.Tensor, cond: Conditions | None) -> torch.Tensor:
        tb = t.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))  # (B, 1, ...)
        m, s2 = mu.to(x.dtype), std.to(x.dtype) ** 2
        var = (1 - tb) ** 2 * s2 + tb**2
        return -m + (tb - (1 - tb) * s2) / var * (x - (1 - tb) * m)

    return v


def gaussian_score(x: torch.Tensor, t: float, mu: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    var = (1 - t) ** 2 * std**2 + t**2
    return -(x - (1 - t) * mu) / var


def _noise(n: int, d: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --------------------------------------------------------------------------------------
# Interpolant and helpers
# --------------------------------------------------------------------------------------


def test_interpolant_endpoints():
    x0, eps = _noise(4, 3, 0), _noise(4, 3, 1)
    zeros, ones = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    torch.testing.assert_close(paths.interpolate(x0, eps, zeros), x0)
    torch.testing.assert_close(paths.interpolate(x0, eps, ones), eps)
    assert paths.T_DATA == 0.0 and paths.T_NOISE == 1.0


def test_velocity_is_time_derivative_of_interpolant():
    x0, eps = _noise(5, 3, 2), _noise(5, 3, 3)
    t = torch.rand(5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    _, dx_dt = torch.autograd.functional.jvp(
        lambda tt: paths.interpolate(x0, eps, tt), (t,), (torch.ones_like(t),)
    )
    torch.testing.assert_close(dx_dt, paths.velocity_target(x0, eps))


def test_denoised_noise_and_score_helpers_are_consistent():
    x0, eps = _noise(6, 3, 5), _noise(6, 3, 6)
    t = torch.linspace(0.1, 0.9, 6, dtype=torch.float64)
    x_t = paths.interpolate(x0, eps, t)
    v = paths.velocity_target(x0, eps)
    # With the per-sample (conditional) velocity the helpers recover x0 and eps exactly.
    torch.testing.assert_close(paths.denoised_from_velocity(x_t, v, t), x0)
    torch.testing.assert_close(paths.noise_from_velocity(x_t, v, t), eps)
    torch.testing.assert_close(paths.score_from_velocity(x_t, v, t), -eps / t[:, None])
    # The marginal score implied by the exact Gaussian velocity equals the Gaussian score.
    field = gaussian_velocity(MU, STD)
    for time in (0.05, 0.3, 0.7, 1.0):
        tt = torch.full((6,), time, dtype=torch.float64)
        score = paths.score_from_velocity(x_t, field(x_t, tt, None), tt)
        torch.testing.assert_close(score, gaussian_score(x_t, time, MU, STD))


def test_closed_form_gaussian_flow_matches_scipy():
    """Guards the analytic reference itself: an adaptive solver agrees with mu + s * eps."""
    field = gaussian_velocity(MU, STD)
    eps = _noise(3, 3, 7)

    def rhs(t, y):
        x = torch.from_numpy(y).reshape(3, 3)
        return field(x, torch.full((3,), t, dtype=torch.float64), None).reshape(-1).numpy()

    sol = solve_ivp(rhs, (1.0, 0.0), eps.reshape(-1).numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sol.y[:, -1].reshape(3, 3), (MU + STD * eps).numpy(), atol=1e-7)


# --------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------


def test_make_noisy_batch_is_the_interpolant_and_deterministic():
    x0 = _noise(8, 3, 8, torch.float32).reshape(8, 3, 1, 1)
    a = make_noisy_batch(x0, generator=torch.Generator().manual_seed(1))
    b = make_noisy_batch(x0, generator=torch.Generator().manual_seed(1))
    c = make_noisy_batch(x0, generator=torch.Generator().manual_seed(2))
    for field in ("x_t", "t", "noise", "target"):
        torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=0, atol=0)
    assert not torch.equal(a.noise, c.noise)
    assert a.t.shape == (8,) and a.t.dtype == torch.float32
    assert bool(((a.t >= 0) & (a.t < 1)).all())
    torch.testing.assert_close(a.x_t, paths.interpolate(x0, a.noise, a.t))
    torch.testing.assert_close(a.target, a.noise - x0)
    fixed = make_noisy_batch(x0, generator=torch.Generator().manual_seed(1), t=torch.full((8,), 0.25))
    torch.testing.assert_close(fixed.t, torch.full((8,), 0.25))
    with pytest.raises(ValueError, match="shape"):
        make_noisy_batch(x0, t=torch.zeros(3))


def test_training_times_are_uniform():
    t = make_noisy_batch(torch.zeros(50_000, 1), generator=torch.Generator().manual_seed(0)).t
    assert abs(t.mean().item() - 0.5) < 0.01
    assert abs(t.var().item() - 1 / 12) < 0.003


def test_velocity_loss_is_per_sample_fp32():
    pred = torch.randn(4, 2, 3, 3, dtype=torch.bfloat16)
    target = torch.randn(4, 2, 3, 3, dtype=torch.bfloat16)
    loss = velocity_loss(pred, target)
    assert loss.shape == (4,) and loss.dtype == torch.float32
    expected = ((pred.float() - target.float()) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError, match="shape"):
        velocity_loss(pred, target[:, :1])


def test_flow_matching_loss_matches_manual_computation_and_backprops():
    net = torch.nn.Linear(3, 3)

    def v(x, t, cond):
        return net(x) * (1 + t[:, None])

    x0 = _noise(16, 3, 9, torch.float32)
    loss = flow_matching_loss(v, x0, generator=torch.Generator().manual_seed(3))
    batch = make_noisy_batch(x0, generator=torch.Generator().manual_seed(3))
    manual = ((v(batch.x_t, batch.t, None) - batch.target) ** 2).mean()
    torch.testing.assert_close(loss, manual)
    loss.backward()
    assert net.weight.grad is not None


# --------------------------------------------------------------------------------------
# Samplers on the analytic Gaussian
# --------------------------------------------------------------------------------------


def test_time_grid():
    grid = time_grid(4)
    assert grid.dtype == torch.float64
    torch.testing.assert_close(grid, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    torch.testing.assert_close(time_grid(2, 0.0, 1.0), torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
    with pytest.raises(SamplerError):
        time_grid(0)
    with pytest.raises(SamplerError):
        time_grid(3, 1.5, 0.0)


def _convergence_slope(solver) -> tuple[float, list[float]]:
    field = gaussian_velocity(MU, STD)
    eps = _noise(256, 3, 10)
    exact = MU + STD * eps
    steps = [8, 16, 32, 64, 128]
    errors = [(solver(field, eps, None, n) - exact).abs().max().item() for n in steps]
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    return float(slope), errors


def test_euler_is_first_order():
    slope, errors = _convergence_slope(euler_ode)
    assert 0.85 < slope < 1.15, (slope, errors)
    assert errors[-1] < 0.06


def test_heun_is_second_order():
    slope, errors = _convergence_slope(heun_ode)
    assert 1.8 < slope < 2.3, (slope, errors)
    assert errors[-1] < 1e-4


def test_sde_reproduces_gaussian_moments():
    mu = torch.tensor([0.5, -1.0], dtype=torch.float64)
    std = torch.tensor([0.5, 1.2], dtype=torch.float64)
    n = 20_000
    out = euler_maruyama_sde(
        gaussian_velocity(mu, std), _noise(n, 2, 11), None, 250,
        generator=torch.Generator().manual_seed(12),
    )
    mean, var = out.mean(0), out.var(0)
    # 4 standard errors of the mean plus a little for the O(1/steps) discretisation bias.
    assert bool(((mean - mu).abs() < 4 * std / math.sqrt(n) + 0.01).all()), mean
    # Std error of var/s^2 is sqrt(2/n) = 1 %; Euler–Maruyama with 250 steps and the final
    # 0.04 Euler step shrink the variance by ~1-1.5 % here.
    assert bool(((var / std**2 - 1).abs() < 0.05).all()), var


def test_sde_without_diffusion_is_euler():
    field = gaussian_velocity(MU, STD)
    eps = _noise(16, 3, 13)
    sde = euler_maruyama_sde(field, eps, None, 20, diffusion_scale=0.0, last_step_size=0.0)
    torch.testing.assert_close(sde, euler_ode(field, eps, None, 20))
    # One step with a noise-free final step is a single Euler step from 1 to 0.
    one = euler_maruyama_sde(field, eps, None, 1, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(one, euler_ode(field, eps, None, 1))


def test_sde_is_deterministic_given_the_generator():
    field = gaussian_velocity(MU, STD)
    eps = _noise(16, 3, 14)

    def run(seed: int) -> torch.Tensor:
        return euler_maruyama_sde(field, eps, None, 30, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(0), run(0))
    assert not torch.allclose(run(0), run(1))
    # One seed gives the same noise for bf16 and fp32 states (drawn in fp32, then cast).
    def zero_field(x, t, c):
        return torch.zeros_like(x)

    outs = [
        euler_maruyama_sde(zero_field, torch.zeros(64, 3, dtype=dtype), None, 30,
                           generator=torch.Generator().manual_seed(0))
        for dtype in (torch.float32, torch.bfloat16)
    ]
    assert outs[1].dtype == torch.bfloat16
    torch.testing.assert_close(outs[1].float(), outs[0], atol=0.05, rtol=0.02)


@pytest.mark.parametrize("method,steps,tol", [("euler", 50, 0.3), ("euler", 400, 0.04), ("heun", 50, 1e-3)])
def test_reverse_ode_round_trip(method, steps, tol):
    field = gaussian_velocity(MU, STD)
    x0 = MU + STD * _noise(64, 3, 15)
    latent = reverse_ode(field, x0, None, steps, method=method)
    # The exact inverse flow maps x0 to (x0 - mu) / s at t = 1.
    assert (latent - (x0 - MU) / STD).abs().max().item() < tol
    forward = euler_ode if method == "euler" else heun_ode
    back = forward(field, latent, None, steps)
    assert (back - x0).abs().max().item() < tol


def test_reverse_ode_rejects_sde_and_backwards_time():
    field = gaussian_velocity(MU, STD)
    with pytest.raises(SamplerError, match="deterministic"):
        reverse_ode(field, _noise(2, 3, 0), method="sde")
    with pytest.raises(SamplerError, match="forward in time"):
        reverse_ode(field, _noise(2, 3, 0), t_start=0.8, t_end=0.2)


# --------------------------------------------------------------------------------------
# Sampler plumbing
# --------------------------------------------------------------------------------------


class Recorder:
    """A velocity function that records what the sampler hands it."""

    def __init__(self, with_params: bool = False):
        self.calls: list[tuple[tuple[int, ...], torch.dtype, torch.Tensor]] = []
        self.weight = torch.nn.Parameter(torch.ones(())) if with_params else None

    def __call__(self, x, t, cond):
        self.calls.append((tuple(x.shape), t.dtype, t.clone()))
        out = -x
        return out * self.weight if self.weight is not None else out


@pytest.mark.parametrize(
    "kind,evals", [(SamplerKind.EULER, 7), (SamplerKind.HEUN, 14), (SamplerKind.SDE, 7)]
)
def test_samplers_pass_shared_batch_times_and_call_back(kind, evals):
    rec = Recorder(with_params=True)
    seen = []
    x = torch.randn(3, 2, 4, 4, dtype=torch.bfloat16)
    config = SampleConfig(sampler=kind, num_steps=7, guidance=GuidanceConfig(start=0.0, end=0.0))
    with torch.enable_grad():
        out = sample(rec, x, None, config, callback=lambda i, t, xx: seen.append((i, t)))
    assert out.shape == x.shape and out.dtype == torch.bfloat16
    assert not out.requires_grad  # samplers run under no_grad
    assert len(rec.calls) == evals
    for shape, t_dtype, t in rec.calls:
        assert shape == (3, 2, 4, 4)
        assert t_dtype == torch.float32  # times stay fp32 for a bf16 state
        assert t.shape == (3,) and bool((t == t[0]).all())
    assert [i for i, _ in seen] == list(range(7))
    assert seen[-1][1] == 0.0
    assert all(a > b for (_, a), (_, b) in itertools.pairwise(seen))
    first_t = rec.calls[0][2][0].item()
    assert first_t == 1.0


def test_sde_final_step_is_noise_free_and_lands_at_zero():
    rec = Recorder()
    seen = []
    euler_maruyama_sde(rec, torch.zeros(2, 3), None, 5, last_step_size=0.04,
                       callback=lambda i, t, x: seen.append(t))
    times = [c[2][0].item() for c in rec.calls]
    assert times[0] == 1.0 and times[-1] == pytest.approx(0.04)
    assert seen[-2] == pytest.approx(0.04) and seen[-1] == 0.0
    # Zero velocity and zero diffusion only in the last step: the noise-free final step
    # leaves x unchanged, so the output equals the state at t = last_step_size.
    states = []
    euler_maruyama_sde(lambda x, t, c: torch.zeros_like(x), torch.zeros(2, 3), None, 5,
                       generator=torch.Generator().manual_seed(0),
                       callback=lambda i, t, x: states.append(x.clone()))
    assert torch.equal(states[-1], states[-2]) and not torch.equal(states[-2], states[-3])


def test_every_sampler_kind_is_registered_and_dispatches():
    assert set(SAMPLERS) == set(SamplerKind)
    field = gaussian_velocity(MU, STD)
    eps = _noise(512, 3, 16)
    for name in ("euler", "heun", "sde"):
        config = SampleConfig(sampler=name, num_steps=60)
        out = sample(field, eps, None, config)
        assert out.shape == eps.shape
        assert (out.mean(0) - MU).abs().max().item() < 0.25
    # Without a generator, the SDE noise comes from config.seed: repeatable.
    config = SampleConfig(sampler="sde", num_steps=20, seed=3)
    assert torch.equal(sample(field, eps, None, config), sample(field, eps, None, config))
    other = SampleConfig(sampler="sde", num_steps=20, seed=4)
    assert not torch.equal(sample(field, eps, None, config), sample(field, eps, None, other))


def test_progress_bar_runs():
    out = euler_ode(gaussian_velocity(MU, STD), _noise(4, 3, 17), None, 3, progress=True)
    assert torch.isfinite(out).all()


def test_sampler_rejects_wrong_velocity_shape():
    with pytest.raises(SamplerError, match="shaped like its input"):
        euler_ode(lambda x, t, c: x[:, :1], torch.zeros(2, 3), None, 2)
