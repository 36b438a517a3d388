"""Pathway-score tokens in the network: PathwayTokenizer, ModelConfig.rna_pathways, SiT wiring."""

import pytest
import torch

from mupad.conditions import Conditions, ConditionStream
from mupad.config import (
    ConfigError,
    CrossAttentionKind,
    ModelConfig,
    from_dict,
    load_json,
    save_json,
    to_dict,
)
from mupad.models import ModelInputError, SiT
from mupad.models.pathway_tokens import PathwayTokenizer

P = 7


def config(**overrides) -> ModelConfig:
    fields = {
        "in_channels": 3,
        "patch_size": 2,
        "hidden_size": 32,
        "depth": 2,
        "num_heads": 2,
        "text_dim": 8,
        "rna_dim": 16,
        "rna_pathways": P,
        "sample_size": 8,
    }
    return ModelConfig(**{**fields, **overrides})


def trained_like(model: SiT) -> SiT:
    """Give the zero-initialised output layers weights, so conditions change the output."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if torch.count_nonzero(parameter) == 0:
                parameter.normal_(std=0.05)
    return model.eval()


def test_tokenizer_shapes_and_identity():
    tokenizer = PathwayTokenizer(P, 16)
    scores = torch.randn(3, P, 1)
    tokens = tokenizer(scores)
    assert tokens.shape == (3, P, 16)
    same = tokenizer(torch.zeros(1, P, 1))[0]  # equal scores: tokens differ only by identity
    assert torch.allclose(same - tokenizer.identity, (same - tokenizer.identity)[0].expand(P, -1))
    assert not torch.allclose(same[0], same[1])
    with pytest.raises(ModelInputError, match=r"must be \(batch, 7, 1\)"):
        tokenizer(torch.zeros(3, P + 1, 1))
    tokens.sum().backward()
    assert tokenizer.identity.grad is not None and tokenizer.value_in.weight.grad is not None


def test_config_validation_and_json_round_trip(tmp_path):
    cfg = config()
    assert cfg.condition_dims["rna"] == 16 and cfg.condition_input_dims["rna"] == 1
    assert from_dict(ModelConfig, to_dict(cfg)) == cfg
    save_json(cfg, tmp_path / "c.json")
    assert load_json(ModelConfig, tmp_path / "c.json") == cfg
    with pytest.raises(ConfigError, match="rna_pathways=7 needs rna_dim > 0"):
        config(rna_dim=0)
    with pytest.raises(ConfigError, match="rna_pathways must be >= 0"):
        config(rna_pathways=-1)
    legacy = to_dict(config(rna_pathways=0))
    del legacy["rna_pathways"]  # configs written before the field existed still load
    assert from_dict(ModelConfig, legacy).rna_pathways == 0


@pytest.mark.parametrize("kind", [CrossAttentionKind.DECOUPLED, CrossAttentionKind.SHARED])
def test_model_takes_pathway_scores_and_save_load_round_trips(tmp_path, kind):
    model = trained_like(SiT(config(cross_attention=kind)))
    assert model.pathway_tokenizer is not None
    x = torch.randn(2, 3, 8, 8)
    cond = Conditions.build(rna=torch.randn(2, P, 1))
    out = model(x, 0.5, cond).velocity
    assert out.shape == x.shape
    assert not torch.allclose(out, model(x, 0.5).velocity)  # the scores matter
    folder = model.save_pretrained(tmp_path / "model")
    loaded = SiT.from_pretrained(folder)
    assert loaded.config == model.config and loaded.config.rna_pathways == P
    assert torch.equal(loaded(x, 0.5, cond).velocity, out)


def test_pathway_identity_matters():
    model = trained_like(SiT(config()))
    x = torch.randn(1, 3, 8, 8)
    scores = torch.zeros(1, P, 1)
    scores[0, 0] = 3.0
    swapped = scores.flip(1)  # the same values on other pathways
    a = model(x, 0.5, Conditions.build(rna=scores)).velocity
    b = model(x, 0.5, Conditions.build(rna=swapped)).velocity
    assert not torch.allclose(a, b)


def test_zero_presence_is_exactly_the_model_without_the_stream():
    model = trained_like(SiT(config()))
    x = torch.randn(3, 3, 8, 8)
    text = ConditionStream.from_tokens(torch.randn(3, 4, 8))
    scores = torch.randn(3, P, 1)
    scores[1] = float("nan")  # garbage in an absent sample must not leak
    rna = ConditionStream(
        scores, torch.ones(3, P, dtype=torch.bool), torch.tensor([True, False, True])
    )
    with_rna = model(
        x,
        0.3,
        Conditions({**Conditions.build(text=text).streams, **Conditions.build(rna=rna).streams}),
    ).velocity
    without = model(x, 0.3, Conditions.build(text=text)).velocity
    assert torch.isfinite(with_rna).all()
    assert torch.equal(with_rna[1], without[1])
    assert not torch.allclose(with_rna[0], without[0])
    all_absent = model(
        x, 0.3, Conditions.build(text=text, rna=rna.with_presence(torch.zeros(3, dtype=torch.bool)))
    ).velocity
    assert torch.equal(all_absent, without)


def test_padded_pathways_and_gradients():
    model = trained_like(SiT(config())).train()
    x = torch.randn(2, 3, 8, 8)
    mask = torch.ones(2, P, dtype=torch.bool)
    mask[0, 3:] = False
    scores = torch.randn(2, P, 1)
    padded = scores.clone()
    padded[0, 3:] = float("nan")  # padding values never matter
    a = model(x, 0.5, Conditions.build(rna=ConditionStream.from_tokens(scores, mask))).velocity
    b = model(x, 0.5, Conditions.build(rna=ConditionStream.from_tokens(padded, mask))).velocity
    assert torch.equal(a, b)
    b.square().mean().backward()
    grads = [p.grad for p in model.pathway_tokenizer.parameters()]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_wrong_rna_shapes_are_refused():
    model = SiT(config())
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(
        ModelInputError, match=r"expects \(batch, rna_pathways=7, 1\) pathway scores"
    ):
        model(x, 0.5, Conditions.build(rna=torch.randn(2, P, 16)))
    with pytest.raises(
        ModelInputError, match="carry 5 pathway tokens but the model was built for rna_pathways=7"
    ):
        model(x, 0.5, Conditions.build(rna=torch.randn(2, 5, 1)))
    plain = SiT(config(rna_pathways=0))
    assert plain.pathway_tokenizer is None
    assert plain(x, 0.5, Conditions.build(rna=torch.randn(2, 5, 16))).velocity.shape == x.shape
