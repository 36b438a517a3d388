"""The quality levers of the generator: clean-image prediction, the patch bottleneck, the
convolutional refinement head and logit-normal training times; and the tile measures that
judge them (border ratio, colour moments, nearest-training distances)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mupad.config import ConfigError, ModelConfig, Prediction, TrainConfig, from_dict, to_dict
from mupad.evaluation.stats import EvaluationError
from mupad.evaluation.tile_quality import (
    border_ratio,
    colour_distance,
    colour_moments,
    nearest_distances,
)
from mupad.models import SiT
from mupad.transport import paths
from mupad.transport.losses import make_noisy_batch

pytestmark = pytest.mark.usefixtures("one_thread")


def pixel_config(**overrides) -> ModelConfig:
    fields = dict(in_channels=3, patch_size=4, hidden_size=32, depth=2, num_heads=2, sample_size=16)
    fields.update(overrides)
    return ModelConfig(**fields)


# ---------------------------------------------------------------------------- paths


def test_velocity_from_denoised_inverts_denoised_from_velocity():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 8, 8, generator=generator)
    x0_hat = torch.randn(4, 3, 8, 8, generator=generator)
    t = torch.tensor([0.05, 0.3, 0.7, 1.0])
    v = paths.velocity_from_denoised(x, x0_hat, t)
    torch.testing.assert_close(paths.denoised_from_velocity(x, v, t), x0_hat)


def test_velocity_from_denoised_is_the_true_velocity_for_the_true_image():
    generator = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 3, 4, 4, generator=generator)
    noise = torch.randn(3, 3, 4, 4, generator=generator)
    t = torch.tensor([0.2, 0.5, 0.9])
    x_t = paths.interpolate(x0, noise, t)
    torch.testing.assert_close(
        paths.velocity_from_denoised(x_t, x0, t), paths.velocity_target(x0, noise)
    )


def test_velocity_from_denoised_stays_bounded_near_data():
    x = torch.ones(1, 1, 2, 2)
    v = paths.velocity_from_denoised(x, torch.zeros_like(x), torch.tensor([0.0]))
    assert torch.isfinite(v).all()
    assert float(v.max()) == pytest.approx(1.0 / paths.DENOISED_T_MIN)


def test_logit_normal_times_are_deterministic_inside_the_unit_interval_and_centred():
    draw = lambda: paths.sample_training_times(  # noqa: E731
        20_000, torch.Generator().manual_seed(3), logit_normal=(0.8, 1.0)
    )
    t = draw()
    torch.testing.assert_close(t, draw())
    assert float(t.min()) > 0.0 and float(t.max()) < 1.0
    assert float(t.median()) == pytest.approx(float(torch.sigmoid(torch.tensor(0.8))), abs=0.02)
    uniform = paths.sample_training_times(20_000, torch.Generator().manual_seed(3))
    assert float(uniform.median()) == pytest.approx(0.5, abs=0.02)


def test_noisy_batch_uses_logit_normal_times():
    x0 = torch.zeros(512, 1, 2, 2)
    batch = make_noisy_batch(
        x0, generator=torch.Generator().manual_seed(0), logit_normal=(-2.0, 0.5)
    )
    assert float(batch.t.mean()) < 0.25  # location -2 pulls t towards the data end


def test_train_config_time_sampling_round_trips_and_checks_scale():
    config = TrainConfig(time_sampling="logit_normal", time_location=0.5, time_scale=0.8)
    assert config.logit_normal == (0.5, 0.8)
    assert from_dict(TrainConfig, json.loads(json.dumps(to_dict(config)))) == config
    assert TrainConfig().logit_normal is None
    with pytest.raises(ConfigError, match="time_scale"):
        TrainConfig(time_scale=0.0)
    with pytest.raises(ConfigError, match="TimeSampling"):
        TrainConfig(time_sampling="beta")


# ---------------------------------------------------------------------------- model


def test_model_config_levers_round_trip_and_old_configs_load():
    config = pixel_config(prediction="data", bottleneck_dim=8, refine_channels=6)
    assert config.prediction is Prediction.DATA
    assert from_dict(ModelConfig, json.loads(json.dumps(to_dict(config)))) == config
    old = {k: v for k, v in to_dict(pixel_config()).items()
           if k not in ("prediction", "bottleneck_dim", "refine_channels")}  # fmt: skip
    assert from_dict(ModelConfig, old) == pixel_config()
    with pytest.raises(ConfigError, match="refine_channels"):
        pixel_config(refine_channels=-1)
    with pytest.raises(ConfigError, match="out_channels"):
        pixel_config(prediction="data", out_channels=4)


@pytest.mark.parametrize("refine", [0, 6])
def test_data_prediction_starts_at_the_zero_image(refine):
    model = SiT(pixel_config(prediction="data", refine_channels=refine))
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([0.3, 0.9])
    v = model(x, t).velocity
    torch.testing.assert_close(paths.denoised_from_velocity(x, v, t), torch.zeros_like(x))


def test_refine_head_starts_at_zero_and_still_learns():
    model = SiT(pixel_config(refine_channels=6))
    x = torch.randn(2, 3, 16, 16)
    out = model(x, 0.5).velocity
    assert float(out.detach().abs().max()) == 0.0
    ((out - x) ** 2).mean().backward()
    assert float(model.final_proj.weight.grad.abs().sum()) > 0.0


def _head_output(model: SiT, token: int) -> torch.Tensor:
    """The output image when only one token's last-layer features are nonzero."""
    config = model.config
    grid = config.sample_size // config.patch_size
    features = torch.zeros(1, grid * grid, model.final_proj.out_features)
    features[0, token] = 1.0
    with torch.no_grad():
        image = model._unpatchify(features, grid, grid)
        return model.refine(image) if model.refine is not None else image


def test_refine_head_lets_a_token_reach_its_neighbours_pixels():
    torch.manual_seed(0)
    linear = SiT(pixel_config())
    refined = SiT(pixel_config(refine_channels=6))
    p = linear.config.patch_size
    for model, leaks in ((linear, False), (refined, True)):
        image = _head_output(model, token=5)  # grid 4x4: row 1, column 1 -> pixels [4:8, 4:8]
        outside = image.clone()
        outside[..., p : 2 * p, p : 2 * p] = 0.0
        assert (float(outside.abs().max()) > 0.0) is leaks
        # The neighbour's pixel next to the border is reached; far-away pixels are not.
        if leaks:
            assert float(image[..., p, 2 * p].abs().max()) > 0.0
            assert float(image[..., 3 * p :, 3 * p :].abs().max()) == 0.0


def test_bottleneck_patch_embedding_is_low_rank():
    model = SiT(pixel_config(bottleneck_dim=5))
    assert tuple(model.patch_embed.weight.shape) == (5, 3, 4, 4)
    weight = model.patch_expand.weight @ model.patch_embed.weight.view(5, -1)  # (D, C*p*p)
    assert torch.linalg.matrix_rank(weight) == 5
    x = torch.randn(2, 3, 16, 16)
    assert model(x, 0.4).velocity.shape == x.shape


@pytest.mark.parametrize(
    "levers", [{}, {"prediction": "data", "bottleneck_dim": 8, "refine_channels": 6}]
)
def test_levers_survive_save_and_load(tmp_path, levers):
    model = SiT(pixel_config(**levers))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(tmp_path / "m")
    loaded = SiT.from_pretrained(tmp_path / "m")
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0.2, 0.8])
    torch.testing.assert_close(loaded(x, t).velocity, model(x, t).velocity)


def test_data_prediction_learns_a_constant_image_faster_than_chance():
    """A few steps of the velocity loss move the clean-image prediction towards the data."""
    torch.manual_seed(0)
    model = SiT(pixel_config(prediction="data", refine_channels=4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x0 = torch.full((16, 3, 16, 16), 0.5)
    generator = torch.Generator().manual_seed(0)
    for _ in range(60):
        batch = make_noisy_batch(x0, generator=generator)
        loss = ((model(batch.x_t, batch.t).velocity - batch.target) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    x_t = paths.interpolate(x0[:4], torch.randn(4, 3, 16, 16), torch.full((4,), 0.5))
    with torch.no_grad():
        x0_hat = paths.denoised_from_velocity(x_t, model(x_t, 0.5).velocity, 0.5)
    assert float((x0_hat - 0.5).abs().mean()) < 0.15  # started at |0 - 0.5| = 0.5


# ---------------------------------------------------------------------------- measures


def _kather_like(n: int = 6, size: int = 32) -> torch.Tensor:
    """Smooth random images: a Gaussian-blurred noise field, no grid."""
    generator = torch.Generator().manual_seed(0)
    noise = torch.rand(n, 3, size, size, generator=generator)
    kernel = torch.ones(3, 1, 3, 3) / 9.0
    smooth = torch.nn.functional.conv2d(noise, kernel, padding=1, groups=3)
    return (smooth * 255).to(torch.uint8)


def test_border_ratio_is_one_without_a_grid_and_large_for_a_mosaic():
    smooth = _kather_like()
    assert border_ratio(smooth, 8) == pytest.approx(1.0, abs=0.08)
    blocks = torch.rand(6, 3, 4, 4, generator=torch.Generator().manual_seed(1)) * 255
    mosaic = torch.nn.functional.interpolate(blocks, scale_factor=8, mode="nearest")
    mosaic = mosaic + torch.rand(mosaic.shape, generator=torch.Generator().manual_seed(2)) * 8
    assert border_ratio(mosaic, 8) > 5.0
    # The same mosaic measured at a period it does not have shows no grid at that period's
    # odd borders: the ratio drops towards 1 when half of the "borders" are inside blocks.
    assert border_ratio(mosaic, 16) < border_ratio(mosaic, 8)


def test_border_ratio_rejects_bad_inputs():
    with pytest.raises(EvaluationError, match="period"):
        border_ratio(_kather_like(), 1)
    with pytest.raises(EvaluationError, match="RGB"):
        border_ratio(torch.zeros(2, 1, 16, 16), 4)
    with pytest.raises(EvaluationError, match="flat"):
        border_ratio(torch.zeros(2, 3, 16, 16), 4)


def test_colour_moments_and_distance():
    images = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    images[:, 0] = 200
    images[1, 2] = 100
    moments = colour_moments(images)
    assert moments["mean"] == pytest.approx([200.0, 0.0, 50.0])
    assert moments["std"][0] == pytest.approx(0.0)
    assert colour_distance(moments, moments) == 0.0
    shifted = {"mean": [m + 6 for m in moments["mean"]], "std": moments["std"]}
    assert colour_distance(shifted, moments) == pytest.approx(3.0)


def test_nearest_distances_match_brute_force_and_flag_copies():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(30, 5))
    queries = np.concatenate([rng.normal(size=(4, 5)), reference[:2]])  # two exact copies
    brute = np.array([np.min(np.linalg.norm(reference - q, axis=1)) for q in queries])
    found = nearest_distances(queries, reference)
    np.testing.assert_allclose(found, brute, atol=1e-9)
    assert found[-2:] == pytest.approx([0.0, 0.0], abs=1e-6)
    with pytest.raises(EvaluationError, match="feature sets"):
        nearest_distances(queries, reference[:, :3])
