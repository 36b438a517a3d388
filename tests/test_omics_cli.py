"""`mupad omics score`: end to end on small files; bad input exits with an error and no file."""

import re

import numpy as np
import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from mupad.omics.cli import omics_app
from mupad.omics.expression import Orientation
from mupad.omics.genesets import GeneSets, default_gene_sets, write_gmt
from mupad.omics.pipeline import expression_to_scores
from mupad.omics.scoring import ScoringMethod, SsgseaNormalisation

runner = CliRunner()
app = typer.Typer()
app.add_typer(omics_app, name="omics")  # as mupad.cli mounts it


@pytest.fixture(scope="module")
def counts() -> pd.DataFrame:
    """8 samples x 1,500 real gene symbols (+ a mitochondrial and a housekeeping gene)."""
    rng = np.random.default_rng(3)
    genes = sorted(default_gene_sets().genes)[:1500] + ["MT-CO1", "GAPDH"]
    genes = list(dict.fromkeys(genes))
    values = rng.negative_binomial(5, 0.1, size=(8, len(genes))).astype(float)
    return pd.DataFrame(values, index=[f"patient{i}" for i in range(8)], columns=genes)


@pytest.fixture(scope="module")
def gmt(tmp_path_factory) -> str:
    sets = default_gene_sets()
    path = tmp_path_factory.mktemp("sets") / "some.gmt"
    write_gmt(sets.subset([n for n, s in sets.sizes.items() if s >= 40][:30]), path)
    return str(path)


@pytest.mark.parametrize("method", list(ScoringMethod))
def test_score_either_orientation_same_output(tmp_path, counts, gmt, method):
    outputs = []
    for name, table in (("samples.csv", counts), ("genes.tsv", counts.T)):
        source = tmp_path / name
        table.to_csv(source, sep="," if name.endswith(".csv") else "\t")
        out = tmp_path / f"scores_{name}.csv"
        result = runner.invoke(
            app,
            [
                "omics",
                "score",
                str(source),
                "--gene-sets",
                gmt,
                "--method",
                method.value,
                "--output",
                str(out),
            ],
        )
        assert result.exit_code == 0, result.output
        outputs.append(pd.read_csv(out, index_col="sample"))
    pd.testing.assert_frame_equal(outputs[0], outputs[1])
    scores = outputs[0]
    assert list(scores.index) == list(counts.index)  # one row per sample
    expected = expression_to_scores(counts, gmt, method=method)
    np.testing.assert_allclose(scores.to_numpy(), expected.to_numpy(), rtol=1e-12)
    assert list(scores.columns) == list(expected.columns)


def test_default_gene_sets_tpm_and_tsv_output(tmp_path, counts):
    source = tmp_path / "counts.csv"
    counts.to_csv(source)
    lengths = tmp_path / "lengths.tsv"
    pd.DataFrame({"gene": counts.columns, "length": 1000 + np.arange(counts.shape[1])}).to_csv(
        lengths, sep="\t", index=False
    )
    out = tmp_path / "scores.tsv"
    result = runner.invoke(
        app,
        [
            "omics",
            "score",
            str(source),
            "--gene-lengths",
            str(lengths),
            "-o",
            str(out),
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    scores = pd.read_csv(out, sep="\t", index_col=0)
    assert scores.shape[0] == 8 and scores.shape[1] > 100


def _bad_inputs(counts: pd.DataFrame) -> dict[str, tuple[pd.DataFrame, str]]:
    repeated = counts.copy()
    repeated.columns = [counts.columns[0], *counts.columns[:-1]]
    with_nan = counts.copy()
    with_nan.iloc[2, 5] = np.nan
    negative = counts.copy()
    negative.iloc[1, 3] = -4
    unrelated = counts.copy()
    unrelated.columns = [f"ENSG{i:011d}" for i in range(counts.shape[1])]
    return {
        "duplicated": (repeated, "gene id(s) repeat"),
        "nan": (with_nan, "missing or infinite value"),
        "negative": (negative, "negative value"),
        "other ids": (unrelated, "pass a mapping table"),
    }


@pytest.mark.parametrize("case", ["duplicated", "nan", "negative", "other ids"])
def test_bad_expression_fails_cleanly_without_output(tmp_path, counts, gmt, case):
    table, message = _bad_inputs(counts)[case]
    source = tmp_path / "bad.csv"
    table.T.to_csv(source)
    out = tmp_path / "scores.csv"
    result = runner.invoke(app, ["omics", "score", str(source), "--gene-sets", gmt, "-o", str(out)])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert not out.exists() and not list(tmp_path.glob(".scores*"))


def test_no_overlap_and_empty_gene_set_fail_cleanly(tmp_path, counts):
    source = tmp_path / "counts.csv"
    counts.to_csv(source)
    out = tmp_path / "scores.csv"
    other = tmp_path / "other.gmt"
    write_gmt(GeneSets({"fly": ["DPP", "WG", "HH", "EN", "CI"]}), other)
    result = runner.invoke(
        app, ["omics", "score", str(source), "--gene-sets", str(other), "-o", str(out)]
    )
    assert result.exit_code == 2
    assert re.search(
        r"0 of the 14\d\d expression genes appear in any of the 1 sets",
        " ".join(result.output.split()),
    )
    empty = tmp_path / "empty.gmt"
    empty.write_text("ok\t\tTP53\tMDM2\nhollow\tdesc\n")
    result = runner.invoke(
        app, ["omics", "score", str(source), "--gene-sets", str(empty), "-o", str(out)]
    )
    assert result.exit_code == 2 and "have no genes: 'hollow (line 2)'" in " ".join(
        result.output.split()
    )
    assert not out.exists()


def _primes_above(start: int, count: int) -> list[int]:
    primes, candidate = [], start
    while len(primes) < count:
        candidate += 1
        if all(candidate % d for d in range(2, int(candidate**0.5) + 1)):
            primes.append(candidate)
    return primes


def test_ensembl_counts_with_gtf_lengths_and_mapping(tmp_path, counts):
    ids = [f"ENSG{i:011d}.1" for i in range(counts.shape[1])]
    # Prime lengths above every count: no two non-zero genes share a count/length ratio, so
    # no near-tie can be ranked differently by last-bit rounding on the two paths.
    lengths = _primes_above(1000, counts.shape[1])
    gtf = tmp_path / "genes.gtf"
    lines = [
        f'chr1\tt\texon\t{10_000 * i + 1}\t{10_000 * i + length}\t.\t+\t.\t'
        f'gene_id "{gid}"; gene_name "{sym}";'
        for i, (gid, sym, length) in enumerate(zip(ids, counts.columns, lengths))
    ]
    gtf.write_text("\n".join(lines) + "\n")
    source = tmp_path / "ensembl.csv"
    counts.set_axis(ids, axis=1).T.to_csv(source)
    out = tmp_path / "scores.csv"
    result = runner.invoke(
        app, ["omics", "score", str(source), "--gene-lengths", str(gtf), "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    by_symbol = expression_to_scores(
        counts, gene_lengths=pd.Series(lengths, index=counts.columns, dtype=float)
    )
    np.testing.assert_allclose(pd.read_csv(out, index_col=0).to_numpy(), by_symbol.to_numpy())


@pytest.mark.parametrize("normalisation", list(SsgseaNormalisation))
@pytest.mark.parametrize("orientation", list(Orientation))
def test_every_cli_choice_runs(tmp_path, counts, gmt, normalisation, orientation):
    source = tmp_path / "genes.csv"
    table = counts.T if orientation is not Orientation.SAMPLES_X_GENES else counts
    table.to_csv(source)
    out = tmp_path / "scores.csv"
    args = ["omics", "score", str(source), "--gene-sets", gmt, "-o", str(out), "--no-progress"]
    args += ["--normalisation", normalisation.value, "--orientation", orientation.value]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert pd.read_csv(out, index_col=0).shape[0] == counts.shape[0]
