"""Classifier-free guidance on velocity callables, with time-dependent scales.

Convention (w = 0 is the plain conditional model):

    JOINT:         v = v_cond + w(t) * (v_cond - v_uncond)
                   v_uncond = the same conditions with every modality marked absent
    PER_MODALITY:  v = v_full + sum_k w(t) * s_k * (v_full - v_{drop k})
                   v_{drop k} = the same conditions with only modality k marked absent

All passes of one step go through ONE forward call on a concatenated batch
(x repeated, t repeated, `Conditions.concat`). When the effective scale is zero, or there
is nothing to drop (no conditions / no modality present), exactly one forward call on the
original batch is made — guidance then costs nothing.

Schedules are functions of the sampler's time t (t = 1 pure noise, t = 0 data; see `paths`):
constant, linear anneal (`start` at t = 1 to `end` at t = 0; the paper anneals 2.5 -> 0.0)
and interval (constant `start` inside [t_low, t_high], zero outside). `skip_below` sets
|w(t)| below it to exactly 0: the paper's anneal reaches 0 only at t = 0, which no sampler
evaluates, so without a cut-off annealed guidance never saves an unconditional pass.
"""

from __future__ import annotations

import dataclasses

import torch

from mupad.conditions import Conditions, Modality, is_empty
from mupad.config import GuidanceConfig, GuidanceMode, GuidanceScheduleKind, parse_enum
from mupad.errors import MupadError
from mupad.transport.velocity import VelocityFn


class GuidanceError(MupadError, ValueError):
    """Guidance cannot be applied to this input; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class GuidanceSchedule:
    """The guidance scale as a function of time: w(t)."""

    kind: GuidanceScheduleKind = GuidanceScheduleKind.LINEAR
    start: float = 2.5  # CONSTANT/INTERVAL: the scale; LINEAR: the scale at t = 1 (noise)
    end: float = 0.0  # LINEAR: the scale at t = 0 (data)
    t_low: float = 0.0  # INTERVAL: guidance is on for t in [t_low, t_high]
    t_high: float = 1.0
    skip_below: float = 0.0  # |w(t)| below this -> 0 (one plain pass for that step)

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", parse_enum(GuidanceScheduleKind, self.kind))

    @classmethod
    def from_config(cls, config: GuidanceConfig) -> GuidanceSchedule:
        return cls(
            kind=config.schedule,
            start=config.start,
            end=config.end,
            t_low=config.t_low,
            t_high=config.t_high,
            skip_below=config.skip_below,
        )

    def __call__(self, t: float) -> float:
        """w(t) for a time t in [0, 1]."""
        w = self._scale(float(t))
        return 0.0 if abs(w) < self.skip_below else w

    def _scale(self, t: float) -> float:
        if self.kind is GuidanceScheduleKind.CONSTANT:
            return float(self.start)
        if self.kind is GuidanceScheduleKind.LINEAR:
            # t = 1 (noise) -> start, t = 0 (data) -> end.
            return float(self.end + (self.start - self.end) * t)
        if self.kind is GuidanceScheduleKind.INTERVAL:
            return float(self.start) if self.t_low <= t <= self.t_high else 0.0
        raise GuidanceError(f"unknown guidance schedule {self.kind!r}")

    @property
    def is_zero(self) -> bool:
        """True when w(t) = 0 for every t (guidance can be skipped altogether)."""
        if self.kind is GuidanceScheduleKind.LINEAR:
            largest = max(abs(self.start), abs(self.end))
        else:
            largest = abs(self.start)
        return largest == 0.0 or largest < self.skip_below


def _shared_time(t: torch.Tensor) -> float:
    """The single time of a (B,) time tensor; guidance scales are per step, not per sample."""
    t_host = t.detach().to("cpu", torch.float64).reshape(-1)
    if t_host.numel() == 0:
        raise GuidanceError("guidance got an empty time tensor")
    if not bool((t_host == t_host[0]).all()):
        raise GuidanceError(
            "guidance needs one shared time across the batch (as the samplers pass it); got "
            f"times ranging over [{float(t_host.min())}, {float(t_host.max())}]"
        )
    return float(t_host[0])


def _present_modalities(cond: Conditions) -> list[Modality]:
    """Modalities given for at least one sample, in a fixed (enum) order."""
    return [
        m for m in Modality if m in cond.streams and bool(cond.streams[m].present.any())
    ]


def _repeat_batch(x: torch.Tensor, t: torch.Tensor, copies: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, ...), (B,) -> (copies*B, ...), (copies*B,)."""
    return torch.cat([x] * copies), torch.cat([t] * copies)


@dataclasses.dataclass(frozen=True)
class GuidedVelocity:
    """A velocity function with classifier-free guidance; call it like the one it wraps."""

    velocity_fn: VelocityFn
    schedule: GuidanceSchedule
    mode: GuidanceMode = GuidanceMode.JOINT
    modality_scales: dict[str, float] = dataclasses.field(
        default_factory=lambda: {m.value: 1.0 for m in Modality}
    )
    # The last (conditions, modalities dropped) and the batched conditions built from them.
    # A sampler passes the same conditions at every step, so the batch is built once and is
    # the same object each call — which also lets `condition_kv_cache` reuse its K/V.
    _batched: list[tuple[Conditions, tuple[Modality, ...], Conditions]] = dataclasses.field(
        default_factory=list, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", parse_enum(GuidanceMode, self.mode))
        unknown = set(self.modality_scales) - {m.value for m in Modality}
        if unknown:
            raise GuidanceError(
                f"unknown modality name(s) {sorted(unknown)} in modality_scales; use "
                f"{[m.value for m in Modality]}"
            )

    def __call__(
        self, x: torch.Tensor, t: torch.Tensor, cond: Conditions | None
    ) -> torch.Tensor:
        if cond is None or is_empty(cond):
            return self.velocity_fn(x, t, cond)
        w = self.schedule(_shared_time(t))
        if w == 0.0:
            return self.velocity_fn(x, t, cond)
        if self.mode is GuidanceMode.JOINT:
            return self._joint(x, t, cond, w)
        return self._per_modality(x, t, cond, w)

    def _batch(self, cond: Conditions, dropped: tuple[Modality, ...]) -> Conditions:
        """[cond; cond without all modalities] (joint, `dropped` = ()) or [cond; cond without
        each dropped modality] (per modality), memoised for the last `cond`."""
        for seen, seen_dropped, batched in self._batched:
            if seen is cond and seen_dropped == dropped:
                return batched
        if dropped:
            parts = [cond] + [cond.without([m]) for m in dropped]
        else:
            parts = [cond, cond.without(list(cond.streams))]
        batched = Conditions.concat(parts)
        # Keep the few variants one sampling run can produce (per-modality scales can vanish
        # at different times); a new `cond` starts afresh.
        if self._batched and self._batched[-1][0] is not cond:
            self._batched.clear()
        self._batched.append((cond, dropped, batched))
        return batched

    def _joint(self, x: torch.Tensor, t: torch.Tensor, cond: Conditions, w: float) -> torch.Tensor:
        batch = x.shape[0]
        x_in, t_in = _repeat_batch(x, t, 2)  # (2B, ...), (2B,)
        out = self.velocity_fn(x_in, t_in, self._batch(cond, ()))
        v_cond, v_uncond = out[:batch], out[batch:]
        return v_cond + w * (v_cond - v_uncond)

    def _per_modality(
        self, x: torch.Tensor, t: torch.Tensor, cond: Conditions, w: float
    ) -> torch.Tensor:
        scales = {
            m: w * float(self.modality_scales.get(m.value, 1.0))
            for m in _present_modalities(cond)
        }
        scales = {m: s for m, s in scales.items() if s != 0.0}
        if not scales:
            return self.velocity_fn(x, t, cond)
        batch = x.shape[0]
        dropped = tuple(scales)
        x_in, t_in = _repeat_batch(x, t, 1 + len(dropped))  # ((1+K)B, ...), ((1+K)B,)
        out = self.velocity_fn(x_in, t_in, self._batch(cond, dropped))
        v_full = out[:batch]
        guided = v_full
        for i, m in enumerate(dropped, start=1):
            v_drop = out[i * batch : (i + 1) * batch]
            guided = guided + scales[m] * (v_full - v_drop)
        return guided


def guided(velocity_fn: VelocityFn, config: GuidanceConfig | None) -> VelocityFn:
    """Wrap `velocity_fn` with classifier-free guidance as configured.

    Returns `velocity_fn` itself when `config` is None or its schedule is zero everywhere.
    """
    if config is None:
        return velocity_fn
    schedule = GuidanceSchedule.from_config(config)
    if schedule.is_zero:
        return velocity_fn
    return GuidedVelocity(
        velocity_fn=velocity_fn,
        schedule=schedule,
        mode=config.mode,
        modality_scales=dict(config.modality_scales),
    )


__all__ = ["GuidanceError", "GuidanceSchedule", "GuidedVelocity", "guided"]
