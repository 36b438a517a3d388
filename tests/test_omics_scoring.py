"""Pathway scores: ssGSEA against a step-by-step walk and against gseapy, z-scores, errors."""

import itertools
import logging

import numpy as np
import pandas as pd
import pytest

from mupad.omics.errors import ExpressionError, GeneSetError
from mupad.omics.genesets import GeneSets, default_gene_sets
from mupad.omics.scoring import (
    ScoringMethod,
    SsgseaNormalisation,
    average_ranks,
    match_gene_sets,
    score_pathways,
)


def walk_es(values: np.ndarray, members: set[int], order: np.ndarray | None = None) -> float:
    """ssGSEA by its definition: walk genes from the highest rank down, sum the running sum."""
    ranks = average_ranks(values[None, :])[0]
    if order is None:
        order = np.argsort(-values, kind="stable")
    hit = np.array([j in members for j in order])
    weights = ranks[order] ** 0.25
    p_hit = np.cumsum(hit * weights) / np.sum(hit * weights)
    p_miss = np.cumsum(~hit) / (len(values) - hit.sum())
    return float(np.sum(p_hit - p_miss))


@pytest.fixture(scope="module")
def real_sets() -> GeneSets:
    """Twenty-four real WikiPathways sets (bundled), sizes 10-80."""
    sets = default_gene_sets()
    names = [n for n, size in sets.sizes.items() if 10 <= size <= 80][:24]
    return sets.subset(names)


@pytest.fixture(scope="module")
def expression(real_sets) -> pd.DataFrame:
    """Tie-free log-normal expression: 10 samples x (set genes + 300 background genes)."""
    rng = np.random.default_rng(7)
    genes = sorted(real_sets.genes) + [f"BACKGROUND{i}" for i in range(300)]
    values = rng.lognormal(mean=1.0, sigma=1.0, size=(10, len(genes)))
    return pd.DataFrame(values, index=[f"sample{i}" for i in range(10)], columns=genes)


def test_closed_form_equals_the_walk(expression, real_sets):
    scores = score_pathways(expression, real_sets, normalisation="raw", min_size=1)
    column = {g: i for i, g in enumerate(expression.columns)}
    for sample in range(3):
        for name in scores.columns[:6]:
            members = {column[g] for g in real_sets[name]}
            expected = walk_es(expression.to_numpy()[sample], members)
            assert scores.iloc[sample][name] == pytest.approx(expected, abs=1e-9)


def test_ties_give_the_mean_over_tied_orders():
    values = np.array([5.0, 2.0, 2.0, 2.0, 9.0, 1.0, 7.0])
    members = {1, 4, 5}
    frame = pd.DataFrame([values], columns=[f"G{i}" for i in range(7)])
    sets = GeneSets({"S": [f"G{i}" for i in members]})
    score = score_pathways(frame, sets, normalisation="raw", min_size=1).iloc[0, 0]
    tied = [1, 2, 3]
    walks = []
    for perm in itertools.permutations(tied):
        order = [4, 6, 0, *perm, 5]  # descending values with one order of the tied genes
        walks.append(walk_es(values, members, np.array(order)))
    assert score == pytest.approx(np.mean(walks), abs=1e-12)
    assert np.ptp(walks) > 0  # the order of ties does matter for a single walk


def test_ssgsea_matches_gseapy(expression, real_sets):
    gseapy = pytest.importorskip(
        "gseapy", reason="the reference ssGSEA implementation (pip install gseapy) is not installed"
    )
    result = gseapy.ssgsea(
        data=expression.T, gene_sets={n: list(g) for n, g in real_sets.items()}, outdir=None,
        sample_norm_method="rank", weight=0.25, min_size=5, max_size=10_000,
        permutation_num=0, no_plot=True, threads=1, verbose=False,
    )  # fmt: skip
    table = result.res2d
    ours_raw = score_pathways(expression, real_sets, normalisation="raw", min_size=5)
    ours_nes = score_pathways(expression, real_sets, normalisation="range", min_size=5)
    for column, ours in (("ES", ours_raw), ("NES", ours_nes)):
        reference = table.pivot(index="Name", columns="Term", values=column).astype(float)
        reference = reference.loc[ours.index, list(ours.columns)]
        diff = np.abs(ours.to_numpy() - reference.to_numpy()).max()
        corr = np.corrcoef(ours.to_numpy().ravel(), reference.to_numpy().ravel())[0, 1]
        scale = np.abs(reference.to_numpy()).max()
        assert diff <= 1e-9 * scale, f"{column}: max abs diff {diff:.3g} (scale {scale:.3g})"
        assert corr > 0.999999


def test_normalisations_and_batch_independence(expression, real_sets):
    raw = score_pathways(expression, real_sets, normalisation="raw")
    universe = score_pathways(expression, real_sets)  # default
    spread = score_pathways(expression, real_sets, normalisation=SsgseaNormalisation.RANGE)
    np.testing.assert_allclose(universe, raw / expression.shape[1])
    np.testing.assert_allclose(spread, raw / (raw.to_numpy().max() - raw.to_numpy().min()))
    assert np.abs(universe.to_numpy()).max() <= 1.0
    alone = score_pathways(expression.iloc[[4]], real_sets)
    pd.testing.assert_frame_equal(alone, universe.iloc[[4]])  # per sample: no batch effect


def test_enriched_set_scores_high():
    rng = np.random.default_rng(0)
    genes = [f"G{i}" for i in range(200)]
    values = rng.normal(size=(2, 200))
    values[0, :20] += 5.0  # sample 0: the set's genes are the top genes
    sets = GeneSets({"up": genes[:20], "random": genes[100:120]})
    scores = score_pathways(pd.DataFrame(values, columns=genes), sets)
    assert scores.loc[0, "up"] > 0.5 and scores.loc[0, "up"] > scores.loc[1, "up"]
    assert abs(scores.loc[0, "random"]) < 0.3


def test_zscore_by_hand():
    values = np.array([[1.0, 2.0, 3.0, 0.0], [3.0, 2.0, 1.0, 0.0], [2.0, 5.0, 2.0, 0.0]])
    frame = pd.DataFrame(values, columns=["A", "B", "C", "D"])
    sets = GeneSets({"AB": ["A", "B"], "CD": ["C", "D"]})
    scores = score_pathways(frame, sets, "zscore", min_size=2)
    z = (values - values.mean(0)) / np.where(
        values.std(0, ddof=1) > 0, values.std(0, ddof=1), np.inf
    )
    np.testing.assert_allclose(scores["AB"], z[:, :2].mean(1))
    np.testing.assert_allclose(scores["CD"], z[:, 2:].mean(1))  # constant gene D counts as 0
    with pytest.raises(ExpressionError, match="at least 2 samples"):
        score_pathways(frame.iloc[:1], sets, ScoringMethod.ZSCORE, min_size=2)


def test_small_sets_are_left_out_with_a_warning(expression, real_sets, caplog):
    sets = GeneSets({**dict(real_sets), "tiny": [expression.columns[0], "NOT_MEASURED"]})
    with caplog.at_level(logging.WARNING):
        scores = score_pathways(expression, sets, min_size=2)
    assert "tiny" not in scores.columns and "1 of 25 gene sets left out" in caplog.text
    assert list(scores.columns) == list(real_sets.names)


def test_no_overlap_says_how_many_genes_matched(real_sets):
    sets = GeneSets({"p53": ["TP53", "MDM2", "CDKN1A", "BAX", "GADD45A"], "egfr": ["EGFR", "GRB2"]})
    frame = pd.DataFrame(np.ones((2, 4)), columns=["TP53", "X1", "X2", "X3"])
    with pytest.raises(
        GeneSetError,
        match=r"1 of the 4 expression genes appear in any of the 2 sets \(largest overlap: set 'p53', 1 of its 5 genes\)",
    ):
        score_pathways(frame, sets, min_size=5)
    ensembl = pd.DataFrame(np.ones((2, 3)), columns=[f"ENSG{i:011d}" for i in range(3)])
    with pytest.raises(GeneSetError, match="uses ensembl ids but the gene sets use symbol ids"):
        score_pathways(ensembl, real_sets)


def test_bad_inputs_are_refused(expression, real_sets):
    with pytest.raises(ExpressionError, match="missing or infinite"):
        score_pathways(expression.replace(expression.iloc[0, 0], np.nan), real_sets)
    repeated = expression.rename(columns={expression.columns[1]: expression.columns[0]})
    with pytest.raises(ExpressionError, match="gene ids repeat"):
        score_pathways(repeated, real_sets)
    with pytest.raises(GeneSetError, match="min_size must be >= 1"):
        match_gene_sets(expression.columns, real_sets, min_size=0)
    with pytest.raises(Exception, match="choose one of: ssgsea, zscore"):
        score_pathways(expression, real_sets, "gsva")
    whole = GeneSets({"all": list(expression.columns)})
    with pytest.raises(GeneSetError, match="no background"):
        score_pathways(expression, whole)
