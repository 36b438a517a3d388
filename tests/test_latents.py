"""The pixels <-> latents contract, with a tiny randomly initialised AutoencoderKL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mupad.latents import (
    AutoencoderKLCodec,
    IdentityCodec,
    LatentCodec,
    LatentsError,
    load_codec,
    pixels_to_uint8,
    uint8_to_pixels,
    validate_pixels,
)

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convolutions run far faster on one thread than on oversubscribed cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny_vae(**overrides):
    torch.manual_seed(0)
    kwargs = {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
        "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
        "block_out_channels": (8, 16),
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": 32,
    }
    kwargs.update(overrides)
    return diffusers.AutoencoderKL(**kwargs).eval()


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_vae")
    _tiny_vae().save_pretrained(folder)  # config.json + diffusion_pytorch_model.safetensors
    return folder


@pytest.fixture(scope="module")
def reference_vae(vae_dir):
    return diffusers.AutoencoderKL.from_pretrained(vae_dir, local_files_only=True).eval()


def _pixels(batch: int = 3, size: int = 32, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=generator) * 2 - 1  # (B, 3, H, W)


def test_load_codec_returns_vae_codec_with_config_scale(vae_dir):
    codec = load_codec(vae_dir)
    assert isinstance(codec, AutoencoderKLCodec)
    assert isinstance(codec, LatentCodec)
    assert codec.latent_channels == 4
    assert codec.downsample == 2
    assert codec.scaling_factor == pytest.approx(0.18215)
    assert codec.shift_factor == 0.0  # config shift_factor None -> 0
    assert codec.latent_shape(64, 32) == (4, 32, 16)
    described = codec.describe()
    json.dumps(described)
    assert described["scaling_factor"] == 0.18215


def test_encode_applies_scale_and_matches_manual(vae_dir, reference_vae):
    codec = load_codec(vae_dir, batch_size=2)  # 3 images -> 2 chunks
    pixels = _pixels()
    latents = codec.encode(pixels)
    assert latents.shape == (3, 4, 16, 16)
    assert latents.dtype == torch.float32
    with torch.no_grad():
        manual = reference_vae.encode(pixels).latent_dist.mean * 0.18215
    torch.testing.assert_close(latents, manual, atol=1e-5, rtol=1e-4)

    decoded = codec.decode(latents)
    assert decoded.shape == pixels.shape
    assert decoded.min() >= -1 and decoded.max() <= 1
    with torch.no_grad():
        manual_pixels = reference_vae.decode(manual / 0.18215).sample.clamp(-1, 1)
    torch.testing.assert_close(decoded, manual_pixels, atol=1e-5, rtol=1e-4)
    assert codec.decode(latents, clamp=False).shape == pixels.shape


def test_encode_sample_uses_generator(vae_dir):
    codec = load_codec(vae_dir)
    pixels = _pixels(batch=2)
    a = codec.encode(pixels, sample=True, generator=torch.Generator().manual_seed(3))
    b = codec.encode(pixels, sample=True, generator=torch.Generator().manual_seed(3))
    c = codec.encode(pixels, sample=True, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a, codec.encode(pixels))  # the mean differs from a sample


def test_overridden_scale_and_shift(vae_dir, reference_vae):
    codec = AutoencoderKLCodec(vae_dir, scaling_factor=0.5, shift_factor=0.25)
    pixels = _pixels(batch=2)
    with torch.no_grad():
        mean = reference_vae.encode(pixels).latent_dist.mean
    latents = codec.encode(pixels)
    torch.testing.assert_close(latents, (mean - 0.25) * 0.5, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        expected = reference_vae.decode(latents / 0.5 + 0.25).sample.clamp(-1, 1)
    torch.testing.assert_close(codec.decode(latents), expected, atol=1e-5, rtol=1e-4)

    per_channel = AutoencoderKLCodec(vae_dir, scaling_factor=[1.0, 2.0, 3.0, 4.0])
    scaled = per_channel.encode(pixels)
    factors = torch.tensor([1.0, 2.0, 3.0, 4.0])[None, :, None, None]
    torch.testing.assert_close(scaled, mean * factors, atol=1e-5, rtol=1e-4)
    with pytest.raises(LatentsError, match="latent channels"):
        AutoencoderKLCodec(vae_dir, scaling_factor=[1.0, 2.0])


def test_config_shift_and_latents_stats(tmp_path, reference_vae):
    shifted = tmp_path / "shifted"
    _tiny_vae(scaling_factor=0.3, shift_factor=0.1).save_pretrained(shifted)
    codec = load_codec(shifted)
    assert codec.scaling_factor == pytest.approx(0.3)
    assert codec.shift_factor == pytest.approx(0.1)
    pixels = _pixels(batch=1)
    with torch.no_grad():
        mean = reference_vae.encode(pixels).latent_dist.mean  # same seed -> same weights
    torch.testing.assert_close(codec.encode(pixels), (mean - 0.1) * 0.3, atol=1e-5, rtol=1e-4)

    stats = tmp_path / "stats"
    mu, sd = [0.1, 0.2, 0.3, 0.4], [1.0, 2.0, 4.0, 8.0]
    _tiny_vae(scaling_factor=1.0, latents_mean=mu, latents_std=sd).save_pretrained(stats)
    codec = load_codec(stats)
    expected = (mean - torch.tensor(mu)[None, :, None, None]) / torch.tensor(sd)[
        None, :, None, None
    ]
    torch.testing.assert_close(codec.encode(pixels), expected, atol=1e-5, rtol=1e-4)


def test_pipeline_folder_with_vae_subfolder(tmp_path, vae_dir, reference_vae):
    pipeline = tmp_path / "pipeline"
    _tiny_vae().save_pretrained(pipeline / "vae")
    (pipeline / "model_index.json").write_text("{}")
    codec = load_codec(pipeline)
    assert codec.folder == pipeline / "vae"
    pixels = _pixels(batch=1)
    with torch.no_grad():
        manual = reference_vae.encode(pixels).latent_dist.mean * 0.18215
    torch.testing.assert_close(codec.encode(pixels), manual, atol=1e-5, rtol=1e-4)


def test_cache_name_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("MUPAD_CACHE", str(tmp_path))
    _tiny_vae().save_pretrained(tmp_path / "sd-vae-ft-ema")
    codec = load_codec("stabilityai/sd-vae-ft-ema")
    assert isinstance(codec, AutoencoderKLCodec)
    assert codec.folder == tmp_path / "sd-vae-ft-ema"


def test_bf16_codec(vae_dir, reference_vae):
    codec = AutoencoderKLCodec(vae_dir, dtype="bf16")
    pixels = _pixels(batch=2)
    latents = codec.encode(pixels)
    assert latents.dtype == torch.float32
    with torch.no_grad():
        manual = reference_vae.encode(pixels).latent_dist.mean * 0.18215
    torch.testing.assert_close(latents, manual, atol=0.05, rtol=0.05)
    assert codec.decode(latents).dtype == torch.float32
    with pytest.raises(LatentsError, match="dtype"):
        AutoencoderKLCodec(vae_dir, dtype="int8")


def test_missing_folder_and_unknown_name(tmp_path, monkeypatch):
    monkeypatch.setenv("MUPAD_CACHE", str(tmp_path / "cache"))
    with pytest.raises(LatentsError, match="sd-vae-ft-ema"):
        load_codec(tmp_path / "nope")
    with pytest.raises(LatentsError, match="diffusion_pytorch_model.safetensors"):
        load_codec("some-org/some-vae")
    with pytest.raises(LatentsError, match="does not exist"):
        AutoencoderKLCodec(tmp_path / "nope")


def test_missing_weights_and_config(tmp_path, vae_dir):
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((vae_dir / "config.json").read_text())
    with pytest.raises(LatentsError, match="missing diffusion_pytorch_model.safetensors"):
        load_codec(no_weights)
    (no_weights / "diffusion_pytorch_model.bin").write_bytes(b"")
    with pytest.raises(LatentsError, match="pickled weights"):
        load_codec(no_weights)

    no_config = tmp_path / "no_config"
    no_config.mkdir()
    (no_config / "diffusion_pytorch_model.safetensors").write_bytes(
        (vae_dir / "diffusion_pytorch_model.safetensors").read_bytes()
    )
    with pytest.raises(LatentsError, match="missing config.json"):
        load_codec(no_config)

    wrong_class = tmp_path / "wrong_class"
    wrong_class.mkdir()
    config = json.loads((vae_dir / "config.json").read_text())
    config["_class_name"] = "AutoencoderTiny"
    (wrong_class / "config.json").write_text(json.dumps(config))
    (wrong_class / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    with pytest.raises(LatentsError, match="not an AutoencoderKL"):
        load_codec(wrong_class)


@pytest.mark.parametrize(
    ("pixels", "match"),
    [
        (torch.zeros(3, 32, 32), "4-D"),
        (torch.zeros(1, 32, 32, 3), "channels-last"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "uint8_to_pixels"),
        (torch.zeros(1, 3, 31, 32), "multiples of 2"),
        (torch.full((1, 3, 32, 32), float("nan")), "NaN"),
        (torch.full((1, 3, 32, 32), 255.0), r"\[-1, 1\]"),
        (torch.zeros(0, 3, 32, 32), "empty"),
    ],
)
def test_bad_pixels(vae_dir, pixels, match):
    codec = load_codec(vae_dir)
    with pytest.raises(LatentsError, match=match):
        codec.encode(pixels)


def test_bad_latents(vae_dir):
    codec = load_codec(vae_dir)
    with pytest.raises(LatentsError, match="different codec"):
        codec.decode(torch.zeros(1, 3, 16, 16))
    with pytest.raises(LatentsError, match="NaN"):
        codec.decode(torch.full((1, 4, 16, 16), float("inf")))


@pytest.mark.parametrize("spec", [None, "identity", "pixels", "PIXELS"])
def test_identity_codec_round_trip_exact(spec):
    codec = load_codec(spec)
    assert isinstance(codec, IdentityCodec)
    assert (codec.latent_channels, codec.downsample) == (3, 1)
    pixels = _pixels(batch=2, size=17)
    latents = codec.encode(pixels)
    assert torch.equal(latents, pixels)
    assert latents.data_ptr() != pixels.data_ptr()
    assert torch.equal(codec.decode(latents), pixels)
    with pytest.raises(LatentsError):
        codec.encode(pixels * 3)
    assert load_codec(codec) is codec


def test_uint8_helpers():
    images = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)  # channels-last
    pixels = uint8_to_pixels(images)
    assert pixels.shape == (2, 3, 8, 8)
    validate_pixels(pixels)
    assert torch.equal(pixels_to_uint8(pixels), images.permute(0, 3, 1, 2))
    with pytest.raises(LatentsError):
        uint8_to_pixels(images.float())
