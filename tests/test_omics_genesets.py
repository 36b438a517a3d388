"""GMT gene sets: reading, writing, validation and the bundled default collection."""

import pytest

from mupad.omics.errors import GeneSetError
from mupad.omics.genesets import GeneSets, default_gene_sets, load_gmt, write_gmt
from mupad.omics.ids import GeneIdKind


def test_gmt_round_trip_keeps_order_and_descriptions(tmp_path):
    sets = GeneSets({"B set": ["TP53", "MDM2"], "A set": ["EGFR"]}, {"B set": "desc b"})
    path = tmp_path / "sets.gmt"
    write_gmt(sets, path)
    back = load_gmt(path)
    assert back == sets
    assert back.names == ("B set", "A set")
    assert back.description("B set") == "desc b"
    assert path.read_text().splitlines()[0] == "B set\tdesc b\tTP53\tMDM2"


def test_enrichr_style_lines_weights_and_canonical_ids(tmp_path):
    path = tmp_path / "enrichr.gmt"
    path.write_text("Pathway WP1\t\ttp53\tMDM2,0.5\tENSG00000141510.16\tTP53\t\n")
    sets = load_gmt(path)
    # upper case, weight dropped, version dropped, duplicates removed, trailing tab ignored
    assert sets["Pathway WP1"] == ("TP53", "MDM2", "ENSG00000141510")


def test_gmt_with_empty_set_is_refused(tmp_path):
    path = tmp_path / "bad.gmt"
    path.write_text("good\t\tA\tB\nempty one\tno genes here\n")
    with pytest.raises(
        GeneSetError, match=r"1 gene set\(s\) have no genes: 'empty one \(line 2\)'"
    ):
        load_gmt(path)


def test_gmt_with_repeated_name_or_missing_file_is_refused(tmp_path):
    path = tmp_path / "dup.gmt"
    path.write_text("S\t\tA\nS\t\tB\n")
    with pytest.raises(GeneSetError, match="appears twice"):
        load_gmt(path)
    with pytest.raises(GeneSetError, match="does not exist"):
        load_gmt(tmp_path / "missing.gmt")


def test_gene_sets_are_immutable_and_validated():
    sets = GeneSets({"S": ["A", "B"]})
    with pytest.raises(AttributeError):
        sets.extra = 1
    with pytest.raises(TypeError):
        sets["T"] = ("C",)  # type: ignore[index]
    with pytest.raises(GeneSetError, match="have no genes"):
        GeneSets({"S": ["A"], "T": ["", "  "]})
    with pytest.raises(GeneSetError, match="is empty"):
        GeneSets({})
    assert sets.subset(["S"]) == sets
    with pytest.raises(GeneSetError, match="unknown gene set"):
        sets.subset(["nope"])


def test_bundled_default_is_wikipathways():
    sets = default_gene_sets()
    assert len(sets) == 801
    assert sets.id_kind is GeneIdKind.SYMBOL
    assert "Glutathione Metabolism WP100" in sets
    assert "GPX1" in sets["Glutathione Metabolism WP100"]
    assert sets.description("Glutathione Metabolism WP100") == "WP100"
