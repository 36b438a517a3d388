"""The pathology VAE: training on real tiles, diffusers folder + codec, resume, metrics, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from mupad.data.tiles import TileFolderError, bundled_kather_dir, load_image_tiles
from mupad.latents import load_codec
from mupad.training.loop import read_log
from mupad.vae import VAEConfigError, VAETrainConfig, psnr, ssim
from mupad.vae.cli import vae_app
from mupad.vae.model import build_autoencoder, vae_preset_names
from mupad.vae.train import VAERunError, bicubic_baseline, train_vae

WEIGHTS = "diffusion_pytorch_model.safetensors"


pytestmark = pytest.mark.usefixtures("one_thread")


def _config(**overrides) -> VAETrainConfig:
    base = {
        "preset": "tiny",
        "steps": 40,
        "batch_size": 4,
        "crop": 32,
        "learning_rate": 3e-3,
        "warmup_steps": 5,
        "eval_every": 0,
        "log_every": 5,
        "checkpoint_every": 20,
        "scale_samples": 32,
    }
    base.update(overrides)
    return VAETrainConfig(**base)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("vae") / "run"
    train_vae(bundled_kather_dir(), run, _config(), progress=False)
    return run


def test_presets_build_and_are_8x():
    for name in vae_preset_names():
        if name == "sd":
            continue  # 84 M parameters: built in the slow tier only
        vae = build_autoencoder(name)
        assert 2 ** (len(vae.config.block_out_channels) - 1) == 8
    with pytest.raises(VAEConfigError, match="unknown VAE preset"):
        build_autoencoder("huge")


def test_loss_drops_on_real_tiles(trained):
    records = [r for r in read_log(trained) if "l1" in r]
    assert [r["step"] for r in records] == list(range(5, 41, 5))
    first, last = records[0]["l1"], min(r["l1"] for r in records[-3:])
    assert last < 0.75 * first, (first, last)
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["heldout_tiles"] == 10 and metrics["train_tiles"] == 86
    assert math.isfinite(metrics["vae"]["psnr"]) and 0 < metrics["vae"]["ssim"] < 1
    assert metrics["vae"]["size"] == 144  # 150-px tiles cropped to a multiple of 8
    assert "bicubic_x8" in metrics


def test_saved_folder_loads_as_codec(trained):
    config = json.loads((trained / "vae" / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKL"
    assert config["scaling_factor"] != 1.0 and config["shift_factor"] is not None
    for spec in (trained, trained / "vae"):  # a run folder resolves to its vae/
        codec = load_codec(spec)
        assert codec.downsample == 8 and codec.latent_channels == 4
    tiles = load_image_tiles(bundled_kather_dir()).images[:8, :, :64, :64]  # (8, 3, 64, 64)
    pixels = tiles.float() / 127.5 - 1
    latents = codec.encode(pixels)
    assert latents.shape == (8, 4, 8, 8)
    assert 0.3 < float(latents.std()) < 3.0  # ~unit variance after the fitted scale/shift
    assert abs(float(latents.mean())) < 1.0
    assert codec.decode(latents).shape == (8, 3, 64, 64)


def test_resume_is_exact(tmp_path, trained):
    config = _config(steps=6, checkpoint_every=3, log_every=1)
    straight = tmp_path / "straight"
    train_vae(bundled_kather_dir(), straight, config, progress=False)
    interrupted = tmp_path / "interrupted"
    train_vae(
        bundled_kather_dir(),
        interrupted,
        _config(steps=3, checkpoint_every=3, log_every=1),
        progress=False,
    )
    result = train_vae(bundled_kather_dir(), interrupted, config, progress=False)
    assert result.resumed_from == 3
    a = load_file(str(straight / "vae" / WEIGHTS))
    b = load_file(str(interrupted / "vae" / WEIGHTS))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in read_log(interrupted)] == [1, 2, 3, 4, 5, 6]
    # Another run's settings in the same folder are refused.
    with pytest.raises(VAERunError, match="other settings"):
        train_vae(
            bundled_kather_dir(), interrupted, _config(steps=6, learning_rate=1e-3), progress=False
        )


def test_psnr_and_ssim_maths():
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 48, 48, generator=gen)
    assert torch.isinf(psnr(a, a)).all()
    assert torch.allclose(ssim(a, a), torch.ones(2))
    noisy = 0.5 + 0.01 * torch.randn(4, 3, 64, 64, generator=gen)  # MSE ~ 1e-4 -> ~40 dB
    flat = torch.full_like(noisy, 0.5)
    assert psnr(flat, noisy).mean().item() == pytest.approx(40.0, abs=0.1)
    assert psnr(flat * 255, noisy * 255, data_range=255).mean().item() == pytest.approx(
        40.0, abs=0.1
    )
    with pytest.raises(ValueError, match="same shape"):
        psnr(a, a[:, :, :10])


def test_ssim_matches_scikit_image():
    metrics = pytest.importorskip("skimage.metrics", reason="scikit-image not installed")
    gen = torch.Generator().manual_seed(1)
    tiles = load_image_tiles(bundled_kather_dir()).images[:3].float() / 255  # (3, 3, 150, 150)
    degraded = (tiles + 0.05 * torch.randn(tiles.shape, generator=gen)).clamp(0, 1)
    blurred = bicubic_baseline((tiles * 255).round().to(torch.uint8), 4).float() / 255
    for other in (degraded, blurred):
        ours = ssim(tiles, other)
        for i in range(tiles.shape[0]):
            ref = metrics.structural_similarity(
                tiles[i].permute(1, 2, 0).double().numpy(),
                other[i].permute(1, 2, 0).double().numpy(),
                channel_axis=-1,
                data_range=1.0,
                gaussian_weights=True,
                sigma=1.5,
                use_sample_covariance=False,
            )
            assert float(ours[i]) == pytest.approx(ref, abs=1e-5)
            ref_psnr = metrics.peak_signal_noise_ratio(
                tiles[i].double().numpy(), other[i].double().numpy(), data_range=1.0
            )
            assert float(psnr(tiles[i : i + 1], other[i : i + 1])) == pytest.approx(
                ref_psnr, abs=1e-3
            )


def test_load_image_tiles_flat_and_nested(tmp_path):
    for i, size in enumerate((40, 48)):
        Image.new("RGB", (size, size), (i * 50, 0, 0)).save(tmp_path / f"t{i}.png")
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (64, 50), (0, 9, 0)).save(tmp_path / "sub" / "x.jpg")
    tiles = load_image_tiles(tmp_path)
    assert tiles.images.shape == (3, 3, 40, 40)
    assert tiles.class_names == (".", "sub")
    assert tiles.labels.tolist() == [1, 0, 0]  # sorted paths: sub/x.jpg, t0.png, t1.png
    with pytest.raises(TileFolderError, match="smaller than the tile size"):
        load_image_tiles(tmp_path, size=45)


def test_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TileFolderError, match="no images"):
        train_vae(empty, tmp_path / "run", _config(), progress=False)
    with pytest.raises(VAEConfigError, match="not a multiple"):
        train_vae(bundled_kather_dir(), tmp_path / "run", _config(crop=36), progress=False)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(VAERunError, match="not empty"):
        train_vae(bundled_kather_dir(), busy, _config(), progress=False)
    with pytest.raises(VAEConfigError, match="precision"):
        _config(precision="fp8")


def test_cli_eval_and_train_errors(trained, tmp_path):
    runner = CliRunner()
    held = tmp_path / "held"
    held.mkdir()
    for path in sorted((bundled_kather_dir() / "01_TUMOR").glob("*.png"))[:3]:
        (held / path.name).write_bytes(path.read_bytes())
    result = runner.invoke(vae_app, ["eval", "--vae", str(trained / "vae"), "--data", str(held)])
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)
    assert scores["vae"]["num_images"] == 3 and "bicubic_x8" in scores
    bad = runner.invoke(
        vae_app,
        [
            "train",
            "--data",
            str(held),
            "--out",
            str(tmp_path / "r"),
            "--preset",
            "tiny",
            "--crop",
            "36",
        ],
    )
    assert bad.exit_code == 2 and "multiple" in bad.output
