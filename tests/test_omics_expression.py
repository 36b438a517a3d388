"""Expression readers, orientation and gene-id detection, id mapping, bad-input errors."""

import logging

import numpy as np
import pandas as pd
import pytest

from mupad.omics.errors import ExpressionError, GeneIdError
from mupad.omics.expression import (
    Orientation,
    as_samples_by_genes,
    detect_orientation,
    load_gene_mapping,
    map_gene_ids,
    orient_mapping,
    read_expression,
)
from mupad.omics.ids import GeneIdKind, canonical_gene_id, detect_gene_id_kind

GENES = ["TP53", "EGFR", "MYC", "KRAS", "CDK4", "PTEN", "BRCA1", "GPX1"]


def counts_frame(samples=3, genes=GENES, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 50, size=(samples, len(genes))).astype(float)
    return pd.DataFrame(values, index=[f"S{i}" for i in range(samples)], columns=genes)


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".txt", ".csv.gz"])
@pytest.mark.parametrize("transpose", [False, True])
def test_text_tables_in_either_orientation(tmp_path, suffix, transpose):
    frame = counts_frame()
    path = tmp_path / f"expr{suffix}"
    table = frame.T if transpose else frame
    table.to_csv(path, sep="," if ".csv" in suffix else "\t")
    read = read_expression(path)
    pd.testing.assert_frame_equal(read, frame, check_names=False)
    assert read.index.name == "sample" and read.columns.name == "gene"


def test_parquet_and_gene_column(tmp_path):
    pytest.importorskip("pyarrow")
    frame = counts_frame()
    frame.to_parquet(tmp_path / "e.parquet")
    pd.testing.assert_frame_equal(read_expression(tmp_path / "e.parquet"), frame, check_names=False)
    table = frame.T.reset_index(names="symbol")
    table.insert(0, "description", "some text")
    table.to_csv(tmp_path / "annotated.csv", index=False)
    read = read_expression(tmp_path / "annotated.csv", gene_column="symbol")
    pd.testing.assert_frame_equal(read, frame, check_names=False)


def test_h5ad(tmp_path):
    anndata = pytest.importorskip("anndata")
    frame = counts_frame()
    adata = anndata.AnnData(
        frame.to_numpy(),
        obs=pd.DataFrame(index=frame.index),
        var=pd.DataFrame({"ensembl": [f"ENSG{i:011d}" for i in range(8)]}, index=frame.columns),
    )
    adata.layers["raw"] = frame.to_numpy() * 2
    # pandas >= 3 string columns need anndata's opt-in to be written
    with anndata.settings.override(allow_write_nullable_strings=True):
        adata.write_h5ad(tmp_path / "e.h5ad")
    pd.testing.assert_frame_equal(read_expression(tmp_path / "e.h5ad"), frame, check_names=False)
    doubled = read_expression(tmp_path / "e.h5ad", layer="raw")
    np.testing.assert_allclose(doubled.to_numpy(), frame.to_numpy() * 2)
    by_id = read_expression(tmp_path / "e.h5ad", gene_column="ensembl")
    assert detect_gene_id_kind(by_id.columns) is GeneIdKind.ENSEMBL
    with pytest.raises(ExpressionError, match="no layer 'nope'"):
        read_expression(tmp_path / "e.h5ad", layer="nope")


def test_orientation_detection_and_ambiguity():
    frame = counts_frame()
    assert detect_orientation(frame) is Orientation.SAMPLES_X_GENES
    assert detect_orientation(frame.T) is Orientation.GENES_X_SAMPLES
    ensembl = frame.set_axis([f"ENSG{i:011d}.3" for i in range(8)], axis=1)
    assert detect_orientation(ensembl.T) is Orientation.GENES_X_SAMPLES
    anonymous = frame.set_axis([f"g{i}" for i in range(8)], axis=1)
    with pytest.raises(GeneIdError, match="orientation='genes_x_samples'"):
        as_samples_by_genes(anonymous)
    assert as_samples_by_genes(anonymous.T, "genes_x_samples").shape == (3, 8)


def test_gene_id_kinds_and_canonical_form():
    assert canonical_gene_id(" ENSG00000141510.16 ") == "ENSG00000141510"
    assert canonical_gene_id("ENSMUSG00000059552.2") == "ENSMUSG00000059552"
    assert canonical_gene_id("Trp53") == "TRP53"
    assert detect_gene_id_kind(["ENSG00000141510.2", "ENSG00000146648"]) is GeneIdKind.ENSEMBL
    assert detect_gene_id_kind(["TP53", "EGFR"]) is GeneIdKind.SYMBOL
    with pytest.raises(GeneIdError, match="empty"):
        detect_gene_id_kind([])


def test_par_y_rows_dropped_and_versions_stripped():
    frame = pd.DataFrame(
        [[1.0, 2.0, 0.0]],
        index=["S0"],
        columns=["ENSG00000182378.14", "ENSG00000141510.16", "ENSG00000182378.14_PAR_Y"],
    )
    out = as_samples_by_genes(frame, "samples_x_genes")
    assert list(out.columns) == ["ENSG00000182378", "ENSG00000141510"]


def _negate_second_sample(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    frame.loc["S1"] = -frame.loc["S1"] - 1
    return frame


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            lambda f: f.set_axis(["TP53", "tp53", *GENES[2:]], axis=1),
            r"1 gene id\(s\) repeat.*'TP53' \(2x\)",
        ),
        (
            lambda f: f.set_axis([f"ENSG{1:011d}.1", f"ENSG{1:011d}.2", *GENES[2:]], axis=1),
            "repeat",
        ),
        (lambda f: f.set_axis(["S0", "S0", "S2"], axis=0), r"sample id\(s\) repeat"),
        (lambda f: f.mask(f > 40, np.nan), r"missing or infinite value\(s\), first at sample"),
        (_negate_second_sample, r"8 negative value\(s\), first -\d+ at sample 'S1', gene 'TP53'"),
        (lambda f: f.astype(object).where(f < 45, "high"), "non-numeric values"),
        (lambda f: f.iloc[:, :0], "empty"),
    ],
)
def test_bad_matrices_are_refused(mutate, message):
    with pytest.raises(ExpressionError, match=message):
        as_samples_by_genes(mutate(counts_frame(seed=3)), "samples_x_genes")


def test_bad_files_are_refused(tmp_path):
    with pytest.raises(ExpressionError, match="does not exist"):
        read_expression(tmp_path / "none.csv")
    (tmp_path / "x.xlsx").write_text("")
    with pytest.raises(ExpressionError, match="unsupported expression file type"):
        read_expression(tmp_path / "x.xlsx")


def test_mapping_table_sums_collisions_and_drops_unmapped(tmp_path, caplog):
    frame = pd.DataFrame(
        [[1.0, 2.0, 3.0, 4.0]],
        index=["S0"],
        columns=["ENSG00000000001.1", "ENSG00000000002", "ENSG00000000003", "ENSG00000000009"],
    )
    table = tmp_path / "map.tsv"
    table.write_text(
        "ensembl\tsymbol\nENSG00000000001\tA\nENSG00000000002\tA\nENSG00000000003\tB\n"
    )
    mapping = load_gene_mapping(table)
    oriented = as_samples_by_genes(frame, "samples_x_genes")
    with caplog.at_level(logging.WARNING):
        mapped = map_gene_ids(oriented, mapping)
    assert mapped.to_dict("records") == [{"A": 3.0, "B": 3.0}]
    assert "1 of 4 genes have no entry" in caplog.text
    assert orient_mapping(mapping, GeneIdKind.SYMBOL)["B"] == "ENSG00000000003"
    with pytest.raises(GeneIdError, match="none of the 4 gene ids"):
        map_gene_ids(oriented, {"X": "Y"})


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".csv.gz"])
def test_a_repeated_gene_column_is_refused_not_renamed(tmp_path, suffix):
    """Issue 15: pandas renamed a repeated samples x genes column to 'GENE.1' silently."""
    sep = "," if ".csv" in suffix else "\t"
    path = tmp_path / f"expr{suffix}"
    frame = counts_frame().set_axis(["TP53", "EGFR", "MYC", "TP53", *GENES[4:]], axis=1)
    frame.to_csv(path, sep=sep)
    with pytest.raises(ExpressionError, match=r"1 gene id\(s\) repeat.*'TP53' \(2x\)"):
        read_expression(path, orientation="samples_x_genes")
    with pytest.raises(ExpressionError, match=r"'TP53' \(2x\)"):
        read_expression(path)  # detected orientation
    # The other orientation already refused it (repeated rows), and a repeated sample
    # column of a genes x samples table is refused too.
    frame.T.to_csv(path, sep=sep)
    with pytest.raises(ExpressionError, match=r"'TP53' \(2x\)"):
        read_expression(path)
    counts_frame().T.set_axis(["S0", "S0", "S2"], axis=1).to_csv(path, sep=sep)
    with pytest.raises(ExpressionError, match=r"sample id\(s\) repeat"):
        read_expression(path)
