"""`expression_to_scores`: the one-call pipeline's options and their order of operations."""

import numpy as np
import pandas as pd
import pytest

from mupad.omics import pipeline
from mupad.omics.errors import GeneIdError
from mupad.omics.genesets import GeneSets
from mupad.omics.normalize import normalise_counts
from mupad.omics.scoring import score_pathways

GENES = [f"GENE{i}" for i in range(60)]
SETS = GeneSets({"first": GENES[:12], "second": GENES[20:35], "third": GENES[40:52]})


@pytest.fixture()
def counts() -> pd.DataFrame:
    rng = np.random.default_rng(11)
    values = rng.poisson(20, size=(5, 60)).astype(float)
    return pd.DataFrame(values, index=[f"s{i}" for i in range(5)], columns=GENES)


def test_pipeline_is_normalise_then_filter_then_score(counts):
    with_mt = counts.assign(**{"MT-CO1": 5000.0})
    got = pipeline.expression_to_scores(with_mt, SETS, orientation="samples_x_genes")
    # TPM/CPM over every gene (MT-CO1 included), then drop it, then score
    expected = score_pathways(normalise_counts(with_mt).drop(columns="MT-CO1"), SETS)
    pd.testing.assert_frame_equal(got, expected, check_names=False)


def test_already_normalised_values_are_scored_as_given(counts):
    logged = np.log1p(counts)
    got = pipeline.expression_to_scores(
        logged, SETS, normalise=False, orientation="samples_x_genes"
    )
    pd.testing.assert_frame_equal(got, score_pathways(logged, SETS), check_names=False)
    with pytest.raises(GeneIdError, match="only used with normalise=True"):
        pipeline.expression_to_scores(
            logged,
            SETS,
            pd.Series(1000.0, index=GENES),
            normalise=False,
            orientation="samples_x_genes",
        )


def test_ensembl_ids_need_a_map_and_collisions_sum_before_log(counts):
    ids = [f"ENSG{i:011d}" for i in range(61)]
    doubled = counts.assign(EXTRA=counts["GENE0"]).set_axis(ids, axis=1)
    mapping = dict(zip(ids, [*GENES, "GENE0"]))  # two Ensembl ids -> GENE0
    with pytest.raises(GeneIdError, match="pass a mapping table"):
        pipeline.expression_to_scores(doubled, SETS, orientation="samples_x_genes")
    got = pipeline.expression_to_scores(
        doubled, SETS, gene_map=mapping, orientation="samples_x_genes"
    )
    summed = counts.assign(GENE0=2 * counts["GENE0"])
    cpm = summed / summed.sum(axis=1).to_numpy()[:, None] * 1e6
    pd.testing.assert_frame_equal(got, score_pathways(np.log1p(cpm), SETS), check_names=False)
    reverse = {symbol: ensembl for ensembl, symbol in list(mapping.items())[:60]}
    assert pipeline.expression_to_scores(
        doubled, SETS, gene_map=reverse, orientation="samples_x_genes"
    ).shape == (5, 3)
