"""H&E -> IHC: serial-section pairing, the embedding flow, the translator and the CLI.

Tiny synthetic inputs throughout (a stub image encoder, 8-d embeddings, a tiny SiT); one
small real pair (the CIMA serial mouse-lung sections) when ../shared/data is present.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from mupad.applications import he2ihc
from mupad.applications.he2ihc import (
    EmbeddingFlow,
    EmbeddingFlowConfig,
    EmbeddingSpec,
    EmbeddingStats,
    HE2IHCError,
    HEToIHCTranslator,
    ResidualFlowMLP,
    embedding_metrics,
    evaluate_flow,
    flow_interpolate,
    flow_velocity_target,
    train_embedding_flow,
)
from mupad.applications.serial_pairs import (
    PairingError,
    PairSamplingConfig,
    Section,
    fit_affine,
    read_landmarks,
    read_pairs,
    region_split,
    sample_patch_pairs,
    write_pairs,
)
from mupad.conditioning.image_encoders import ImageEncoder, ImageFeatures, Preprocessing
from mupad.conditioning.registry import register_encoder
from mupad.config import ConfigError, SampleConfig, model_preset
from mupad.models import SiT
from mupad.training.checkpoint import ResumeError
from mupad.transport import paths

DATA = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "cima_anhir_mouse_lung_serial_he_ihc"
)
STUB = "test-he2ihc-stub"


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------
# Helpers: a stub encoder, synthetic serial sections, synthetic embedding pairs
# --------------------------------------------------------------------------------------


class StubEncoder(ImageEncoder):
    """8-d features from an 8 x 8 input: per-channel means and contrasts + 2 grid stats."""

    def __init__(self, weights=None, device="cpu", **_):
        self.name = STUB
        self._set_runtime(device, torch.float32, 64)
        self.preprocessing = Preprocessing(
            size=8, center_crop=False, mean=(0.5,) * 3, std=(0.5,) * 3
        )
        self.grid_size = (2, 2)
        self.dim = self.embedding_dim = 8

    def _forward(self, inputs):
        cells = torch.nn.functional.avg_pool2d(inputs, 4)  # (b, 3, 2, 2)
        grid = torch.cat(
            [
                cells,
                cells.std(dim=1, keepdim=True),
                cells.mean(dim=1, keepdim=True),
                cells.amax(dim=1, keepdim=True),
                cells.amin(dim=1, keepdim=True),
                cells[:, :1] - cells[:, 2:3],
            ],
            dim=1,
        )
        patches = grid.permute(0, 2, 3, 1).contiguous()  # (b, 2, 2, 8)
        pooled = patches.mean(dim=(1, 2))
        return ImageFeatures(global_token=pooled, patches=patches, embedding=pooled)


register_encoder(STUB, StubEncoder, overwrite=True)

# H&E -> IHC affine used by the synthetic sections: a small rotation, scale and shift.
_ANGLE = np.deg2rad(4.0)
TRUE_AFFINE = np.array(
    [[1.02 * np.cos(_ANGLE), -np.sin(_ANGLE), 6.0], [np.sin(_ANGLE), 0.98 * np.cos(_ANGLE), -4.0]]
)


def _he_image(width=200, height=160, seed=0) -> np.ndarray:
    """White glass with a pink 'tissue' ellipse of blurred random texture."""
    rng = np.random.default_rng(seed)
    texture = rng.random((height // 4, width // 4))
    texture = (
        np.asarray(
            Image.fromarray((texture * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
        )
        / 255.0
    )
    yy, xx = np.mgrid[0:height, 0:width]
    inside = ((xx - width / 2) / (0.42 * width)) ** 2 + (
        (yy - height / 2) / (0.42 * height)
    ) ** 2 < 1
    image = np.full((height, width, 3), 245.0)
    image[inside, 0] = 200 - 60 * texture[inside]
    image[inside, 1] = 90 - 60 * texture[inside]
    image[inside, 2] = 170 - 40 * texture[inside]
    return image.clip(0, 255).astype(np.uint8)


def _stain(he: np.ndarray) -> np.ndarray:
    """The synthetic 'IHC' colour of H&E pixels: blue haematoxylin + brown where dark."""
    rgb = he.astype(np.float64)
    darkness = 1.0 - rgb.mean(axis=-1, keepdims=True) / 255.0
    ihc = (
        250
        - darkness * np.array([200.0, 150.0, 60.0])
        - (darkness > 0.45) * np.array([0.0, 60.0, 120.0])
    )
    return ihc.clip(0, 255).astype(np.uint8)


def _ihc_image(he: np.ndarray) -> np.ndarray:
    """IHC(q) = stain(HE(A^-1 q)): the H&E section moved by TRUE_AFFINE, restained."""
    full = np.vstack([TRUE_AFFINE, [0, 0, 1]])
    inverse = np.linalg.inv(full)[:2]  # IHC -> H&E, the map PIL's transform wants
    moved = Image.fromarray(he).transform(
        (he.shape[1], he.shape[0]),
        Image.Transform.AFFINE,
        tuple(inverse.ravel()),
        Image.Resampling.BILINEAR,
        fillcolor=(245, 245, 245),
    )
    return _stain(np.asarray(moved))


def _landmarks(tmp_path: Path, count=12, noise=0.3, seed=0) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    he_points = rng.uniform([50, 40], [150, 120], size=(count, 2))
    ihc_points = (
        he_points @ TRUE_AFFINE[:, :2].T + TRUE_AFFINE[:, 2] + rng.normal(0, noise, (count, 2))
    )
    paths_out = []
    for name, points in (("he.csv", he_points), ("ihc.csv", ihc_points)):
        path = tmp_path / name
        rows = [" ,X,Y"] + [f"{i + 1},{x * 10:.3f},{y * 10:.3f}" for i, (x, y) in enumerate(points)]
        path.write_text("\n".join(rows) + "\n")  # stored at 10x, read back with scale 0.1
        paths_out.append(path)
    return paths_out[0], paths_out[1]


def _synthetic_pairs(count=240, dim=8, seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    """H&E embeddings and IHC embeddings = a fixed nonlinear function of them + noise."""
    generator = torch.Generator().manual_seed(seed)
    he = torch.randn(count, dim, generator=generator) + 2.0
    mix = torch.randn(dim, dim, generator=torch.Generator().manual_seed(123)) / dim**0.5
    ihc = (
        3.0 * torch.tanh((he - 2.0) @ mix)
        + 1.0
        + 0.05 * torch.randn(count, dim, generator=generator)
    )
    return he, ihc


def _flow_config(**overrides) -> EmbeddingFlowConfig:
    base = {
        "dim": 8,
        "hidden": 32,
        "blocks": 6,
        "steps": 300,
        "batch_size": 32,
        "learning_rate": 2e-3,
        "warmup_steps": 10,
        "weight_decay": 0.0,
        "log_every": 50,
        "checkpoint_every": 100,
        "sample_steps": 8,
    }
    base.update(overrides)
    return EmbeddingFlowConfig(**base)


# --------------------------------------------------------------------------------------
# Serial-section pairing
# --------------------------------------------------------------------------------------


def test_landmarks_and_affine_fit_recover_the_map(tmp_path):
    he_csv, ihc_csv = _landmarks(tmp_path)
    he_points, ihc_points = read_landmarks(he_csv, scale=0.1), read_landmarks(ihc_csv, scale=0.1)
    assert he_points.shape == (12, 2)
    fit = fit_affine(he_points, ihc_points)
    np.testing.assert_allclose(fit.matrix[:, :2], TRUE_AFFINE[:, :2], atol=0.01)
    probe = np.array([[60.0, 50.0], [140.0, 110.0], [100.0, 80.0]])
    np.testing.assert_allclose(
        fit.apply(probe), probe @ TRUE_AFFINE[:, :2].T + TRUE_AFFINE[:, 2], atol=0.5
    )
    assert fit.residual_rms_px < 0.6 and fit.loo_rms_px >= fit.residual_rms_px * 0.9
    assert fit.residual_max_px >= fit.residual_rms_px
    np.testing.assert_allclose(fit.apply(he_points[:2]), ihc_points[:2], atol=1.5)
    with pytest.raises(PairingError, match="at least 3"):
        fit_affine(he_points[:2], ihc_points[:2])
    with pytest.raises(PairingError, match="collinear"):
        line = np.stack([np.arange(5.0), 2 * np.arange(5.0)], axis=1)
        fit_affine(line, line)
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(PairingError, match="X and Y"):
        read_landmarks(bad)


def test_patch_pairs_are_registered_deterministic_and_skip_background(tmp_path):
    he_array = _he_image()
    he, ihc = Section(he_array, name="he"), Section(_ihc_image(he_array), name="ihc")
    fit = fit_affine(*(read_landmarks(p, 0.1) for p in _landmarks(tmp_path)))
    config = PairSamplingConfig(patch_size=24, num_pairs=20, min_tissue=0.6, seed=3)
    pairs = sample_patch_pairs(he, ihc, fit.matrix, config)
    assert pairs.he.shape == pairs.ihc.shape == (20, 24, 24, 3) and pairs.he.dtype == np.uint8
    again = sample_patch_pairs(he, ihc, fit.matrix, config)
    np.testing.assert_array_equal(pairs.he_xy, again.he_xy)
    np.testing.assert_array_equal(pairs.ihc, again.ihc)
    assert (pairs.tissue >= 0.6).all()
    # The IHC patch is the restained H&E patch (up to interpolation), unlike another pair's.
    matched = np.abs(pairs.ihc.astype(float) - _stain(pairs.he).astype(float)).mean()
    shuffled = np.abs(pairs.ihc.astype(float) - _stain(pairs.he[::-1]).astype(float)).mean()
    assert matched < 0.5 * shuffled
    # Background-only sections give a clear error.
    blank = Section(np.full((100, 100, 3), 245, np.uint8))
    with pytest.raises(PairingError, match="tissue"):
        sample_patch_pairs(
            blank, blank, np.eye(2, 3), PairSamplingConfig(patch_size=16, num_pairs=2)
        )


def test_region_split_keeps_train_pixels_out_of_heldout_blocks_and_pairs_round_trip(tmp_path):
    he_array = _he_image()
    he, ihc = Section(he_array), Section(_ihc_image(he_array))
    pairs = sample_patch_pairs(
        he,
        ihc,
        TRUE_AFFINE,
        PairSamplingConfig(patch_size=16, num_pairs=80, min_tissue=0.5, seed=0),
    )
    split = region_split(pairs, he.width, he.height, blocks=(4, 4), heldout_fraction=0.25, seed=1)
    assert (
        set(split) <= {"train", "heldout", ""}
        and (split == "train").any()
        and (split == "heldout").any()
    )
    held_blocks = set(pairs.info["region_split"]["heldout_blocks"])
    block_w, block_h = he.width / 4, he.height / 4
    for (x, y), part in zip(pairs.he_xy, split):
        corners = {
            (min(int(cy // block_h), 3)) * 4 + min(int(cx // block_w), 3)
            for cx in (x, x + 15)
            for cy in (y, y + 15)
        }
        if part == "train":
            assert not corners & held_blocks
    folder = write_pairs(pairs, tmp_path / "pairs", split)
    loaded, loaded_split = read_pairs(folder)
    np.testing.assert_array_equal(loaded.he, pairs.he)
    np.testing.assert_array_equal(loaded.ihc, pairs.ihc)
    np.testing.assert_array_equal(loaded_split, split)
    assert loaded.info["patch_size"] == 16
    # A plain he/ + ihc/ folder without pairs.json is matched by file name.
    (folder / "pairs.json").unlink()
    plain, no_split = read_pairs(folder)
    assert no_split is None and sorted(plain.names) == sorted(pairs.names)


# --------------------------------------------------------------------------------------
# The flow
# --------------------------------------------------------------------------------------


def test_flow_path_is_the_transport_convention_with_ihc_as_data():
    he, ihc = torch.randn(4, 8), torch.randn(4, 8)
    torch.testing.assert_close(flow_interpolate(he, ihc, torch.ones(4)), he)
    torch.testing.assert_close(flow_interpolate(he, ihc, torch.zeros(4)), ihc)
    t = torch.rand(4)
    torch.testing.assert_close(flow_interpolate(he, ihc, t), paths.interpolate(ihc, he, t))
    torch.testing.assert_close(flow_velocity_target(he, ihc), he - ihc)
    assert he2ihc.SOURCE_TIME == paths.T_NOISE and he2ihc.TARGET_TIME == paths.T_DATA


def test_residual_mlp_has_six_blocks_zero_output_and_token_mode():
    config = EmbeddingFlowConfig(dim=8, hidden=16)
    model = ResidualFlowMLP(config)
    assert config.blocks == 6 and len(model.blocks) == 6
    x, t = torch.randn(3, 8), torch.rand(3)
    assert torch.equal(model(x, t), torch.zeros(3, 8))
    tokens = ResidualFlowMLP(EmbeddingFlowConfig(dim=8, hidden=16, num_tokens=5))
    assert tokens(torch.randn(3, 5, 8), t).shape == (3, 5, 8)
    with pytest.raises(HE2IHCError, match="T=5"):
        tokens(torch.randn(3, 8), t)
    with pytest.raises(ConfigError):
        EmbeddingFlowConfig(sampler="sde")


def test_untrained_flow_returns_the_moment_matched_he_embedding():
    he, ihc = _synthetic_pairs(64)
    config = _flow_config()
    stats = EmbeddingStats.fit(he, ihc, config.std_floor)
    flow = EmbeddingFlow(ResidualFlowMLP(config), stats, {})
    expected = stats.destandardize_ihc(stats.standardize_he(he))
    torch.testing.assert_close(flow.predict(he), expected)
    # Moment matching: the standardised statistics are those of the IHC side.
    torch.testing.assert_close(expected.mean(0), ihc.mean(0), atol=1e-4, rtol=1e-4)


def test_flow_learns_synthetic_pairs_better_than_the_baselines(tmp_path):
    he, ihc = _synthetic_pairs(300)
    train, held = slice(0, 240), slice(240, 300)
    result = train_embedding_flow(
        he[train],
        ihc[train],
        _flow_config(steps=150),
        tmp_path / "flow",
        heldout=(he[held], ihc[held]),
        progress=False,
    )
    report = evaluate_flow(result.flow, he[train], ihc[train], he[held], ihc[held])
    m = report["metrics"]
    assert m["flow"]["cosine"] > m["he_embedding"]["cosine"]
    assert m["flow"]["cosine"] > m["mean_ihc"]["cosine"]
    assert m["flow"]["centred_cosine"] > 0.5 > m["moment_matched_he"]["centred_cosine"]
    assert m["flow"]["top5"] > 0.3 > m["mean_ihc"]["top5"]
    assert result.history[-1]["heldout_cosine"] == pytest.approx(m["flow"]["cosine"], abs=1e-6)
    # The log and the files of a flow folder.
    folder = tmp_path / "flow"
    for name in (
        "config.json",
        "metadata.json",
        "model.safetensors",
        "stats.safetensors",
        "log.jsonl",
    ):
        assert (folder / name).is_file()
    loaded = EmbeddingFlow.from_pretrained(folder)
    torch.testing.assert_close(loaded.predict(he[held]), result.flow.predict(he[held]))
    assert set(load_file(str(folder / "stats.safetensors"))) == {
        "he_mean",
        "he_std",
        "ihc_mean",
        "ihc_std",
    }


def test_flow_resumes_exactly_and_refuses_other_settings(tmp_path):
    he, ihc = _synthetic_pairs(64)
    config = _flow_config(steps=30, checkpoint_every=10)
    full = train_embedding_flow(he, ihc, config, tmp_path / "a", progress=False)
    train_embedding_flow(
        he, ihc, _flow_config(steps=20, checkpoint_every=10), tmp_path / "b", progress=False
    )
    resumed = train_embedding_flow(he, ihc, config, tmp_path / "b", progress=False)
    assert resumed.resumed_from == 20
    a, b = (
        load_file(str(tmp_path / "a" / "model.safetensors")),
        load_file(str(tmp_path / "b" / "model.safetensors")),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()
    ]
    assert steps == sorted(set(steps))
    with pytest.raises(ResumeError, match="hidden"):
        train_embedding_flow(
            he, ihc, _flow_config(steps=40, hidden=16), tmp_path / "b", progress=False
        )
    with pytest.raises(ResumeError, match="other embedding pairs"):
        train_embedding_flow(
            he + 1, ihc, _flow_config(steps=40, checkpoint_every=10), tmp_path / "b", progress=False
        )
    del full


def test_principal_axes_dropout_and_source_noise_train_save_and_load(tmp_path):
    he, ihc = _synthetic_pairs(64)
    config = _flow_config(
        steps=20, components=4, dropout=0.1, source_noise=0.3, checkpoint_every=10
    )
    assert config.width == 4 and ResidualFlowMLP(config).input.in_features == 4
    stats = EmbeddingStats.fit(he, ihc, config.std_floor, config.components)
    assert stats.standardize_he(he).shape == (64, 4)
    assert stats.standardize_ihc(ihc).square().mean().item() == pytest.approx(1.0, rel=1e-4)
    # Reconstruction through the IHC axes keeps the mean and lies in a 4-d subspace.
    rebuilt = stats.destandardize_ihc(stats.standardize_ihc(ihc))
    torch.testing.assert_close(rebuilt.mean(0), ihc.mean(0), atol=1e-4, rtol=1e-4)
    assert torch.linalg.matrix_rank(rebuilt - rebuilt.mean(0)).item() == 4
    result = train_embedding_flow(he, ihc, config, tmp_path / "f", progress=False)
    loaded = EmbeddingFlow.from_pretrained(tmp_path / "f")
    assert loaded.predict(he[:3]).shape == (3, 8)
    torch.testing.assert_close(loaded.predict(he[:3]), result.flow.predict(he[:3]))
    # The noise comes from the step generator: a resumed run matches an uninterrupted one.
    train_embedding_flow(
        he, ihc, dataclasses.replace(config, steps=10), tmp_path / "g", progress=False
    )
    train_embedding_flow(he, ihc, config, tmp_path / "g", progress=False)
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("f", "g"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(HE2IHCError, match="components"):
        EmbeddingStats.fit(he[:3], ihc[:3], 0.1, components=5)


def test_token_mode_flow_and_bad_inputs():
    generator = torch.Generator().manual_seed(0)
    he = torch.randn(40, 5, 8, generator=generator)
    ihc = he.flip(-1) + 0.1 * torch.randn(40, 5, 8, generator=generator)
    config = _flow_config(num_tokens=5, steps=20)
    flow = train_embedding_flow(he, ihc, config, progress=False).flow
    assert flow.predict(he[:3]).shape == (3, 5, 8)
    report = evaluate_flow(flow, he[:30], ihc[:30], he[30:], ihc[30:])
    assert set(report["metrics"]) == {
        "flow",
        "he_embedding",
        "mean_ihc",
        "moment_matched_he",
        "ridge",
    }
    with pytest.raises(HE2IHCError, match="same shape"):
        train_embedding_flow(he, ihc[:10], config, progress=False)
    with pytest.raises(HE2IHCError, match="num_tokens"):
        train_embedding_flow(he[:, 0], ihc[:, 0], config, progress=False)


def test_embedding_metrics_on_known_cases():
    generator = torch.Generator().manual_seed(0)
    true = torch.randn(20, 6, generator=generator) + 3
    mean = true.mean(0)
    perfect = embedding_metrics(true, true, mean)
    assert (
        perfect["cosine"] == pytest.approx(1.0)
        and perfect["top1"] == 1.0
        and perfect["r2"] == pytest.approx(1.0)
    )
    constant = embedding_metrics(mean.expand_as(true), true, mean)
    assert (
        constant["centred_cosine"] == 0.0
        and constant["top1"] == 0.0
        and constant["r2"] == pytest.approx(0.0, abs=1e-9)
    )


# --------------------------------------------------------------------------------------
# Translator (the TileTranslator protocol) and the CLI
# --------------------------------------------------------------------------------------


def _tiny_translator(flow: EmbeddingFlow, tile=16) -> HEToIHCTranslator:
    torch.manual_seed(0)
    generator = SiT(
        model_preset("tiny", in_channels=3, image_dim=8, sample_size=tile, patch_size=4)
    )
    return HEToIHCTranslator(
        flow,
        generator,
        encoder=StubEncoder(),
        sample_config=SampleConfig(sampler="euler", num_steps=2),
        batch_size=3,
        mpp=0.5,
    )


def test_translator_maps_uint8_tiles_to_uint8_tiles():
    he, ihc = _synthetic_pairs(32)
    flow = train_embedding_flow(
        he,
        ihc,
        _flow_config(steps=5),
        metadata={"embedding": {"encoder": STUB, "image_size": 0, "tokens": "global"}},
        progress=False,
    ).flow
    translator = _tiny_translator(flow)
    assert (
        translator.tile_size,
        translator.output_channels,
        translator.mpp,
        translator.batch_size,
    ) == (16, 3, 0.5, 3)
    tiles = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    out = translator(tiles)
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.shape == (5, 16, 16, 3)
    np.testing.assert_array_equal(translator(tiles), out)  # deterministic
    as_torch = translator(torch.from_numpy(tiles))
    assert isinstance(as_torch, torch.Tensor) and torch.equal(as_torch, torch.from_numpy(out))
    assert translator.predict_embeddings(tiles).shape == (5, 8)
    with pytest.raises(HE2IHCError, match="divisible"):
        translator(tiles[:, :15, :15])
    with pytest.raises(HE2IHCError, match="uint8"):
        translator(tiles.astype(np.float32))


def test_translator_refuses_a_generator_of_another_width():
    he, ihc = _synthetic_pairs(16)
    flow = train_embedding_flow(
        he,
        ihc,
        _flow_config(steps=2),
        metadata={"embedding": {"encoder": STUB, "image_size": 0, "tokens": "global"}},
        progress=False,
    ).flow
    other = SiT(model_preset("tiny", in_channels=3, image_dim=4, sample_size=16, patch_size=4))
    with pytest.raises(HE2IHCError, match="8-wide"):
        HEToIHCTranslator(flow, other, encoder=StubEncoder())


def test_cli_chain_pairs_train_flow_train_generator_apply(tmp_path):
    from mupad.applications.staining_cli import staining_app

    he_array = _he_image(160, 128)
    Image.fromarray(he_array).save(tmp_path / "he.png")
    Image.fromarray(_ihc_image(he_array)).save(tmp_path / "ihc.png")
    he_csv, ihc_csv = _landmarks(tmp_path)
    runner = CliRunner()

    def run(*args):
        result = runner.invoke(staining_app, [str(a) for a in args])
        assert result.exit_code == 0, result.output + repr(result.exception)
        return result

    run(
        "pairs",
        "--he",
        tmp_path / "he.png",
        "--ihc",
        tmp_path / "ihc.png",
        "--landmarks",
        he_csv,
        "--landmarks",
        ihc_csv,
        "--landmark-scale",
        0.1,
        "--out",
        tmp_path / "pairs",
        "--patch-size",
        16,
        "--num-pairs",
        48,
        "--seed",
        1,
    )
    result = run(
        "train-flow",
        "--pairs",
        tmp_path / "pairs",
        "--out",
        tmp_path / "flow",
        "--encoder",
        STUB,
        "--hidden",
        16,
        "--steps",
        20,
        "--batch-size",
        16,
        "--no-progress",
    )
    assert "flow" in result.output and (tmp_path / "flow" / "metrics.json").is_file()
    metrics = json.loads((tmp_path / "flow" / "metrics.json").read_text())
    assert metrics["num_heldout"] > 0 and "he_embedding" in metrics["metrics"]
    run(
        "train-generator",
        "--pairs",
        tmp_path / "pairs",
        "--flow",
        tmp_path / "flow",
        "--out",
        tmp_path / "gen",
        "--steps",
        2,
        "--batch-size",
        4,
        "--checkpoint-every",
        2,
        "--no-progress",
    )
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    for i in range(2):
        Image.fromarray(he_array[40 + 8 * i : 56 + 8 * i, 60:76]).save(tiles / f"t{i}.png")
    common = [
        "--flow",
        tmp_path / "flow",
        "--checkpoint",
        tmp_path / "gen",
        "--sampler",
        "euler",
        "--steps",
        2,
        "--no-progress",
    ]
    run("apply", *common, "--he", tiles, "--out", tmp_path / "out_tiles")
    sidecar = json.loads((tmp_path / "out_tiles" / "t0.json").read_text())
    assert sidecar["source"].endswith("t0.png") and sidecar["embedding"]["encoder"] == STUB
    assert np.asarray(Image.open(tmp_path / "out_tiles" / "t0.png")).shape == (16, 16, 3)
    run(
        "apply",
        *common,
        "--he",
        tmp_path / "he.png",
        "--out",
        tmp_path / "out_image",
        "--max-tiles",
        3,
    )
    summary = json.loads((tmp_path / "out_image" / "summary.json").read_text())
    assert summary["num_tiles"] == 3 and (tmp_path / "out_image" / "mosaic.png").is_file()
    # The whole-slide engine's factory builds the same translator from the same folders.
    wsi = pytest.importorskip("mupad.applications.wsi")
    options = wsi.TranslatorOptions(
        device="cpu",
        batch_size=2,
        extra={"flow": str(tmp_path / "flow"), "sampler": "euler", "steps": "2"},
    )
    translator = he2ihc.wsi_translator(tmp_path / "gen", options)
    wsi.check_translator(translator)
    out = translator(he_array[None, 40:56, 60:76].copy())
    assert out.shape == (1, 16, 16, 3) and out.dtype == np.uint8
    with pytest.raises(HE2IHCError, match="flow=FOLDER"):
        he2ihc.wsi_translator(tmp_path / "gen", wsi.TranslatorOptions(device="cpu"))
    bad = runner.invoke(staining_app, ["train-flow", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "--pairs" in bad.output


# --------------------------------------------------------------------------------------
# One small real pair (CIMA/ANHIR serial mouse-lung sections)
# --------------------------------------------------------------------------------------


@pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is not present")
def test_real_serial_pair_registers_and_gives_patch_pairs():
    from mupad.applications.serial_pairs import load_section

    landmarks = DATA / "landmarks" / "user-PS_scale-50pc"
    fit = fit_affine(
        read_landmarks(landmarks / "29-041-Izd2-w35-He-les3.csv", 0.1),
        read_landmarks(landmarks / "29-041-Izd2-w35-Ki67-7-les3.csv", 0.1),
    )
    assert fit.num_landmarks == 80 and 5.0 < fit.residual_rms_px < 30.0  # coarse: serial cuts
    he = load_section(DATA / "images" / "29-041-Izd2-w35-He-les3.jpg")
    ihc = load_section(DATA / "images" / "29-041-Izd2-w35-Ki67-7-les3.jpg")
    assert he.mpp is None and (he.width, he.height) == (892, 661)
    pairs = sample_patch_pairs(
        he, ihc, fit.matrix, PairSamplingConfig(patch_size=64, num_pairs=12, seed=0)
    )
    assert pairs.he.shape == pairs.ihc.shape == (12, 64, 64, 3)

    def darkness(images):  # tissue density per patch from grey levels
        return 255.0 - images.astype(float).mean(axis=(1, 2, 3))

    # Registered IHC patches follow the H&E tissue density better than a shuffled pairing.
    matched = np.corrcoef(darkness(pairs.he), darkness(pairs.ihc))[0, 1]
    assert matched > 0.3
    embeddings = he2ihc.embed_pairs(
        pairs.subset([0, 1]), EmbeddingSpec(image_size=75), progress=False
    )
    assert embeddings.he.shape == embeddings.ihc.shape == (2, 2048)
