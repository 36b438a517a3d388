"""H&E -> mIF: marker grouping, the concatenated H&E latent, training, translation, CLI.

Synthetic data made here: 16 px "H&E" tiles (pink stroma whose shade varies smoothly, two
kinds of purple nuclei) whose K = 4 marker maps are deterministic functions of the colour
(nuclei, nuclei of kind A, stroma shade, nuclei of kind B) -> 2 codec groups, the second
padded. A tiny SiT, a stub image encoder and the identity codec keep it to seconds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from typer.testing import CliRunner

from mupad.applications.he2mif import (
    MarkerCodec,
    MIFBatches,
    MIFError,
    MIFTrainingData,
    MIFTranslator,
    apply_intensity_scales,
    concat_velocity,
    evaluate_mif,
    group_markers,
    he_to_pixels,
    load_mif_folder,
    mean_patch_pcc,
    mif_model_config,
    mif_to_unit,
    normalize_intensities,
    num_groups,
    patch_pcc,
    read_mif_stack,
    train_mif,
    translate_mif,
    ungroup_markers,
)
from mupad.applications.mif_cli import mif_app
from mupad.applications.wsi import (
    TileTranslator,
    TranslatorOptions,
    WsiTranslationError,
    build_translator,
    check_translator,
    translate_slide,
)
from mupad.conditioning.image_encoders import ImageEncoder, ImageFeatures, Preprocessing
from mupad.conditioning.registry import get_encoder, register_encoder
from mupad.conditions import Conditions, Modality
from mupad.config import ConfigError, GuidanceConfig, SampleConfig, TrainConfig
from mupad.latents import IdentityCodec, LatentCodec
from mupad.models import SiT
from mupad.models.errors import ModelInputError
from mupad.training.loop import TrainBatch, Trainer, read_log
from mupad.transport.guidance import GuidanceSchedule, GuidedVelocity

STUB = "test-he2mif-stub"
MARKERS = ["DAPI", "CD3", "PanCK", "Ki67"]
SIZE = 16
FAST = SampleConfig(sampler="euler", num_steps=8, guidance=GuidanceConfig(start=0.0, end=0.0))


pytestmark = pytest.mark.usefixtures("one_thread")


class StubEncoder(ImageEncoder):
    """8-d tokens from an 8 x 8 input: a global token + a 2 x 2 grid of colour statistics."""

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
        grid = torch.cat([cells, cells.std(dim=1, keepdim=True), cells.mean(dim=1, keepdim=True),
                          cells.amax(dim=1, keepdim=True), cells.amin(dim=1, keepdim=True),
                          cells[:, :1] - cells[:, 2:3]], dim=1)  # fmt: skip
        patches = grid.permute(0, 2, 3, 1).contiguous()  # (b, 2, 2, 8)
        pooled = patches.mean(dim=(1, 2))
        return ImageFeatures(global_token=pooled, patches=patches, embedding=pooled)


register_encoder(STUB, StubEncoder, overwrite=True)


def synthetic_pairs(n: int, size: int = SIZE, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 H&E (n, S, S, 3) and float32 marker maps (n, 4, S, S) in [0, 1]."""
    rng = np.random.default_rng(seed)
    he = np.zeros((n, size, size, 3))
    mif = np.zeros((n, 4, size, size), np.float32)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n):
        a, b = rng.uniform(0.2, 0.6, 2)
        shade = 0.5 + 0.5 * np.sin(a * xx + b * yy + rng.uniform(0, 2 * np.pi))
        image = np.stack([240 - 40 * shade, 190 - 90 * shade, 215 - 50 * shade], axis=-1)
        mif[i, 2] = shade  # "PanCK": the stroma shade
        for _ in range(rng.integers(3, 7)):
            cy, cx = rng.uniform(0, size, 2)
            disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= rng.uniform(1.5, 2.8) ** 2
            kind = int(rng.integers(2))
            image[disk] = (70, 60, 165) if kind == 0 else (125, 35, 105)
            mif[i, :, disk] = 0.0
            mif[i, 0, disk] = 1.0  # "DAPI": every nucleus
            mif[i, 1 if kind == 0 else 3, disk] = 1.0  # "CD3" / "Ki67": one kind each
        he[i] = image + rng.normal(0, 4, image.shape)
    return he.clip(0, 255).astype(np.uint8), mif


def train_config(steps: int, **overrides) -> TrainConfig:
    fields = {
        "steps": steps, "batch_size": 8, "learning_rate": 2e-3, "warmup_steps": 5,
        "ema_decay": 0.9, "precision": "fp32", "condition_dropout": 0.1, "log_every": 1,
        "checkpoint_every": 10_000,
    }  # fmt: skip
    fields.update(overrides)
    return TrainConfig(**fields)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A tiny H&E -> mIF model trained for a few seconds, with the stub image stream."""
    torch.set_num_threads(1)
    he, mif = synthetic_pairs(48, seed=0)
    out = tmp_path_factory.mktemp("mif") / "run"
    train_mif(
        he, mif, MARKERS, out, train_config=train_config(160), image_encoder=STUB,
        preset="tiny", mpp=0.5, progress=False,
    )  # fmt: skip
    return out


# --------------------------------------------------------------------------------------
# Grouping and latents
# --------------------------------------------------------------------------------------


def test_markers_are_grouped_in_threes_with_zero_padding() -> None:
    assert [num_groups(k) for k in (1, 2, 3, 4, 6, 7)] == [1, 1, 1, 2, 2, 3]
    maps = torch.rand(2, 4, 5, 5)
    pixels = group_markers(maps)
    assert pixels.shape == (2, 2, 3, 5, 5)
    assert torch.equal(pixels[:, 1, 1:], torch.full((2, 2, 5, 5), -1.0))  # zero intensity
    torch.testing.assert_close(pixels[:, 0], maps[:, :3] * 2 - 1)
    torch.testing.assert_close(pixels[:, 1, 0], maps[:, 3] * 2 - 1)
    torch.testing.assert_close(ungroup_markers(pixels, 4), maps, rtol=0, atol=1e-7)
    with pytest.raises(MIFError, match="do not hold"):
        ungroup_markers(pixels, 7)


def test_identity_codec_round_trip_is_exact() -> None:
    codec = MarkerCodec(IdentityCodec(), MARKERS)
    levels = torch.randint(0, 256, (3, 4, 8, 8)).float() / 256  # dyadic: every step exact
    latents = codec.encode(levels)
    assert latents.shape == (3, 6, 8, 8) and codec.target_channels == 6
    assert torch.equal(codec.decode(latents), levels)
    maps = torch.rand(3, 4, 8, 8)
    assert (codec.decode(codec.encode(maps)) - maps).abs().max() <= 2**-24
    assert codec.encode_he(he_to_pixels(synthetic_pairs(3, 8)[0])).shape == (3, 3, 8, 8)


class PoolCodec(LatentCodec):
    """A 4-channel, 2x-downsampling fake codec that counts its calls."""

    name, latent_channels, downsample = "pool", 4, 2

    def __init__(self) -> None:
        self.encoded = self.decoded = 0

    def encode(self, pixels, *, sample=False, generator=None):
        self.encoded += 1
        assert pixels.shape[1] == 3
        pooled = torch.nn.functional.avg_pool2d(pixels, 2)
        return torch.cat([pooled, pooled.mean(1, keepdim=True)], dim=1)

    def decode(self, latents, *, clamp=True):
        self.decoded += 1
        assert latents.shape[1] == 4
        return torch.nn.functional.interpolate(latents[:, :3], scale_factor=2.0)


def test_each_group_is_encoded_and_decoded_separately() -> None:
    codec = PoolCodec()
    marker_codec = MarkerCodec(codec, ["a", "b", "c", "d", "e", "f", "g"])  # 3 groups
    maps = torch.rand(2, 7, 8, 8)
    latents = marker_codec.encode(maps)
    assert latents.shape == (2, 12, 4, 4) and codec.encoded == 3
    decoded = marker_codec.decode(latents)
    assert decoded.shape == (2, 7, 8, 8) and codec.decoded == 3
    assert decoded.min() >= 0 and decoded.max() <= 1
    config = mif_model_config(marker_codec, latent_side=4, image_dim=8, preset="tiny")
    assert (config.in_channels, config.out_channels, config.image_dim) == (16, 12, 8)
    with pytest.raises(MIFError, match=r"\(B, 12, h, w\)"):
        marker_codec.decode(latents[:, :8])


def test_auto_patch_keeps_the_token_grid_small() -> None:
    codec = MarkerCodec(IdentityCodec(), MARKERS)
    assert mif_model_config(codec, 256, 0, "S/2").patch_size == 8  # 32 x 32 tokens
    assert mif_model_config(codec, 32, 0, "S/2").patch_size == 2
    assert mif_model_config(codec, 32, 0, "S/2", patch_size=4).patch_size == 4
    with pytest.raises(ConfigError, match="multiple of the patch size"):
        mif_model_config(codec, 30, 0, "S/2", patch_size=4)


# --------------------------------------------------------------------------------------
# Batches, the trainer and the velocity closure
# --------------------------------------------------------------------------------------


def test_augmentation_moves_target_context_and_token_grid_together() -> None:
    he, _ = synthetic_pairs(6, 8)
    pixels = he_to_pixels(he)
    grid = torch.arange(4.0).view(1, 4, 1).expand(6, 4, 8)  # patch i carries the value i
    tokens = torch.cat([torch.full((6, 1, 8), -7.0), grid], dim=1)  # [global, 2x2 grid]
    data = MIFTrainingData(target=pixels, context=pixels.clone(), tokens=tokens, token_grid=(2, 2))
    batches = MIFBatches(data, batch_size=32, augment=True)
    batch = batches(0, torch.Generator().manual_seed(3))
    assert isinstance(batch, TrainBatch) and batch.x_context is not None
    assert torch.equal(batch.x0, batch.x_context)  # one transform for target and H&E
    transformed = {tuple(row) for row in batch.cond.get(Modality.IMAGE).tokens[:, 1:, 0].tolist()}
    assert len(transformed) > 2  # several dihedral transforms of the grid were drawn
    for row in batch.cond.get(Modality.IMAGE).tokens:
        assert row[0].eq(-7).all() and sorted(row[1:, 0].tolist()) == [0, 1, 2, 3]
    # The grid moves like the image: the pixel block of patch (r, c) holds its value.
    for k in range(32):
        index = batch.cond.get(Modality.IMAGE).tokens[k, 1:, 0].view(2, 2)
        source = _source_rows(batches, k)
        image = batch.x0[k]
        for r in range(2):
            for c in range(2):
                original = int(index[r, c])
                block = pixels[source][:, (original // 2) * 4 : (original // 2) * 4 + 4,
                                       (original % 2) * 4 : (original % 2) * 4 + 4]  # fmt: skip
                mine = image[:, r * 4 : r * 4 + 4, c * 4 : c * 4 + 4]
                assert torch.equal(
                    torch.sort(mine.flatten()).values, torch.sort(block.flatten()).values
                )


def _source_rows(batches: MIFBatches, k: int) -> int:
    generator = torch.Generator().manual_seed(3)
    return int(torch.randint(len(batches.data), (batches.batch_size,), generator=generator)[k])


def test_trainer_concatenates_the_clean_context(tmp_path: Path) -> None:
    seen = []

    class Recorder(SiT):
        def forward(self, x, t, cond=None, **kwargs):
            seen.append(x.detach().clone())
            return super().forward(x, t, cond, **kwargs)

    from mupad.config import model_preset

    model = Recorder(model_preset("tiny", in_channels=5, out_channels=3, cross_attention="none"))
    context = torch.arange(4 * 2 * 4 * 4, dtype=torch.float32).view(4, 2, 4, 4)

    def batch_fn(step, generator):
        return TrainBatch(x0=torch.zeros(4, 3, 4, 4), x_context=context)

    config = train_config(1, batch_size=4, grad_accumulation=2, condition_dropout=0.0)
    Trainer(model, config, tmp_path / "run", batch_fn, progress=False).train()
    assert [x.shape for x in seen] == [(2, 5, 4, 4), (2, 5, 4, 4)]  # two micro-batches
    assert torch.equal(torch.cat([x[:, 3:] for x in seen]), context)  # clean, in row order

    def plain(step, generator):
        return TrainBatch(x0=torch.zeros(4, 3, 4, 4))

    with pytest.raises(ModelInputError, match="channels"):  # the context is missing
        Trainer(model, config, tmp_path / "other", plain, progress=False).train()

    def mismatched(step, generator):
        return TrainBatch(x0=torch.zeros(4, 3, 4, 4), x_context=context[:, :, :2])

    with pytest.raises(ValueError, match="x_context"):
        Trainer(model, config, tmp_path / "third", mismatched, progress=False).train()


def test_concat_velocity_repeats_the_context_for_guided_batches() -> None:
    from mupad.config import model_preset

    model = SiT(model_preset("tiny", in_channels=9, out_channels=6, image_dim=8)).eval()
    for p in model.parameters():  # nonzero outputs, so a mixed-up context would show
        torch.nn.init.normal_(p, std=0.05)
    context = torch.randn(2, 3, 8, 8)
    tokens = torch.randn(2, 5, 8)
    cond = Conditions.build(image=tokens)
    x, t = torch.randn(2, 6, 8, 8), torch.full((2,), 0.7)
    velocity = concat_velocity(model, context)
    guided = GuidedVelocity(velocity, GuidanceSchedule(kind="constant", start=2.0))
    with torch.no_grad():
        out = guided(x, t, cond)
        v_cond = model(torch.cat([x, context], 1), t, cond).velocity
        v_uncond = model(torch.cat([x, context], 1), t, cond.without(list(cond.streams))).velocity
    torch.testing.assert_close(out, v_cond + 2.0 * (v_cond - v_uncond), rtol=1e-4, atol=1e-5)
    with pytest.raises(MIFError, match="not a multiple"):
        velocity(torch.randn(3, 6, 8, 8), torch.full((3,), 0.5), None)


# --------------------------------------------------------------------------------------
# Training and translation
# --------------------------------------------------------------------------------------


def test_training_lowers_the_loss(trained_run: Path) -> None:
    losses = [record["loss"] for record in read_log(trained_run)]
    assert len(losses) == 160
    assert np.mean(losses[-20:]) < 0.6 * np.mean(losses[:10])
    state = json.loads(next(trained_run.glob("checkpoints/*/train_state.json")).read_text())
    extra = state["extra"]
    assert extra["task"] == "he2mif" and extra["markers"] == MARKERS
    assert extra["image_encoder"] == STUB and extra["token_grid"] == [2, 2]
    config = json.loads(next(trained_run.glob("checkpoints/*/config.json")).read_text())
    assert (config["in_channels"], config["out_channels"], config["image_dim"]) == (9, 6, 8)


def test_translate_outputs_one_map_per_marker(trained_run: Path) -> None:
    he, _ = synthetic_pairs(3, seed=5)
    maps = translate_mif(trained_run, he, sample_config=FAST)
    assert maps.shape == (3, 4, SIZE, SIZE) and maps.dtype == torch.float32
    assert maps.min() >= 0 and maps.max() <= 1
    again = translate_mif(trained_run, torch.from_numpy(he), sample_config=FAST)
    assert torch.equal(maps, again)  # seeded: the same tiles give the same maps


def test_trained_pcc_beats_an_untrained_model(trained_run: Path) -> None:
    he, mif = synthetic_pairs(16, seed=7)  # held out: another seed
    translator = MIFTranslator.from_pretrained(trained_run, sample_config=FAST, batch_size=16)
    trained = evaluate_mif(translator, he, mif)
    untrained = MIFTranslator(
        SiT(translator.model.config), translator.marker_codec, encoder=translator.encoder,
        sample_config=FAST,
    )  # fmt: skip
    baseline = evaluate_mif(untrained, he, mif)
    assert abs(baseline["mean"]) < 0.15  # noise: no correlation
    assert trained["mean"] > baseline["mean"] + 0.4
    assert all(trained["per_marker"][m] > 0.2 for m in MARKERS), trained


def test_translator_protocol_and_whole_slide(trained_run: Path, tmp_path: Path) -> None:
    translator = build_translator(
        "he2mif", trained_run,
        TranslatorOptions(device="cpu", batch_size=4, extra={"sampler": "euler", "steps": "4"}),
    )  # fmt: skip
    assert isinstance(translator, TileTranslator)
    check_translator(translator)
    assert (translator.tile_size, translator.output_channels, translator.mpp) == (SIZE, 4, 0.5)
    assert translator.channel_names == MARKERS
    he, _ = synthetic_pairs(2, seed=3)
    out = translator(he)
    assert isinstance(out, np.ndarray) and out.shape == (2, SIZE, SIZE, 4)
    assert out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1

    slide = np.concatenate([np.concatenate(list(synthetic_pairs(3, seed=s)[0]), 1) for s in (1, 2)])
    path = tmp_path / "slide.png"
    Image.fromarray(slide).save(path)  # 32 x 48 px
    written = translate_slide(
        path, translator, tmp_path / "mif.ome.tif", overlap=4, tissue_only=False,
        slide_mpp=0.5, out_dtype="float32", progress=False,
    )  # fmt: skip
    with tifffile.TiffFile(written) as tif:
        assert tif.series[0].levels[0].asarray().shape == (4, 32, 48)
        assert all(name in tif.ome_metadata for name in MARKERS)

    with pytest.raises(WsiTranslationError, match="unknown he2mif option"):
        build_translator("he2mif", trained_run, TranslatorOptions(extra={"flow": "x"}))
    with pytest.raises(WsiTranslationError, match="needs a checkpoint"):
        build_translator("he2mif", None)
    with pytest.raises(WsiTranslationError, match="multiple of 2"):
        build_translator("he2mif", trained_run, TranslatorOptions(tile_size=15))


# --------------------------------------------------------------------------------------
# Metrics and bad inputs
# --------------------------------------------------------------------------------------


def test_patch_pcc() -> None:
    truth = torch.rand(3, 2, 6, 6)
    pcc = patch_pcc(truth * 3 + 1, truth)
    torch.testing.assert_close(pcc, torch.ones(3, 2, dtype=torch.float64))
    torch.testing.assert_close(patch_pcc(-truth, truth), -torch.ones(3, 2, dtype=torch.float64))
    flat = truth.clone()
    flat[0, 1] = 0.5  # a constant map: undefined, skipped
    metrics = mean_patch_pcc(flat, truth, ["a", "b"])
    assert math.isnan(patch_pcc(flat, truth)[0, 1])
    assert metrics["num_undefined"] == {"a": 0, "b": 1}
    assert metrics["per_marker"]["b"] == pytest.approx(1.0) and metrics["mean"] == pytest.approx(
        1.0
    )


def test_bad_inputs_raise_clear_errors(tmp_path: Path) -> None:
    he, mif = synthetic_pairs(4, 8)
    config = train_config(1)
    kwargs = {"train_config": config, "image_encoder": "none", "preset": "tiny", "progress": False}
    with pytest.raises(MIFError, match="at least one marker"):
        train_mif(he, mif[:, :0], [], tmp_path / "a", **kwargs)
    with pytest.raises(MIFError, match="4 channels but 3 markers"):
        train_mif(he, mif, MARKERS[:3], tmp_path / "a", **kwargs)
    with pytest.raises(MIFError, match="same size"):
        train_mif(he, mif[..., :4, :4], MARKERS, tmp_path / "a", **kwargs)
    with pytest.raises(MIFError, match="must be RGB"):
        train_mif(np.concatenate([he, he[..., :1]], -1), mif, MARKERS, tmp_path / "a", **kwargs)
    with pytest.raises(MIFError, match="must be RGB"):
        he_to_pixels(he[..., :2])
    with pytest.raises(MIFError, match="add a batch axis"):
        he_to_pixels(he[0])
    with pytest.raises(MIFError, match="4 H&E tiles but 3"):
        train_mif(he, mif[:3], MARKERS, tmp_path / "a", **kwargs)
    with pytest.raises(MIFError, match="uint8"):
        he_to_pixels(he.astype(np.float32))
    with pytest.raises(MIFError, match=r"lie in \[0, 1\]"):
        train_mif(he, mif * 5, MARKERS, tmp_path / "a", **kwargs)
    with pytest.raises(MIFError, match="unique"):
        train_mif(he, mif, ["a", "b", "a", "c"], tmp_path / "a", **kwargs)
    with pytest.raises(ConfigError, match="multiple of the patch size"):
        train_mif(he[:, :6, :6], mif[..., :6, :6], MARKERS, tmp_path / "a",
                  **{**kwargs, "patch_size": 4})  # fmt: skip
    with pytest.raises(ConfigError, match="velocity objective"):
        train_mif(he, mif, MARKERS, tmp_path / "a",
                  **{**kwargs, "train_config": train_config(1, alignment={"objective": "repa"})})  # fmt: skip
    with pytest.raises(MIFError, match="no checkpoint"):
        translate_mif(tmp_path / "missing", he)


def test_intensity_normalisation() -> None:
    raw = np.zeros((2, 2, 4, 4), np.uint16)
    raw[:, 0] = 65535
    raw[:, 1, 0, 0] = 1000
    unit, scales = normalize_intensities(raw)
    assert unit.dtype == np.float32 and unit[:, 0].min() == 1.0 and scales == [65535.0] * 2
    unit, scales = normalize_intensities(raw, "percentile", 100.0)
    assert scales == [65535.0, 1000.0] and unit[:, 1].max() == 1.0
    np.testing.assert_allclose(apply_intensity_scales(raw, scales), unit)
    assert mif_to_unit(raw).max() == 1.0
    with pytest.raises(MIFError, match="dtype"):
        normalize_intensities(raw, "zscore")


# --------------------------------------------------------------------------------------
# Files and the CLI
# --------------------------------------------------------------------------------------


def _write_folder(root: Path, n: int, seed: int, layout: str = "khw") -> None:
    he, mif = synthetic_pairs(n, seed=seed)
    (root / "he").mkdir(parents=True)
    (root / "mif").mkdir()
    for i in range(n):
        Image.fromarray(he[i]).save(root / "he" / f"t{i:02d}.png")
        stack = (mif[i] * 65535).round().astype(np.uint16)
        if layout == "hwk":
            stack = stack.transpose(1, 2, 0)
        tifffile.imwrite(root / "mif" / f"t{i:02d}.tif", stack, photometric="minisblack")


def test_folder_layout_and_tiff_reading(tmp_path: Path) -> None:
    _write_folder(tmp_path / "khw", 3, seed=0)
    _write_folder(tmp_path / "hwk", 3, seed=0, layout="hwk")
    a, b = load_mif_folder(tmp_path / "khw", MARKERS), load_mif_folder(tmp_path / "hwk", MARKERS)
    assert a.he.shape == (3, SIZE, SIZE, 3) and a.mif.shape == (3, 4, SIZE, SIZE)
    assert np.array_equal(a.mif, b.mif) and a.ids == ["t00", "t01", "t02"]
    with pytest.raises(MIFError, match="3-marker stack"):
        read_mif_stack(tmp_path / "khw" / "mif" / "t00.tif", 3)
    with pytest.raises(MIFError, match="he/<id>.png"):
        load_mif_folder(tmp_path, MARKERS)


def test_cli_train_apply_evaluate(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _write_folder(data, 8, seed=0)
    runner = CliRunner()
    run = tmp_path / "run"
    result = runner.invoke(
        mif_app,
        ["train", "--data", str(data), "--markers", ",".join(MARKERS), "--out", str(run),
         "--image-encoder", "none", "--preset", "tiny", "--steps", "3", "--batch-size", "4",
         "--precision", "fp32", "--normalize", "percentile", "--device", "cpu",
         "--no-progress"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    fast = ["--sampler", "euler", "--steps", "2", "--device", "cpu"]
    out = tmp_path / "out"
    result = runner.invoke(
        mif_app,
        ["apply", "--checkpoint", str(run), "--he", str(data / "he"), "--out", str(out),
         "--no-progress", *fast],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["num_images"] == 8
    with tifffile.TiffFile(out / "t03.tif") as tif:
        stack = tif.asarray()
        assert stack.shape == (4, SIZE, SIZE) and stack.dtype == np.float32
        assert all(name in tif.ome_metadata for name in MARKERS)
    sidecar = json.loads((out / "t03.json").read_text())
    assert sidecar["markers"] == MARKERS and sidecar["source"].endswith("t03.png")
    assert len(sidecar["intensity_scales"]) == 4 and sidecar["sample_config"]["num_steps"] == 2
    assert json.loads((out / "summary.json").read_text())["num_images"] == 8

    single = runner.invoke(
        mif_app, ["apply", "--checkpoint", str(run), "--he", str(data / "he" / "t00.png"),
                  "--out", str(tmp_path / "one"), "--no-progress", *fast],
    )  # fmt: skip
    assert single.exit_code == 0, single.output
    assert (tmp_path / "one" / "t00.tif").is_file()

    metrics_path = tmp_path / "metrics.json"
    result = runner.invoke(
        mif_app,
        ["evaluate", "--checkpoint", str(run), "--data", str(data), "--out", str(metrics_path),
         *fast],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    metrics = json.loads(metrics_path.read_text())
    assert set(metrics["per_marker"]) == set(MARKERS) and metrics["num_patches"] == 8

    bad = runner.invoke(
        mif_app,
        ["train", "--data", str(data), "--markers", "", "--out", str(tmp_path / "bad"),
         "--image-encoder", "none", "--device", "cpu"],
    )  # fmt: skip
    assert bad.exit_code == 2 and "marker" in bad.output
    missing = runner.invoke(
        mif_app, ["apply", "--checkpoint", str(tmp_path / "nothing"), "--he", str(data / "he"),
                  "--out", str(tmp_path / "x"), *fast],
    )  # fmt: skip
    assert missing.exit_code == 2 and "no checkpoint" in missing.output


def test_stub_encoder_is_registered() -> None:
    assert isinstance(get_encoder(STUB), StubEncoder)
