"""FF -> FFPE: attention control, inversion + parallel passes with injection, CFG row
bookkeeping, hematoxylin SSIM, inputs, files, the whole-slide translator, fine-tuning, CLI."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from mupad.applications.ff2ffpe import (
    DomainConditions,
    FFPEError,
    FFPESettings,
    FFPETranslator,
    ParallelPasses,
    domain_layout,
    ff_to_ffpe,
    finetune_domains,
    guidance_config,
    hematoxylin_ssim,
    parse_blocks,
    translate_files,
    translate_images,
    translate_latents,
)
from mupad.applications.ff2ffpe_cli import ffpe_app
from mupad.conditioning.base import ConditionEncoder
from mupad.conditioning.registry import register_encoder
from mupad.conditions import Modality
from mupad.config import GuidanceConfig, GuidanceScheduleKind, Precision, TrainConfig, model_preset
from mupad.data.tiles import bundled_kather_dir
from mupad.models import SiT
from mupad.models.attention import SelfAttention
from mupad.models.attention_control import (
    AttentionControlError,
    AttentionRecorder,
    AttentionReplay,
    InjectionMode,
    RowInjection,
    attention_control,
)
from mupad.transport.guidance import guided
from mupad.transport.samplers import euler_ode

TEXT_DIM = 8
ENCODER_NAME = "ff2ffpe-test-text"
SOURCE, TARGET = "fresh frozen", "ffpe image"


pytestmark = pytest.mark.usefixtures("one_thread")


class HashText(ConditionEncoder):
    """A deterministic stand-in text encoder: tokens from a hash of each text; one token per
    word + 2, so texts of different lengths give padded batches (as MiniLM does)."""

    modality = Modality.TEXT
    dim = TEXT_DIM
    name = ENCODER_NAME

    def encode(self, batch):
        length = max(len(text.split()) + 2 for text in batch)
        tokens = torch.zeros(len(batch), length, TEXT_DIM)
        mask = torch.zeros(len(batch), length, dtype=torch.bool)
        for row, text in enumerate(batch):
            seed = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
            count = len(text.split()) + 2
            generator = torch.Generator().manual_seed(seed)
            tokens[row, :count] = torch.randn(count, TEXT_DIM, generator=generator)
            mask[row, :count] = True
        return tokens, mask


register_encoder(ENCODER_NAME, lambda weights=None, **kwargs: HashText(), overwrite=True)


def tiny_model(seed: int = 0, **overrides) -> SiT:
    """A tiny pixel-space SiT with small random weights everywhere (adaLN-Zero would output 0)."""
    fields = {"in_channels": 3, "text_dim": TEXT_DIM, "patch_size": 4, "sample_size": 16}
    fields.update(overrides)
    torch.manual_seed(seed)
    model = SiT(model_preset("tiny", **fields))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model.eval()


@pytest.fixture(scope="module")
def model() -> SiT:
    return tiny_model()


@pytest.fixture(scope="module")
def domains() -> DomainConditions:
    return DomainConditions.encode(HashText(), SOURCE, TARGET)


def assert_near(a: torch.Tensor, b: torch.Tensor, atol: float) -> None:
    # (torch.testing.assert_close costs ~3 s of lazy imports on its first call)
    assert a.shape == b.shape
    gap = float((a - b).detach().abs().max())
    assert gap <= atol, gap


def kather_tiles(count: int) -> list[Path]:
    return sorted(bundled_kather_dir().glob("*/*.png"))[:count]


def kather_uint8(count: int, side: int) -> torch.Tensor:
    arrays = [np.asarray(Image.open(p).convert("RGB"))[:side, :side] for p in kather_tiles(count)]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------------------
# Attention control
# --------------------------------------------------------------------------------------


def test_control_absent_and_present_but_inactive_are_bit_identical(model, domains):
    x = torch.randn(4, 3, 16, 16)
    cond = domains.repeat(4, "cpu")[1]
    with torch.no_grad():
        plain = model.velocity(x, 0.7, cond)
        with attention_control(model, RowInjection.from_pairs(4, [0, 1], [2, 3], active=False)):
            inactive = model.velocity(x, 0.7, cond)
        with attention_control(model, RowInjection(torch.tensor([1, 0, 3, 2]), frozenset())):
            no_blocks = model.velocity(x, 0.7, cond)
        with attention_control(model, AttentionRecorder()):
            recorded = model.velocity(x, 0.7, cond)
    assert torch.equal(plain, inactive) and torch.equal(plain, no_blocks)
    assert torch.equal(plain, recorded)
    assert all(layer.control is None for layer in model.self_attention_layers())


def test_maps_mode_equals_explicit_attention_map_injection():
    torch.manual_seed(1)
    layer = SelfAttention(16, 2)
    x = torch.randn(2, 9, 16)  # row 0 = source, row 1 = target
    qkv = layer.qkv(x).view(2, 9, 3, 2, 8).permute(2, 0, 3, 1, 4)  # (3, B, H, N, d)
    q, k, v = qkv[0], qkv[1], qkv[2]
    maps = torch.softmax(q[0] @ k[0].transpose(-1, -2) / math.sqrt(8), dim=-1)  # source's
    expected = layer.proj((maps @ v[1]).transpose(0, 1).reshape(9, 16))  # A_src V_tgt
    layer.control = lambda q_, k_, v_: RowInjection(torch.tensor([0, 0]))(0, q_, k_, v_)
    got = layer(x)
    layer.control = None
    assert_near(got[1], expected, 1e-5)
    assert torch.equal(got[0], layer(x)[0])  # the donor row is untouched


def test_kv_mode_copies_keys_and_values_only():
    q, k, v = (torch.randn(3, 2, 5, 4) for _ in range(3))
    injection = RowInjection.from_pairs(3, [0], [2], mode=InjectionMode.KV, blocks=frozenset({1}))
    nq, nk, nv = injection(1, q, k, v)
    assert torch.equal(nq, q) and torch.equal(nk[2], k[0]) and torch.equal(nv[2], v[0])
    assert torch.equal(nk[:2], k[:2])
    assert all(a is b for a, b in zip(injection(0, q, k, v), (q, k, v)))  # other block: untouched


def test_attention_control_rejects_nesting_and_unbinds_on_error(model):
    recorder = AttentionRecorder()
    with pytest.raises(RuntimeError, match="boom"), attention_control(model, recorder):
        raise RuntimeError("boom")
    assert all(layer.control is None for layer in model.self_attention_layers())
    with (
        attention_control(model, recorder),
        pytest.raises(AttentionControlError, match="nested"),
        attention_control(model, recorder),
    ):
        pass
    with pytest.raises(AttentionControlError, match="donor rows"):
        RowInjection.from_pairs(4, [0, 1], [2])
    with pytest.raises(AttentionControlError, match="outside"):
        RowInjection.from_pairs(2, [0], [5])
    injection = RowInjection.from_pairs(2, [0], [1])
    with pytest.raises(AttentionControlError, match="batch of 2"):
        injection(0, *(torch.zeros(3, 1, 2, 2) for _ in range(3)))


# --------------------------------------------------------------------------------------
# Inversion and the parallel passes
# --------------------------------------------------------------------------------------


def test_inversion_then_reconstruction_returns_the_input(model, domains):
    x0 = 0.5 * torch.randn(2, 3, 16, 16)
    source, target = domains.repeat(2, "cpu")

    def error(steps: int, method: str = "euler") -> float:
        settings = FFPESettings(num_steps=steps, method=method, inject_fraction=0.0)
        result = translate_latents(model, x0, source, target, settings)
        return float((result.reconstruction - x0).abs().max())

    coarse, fine = error(8), error(32)
    assert fine < coarse / 3  # first order: error ~ 1 / steps
    assert fine < 0.05
    assert error(16, "heun") < 2e-3  # second order


def test_same_text_with_full_injection_is_the_source_reconstruction(model):
    same = DomainConditions.encode(HashText(), SOURCE, SOURCE)
    source, target = same.repeat(2, "cpu")
    x0 = 0.5 * torch.randn(2, 3, 16, 16)
    settings = FFPESettings(num_steps=6, inject_fraction=1.0)
    result = translate_latents(model, x0, source, target, settings)
    assert_near(result.target, result.reconstruction, 1e-6)


@pytest.mark.parametrize("guidance", [None, 2.0])
def test_without_injection_the_target_is_plain_regeneration(model, domains, guidance):
    x0 = 0.5 * torch.randn(2, 3, 16, 16)
    source, target = domains.repeat(2, "cpu")
    for settings in (
        FFPESettings(num_steps=5, inject_fraction=0.0, guidance=guidance_config(guidance)),
        FFPESettings(num_steps=5, inject_blocks=(), guidance=guidance_config(guidance)),
    ):
        result = translate_latents(model, x0, source, target, settings)
        velocity = guided(model.velocity, settings.guidance)
        plain = euler_ode(velocity, result.inverted, target, 5)
        assert_near(result.target, plain, 2e-5)


@pytest.mark.parametrize("mode", list(InjectionMode))
@pytest.mark.parametrize("guidance", [0.0, 1.5])
def test_batched_rows_match_separate_passes_with_replayed_attention(model, domains, mode, guidance):
    """The one batched evaluation ([source | target | target uncond]) equals: a source-only
    pass recorded, replayed into separate target-cond and target-uncond passes, then CFG."""
    batch = 2
    source, target = domains.repeat(batch, "cpu")
    settings = FFPESettings(
        num_steps=4, inject_blocks=(1,), inject_mode=mode, guidance=guidance_config(guidance)
    )
    passes = ParallelPasses(model, source, target, settings, batch)
    x = torch.randn(2 * batch, 3, 16, 16)  # source and target states differ
    t = torch.full((2 * batch,), 0.8)
    with torch.no_grad():
        got = passes(x, t, None)
        recorder = AttentionRecorder(blocks=frozenset({1}))
        with attention_control(model, recorder):
            v_source = model.velocity(x[:batch], 0.8, source)
        rows = torch.arange(batch)
        replay = AttentionReplay(recorder.records, rows, rows, mode=mode)
        with attention_control(model, replay):
            v_cond = model.velocity(x[batch:], 0.8, target)
            v_uncond = model.velocity(x[batch:], 0.8, target.without([Modality.TEXT]))
    expected = torch.cat([v_source, v_cond + guidance * (v_cond - v_uncond)])
    assert_near(got, expected, 2e-5)
    assert passes.calls == [((3 if guidance else 2) * batch, True)]


@pytest.mark.parametrize("guidance", [None, 1.5])
def test_skipping_the_reconstruction_gives_the_same_target_for_less_work(model, domains, guidance):
    x0 = 0.5 * torch.randn(2, 3, 16, 16)
    source, target = domains.repeat(2, "cpu")
    settings = FFPESettings(num_steps=4, inject_fraction=0.5, guidance=guidance_config(guidance))
    full = translate_latents(model, x0, source, target, settings)
    lean = translate_latents(model, x0, source, target, settings, reconstruct=False)
    assert lean.reconstruction is None
    assert_near(lean.target, full.target, 2e-5)
    rows = 2 if guidance else 1
    passes = ParallelPasses(model, source, target, settings, 2, reconstruct=False)
    with torch.no_grad():
        euler_ode(passes, torch.cat([x0, x0]), None, 4, callback=passes.advance)
    assert passes.calls == [(2 * (rows + 1), True)] * 2 + [(2 * rows, False)] * 2


@pytest.mark.parametrize("method, per_step", [("euler", 1), ("heun", 2)])
def test_injection_covers_the_first_fraction_of_steps(model, domains, method, per_step):
    source, target = domains.repeat(1, "cpu")
    settings = FFPESettings(num_steps=4, method=method, inject_fraction=0.5)
    passes = ParallelPasses(model, source, target, settings, 1)
    from mupad.transport.samplers import heun_ode

    integrate = heun_ode if method == "heun" else euler_ode
    with torch.no_grad():
        integrate(passes, torch.randn(2, 3, 16, 16), None, 4, callback=passes.advance)
    assert [inject for _, inject in passes.calls] == [True] * 2 * per_step + [False] * 2 * per_step
    assert FFPESettings(num_steps=5, inject_fraction=0.5).num_inject_steps == 3  # half up


def test_linear_guidance_schedule_switches_row_count(model, domains):
    source, target = domains.repeat(1, "cpu")
    guidance = GuidanceConfig(schedule=GuidanceScheduleKind.INTERVAL, start=2.0, t_low=0.5)
    settings = FFPESettings(num_steps=4, guidance=guidance)
    passes = ParallelPasses(model, source, target, settings, 1)
    with torch.no_grad():
        euler_ode(passes, torch.randn(2, 3, 16, 16), None, 4, callback=passes.advance)
    assert [rows for rows, _ in passes.calls] == [3, 3, 3, 2]  # t = 1, .75, .5 guided; .25 not


# --------------------------------------------------------------------------------------
# Images, errors, metrics
# --------------------------------------------------------------------------------------


def test_ff_to_ffpe_on_real_tiles_keeps_shape_and_is_deterministic(model):
    images = kather_uint8(2, 32)
    kwargs = {"num_steps": 4, "encoder": HashText(), "inject_blocks": [0, 1]}
    first = ff_to_ffpe(model, images, **kwargs)
    again = ff_to_ffpe(model, images.numpy(), batch_size=1, **kwargs)
    assert first.dtype == torch.uint8 and first.shape == images.shape
    assert torch.equal(first, again)
    gray = ff_to_ffpe(model, images[:, :1], **kwargs)  # (B, 1, H, W) -> replicated
    assert gray.shape == images.shape


def test_bad_inputs_raise_clear_errors(model, domains):
    settings = FFPESettings(num_steps=2)
    images = kather_uint8(1, 32)
    cases = [
        (images.float(), "must be uint8"),
        (images.permute(0, 2, 3, 1), "channels-last"),
        (images[:, :, :30, :30], "multiples of 4"),
        (torch.zeros(0, 3, 16, 16, dtype=torch.uint8), "no images"),
        ("missing.png", "does not exist"),
    ]
    for bad, message in cases:
        with pytest.raises(FFPEError, match=message):
            translate_images(model, bad, domains, settings)
    with pytest.raises(FFPEError, match="no text stream"):
        translate_images(tiny_model(text_dim=0), images, domains, settings)
    with pytest.raises(FFPEError, match="CLS token"):
        translate_images(tiny_model(cls_dim=4), images, domains, settings)
    wide = DomainConditions.encode(
        type("Wide", (), {"encode": lambda self, t: (torch.ones(2, 3, 5), torch.ones(2, 3))})(),
        SOURCE,
        TARGET,
    )
    with pytest.raises(FFPEError, match="5-wide"):
        translate_images(model, images, wide, settings)
    with pytest.raises(FFPEError, match="outside the model's blocks 0..1"):
        translate_images(model, images, domains, FFPESettings(num_steps=2, inject_blocks=(7,)))
    for kwargs, message in [
        ({"method": "sde"}, "deterministic"),
        ({"strength": 0.0}, "strength"),
        ({"inject_fraction": 1.5}, "inject_fraction"),
        ({"target_text": " "}, "non-empty"),
    ]:
        with pytest.raises(FFPEError, match=message):
            FFPESettings(**kwargs)
    assert parse_blocks("0-2,5") == (0, 1, 2, 5) and parse_blocks("all") is None
    assert parse_blocks("none") == ()
    with pytest.raises(FFPEError, match="0-5"):
        parse_blocks("3-1")


def test_hematoxylin_ssim_is_one_for_identical_images_and_lower_when_shuffled():
    images = kather_uint8(3, 64)
    assert np.allclose(hematoxylin_ssim(images, images), 1.0)
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(64 * 64, generator=generator)
    shuffled = images.flatten(2)[:, :, order].view_as(images)
    blurred = torch.from_numpy(
        np.stack(
            [
                np.asarray(Image.fromarray(a).resize((16, 16)).resize((64, 64)))
                for a in images.permute(0, 2, 3, 1).numpy()
            ]
        )
    ).permute(0, 3, 1, 2)
    low, mid = hematoxylin_ssim(images, shuffled), hematoxylin_ssim(images, blurred)
    assert (low < 0.3).all() and (mid > low).all() and (mid < 0.99).all()
    with pytest.raises(FFPEError, match="uint8"):
        hematoxylin_ssim(images.float(), images.float())
    with pytest.raises(FFPEError, match="differ in shape"):
        hematoxylin_ssim(images, images[..., :32])


# --------------------------------------------------------------------------------------
# Files, the whole-slide translator, fine-tuning, CLI
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model) -> Path:
    """A model folder with run metadata, as `finetune_domains` leaves it."""
    folder = tmp_path_factory.mktemp("run") / "model"
    model.save_pretrained(folder)
    extra = {
        "text_encoder": ENCODER_NAME,
        "latents": "identity",
        "class_names": ["ffpe_image", "fresh_frozen"],
        "captions": [TARGET, SOURCE],
    }
    (folder / "train_state.json").write_text(json.dumps({"extra": extra}))
    return folder


def test_translate_files_writes_png_and_sidecar_per_input(tmp_path, model):
    inputs = tmp_path / "ff"
    inputs.mkdir()
    first, second = kather_tiles(2)
    shutil.copy(first, inputs / "a.png")  # 150 x 150: padded to 152, cropped back
    Image.open(second).convert("L").save(inputs / "gray.png")
    translator = FFPETranslator(
        model, settings=FFPESettings(num_steps=3), encoder=HashText(), batch_size=2
    )
    result = translate_files(translator, inputs, tmp_path / "out", progress=False)
    assert [p.name for p in result.outputs] == ["a.png", "gray.png"]
    for path in result.outputs:
        assert Image.open(path).size == (150, 150)
        sidecar = json.loads(path.with_suffix(".json").read_text())
        assert sidecar["padded_to_hw"] == [152, 152]
        assert -1 <= sidecar["hematoxylin_ssim_input_output"] <= 1
    assert (
        "grayscale replicated to RGB"
        in json.loads((tmp_path / "out/gray.json").read_text())["conversions"]
    )
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    assert summary["num_images"] == 2 and summary["settings"]["num_steps"] == 3


def test_translate_files_checks_every_input_before_writing(tmp_path, model):
    inputs = tmp_path / "ff"
    inputs.mkdir()
    shutil.copy(kather_tiles(1)[0], inputs / "good.png")
    (inputs / "broken.png").write_bytes(b"not a png")
    translator = FFPETranslator(model, settings=FFPESettings(num_steps=2), encoder=HashText())
    with pytest.raises(FFPEError, match="broken.png"):
        translate_files(translator, inputs, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(FFPEError, match="larger than 100 px"):
        translate_files(translator, inputs / "good.png", tmp_path / "out", max_side=100)


def test_wsi_translator_follows_the_protocol(checkpoint):
    from mupad.applications.wsi import TranslatorOptions, build_translator

    options = TranslatorOptions(
        device="cpu", batch_size=2, extra={"steps": "2", "inject_blocks": "0", "guidance": "1.0"}
    )
    translator = build_translator("ff2ffpe", checkpoint, options)
    assert (translator.tile_size, translator.output_channels) == (16, 3)
    assert translator.settings.source_text == SOURCE and translator.settings.inject_blocks == (0,)
    tiles = kather_uint8(3, 16).permute(0, 2, 3, 1).numpy()
    out = translator(tiles)
    assert isinstance(out, np.ndarray) and out.shape == tiles.shape and out.dtype == np.uint8
    with pytest.raises(FFPEError, match="unknown ff2ffpe option"):
        build_translator("ff2ffpe", checkpoint, TranslatorOptions(extra={"stepz": "2"}))
    with pytest.raises(FFPEError, match=r"\(B, S, S, 3\)"):
        translator(tiles[..., 0])


def test_finetune_domains_trains_resumes_and_warm_starts(tmp_path):
    ff, ffpe = tmp_path / "ff", tmp_path / "ffpe"
    for folder, tiles in ((ff, kather_tiles(2)), (ffpe, kather_tiles(4)[2:])):
        folder.mkdir()
        for tile in tiles:
            shutil.copy(tile, folder / tile.name)
    config = TrainConfig(
        steps=2, batch_size=2, precision=Precision.FP32, checkpoint_every=2, ema_decay=0.5
    )
    run = finetune_domains(
        ff, ffpe, tmp_path / "run", train_config=config, preset="tiny", crop=32,
        text_encoder=ENCODER_NAME, progress=False,
    )  # fmt: skip
    assert run.result.step == 2 and run.bank.captions == (TARGET, SOURCE)
    state = json.loads((run.result.checkpoint / "train_state.json").read_text())
    assert state["extra"]["class_names"] == ["ffpe_image", "fresh_frozen"]
    translator = FFPETranslator.from_pretrained(
        tmp_path / "run", settings=None, batch_size=1
    )  # texts, encoder and codec from the run
    assert translator.settings.target_text == TARGET
    again = finetune_domains(
        ff, ffpe, tmp_path / "run", train_config=config, preset="tiny", crop=32,
        text_encoder=ENCODER_NAME, progress=False,
    )  # fmt: skip
    assert again.result.resumed_from == 2  # the same command resumes (here: nothing left)

    # Warm start: with lr = 0 one step leaves the weights exactly at the initial ones.
    frozen = dataclasses.replace(config, steps=1, learning_rate=0.0, checkpoint_every=1)
    warm = finetune_domains(
        ff, ffpe, tmp_path / "warm", train_config=frozen, init_from=tmp_path / "run",
        crop=32, progress=False,
    )  # fmt: skip
    start = SiT.from_pretrained(run.result.checkpoint / "ema").state_dict()  # what it samples
    after = SiT.from_pretrained(warm.result.checkpoint).state_dict()
    assert all(torch.equal(start[k], after[k]) for k in start)
    state = json.loads((warm.result.checkpoint / "train_state.json").read_text())
    assert state["extra"]["init_from"] == str(tmp_path / "run")
    assert state["extra"]["text_encoder"] == ENCODER_NAME  # taken from the pretrained run
    with pytest.raises(FFPEError, match="other tile folders"):
        domain_layout(tmp_path / "run", ffpe, ff)
    with pytest.raises(FFPEError, match="must differ"):
        domain_layout(tmp_path / "other", ff, ff)
    with pytest.raises(FFPEError, match="does not exist"):
        domain_layout(tmp_path / "other", tmp_path / "nope", ff)


def test_cli_translate_and_errors(tmp_path, checkpoint):
    runner = CliRunner()
    tile = tmp_path / "tile.png"
    Image.fromarray(kather_uint8(1, 24)[0].permute(1, 2, 0).numpy()).save(tile)
    args = ["translate", "--checkpoint", str(checkpoint), "--input", str(tile), "--steps", "2"]
    result = runner.invoke(
        ffpe_app, [*args, "--out", str(tmp_path / "a"), "--check-reconstruction", "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    sidecar = json.loads((tmp_path / "a/tile.json").read_text())
    assert sidecar["settings"]["inject_fraction"] == 0.5 and sidecar["weights_sha256"]
    assert "hematoxylin_ssim_input_reconstruction" in sidecar
    result = runner.invoke(
        ffpe_app, [*args, "--out", str(tmp_path / "b"), "--no-injection", "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "b/tile.json").read_text())["settings"]["inject_fraction"] == 0
    result = runner.invoke(ffpe_app, [*args, "--out", str(tmp_path / "c"), "--inject-blocks", "9"])
    assert result.exit_code == 2 and "outside the model's blocks" in result.output
    result = runner.invoke(
        ffpe_app, ["finetune", "--ff", str(tmp_path / "x"), "--ffpe", str(tmp_path), "--out",
                   str(tmp_path / "r"), "--device", "cpu"],
    )  # fmt: skip
    assert result.exit_code == 2 and "does not exist" in result.output
