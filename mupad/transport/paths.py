"""The interpolant and the time convention — defined here once, imported everywhere.

Time runs from data to noise:

    t = 0  ->  clean data x0
    t = 1  ->  pure Gaussian noise eps ~ N(0, I)

    x_t = (1 - t) * x0 + t * eps                (linear interpolant, alpha_t = 1 - t, sigma_t = t)
    v   = d x_t / d t = eps - x0                (the velocity the network predicts)

Sampling integrates dx/dt = v from t = 1 down to t = 0; inversion (the reverse ODE)
integrates it from t = 0 up to t = 1. The network receives t itself, in [0, 1].

For a model velocity v(x, t) the implied denoised estimate, noise estimate and score are

    x0_hat  = x - t * v
    eps_hat = x + (1 - t) * v
    score   = -eps_hat / t

and, the other way round, a model that predicts x0_hat has the velocity

    v = (x - x0_hat) / t      (t clamped below at DENOISED_T_MIN, where the ratio blows up)
"""

from __future__ import annotations

import torch

T_DATA = 0.0
T_NOISE = 1.0
# Below this t a data-predicting model's velocity divides by the floor instead of t: the
# velocity stays bounded near the data end, where the step to x0 is tiny anyway.
DENOISED_T_MIN = 0.05


def _broadcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) or scalar time -> shape broadcastable against `like` (B, ...)."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.dim() == 0:
        return t
    return t.reshape(t.shape[0], *([1] * (like.dim() - 1)))


def alpha(t: torch.Tensor) -> torch.Tensor:
    """Coefficient of the data in x_t."""
    return 1.0 - t


def sigma(t: torch.Tensor) -> torch.Tensor:
    """Coefficient of the noise in x_t."""
    return t


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t eps, with t of shape (B,) or a scalar."""
    tb = _broadcast(t, x0)
    return alpha(tb) * x0 + sigma(tb) * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """d x_t / d t for the linear interpolant: eps - x0 (independent of t)."""
    return noise - x0


def denoised_from_velocity(x: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x0_hat = x - t v."""
    return x - _broadcast(t, x) * v


def noise_from_velocity(x: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """eps_hat = x + (1 - t) v."""
    return x + (1.0 - _broadcast(t, x)) * v


def velocity_from_denoised(x: torch.Tensor, x0_hat: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """v = (x - x0_hat) / max(t, DENOISED_T_MIN): the velocity a clean-image prediction implies."""
    tb = _broadcast(t, x).clamp_min(DENOISED_T_MIN)
    return (x - x0_hat) / tb


def score_from_velocity(x: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """grad log p_t(x) = -eps_hat / t (undefined at t = 0; callers keep t > 0)."""
    return -noise_from_velocity(x, v, t) / _broadcast(t, x)


def sample_training_times(
    batch_size: int,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    *,
    logit_normal: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Training times (B,): uniform on [0, 1), or sigmoid(N(location, scale^2)) when
    `logit_normal` = (location, scale) is given (more weight on the middle of the path,
    where the velocity is hardest to predict; location > 0 favours the noise end)."""
    if logit_normal is None:
        return torch.rand(batch_size, generator=generator).to(device)
    location, scale = logit_normal
    normal = torch.randn(batch_size, generator=generator) * scale + location
    # Strictly inside (0, 1) like the uniform draw's [0, 1): t = 1 exactly is pure noise.
    return torch.sigmoid(normal).clamp(0.0, 1.0 - 1e-6).to(device)
