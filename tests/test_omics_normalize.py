"""Counts -> TPM / CPM -> log1p, gene lengths from tables and GTFs, gene filters."""

import gzip
import logging

import numpy as np
import pandas as pd
import pytest

from mupad.omics.errors import ExpressionError, GeneIdError
from mupad.omics.filters import drop_uninformative_genes, housekeeping_genes, read_gene_list
from mupad.omics.gtf import gene_lengths_from_gtf, gene_mapping_from_gtf
from mupad.omics.ids import GeneIdKind
from mupad.omics.normalize import counts_to_cpm, counts_to_tpm, load_gene_lengths, normalise_counts

COUNTS = pd.DataFrame(
    [[10.0, 20.0, 70.0], [0.0, 5.0, 5.0]], index=["a", "b"], columns=["G1", "G2", "G3"]
)
LENGTHS = pd.Series({"G1": 1000.0, "G2": 2000.0, "G3": 500.0})


def test_tpm_by_hand():
    tpm = counts_to_tpm(COUNTS, LENGTHS)
    rate = np.array([[10 / 1, 20 / 2, 70 / 0.5], [0, 5 / 2, 5 / 0.5]])  # reads per kilobase
    expected = rate / rate.sum(axis=1, keepdims=True) * 1e6
    np.testing.assert_allclose(tpm.to_numpy(), expected)
    np.testing.assert_allclose(tpm.sum(axis=1), 1e6)


def test_cpm_with_warning_and_log1p(caplog):
    with caplog.at_level(logging.WARNING):
        out = normalise_counts(COUNTS)
    assert "CPM instead of TPM" in caplog.text
    np.testing.assert_allclose(
        out.to_numpy(), np.log1p(COUNTS.to_numpy() / COUNTS.sum(1).to_numpy()[:, None] * 1e6)
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        tpm = normalise_counts(COUNTS, LENGTHS)
    assert "CPM" not in caplog.text
    np.testing.assert_allclose(tpm.to_numpy(), np.log1p(counts_to_tpm(COUNTS, LENGTHS).to_numpy()))


def test_genes_without_length_are_dropped_and_disjoint_ids_refused(caplog):
    with caplog.at_level(logging.WARNING):
        tpm = counts_to_tpm(COUNTS, LENGTHS.drop("G3"))
    assert list(tpm.columns) == ["G1", "G2"] and "1 of 3 genes have no gene length" in caplog.text
    with pytest.raises(GeneIdError, match="none of the 3 genes has a length"):
        counts_to_tpm(COUNTS, pd.Series({"ENSG00000000001": 100.0}))


def test_bad_counts_are_refused():
    with pytest.raises(ExpressionError, match="no counts at all"):
        counts_to_cpm(COUNTS.assign(G2=0.0, G3=0.0, G1=[1.0, 0.0]))
    with pytest.raises(ExpressionError, match="negative"):
        counts_to_cpm(-COUNTS)
    with pytest.raises(ExpressionError, match="missing or infinite"):
        counts_to_tpm(COUNTS.replace(20.0, np.nan), LENGTHS)


GTF = """#!genome-build test
chr1\tt\tgene\t100\t400\t.\t+\t.\tgene_id "ENSG00000000001.5"; gene_name "AAA";
chr1\tt\texon\t100\t199\t.\t+\t.\tgene_id "ENSG00000000001.5"; transcript_id "T1"; gene_name "AAA";
chr1\tt\texon\t150\t249\t.\t+\t.\tgene_id "ENSG00000000001.5"; transcript_id "T2"; gene_name "AAA";
chr1\tt\texon\t300\t349\t.\t+\t.\tgene_id "ENSG00000000001.5"; transcript_id "T2"; gene_name "AAA";
chr2\tt\texon\t10\t19\t.\t-\t.\tgene_id "ENSG00000000002.1"; transcript_id "T3"; gene_name "BBB";
chr2\tt\texon\t20\t29\t.\t-\t.\tgene_id "ENSG00000000002.1"; transcript_id "T3"; gene_name "BBB";
"""


def test_gtf_union_exon_lengths_and_mapping(tmp_path):
    path = tmp_path / "genes.gtf.gz"
    with gzip.open(path, "wt") as handle:
        handle.write(GTF)
    lengths = gene_lengths_from_gtf(path)
    # AAA: [100,249] U [300,349] = 150 + 50 bases; BBB: adjacent [10,19] U [20,29] = 20 bases
    assert lengths.to_dict() == {"ENSG00000000001": 200.0, "ENSG00000000002": 20.0}
    assert load_gene_lengths(path, GeneIdKind.SYMBOL).to_dict() == {"AAA": 200.0, "BBB": 20.0}
    assert gene_mapping_from_gtf(path) == {"ENSG00000000001": "AAA", "ENSG00000000002": "BBB"}


def test_length_table(tmp_path):
    path = tmp_path / "lengths.csv"
    path.write_text("gene,length\ng1,100\nG2,250\nG3,0\n")
    assert load_gene_lengths(path).to_dict() == {"G1": 100.0, "G2": 250.0}
    with pytest.raises(GeneIdError, match="holds symbol ids but ensembl ids were needed"):
        load_gene_lengths(path, GeneIdKind.ENSEMBL)
    (tmp_path / "one.tsv").write_text("gene\nG1\n")
    with pytest.raises(ExpressionError, match="needs two columns"):
        load_gene_lengths(tmp_path / "one.tsv")


def test_mitochondrial_and_housekeeping_filters(tmp_path, caplog):
    frame = pd.DataFrame(np.ones((2, 5)), columns=["MT-CO1", "mt-nd4", "GAPDH", "RPL13A", "TP53"])
    assert list(drop_uninformative_genes(frame).columns) == ["TP53"]
    assert list(drop_uninformative_genes(frame, housekeeping=False).columns) == [
        "GAPDH",
        "RPL13A",
        "TP53",
    ]
    assert list(
        drop_uninformative_genes(frame, mitochondrial=False, housekeeping=["TP53"]).columns
    ) == ["MT-CO1", "mt-nd4", "GAPDH", "RPL13A"]
    assert {"GAPDH", "ACTB", "RPLP0", "VCP"} <= housekeeping_genes()
    with pytest.raises(ExpressionError, match="nothing is left to score"):
        drop_uninformative_genes(frame[["MT-CO1", "GAPDH"]])
    ensembl = pd.DataFrame(np.ones((1, 2)), columns=["ENSG00000198804", "ENSG00000141510"])
    with caplog.at_level(logging.WARNING):
        assert drop_uninformative_genes(ensembl).shape == (1, 2)
    assert "map ids to symbols first" in caplog.text
    custom = tmp_path / "hk.txt"
    custom.write_text("# my list\ngapdh\tglyceraldehyde\n\nACTB\n")
    assert read_gene_list(custom) == {"GAPDH", "ACTB"}
