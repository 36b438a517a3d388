"""The "pathways" RNA condition encoder: tokens (B, P, 1), standardisation, presence."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from mupad.conditioning import EncoderError, encoder_names, get_encoder
from mupad.conditioning.rna import RNAEncoder, ScoreStandardiser, default_pathways
from mupad.conditions import Modality
from mupad.omics.genesets import default_gene_sets


@pytest.fixture(scope="module")
def gene_sets():
    sets = default_gene_sets()
    return sets.subset([n for n, s in sets.sizes.items() if 30 <= s <= 60][:12])


@pytest.fixture(scope="module")
def counts(gene_sets) -> pd.DataFrame:
    rng = np.random.default_rng(5)
    genes = sorted(gene_sets.genes) + [f"OTHER{i}" for i in range(200)]
    values = rng.negative_binomial(4, 0.1, size=(6, len(genes))).astype(float)
    return pd.DataFrame(values, index=[f"s{i}" for i in range(6)], columns=genes)


def test_registered_and_shaped(gene_sets, counts):
    assert "pathways" in encoder_names()
    encoder = get_encoder("pathways", gene_sets=gene_sets)
    assert isinstance(encoder, RNAEncoder) and encoder.modality is Modality.RNA and encoder.dim == 1
    assert encoder.num_pathways == len(default_pathways(gene_sets))
    tokens, mask = encoder.encode(counts)
    assert tokens.shape == (6, encoder.num_pathways, 1) and tokens.dtype == torch.float32
    assert mask.shape == (6, encoder.num_pathways) and bool(mask.all())


def test_fit_standardises_and_round_trips_through_json(tmp_path, gene_sets, counts):
    encoder = RNAEncoder(gene_sets=gene_sets)
    standardiser = encoder.fit(counts)
    tokens, _ = encoder.encode(counts)
    np.testing.assert_allclose(tokens[..., 0].mean(0), 0.0, atol=1e-6)
    np.testing.assert_allclose(tokens[..., 0].std(0, unbiased=False), 1.0, atol=1e-5)
    path = standardiser.save(tmp_path / "rna_stats.json")
    data = json.loads(path.read_text())
    assert data["method"] == "ssgsea" and data["pathways"] == list(encoder.pathways)
    assert ScoreStandardiser.load(path) == standardiser
    again = get_encoder("pathways", weights=path, gene_sets=gene_sets)
    assert torch.equal(again.encode(counts)[0], tokens)
    with pytest.raises(EncoderError, match="standardiser was fitted on 'ssgsea'"):
        RNAEncoder(path, gene_sets=gene_sets, method="zscore")
    with pytest.raises(EncoderError, match="no pathway standardiser"):
        RNAEncoder(tmp_path / "missing.json")


def test_precomputed_scores_arrays_and_expression_agree(gene_sets, counts):
    encoder = RNAEncoder(gene_sets=gene_sets)
    encoder.fit(counts)
    raw = encoder.scores(counts)
    from_expression = encoder.encode(counts)[0]
    assert torch.allclose(encoder.encode(raw)[0], from_expression)
    assert torch.allclose(encoder.encode(raw[list(reversed(raw.columns))])[0], from_expression)
    assert torch.allclose(encoder.encode(raw.to_numpy())[0], from_expression)
    assert torch.allclose(encoder.encode(torch.tensor(raw.to_numpy()))[0], from_expression)
    with pytest.raises(EncoderError, match=r"must be \(batch, \d+\)"):
        encoder.encode(np.zeros((2, 3)))


def test_presence_and_unscorable_pathways(gene_sets, counts):
    encoder = RNAEncoder(gene_sets=gene_sets)
    encoder.fit(counts)
    placeholder = counts.copy()
    placeholder.iloc[1] = np.nan  # absent sample: never scored
    stream = encoder.encode_stream(placeholder, present=[True, False, True, True, True, True])
    assert stream.present.tolist() == [True, False, True, True, True, True]
    assert torch.equal(stream.tokens[1], torch.zeros_like(stream.tokens[1]))
    assert torch.allclose(stream.tokens[0], encoder.encode(counts.iloc[[0]])[0][0])
    first = encoder.pathways[0]
    unmeasured = counts.drop(columns=[g for g in gene_sets[first] if g in counts.columns])
    tokens, mask = encoder.encode(unmeasured)
    assert not mask[:, 0].any() and mask[:, 1:].all() and torch.all(tokens[:, 0] == 0)


def test_bad_inputs(gene_sets, counts):
    encoder = RNAEncoder(gene_sets=gene_sets)
    with pytest.raises(EncoderError, match="cannot encode a dict"):
        encoder.encode({"a": 1})
    bad = counts.copy()
    bad.iloc[0, 0] = -1
    with pytest.raises(EncoderError, match="negative value"):
        encoder.encode(bad)
    with pytest.raises(EncoderError, match="at least 2 samples"):
        ScoreStandardiser.fit(encoder.scores(counts.iloc[:1]))
    with pytest.raises(EncoderError, match="not in the gene sets"):
        RNAEncoder(gene_sets=gene_sets, pathways=["nope"]).encode(counts)


def test_encoder_tokens_drive_a_model(gene_sets, counts):
    from mupad.conditions import Conditions
    from mupad.config import ModelConfig
    from mupad.models import SiT

    encoder = RNAEncoder(gene_sets=gene_sets)
    encoder.fit(counts)
    stream = encoder.encode_stream(counts.iloc[:2])
    model = SiT(
        ModelConfig(
            in_channels=3,
            hidden_size=16,
            depth=1,
            num_heads=2,
            rna_dim=16,
            rna_pathways=encoder.num_pathways,
            sample_size=4,
        )
    )
    out = model(torch.randn(2, 3, 4, 4), 0.5, Conditions.build(rna=stream)).velocity
    assert out.shape == (2, 3, 4, 4)
