"""Classifier-free guidance: schedules, forward-call budget, the guidance maths, and the
per-modality condition dropout that trains the unconditional branches."""

from __future__ import annotations

import pytest
import torch

from mupad.conditions import ConditionError, Conditions, ConditionStream, Modality
from mupad.config import GuidanceConfig, GuidanceMode, SampleConfig
from mupad.transport import (
    GuidanceError,
    GuidanceSchedule,
    euler_ode,
    guided,
    heun_ode,
    sample,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# Per-modality effect on the toy velocity: each present modality adds its own term.
EFFECT = {Modality.IMAGE: 1.0, Modality.TEXT: 10.0, Modality.RNA: 100.0}


class ToyVelocity:
    """v = x + t + sum_k EFFECT[k] * m_k (m_k = presence); records every forward call."""

    def __init__(self):
        self.batch_sizes: list[int] = []
        self.presence: list[dict[Modality, torch.Tensor]] = []

    def __call__(self, x, t, cond):
        self.batch_sizes.append(x.shape[0])
        out = x + t.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        flags = {}
        if cond is not None:
            for m, stream in cond.streams.items():
                flags[m] = stream.present.clone()
                out = out + EFFECT[m] * stream.present.to(x.dtype).reshape(
                    -1, *([1] * (x.dim() - 1))
                )
        self.presence.append(flags)
        return out


def make_cond(batch: int, present: dict[str, list[bool]] | None = None, length: int = 2) -> Conditions:
    """Conditions with image/text/rna streams; `present` overrides presence per modality."""
    present = present or {}
    streams = {}
    for i, name in enumerate(("image", "text", "rna")):
        tokens = torch.full((batch, length + i, 3), float(i + 1))
        flags = torch.tensor(present.get(name, [True] * batch))
        streams[name] = ConditionStream.from_tokens(tokens, present=flags)
    return Conditions.build(**streams)


# --------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------


def test_linear_anneal_is_the_papers_2p5_to_0():
    schedule = GuidanceSchedule.from_config(GuidanceConfig())  # the defaults are the paper's
    assert schedule(1.0) == pytest.approx(2.5)
    assert schedule(0.0) == pytest.approx(0.0)
    assert schedule(0.5) == pytest.approx(1.25)
    ramp = GuidanceSchedule(kind="linear", start=4.0, end=1.0)
    assert ramp(1.0) == 4.0 and ramp(0.0) == 1.0 and ramp(0.25) == pytest.approx(1.75)


def test_constant_and_interval_schedules():
    constant = GuidanceSchedule.from_config(GuidanceConfig(schedule="constant", start=3.0, end=9.0))
    assert constant(0.0) == constant(0.4) == constant(1.0) == 3.0
    interval = GuidanceSchedule.from_config(
        GuidanceConfig(schedule="interval", start=2.0, t_low=0.3, t_high=0.7)
    )
    assert interval(0.0) == interval(0.29) == interval(0.71) == interval(1.0) == 0.0
    assert interval(0.3) == interval(0.5) == interval(0.7) == 2.0
    assert GuidanceSchedule(kind="constant", start=0.0).is_zero
    assert GuidanceSchedule(kind="linear", start=0.0, end=0.0).is_zero
    assert not GuidanceSchedule(kind="linear", start=0.0, end=1.0).is_zero


# --------------------------------------------------------------------------------------
# Forward-call budget
# --------------------------------------------------------------------------------------


def test_zero_scale_makes_one_plain_call_per_step():
    toy = ToyVelocity()
    fn = guided(toy, GuidanceConfig(schedule="constant", start=0.0))
    assert fn is toy  # nothing to wrap
    euler_ode(fn, torch.zeros(4, 2), make_cond(4), 5)
    assert toy.batch_sizes == [4] * 5
    # Guidance is also skipped where an interval schedule is off.
    toy = ToyVelocity()
    fn = guided(toy, GuidanceConfig(schedule="interval", start=2.0, t_low=0.0, t_high=0.5))
    euler_ode(fn, torch.zeros(4, 2), make_cond(4), 4)  # evaluates t = 1, .75, .5, .25
    assert toy.batch_sizes == [4, 4, 8, 8]


def test_skip_below_cuts_the_anneal_tail_to_one_plain_pass():
    schedule = GuidanceSchedule.from_config(GuidanceConfig(skip_below=0.5))
    assert schedule(1.0) == pytest.approx(2.5) and schedule(0.2) == pytest.approx(0.5)
    assert schedule(0.19) == 0.0 and schedule(0.0) == 0.0
    toy = ToyVelocity()
    # Euler over 10 steps evaluates t = 1.0, 0.9, ..., 0.1: w = 2.5 t, below 0.5 only at 0.1.
    euler_ode(guided(toy, GuidanceConfig(skip_below=0.5)), torch.zeros(2, 2), make_cond(2), 10)
    assert toy.batch_sizes == [4] * 9 + [2]
    # A schedule entirely below the cut-off is no guidance at all.
    toy = ToyVelocity()
    assert guided(toy, GuidanceConfig(schedule="constant", start=0.3, skip_below=0.5)) is toy
    with pytest.raises(Exception, match="skip_below"):
        GuidanceConfig(skip_below=-1.0)


@pytest.mark.parametrize("mode", ["joint", "per_modality"])
def test_empty_conditions_make_one_plain_call_per_step(mode):
    for cond in (None, make_cond(3, {"image": [False] * 3, "text": [False] * 3, "rna": [False] * 3})):
        toy = ToyVelocity()
        euler_ode(guided(toy, GuidanceConfig(schedule="constant", start=2.0, mode=mode)),
                  torch.zeros(3, 2), cond, 4)
        assert toy.batch_sizes == [3] * 4


def test_joint_guidance_is_one_doubled_call_per_step():
    toy = ToyVelocity()
    exact = GuidanceConfig(skip_below=0.0)  # linear 2.5 -> 0, no cut-off
    fn = guided(toy, exact)
    euler_ode(fn, torch.zeros(4, 2), make_cond(4), 6)  # Euler never evaluates t = 0
    assert toy.batch_sizes == [8] * 6
    flags = toy.presence[0]
    for m in Modality:
        assert flags[m].tolist() == [True] * 4 + [False] * 4  # conditional half, then dropped
    # Heun's last corrector sits at t = 0 where the annealed scale is 0: one plain call.
    toy = ToyVelocity()
    heun_ode(guided(toy, exact), torch.zeros(4, 2), make_cond(4), 3)
    assert toy.batch_sizes == [8, 8, 8, 8, 8, 4]
    # The default cut-off (w < 0.5, i.e. t < 0.2) also makes Euler's last step (t = 1/6) plain.
    toy = ToyVelocity()
    euler_ode(guided(toy, GuidanceConfig()), torch.zeros(4, 2), make_cond(4), 6)
    assert toy.batch_sizes == [8] * 5 + [4]


def test_per_modality_guidance_is_one_call_with_one_slice_per_dropped_modality():
    toy = ToyVelocity()
    config = GuidanceConfig(schedule="constant", start=1.5, mode=GuidanceMode.PER_MODALITY)
    # RNA is absent for every sample: dropping it would change nothing, so it is skipped.
    cond = make_cond(2, {"rna": [False, False]})
    euler_ode(guided(toy, config), torch.zeros(2, 2), cond, 3)
    assert toy.batch_sizes == [6] * 3  # (1 + K) B with K = 2
    flags = toy.presence[0]
    assert flags[Modality.IMAGE].tolist() == [True, True, False, False, True, True]
    assert flags[Modality.TEXT].tolist() == [True, True, True, True, False, False]
    assert flags[Modality.RNA].tolist() == [False] * 6
    # A modality with scale 0 is skipped too.
    toy = ToyVelocity()
    config = GuidanceConfig(schedule="constant", start=1.5, mode="per_modality", text_scale=0.0)
    euler_ode(guided(toy, config), torch.zeros(2, 2), make_cond(2), 3)
    assert toy.batch_sizes == [6] * 3  # image and rna remain


# --------------------------------------------------------------------------------------
# The guidance maths against hand computations
# --------------------------------------------------------------------------------------


def test_joint_guidance_math():
    toy = ToyVelocity()
    w = 2.0
    fn = guided(toy, GuidanceConfig(schedule="constant", start=w))
    x = torch.tensor([[0.5], [1.0], [-1.0]])
    t = torch.full((3,), 0.25)
    # Sample 0: all present; sample 1: only text; sample 2: image + rna.
    cond = make_cond(3, {"image": [True, False, True], "text": [True, True, False],
                         "rna": [True, False, True]})
    out = fn(x, t, cond)
    base = x + 0.25
    v_cond = base + torch.tensor([[111.0], [10.0], [101.0]])
    v_uncond = base
    torch.testing.assert_close(out, v_cond + w * (v_cond - v_uncond))
    torch.testing.assert_close(out, base + 3 * torch.tensor([[111.0], [10.0], [101.0]]))


def test_per_modality_guidance_math():
    toy = ToyVelocity()
    w = 0.5
    config = GuidanceConfig(schedule="constant", start=w, mode="per_modality",
                            image_scale=2.0, text_scale=1.0, rna_scale=4.0)
    fn = guided(toy, config)
    x = torch.tensor([[0.0], [2.0]])
    t = torch.full((2,), 0.6)
    cond = make_cond(2, {"image": [True, True], "text": [True, False], "rna": [False, True]})
    out = fn(x, t, cond)
    base = x + 0.6
    v_full = base + torch.tensor([[11.0], [101.0]])
    v_drop_image = v_full - 1.0
    v_drop_text = v_full - torch.tensor([[10.0], [0.0]])  # absent for sample 1: no change
    v_drop_rna = v_full - torch.tensor([[0.0], [100.0]])
    expected = (
        v_full
        + w * 2.0 * (v_full - v_drop_image)
        + w * 1.0 * (v_full - v_drop_text)
        + w * 4.0 * (v_full - v_drop_rna)
    )
    torch.testing.assert_close(out, expected)
    # By hand: sample 0 = 0.6 + 11 + 1*1 + 0.5*10 ; sample 1 = 2.6 + 101 + 1 + 0 + 2*100.
    torch.testing.assert_close(out, torch.tensor([[17.6], [304.6]]))


def test_guidance_uses_the_shared_time_for_its_scale():
    toy = ToyVelocity()
    fn = guided(toy, GuidanceConfig())  # w(t) = 2.5 t
    x = torch.zeros(2, 1)
    cond = make_cond(2)
    out = fn(x, torch.full((2,), 0.4), cond)
    torch.testing.assert_close(out, 0.4 + 111.0 * (1 + 2.5 * 0.4) * torch.ones(2, 1))
    with pytest.raises(GuidanceError, match="shared time"):
        fn(x, torch.tensor([0.2, 0.4]), cond)


def test_sample_applies_guidance_from_the_config():
    toy = ToyVelocity()
    guidance = GuidanceConfig(mode="per_modality", skip_below=0.0)
    config = SampleConfig(sampler="sde", num_steps=5, guidance=guidance)
    out = sample(toy, torch.zeros(3, 2), make_cond(3), config)
    assert out.shape == (3, 2)
    assert toy.batch_sizes == [12] * 5  # (1 + 3) * 3 on every step (the SDE never evaluates t = 0)
    with pytest.raises(ConditionError, match="batch size"):
        sample(toy, torch.zeros(3, 2), make_cond(2), config)


# --------------------------------------------------------------------------------------
# Condition dropout (Conditions.dropout) for classifier-free guidance training
# --------------------------------------------------------------------------------------


def test_condition_dropout_rate_independence_and_determinism():
    n, p = 40_000, 0.1
    cond = make_cond(n, length=1)
    dropped = cond.dropout(p, generator=torch.Generator().manual_seed(0))
    absent = {m: ~dropped.streams[m].present for m in Modality}
    for m in Modality:
        rate = absent[m].float().mean().item()
        assert abs(rate - p) < 0.006, (m, rate)  # std error 0.0015
    # Independence: joint drop rates factorise (p^2 = 0.01, std error 0.0005).
    for a, b in ((Modality.IMAGE, Modality.TEXT), (Modality.TEXT, Modality.RNA),
                 (Modality.IMAGE, Modality.RNA)):
        both = (absent[a] & absent[b]).float().mean().item()
        assert abs(both - p * p) < 0.0025, (a, b, both)
    all_three = (absent[Modality.IMAGE] & absent[Modality.TEXT] & absent[Modality.RNA])
    assert all_three.float().mean().item() < 0.003  # p^3 = 0.001
    # Deterministic given the generator; a different seed differs.
    again = cond.dropout(p, generator=torch.Generator().manual_seed(0))
    other = cond.dropout(p, generator=torch.Generator().manual_seed(1))
    for m in Modality:
        assert torch.equal(again.streams[m].present, dropped.streams[m].present)
    assert not torch.equal(other.streams[Modality.TEXT].present, dropped.streams[Modality.TEXT].present)
    # Tokens and masks are untouched; only presence changes.
    for m in Modality:
        assert torch.equal(dropped.streams[m].tokens, cond.streams[m].tokens)


def test_condition_dropout_never_turns_an_absent_modality_present():
    n = 2_000
    pattern = (torch.arange(n) % 3 == 0).tolist()  # a third present
    cond = make_cond(n, {"text": pattern})
    for p in (0.0, 0.1, 0.5):
        out = cond.dropout(p, generator=torch.Generator().manual_seed(2))
        text = out.streams[Modality.TEXT].present
        assert not bool((text & ~torch.tensor(pattern)).any())
    assert cond.dropout(0.0) is cond
    everything = cond.dropout(1.0, generator=torch.Generator().manual_seed(0))
    assert not any(bool(s.present.any()) for s in everything.streams.values())
