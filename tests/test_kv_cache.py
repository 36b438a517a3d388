"""Condition K/V caching across sampler steps: same samples, fewer K/V projections, never in
training, invalidated by in-place edits of the condition tensors."""

from __future__ import annotations

import pytest
import torch

from mupad.applications.generate import generate
from mupad.conditions import Conditions
from mupad.config import GuidanceConfig, SampleConfig, model_preset
from mupad.models import SiT
from mupad.models.attention import DecoupledCrossAttention
from mupad.models.kv_cache import condition_kv_cache

TEXT_DIM, IMAGE_DIM = 16, 12


pytestmark = pytest.mark.usefixtures("one_thread")


def _model() -> SiT:
    config = model_preset(
        "tiny", in_channels=3, sample_size=8, text_dim=TEXT_DIM, image_dim=IMAGE_DIM
    )
    torch.manual_seed(0)
    model = SiT(config).eval()
    with torch.no_grad():  # open the zero-initialised gates so the streams matter
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def _cond(batch: int = 2) -> Conditions:
    generator = torch.Generator().manual_seed(3)
    return Conditions.build(
        text=torch.randn(batch, 5, TEXT_DIM, generator=generator),
        image=torch.randn(batch, 4, IMAGE_DIM, generator=generator),
    )


def _count_kv_calls(model: SiT) -> list[int]:
    calls = [0]
    for layer in model.modules():
        if isinstance(layer, DecoupledCrossAttention):
            for linear in layer.kv.values():
                linear.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("mode", ["joint", "per_modality"])
def test_generate_computes_condition_kv_once_and_matches_uncached_sampling(mode):
    model = _model()
    cond = _cond()
    config = SampleConfig(
        sampler="sde", num_steps=6, guidance=GuidanceConfig(mode=mode, skip_below=0.5), seed=1
    )
    calls = _count_kv_calls(model)
    cached = generate(model, cond, config)
    blocks = model.config.depth
    # Guided steps share one batched condition set; the unguided tail (w < 0.5) uses the
    # plain one: two K/V computations per stream and block for the whole run.
    assert calls[0] == 2 * 2 * blocks

    # The same run without the cache (bypass generate's context by sampling directly).
    from mupad.applications.generate import initial_noise
    from mupad.models.cls_joint import velocity_fn
    from mupad.transport.samplers import sample

    generator = torch.Generator().manual_seed(config.seed)
    noise = initial_noise(model, 2, generator)
    calls[0] = 0
    with torch.no_grad():
        plain = sample(velocity_fn(model, (3, 8, 8)), noise, cond, config, generator=generator)
    assert calls[0] == 2 * 6 * blocks  # every call, every stream, every block
    from mupad.data.tiles import to_uint8

    assert torch.equal(cached, to_uint8(plain))


def test_no_caching_with_gradients_and_in_place_edits_invalidate():
    model = _model()
    cond = _cond()
    x, t = torch.randn(2, 3, 8, 8), torch.full((2,), 0.5)
    calls = _count_kv_calls(model)
    depth = model.config.depth
    with condition_kv_cache(model), torch.no_grad():
        before = model(x, t, cond).velocity
        assert torch.equal(model(x, t, cond).velocity, before)
        assert calls[0] == 2 * depth  # two streams, once each: the second call reused K/V
        cond.streams[next(iter(cond.streams))].tokens.mul_(2.0)  # in place: new version
        after = model(x, t, cond).velocity
        assert calls[0] == 3 * depth  # only the edited stream was recomputed
        assert not torch.equal(before, after)
    with torch.no_grad():
        assert torch.equal(model(x, t, cond).velocity, after)  # uncached agrees
    # With gradients enabled the cache is bypassed, so the K/V weights get gradients.
    calls[0] = 0
    with condition_kv_cache(model):
        out = model(x, t, cond).velocity
        out.square().mean().backward()
        model(x, t, cond)
    assert calls[0] == 2 * 2 * depth
    layer = next(m for m in model.modules() if isinstance(m, DecoupledCrossAttention))
    assert layer.kv_cache is None  # unbound on exit
    assert all(linear.weight.grad is not None for linear in layer.kv.values())
