"""The network: shapes, adaLN-Zero init, decoupled/shared cross-attention semantics,
the CLS token, checkpoints and input validation. Tiny configs on CPU, fast."""

from __future__ import annotations

import json

import pytest
import torch

from mupad.conditions import ConditionError, Conditions, ConditionStream, Modality
from mupad.config import CrossAttentionKind, ModelConfig, model_preset, to_dict
from mupad.models import CheckpointError, ModelInputError, SiT, SiTOutput, build_model
from mupad.models.embeddings import PositionEmbedding2D, sincos_2d_position_embedding

TEXT_DIM, RNA_DIM, IMAGE_DIM, CLS_DIM = 16, 8, 12, 10


def tiny_config(**overrides) -> ModelConfig:
    fields = {"text_dim": TEXT_DIM, "rna_dim": RNA_DIM, "image_dim": IMAGE_DIM}
    fields.update(overrides)
    return model_preset("tiny", **fields)


def perturbed(config: ModelConfig, seed: int = 0) -> SiT:
    """A model whose zero-initialised layers are random, so every branch matters."""
    model = SiT(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model


def make_inputs(batch: int = 2, height: int = 8, width: int = 12, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, height, width, generator=generator)
    t = torch.rand(batch, generator=generator)
    text = torch.randn(batch, 5, TEXT_DIM, generator=generator)
    rna = torch.randn(batch, 1, RNA_DIM, generator=generator)
    image = torch.randn(batch, 3, IMAGE_DIM, generator=generator)
    return x, t, text, rna, image


def stream(tokens, mask=None, present=None) -> ConditionStream:
    return ConditionStream.from_tokens(tokens, mask, present)


# --------------------------------------------------------------------------------------
# Shapes and initialisation
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("preset", "height", "width"), [("tiny", 8, 12), ("S/8", 16, 24), ("S/4", 8, 16)]
)
def test_shapes_for_presets(preset, height, width):
    model = build_model(model_preset(preset, text_dim=TEXT_DIM))
    x = torch.randn(2, 4, height, width)
    cond = Conditions.build(text=torch.randn(2, 3, TEXT_DIM))
    with torch.no_grad():
        out = model(x, torch.tensor([0.2, 0.9]), cond)
    assert isinstance(out, SiTOutput)
    assert out.velocity.shape == (2, 4, height, width)
    assert out.cls_velocity is None and out.hidden is None


def test_rectangular_input_and_out_channels():
    model = perturbed(tiny_config(out_channels=3, patch_size=4))
    x = torch.randn(3, 4, 8, 20)
    out = model(x, 0.5)
    assert out.velocity.shape == (3, 3, 8, 20)
    assert torch.isfinite(out.velocity).all()


def test_zero_init_outputs_exactly_zero():
    model = SiT(tiny_config(cls_dim=CLS_DIM))
    x, t, text, rna, image = make_inputs()
    cond = Conditions.build(text=text, rna=rna, image=image)
    out = model(x, t, cond, cls_token=torch.randn(2, CLS_DIM))
    assert torch.equal(out.velocity, torch.zeros_like(out.velocity))
    assert torch.equal(out.cls_velocity, torch.zeros_like(out.cls_velocity))


def test_scalar_and_vector_time_agree_and_velocity_callable():
    model = perturbed(tiny_config())
    x, _, text, _, _ = make_inputs()
    cond = Conditions.build(text=text)
    a = model(x, 0.3, cond).velocity
    b = model(x, torch.tensor(0.3), cond).velocity
    c = model.velocity(x, torch.full((2,), 0.3), cond)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_bf16_autocast_keeps_input_dtype():
    model = perturbed(tiny_config())
    x, t, text, _, _ = make_inputs()
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    cond = Conditions.build(text=stream(text, mask, torch.tensor([True, False])))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x.to(memory_format=torch.channels_last), t, cond)
    assert out.velocity.dtype == torch.float32
    assert torch.isfinite(out.velocity).all()
    reference = model(x, t, cond).velocity
    relative_error = (out.velocity - reference).norm() / reference.norm()
    assert relative_error < 0.05


def test_position_embedding_is_cached_per_grid():
    pos = PositionEmbedding2D(64)
    a = pos(4, 6, torch.device("cpu"), torch.float32)
    assert a.shape == (1, 24, 64)
    assert pos(4, 6, torch.device("cpu"), torch.float32) is a  # cached
    assert pos(6, 4, torch.device("cpu"), torch.float32) is not a
    table = sincos_2d_position_embedding(64, 4, 6)
    # Row features repeat along a row, column features along a column.
    assert torch.equal(table[0, :32], table[5, :32])
    assert torch.equal(table[0, 32:], table[6, 32:])


# --------------------------------------------------------------------------------------
# Decoupled cross-attention
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dca_model() -> SiT:
    return perturbed(tiny_config())


def test_dca_conditions_change_the_output(dca_model):
    x, t, text, _, _ = make_inputs()
    with torch.no_grad():
        plain = dca_model(x, t).velocity
        conditioned = dca_model(x, t, Conditions.build(text=text)).velocity
    assert not torch.allclose(plain, conditioned)


def test_dca_zero_gate_equals_model_without_stream(dca_model):
    x, t, text, rna, image = make_inputs()
    gated = Conditions.build(
        text=stream(text, present=torch.tensor([False, True])), rna=rna, image=image
    )
    without = Conditions.build(rna=rna, image=image)
    with torch.no_grad():
        out_gated = dca_model(x, t, gated).velocity
        out_without = dca_model(x, t, without).velocity
    assert torch.equal(out_gated[0], out_without[0])  # exact: the gate is a torch.where
    assert not torch.allclose(out_gated[1], out_without[1])


def test_dca_stream_absent_everywhere_equals_no_stream(dca_model):
    x, t, text, rna, _ = make_inputs()
    full = Conditions.build(text=text, rna=rna)
    with torch.no_grad():
        dropped = dca_model(x, t, full.without([Modality.TEXT])).velocity
        only_rna = dca_model(x, t, Conditions.build(rna=rna)).velocity
        none_present = dca_model(x, t, full.without([Modality.TEXT, Modality.RNA])).velocity
        unconditional = dca_model(x, t, None).velocity
    assert torch.equal(dropped, only_rna)
    assert torch.equal(none_present, unconditional)


def test_dca_absent_sample_with_nan_tokens_is_exact_and_finite(dca_model):
    x, t, text, rna, _ = make_inputs()
    text = text.clone()
    text[0] = float("nan")  # garbage in an absent sample must not leak anywhere
    cond = Conditions.build(text=stream(text, present=torch.tensor([False, True])), rna=rna)
    model = dca_model
    out = model(x, t, cond).velocity
    ref = model(x, t, Conditions.build(rna=rna)).velocity
    assert torch.equal(out[0], ref[0].detach())
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.zero_grad(set_to_none=True)


def test_dca_masks_act_per_sample(dca_model):
    x, t, text, rna, _ = make_inputs()
    other = text.clone()
    other[1] = torch.randn_like(other[1])
    with torch.no_grad():
        a = dca_model(x, t, Conditions.build(text=text, rna=rna)).velocity
        b = dca_model(x, t, Conditions.build(text=other, rna=rna)).velocity
    assert torch.equal(a[0], b[0])
    assert not torch.allclose(a[1], b[1])


def test_dca_padding_tokens_change_nothing(dca_model):
    x, t, text, _, _ = make_inputs()
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    garbage = torch.full((2, 3, TEXT_DIM), 1e4)
    garbage[0, 1] = float("nan")
    padded = torch.cat([text, garbage], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(2, 3, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        a = dca_model(x, t, Conditions.build(text=stream(text, mask))).velocity
        b = dca_model(x, t, Conditions.build(text=stream(padded, padded_mask))).velocity
        # Sample 1 with its padding cut off entirely.
        short = dca_model(x[1:], t[1:], Conditions.build(text=text[1:, :2])).velocity
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a[1:], short, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------
# Shared cross-attention (ablation)
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_model() -> SiT:
    return perturbed(tiny_config(cross_attention=CrossAttentionKind.SHARED), seed=3)


def test_shared_nothing_present_is_exactly_unconditional(shared_model):
    x, t, text, rna, image = make_inputs()
    cond = Conditions.build(
        text=stream(text, present=torch.tensor([False, True])),
        rna=stream(rna, present=torch.tensor([False, True])),
        image=stream(image, present=torch.tensor([False, False])),
    )
    with torch.no_grad():
        out = shared_model(x, t, cond).velocity
        plain = shared_model(x, t).velocity
        everything_absent = shared_model(
            x, t, cond.without([Modality.TEXT, Modality.RNA, Modality.IMAGE])
        ).velocity
    assert torch.equal(out[0], plain[0])
    assert not torch.allclose(out[1], plain[1])
    assert torch.equal(everything_absent, plain)


def test_shared_absent_modality_matches_model_without_it(shared_model):
    x, t, text, rna, _ = make_inputs()
    gated = Conditions.build(text=stream(text, present=torch.tensor([False, True])), rna=rna)
    with torch.no_grad():
        a = shared_model(x, t, gated).velocity
        b = shared_model(x, t, Conditions.build(rna=rna)).velocity
        # Absent in every sample: the stream is dropped, bit for bit.
        c = shared_model(x, t, Conditions.build(text=text, rna=rna).without([Modality.TEXT]))
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a[1], b[1])
    assert torch.equal(c.velocity, b)


def test_shared_padding_and_per_sample_masks(shared_model):
    x, t, text, rna, _ = make_inputs()
    padded = torch.cat([text, torch.full((2, 2, TEXT_DIM), float("nan"))], dim=1)
    mask = torch.cat([torch.ones(2, 5, dtype=torch.bool), torch.zeros(2, 2, dtype=torch.bool)], 1)
    other = text.clone()
    other[1] += 1.0
    with torch.no_grad():
        a = shared_model(x, t, Conditions.build(text=text, rna=rna)).velocity
        b = shared_model(x, t, Conditions.build(text=stream(padded, mask), rna=rna)).velocity
        c = shared_model(x, t, Conditions.build(text=other, rna=rna)).velocity
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.equal(a[0], c[0])
    assert not torch.allclose(a[1], c[1])


def test_no_cross_attention_kind_has_no_streams():
    model = SiT(tiny_config(cross_attention="none"))
    assert model.config.condition_dims == {}
    assert all(block.cross is None for block in model.blocks)
    x, t, text, _, _ = make_inputs()
    with pytest.raises(ModelInputError, match="no stream for it"):
        model(x, t, Conditions.build(text=text))


# --------------------------------------------------------------------------------------
# CLS token and intermediate features
# --------------------------------------------------------------------------------------


def test_cls_token_and_hidden_shapes():
    config = tiny_config(cls_dim=CLS_DIM)
    model = perturbed(config)
    x, t, text, _, _ = make_inputs(height=8, width=12)
    out = model(
        x, t, Conditions.build(text=text), cls_token=torch.randn(2, CLS_DIM), hidden_from_block=1
    )
    assert out.velocity.shape == (2, 4, 8, 12)
    assert out.cls_velocity.shape == (2, CLS_DIM)
    assert out.hidden.shape == (2, (8 // 2) * (12 // 2), config.hidden_size)
    # The CLS state takes part in self-attention: changing it changes the image velocity.
    other = model(x, t, Conditions.build(text=text), cls_token=torch.randn(2, CLS_DIM))
    assert not torch.allclose(out.velocity, other.velocity)
    last = model(x, t, cls_token=torch.randn(2, CLS_DIM), hidden_from_block=config.depth)
    assert last.hidden.shape == out.hidden.shape


# --------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------


def test_save_and_load_round_trip_is_bit_exact(tmp_path):
    model = perturbed(tiny_config(cls_dim=CLS_DIM))
    folder = model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    loaded = SiT.from_pretrained(folder)
    assert loaded.config == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    x, t, text, _, _ = make_inputs()
    cls_token = torch.randn(2, CLS_DIM)
    cond = Conditions.build(text=text)
    with torch.no_grad():
        assert torch.equal(
            model(x, t, cond, cls_token=cls_token).velocity,
            loaded.eval()(x, t, cond, cls_token=cls_token).velocity,
        )
    # Saving again over the same folder replaces it atomically, leaving no temporaries.
    model.save_pretrained(folder)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no model folder"):
        SiT.from_pretrained(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="lacks config.json, model.safetensors"):
        SiT.from_pretrained(empty)

    folder = SiT(tiny_config()).save_pretrained(tmp_path / "a")
    other = to_dict(tiny_config(text_dim=TEXT_DIM + 1, cls_dim=4))
    (folder / "config.json").write_text(json.dumps(other))
    with pytest.raises(CheckpointError, match="another model config") as info:
        SiT.from_pretrained(folder)
    message = str(info.value)
    assert "kv.text.weight" in message and "cls_head.weight" in message

    (folder / "config.json").write_text(json.dumps({"hidden_sise": 3}))
    with pytest.raises(CheckpointError, match="not a valid ModelConfig"):
        SiT.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(to_dict(tiny_config())))
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read"):
        SiT.from_pretrained(folder)


# --------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checked_model() -> SiT:
    return SiT(tiny_config(cls_dim=CLS_DIM))


def _call(model, x=None, t=None, cond=None, cls_token="default", **kwargs):
    x = torch.randn(2, 4, 8, 8) if x is None else x
    t = torch.rand(2) if t is None else t
    if isinstance(cls_token, str):
        cls_token = torch.randn(2, CLS_DIM)
    return model(x, t, cond, cls_token=cls_token, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"x": torch.randn(4, 8, 8)}, "must be \\(batch, channels, height, width\\)"),
        ({"x": torch.randn(2, 3, 8, 8)}, "3 channels but the model expects in_channels=4"),
        ({"x": torch.randn(2, 4, 8, 7)}, "multiples of the patch size 2"),
        ({"x": torch.zeros(2, 4, 8, 8, dtype=torch.long)}, "x must be floating point"),
        ({"t": torch.tensor([10, 20])}, "integer step indices are not times"),
        ({"t": 1.5}, "must lie in \\[0, 1\\]"),
        ({"t": torch.tensor([0.5, -0.1])}, "must lie in \\[0, 1\\]"),
        ({"t": torch.tensor([0.5, float("nan")])}, "must lie in \\[0, 1\\]"),
        ({"t": torch.rand(3)}, "scalar or have shape \\(batch,\\)"),
        ({"cls_token": None}, "pass cls_token of shape \\(batch, 10\\)"),
        ({"cls_token": torch.randn(2, 7)}, "cls_token must have shape"),
        ({"hidden_from_block": 0}, "hidden_from_block must be in \\[1, depth=2\\]"),
        ({"hidden_from_block": 3}, "hidden_from_block must be in \\[1, depth=2\\]"),
    ],
)
def test_bad_inputs_raise_model_input_error(checked_model, kwargs, match):
    with pytest.raises(ModelInputError, match=match):
        _call(checked_model, **kwargs)


def test_cls_token_given_to_model_without_one():
    with pytest.raises(ModelInputError, match="no CLS token"):
        SiT(tiny_config())(torch.randn(2, 4, 8, 8), 0.5, cls_token=torch.randn(2, 3))


def test_velocity_refuses_cls_models(checked_model):
    with pytest.raises(ModelInputError, match="cls_token"):
        checked_model.velocity(torch.randn(2, 4, 8, 8), 0.5)


def test_bad_conditions_raise(checked_model):
    model = SiT(tiny_config(image_dim=0))
    x = torch.randn(2, 4, 8, 8)
    with pytest.raises(ModelInputError, match="'image' condition but the model has no stream"):
        model(x, 0.5, Conditions.build(image=torch.randn(2, 3, IMAGE_DIM)))
    with pytest.raises(ModelInputError, match="text tokens are 7 wide but the model expects"):
        model(x, 0.5, Conditions.build(text=torch.randn(2, 3, 7)))
    bad = torch.randn(2, 3, TEXT_DIM)
    bad[1, 0] = float("inf")
    with pytest.raises(ConditionError, match="NaN or Inf"):
        model(x, 0.5, Conditions.build(text=bad))
    with pytest.raises(ConditionError, match="batch size 3 but the images have 2"):
        model(x, 0.5, Conditions.build(text=torch.randn(3, 2, TEXT_DIM)))
    with pytest.raises(ModelInputError, match="must be a mupad.conditions.Conditions"):
        model(x, 0.5, {"text": torch.randn(2, 3, TEXT_DIM)})
