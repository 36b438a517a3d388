"""Joint (image, CLS) sampling: the packed state, the velocity adapter, generate() with CLS
models under every sampler and guidance mode, and the reverse ODE on the joint state."""

from __future__ import annotations

import pytest
import torch

from mupad.applications.generate import generate, initial_noise
from mupad.conditions import Conditions, ConditionStream
from mupad.config import GuidanceConfig, GuidanceMode, SampleConfig, model_preset
from mupad.data.tiles import to_uint8
from mupad.models import ModelInputError, SiT
from mupad.models.cls_joint import (
    JointClsVelocity,
    pack_state,
    state_width,
    unpack_state,
    velocity_fn,
)
from mupad.transport import guided, reverse_ode, sample

torch.set_num_threads(1)

CLS_DIM, TEXT_DIM, SIDE = 16, 8, 8
NO_GUIDANCE = GuidanceConfig(start=0.0, end=0.0)


def perturbed_model(in_channels: int = 4, cls_dim: int = CLS_DIM, std: float = 0.05) -> SiT:
    """A tiny SiT whose weights are all small seeded Gaussians (a fresh SiT outputs exactly 0)."""
    config = model_preset(
        "tiny", in_channels=in_channels, sample_size=SIDE, cls_dim=cls_dim, text_dim=TEXT_DIM
    )
    model = SiT(config)
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model.eval()


def text_cond(batch: int, seed: int = 7) -> Conditions:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, 3, TEXT_DIM, generator=generator)  # (B, T, D)
    return Conditions.build(text=ConditionStream.from_tokens(tokens))


def config(sampler: str, guidance: GuidanceConfig = NO_GUIDANCE, steps: int = 4) -> SampleConfig:
    return SampleConfig(sampler=sampler, num_steps=steps, guidance=guidance, seed=3)


# --------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------


def test_pack_unpack_round_trip_and_views():
    x = torch.randn(3, 4, 8, 6)
    cls = torch.randn(3, CLS_DIM)
    state = pack_state(x, cls)
    assert state.shape == (3, 4 * 8 * 6 + CLS_DIM) == (3, state_width((4, 8, 6), CLS_DIM))
    x_back, cls_back = unpack_state(state, (4, 8, 6), CLS_DIM)
    assert torch.equal(x_back, x) and torch.equal(cls_back, cls)
    # Both parts are views of the packed state, not copies.
    assert x_back.untyped_storage().data_ptr() == state.untyped_storage().data_ptr()
    assert cls_back.untyped_storage().data_ptr() == state.untyped_storage().data_ptr()
    state[0, 0] = 100.0
    state[0, -1] = -100.0
    assert x_back[0, 0, 0, 0] == 100.0 and cls_back[0, -1] == -100.0


def test_pack_state_rejects_bad_inputs():
    with pytest.raises(ModelInputError, match="batch"):
        pack_state(torch.randn(2, 4, 8, 8), torch.randn(3, CLS_DIM))
    with pytest.raises(ModelInputError, match=r"\(batch, channels, height, width\)"):
        pack_state(torch.randn(2, 4, 8), torch.randn(2, CLS_DIM))
    with pytest.raises(ModelInputError, match=r"\(batch, cls_dim\)"):
        pack_state(torch.randn(2, 4, 8, 8), torch.randn(2, CLS_DIM, 1))


def test_wrong_state_width_names_the_expected_width():
    expected = 4 * SIDE * SIDE + CLS_DIM
    with pytest.raises(ModelInputError, match=f"\\(batch, {expected}\\)"):
        unpack_state(torch.randn(2, expected + 1), (4, SIDE, SIDE), CLS_DIM)
    with pytest.raises(ModelInputError, match=f"\\(batch, {expected}\\)"):
        unpack_state(torch.randn(2, 4, SIDE, SIDE), (4, SIDE, SIDE), CLS_DIM)  # unpacked image
    model = perturbed_model()
    fn = velocity_fn(model, (4, SIDE, SIDE))
    with pytest.raises(ModelInputError, match=f"\\(batch, {expected}\\)"):
        fn(torch.randn(2, expected - CLS_DIM), torch.full((2,), 0.5), None)
    # Through a sampler too: the error surfaces unchanged.
    with pytest.raises(ModelInputError, match=f"\\(batch, {expected}\\)"):
        sample(fn, torch.randn(2, expected + 3), None, config("euler"))


# --------------------------------------------------------------------------------------
# The velocity adapter
# --------------------------------------------------------------------------------------


def test_velocity_fn_picks_model_velocity_without_cls():
    model = perturbed_model(cls_dim=0)
    assert velocity_fn(model, (4, SIDE, SIDE)) == model.velocity
    cls_model = perturbed_model()
    fn = velocity_fn(cls_model, (4, SIDE, SIDE))
    assert isinstance(fn, JointClsVelocity) and fn.state_width == 4 * SIDE * SIDE + CLS_DIM
    with pytest.raises(ModelInputError, match="cls_joint.velocity_fn"):
        cls_model.velocity(torch.randn(1, 4, SIDE, SIDE), 0.5)


def test_joint_velocity_rejects_mismatched_models():
    with pytest.raises(ModelInputError, match="cls_dim > 0"):
        JointClsVelocity(perturbed_model(cls_dim=0), (4, SIDE, SIDE))
    with pytest.raises(ModelInputError, match="in_channels=4"):
        JointClsVelocity(perturbed_model(), (3, SIDE, SIDE))
    with pytest.raises(ModelInputError, match="image_shape"):
        JointClsVelocity(perturbed_model(), (4, SIDE))  # type: ignore[arg-type]
    learned_sigma = SiT(model_preset("tiny", in_channels=4, out_channels=8, cls_dim=CLS_DIM))
    with pytest.raises(ModelInputError, match="shaped like its input"):
        JointClsVelocity(learned_sigma, (4, SIDE, SIDE))


def test_joint_velocity_equals_model_forward():
    model = perturbed_model()
    x, cls = torch.randn(2, 4, SIDE, SIDE), torch.randn(2, CLS_DIM)
    t, cond = torch.tensor([0.3, 0.8]), text_cond(2)
    out = model(x, t, cond, cls_token=cls)
    assert out.velocity.abs().max() > 0 and out.cls_velocity.abs().max() > 0  # nontrivial
    fn = JointClsVelocity(model, (4, SIDE, SIDE))
    state = pack_state(x, cls)
    v = fn(state, t, cond)
    assert v.shape == state.shape and v.dtype == state.dtype
    v_x, v_cls = fn.unpack(v)
    torch.testing.assert_close(v_x, out.velocity, rtol=0, atol=0)
    torch.testing.assert_close(v_cls, out.cls_velocity, rtol=0, atol=0)
    # The CLS state is an input of the image velocity (it attends with the patch tokens).
    v_other = fn(pack_state(x, cls + 1.0), t, cond)
    assert not torch.allclose(fn.unpack(v_other)[0], v_x)


# --------------------------------------------------------------------------------------
# generate() with CLS models
# --------------------------------------------------------------------------------------

GUIDANCE_CASES = {
    "none": NO_GUIDANCE,
    "joint": GuidanceConfig(start=2.5, end=0.0, mode=GuidanceMode.JOINT),
    "per_modality": GuidanceConfig(start=2.0, end=1.0, mode=GuidanceMode.PER_MODALITY),
}


@pytest.mark.parametrize("sampler", ["euler", "heun", "sde"])
@pytest.mark.parametrize("guidance", list(GUIDANCE_CASES))
def test_generate_cls_model_is_deterministic_and_shaped(sampler, guidance):
    model = perturbed_model(in_channels=3)
    cond = text_cond(2)
    cfg = config(sampler, GUIDANCE_CASES[guidance])
    images, cls = generate(model, cond, cfg, return_cls=True)
    assert images.shape == (2, 3, SIDE, SIDE) and images.dtype == torch.uint8
    assert cls.shape == (2, CLS_DIM) and cls.dtype == torch.float32
    assert torch.isfinite(cls).all()
    images_again, cls_again = generate(model, cond, cfg, return_cls=True)
    assert torch.equal(images, images_again) and torch.equal(cls, cls_again)
    assert torch.equal(generate(model, cond, cfg), images)  # return_cls only adds the CLS
    if guidance != "none":  # guidance acts on the joint state
        _, cls_plain = generate(model, cond, config(sampler), return_cls=True)
        assert not torch.allclose(cls, cls_plain)


def test_generate_cls_model_matches_the_manual_pipeline():
    """generate() = initial_noise (image noise first, then CLS noise) -> sample on the joint
    velocity with the same generator -> decode the image part."""
    model = perturbed_model(in_channels=3)
    cond = text_cond(2)
    cfg = config("sde", GUIDANCE_CASES["joint"])
    images, cls = generate(model, cond, cfg, return_cls=True)

    generator = torch.Generator().manual_seed(cfg.seed)
    noise = initial_noise(model, 2, generator)
    assert noise.shape == (2, 3 * SIDE * SIDE + CLS_DIM)
    state = sample(velocity_fn(model, (3, SIDE, SIDE)), noise, cond, cfg, generator=generator)
    latents, cls_manual = unpack_state(state, (3, SIDE, SIDE), CLS_DIM)
    assert torch.equal(images, to_uint8(latents.clamp(-1, 1)))
    assert torch.equal(cls, cls_manual)

    # The image noise is drawn first, exactly as for a model without a CLS token.
    plain = perturbed_model(in_channels=3, cls_dim=0)
    image_noise = initial_noise(plain, 2, torch.Generator().manual_seed(cfg.seed))
    torch.testing.assert_close(
        unpack_state(noise, (3, SIDE, SIDE), CLS_DIM)[0], image_noise, rtol=0, atol=0
    )


def test_cls_noise_changes_the_images():
    model = perturbed_model(in_channels=3, std=0.1)  # enough for the CLS to steer clearly
    fn = velocity_fn(model, (3, SIDE, SIDE))
    cond, cfg = text_cond(2), config("heun", steps=6)
    generator = torch.Generator().manual_seed(0)
    x_noise = torch.randn(2, 3, SIDE, SIDE, generator=generator)
    cls_noise = torch.randn(2, CLS_DIM, generator=generator)
    state_a = sample(fn, pack_state(x_noise, cls_noise), cond, cfg)
    state_b = sample(fn, pack_state(x_noise, -cls_noise), cond, cfg)  # same image noise
    x_a, _ = unpack_state(state_a, (3, SIDE, SIDE), CLS_DIM)
    x_b, _ = unpack_state(state_b, (3, SIDE, SIDE), CLS_DIM)
    assert (x_a - x_b).abs().max() > 0.05
    assert not torch.equal(to_uint8(x_a.clamp(-1, 1)), to_uint8(x_b.clamp(-1, 1)))


def test_generate_with_bf16_autocast_runs_for_cls_models():
    model = perturbed_model(in_channels=3)
    images, cls = generate(model, text_cond(2), config("euler"), bf16=True, return_cls=True)
    assert images.shape == (2, 3, SIDE, SIDE) and cls.shape == (2, CLS_DIM)
    assert torch.isfinite(cls).all()


def test_generate_without_cls_is_unchanged():
    """cls_dim == 0: generate() = today's pipeline (image noise, then the sampler on
    model.velocity with the same generator), bit for bit."""
    model = perturbed_model(in_channels=3, cls_dim=0)
    cond = text_cond(2)
    for cfg in (config("sde", GUIDANCE_CASES["joint"]), config("heun")):
        generator = torch.Generator().manual_seed(cfg.seed)
        noise = torch.randn(2, 3, SIDE, SIDE, generator=generator)
        latents = sample(model.velocity, noise, cond, cfg, generator=generator)
        expected = to_uint8(latents.clamp(-1, 1))
        assert torch.equal(generate(model, cond, cfg), expected)
    with pytest.raises(ValueError, match="return_cls"):
        generate(model, cond, cfg, return_cls=True)


# --------------------------------------------------------------------------------------
# Inversion
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("guidance", ["none", "joint"])
def test_reverse_ode_round_trip_of_the_joint_state(guidance):
    model = perturbed_model(std=0.02)  # small weights: a smooth velocity field
    fn = velocity_fn(model, (4, SIDE, SIDE))
    cond = text_cond(2)
    noise = initial_noise(model, 2, torch.Generator().manual_seed(5))
    cfg = config("heun", GUIDANCE_CASES[guidance], steps=20)
    data = sample(fn, noise, cond, cfg)  # t = 1 -> 0
    assert (data - noise).abs().max() > 1e-2  # the trajectory actually moved
    back = reverse_ode(guided(fn, cfg.guidance), data, cond, 20, method="heun")  # t = 0 -> 1
    torch.testing.assert_close(back, noise, rtol=0, atol=1e-4)
    x_back, cls_back = unpack_state(back, (4, SIDE, SIDE), CLS_DIM)
    x_noise, cls_noise = unpack_state(noise, (4, SIDE, SIDE), CLS_DIM)
    torch.testing.assert_close(cls_back, cls_noise, rtol=0, atol=1e-4)
    torch.testing.assert_close(x_back, x_noise, rtol=0, atol=1e-4)
