"""Spatial transcriptomics: readers, patch extraction and spot scoring.

Real data (read from <repo>/../shared/data, never copied here): the HER2ST sections (spots
-> patches + scores; patches land on tissue; coordinates map to the right pixels) and the
Visium CytAssist mouse embryo folder (Space Ranger file handling). Bad input is built in
tmp_path: alpha / 16-bit images, missing scale factors and files, spots outside the image,
mismatched barcodes, the three positions formats.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp
import tifffile
from PIL import Image
from typer.testing import CliRunner

from mupad.omics.genesets import GeneSets, default_gene_sets
from mupad.omics.scoring import ScoringMethod
from mupad.omics.spatial import (
    BarcodeMismatchError,
    ImageLevel,
    MissingSpatialFileError,
    MppSource,
    OutputExistsError,
    ScaleFactorError,
    SpatialDataError,
    SpatialKind,
    SpotImageError,
    SpotsOutsideImageError,
    detect_kind,
    extract_spots,
    load_sample,
    read_10x_h5,
    read_her2st,
    read_mtx_folder,
    read_positions,
    read_space_ranger,
)
from mupad.omics.spatial import extract as extract_module
from mupad.omics.spatial.images import cut_patch, open_tissue_image, patch_box

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HER2ST = SHARED_DATA / "her2st_he_spatial_expression_6sections"
VISIUM_EMBRYO = SHARED_DATA / "visium_cytassist_mouse_embryo_lowres"


def _need(folder: Path) -> Path:
    if not folder.is_dir():
        pytest.skip(f"real-data folder {folder} is absent (expected at <repo>/../shared/data)")
    return folder


def small_gene_sets(n: int = 12) -> GeneSets:
    """A few of the bundled sets, to keep scoring fast."""
    full = default_gene_sets()
    return full.subset(full.names[:n])


def tissue_fraction(patch: Image.Image) -> float:
    """Fraction of pixels with HSV saturation > 40/255 (stained tissue; glass is ~grey)."""
    hsv = np.asarray(patch.convert("HSV"))
    return float((hsv[..., 1] > 40).mean())


# ---------------------------------------------------------------- HER2ST (real data)


@pytest.fixture(scope="module")
def her2st_b4():
    return read_her2st("B4", _need(HER2ST))


def test_her2st_section_reads_counts_spots_image_and_pixel_size(her2st_b4):
    sample = her2st_b4
    assert sample.kind is SpatialKind.HER2ST
    assert sample.counts.shape == (283, 15289)
    assert sample.spots_without_counts == ("18x20",)  # in the spot file, not in the counts
    assert sample.counts.index.equals(sample.spots.barcodes)
    assert sample.spots.frame["in_tissue"].all()
    # legacy ST: 200 µm pitch; ~290 px per step in these scans -> ~0.69 µm/px
    assert sample.mpp_source is MppSource.ARRAY_PITCH
    assert 0.6 < sample.fullres_mpp < 0.8
    assert sample.image.level is ImageLevel.FULLRES and sample.image.path.suffix == ".jpg"
    assert detect_kind(HER2ST) is SpatialKind.HER2ST


def test_her2st_patches_land_on_tissue_and_pair_with_scores(tmp_path, her2st_b4):
    sample = her2st_b4
    chosen = list(sample.spots.barcodes[::12])  # 24 spots spread over the section
    gene_sets = small_gene_sets()
    manifest_path = extract_spots(
        sample, tmp_path / "b4", patch_um=100.0, size=64, gene_sets=gene_sets,
        barcodes=chosen, progress=False,
    )  # fmt: skip
    out = manifest_path.parent
    manifest = pd.read_csv(manifest_path)
    scores = pd.read_csv(out / "scores.csv", index_col=0)
    summary = json.loads((out / "summary.json").read_text())
    assert manifest["barcode"].tolist() == chosen
    assert scores.index.tolist() == chosen and list(scores.columns) == list(gene_sets.names)
    assert np.isfinite(scores.to_numpy()).all()
    assert scores.std(axis=0).gt(0).sum() >= len(gene_sets) // 2  # scores vary across spots
    assert summary["scoring"]["genes_overlapping"] > 100
    assert summary["spots_written"] == len(chosen) and not summary["skipped"]
    assert manifest["source_side_px"].iloc[0] == pytest.approx(100.0 / sample.fullres_mpp)

    patches = [Image.open(out / p) for p in manifest["patch"]]
    assert all(p.size == (64, 64) and p.mode == "RGB" for p in patches)
    on_tissue = np.array([tissue_fraction(p) for p in patches])

    # Background: grid positions far (>= 3 steps) from every tissue spot, placed with the
    # same least-squares grid -> pixel map, cut at the same size.
    table = pd.read_csv(HER2ST / "spots" / "B4_selection.tsv", sep="\t")
    design = np.column_stack([table["x"], table["y"], np.ones(len(table))])
    coef, *_ = np.linalg.lstsq(design, table[["pixel_x", "pixel_y"]].to_numpy(), rcond=None)
    tissue_xy = table[["x", "y"]].to_numpy()
    side_px = 100.0 / sample.fullres_mpp
    background = []
    with open_tissue_image(sample.image.path) as image:
        for gx in range(1, 34, 2):
            for gy in range(1, 36, 2):
                if np.abs(tissue_xy - [gx, gy]).sum(axis=1).min() < 3:
                    continue
                x, y = np.array([gx, gy, 1.0]) @ coef
                box = patch_box(x, y, side_px)
                if box.inside(image.width, image.height):
                    background.append(tissue_fraction(cut_patch(image, box, 64)))
    background = np.array(background)
    assert len(background) > 50
    assert np.median(on_tissue) > 0.4  # measured ~0.72 on B4
    assert background.max() < 0.05  # measured <= 0.01
    assert (on_tissue > 0.05).mean() >= 0.9


def test_her2st_patch_is_the_image_region_at_the_spot(tmp_path, monkeypatch, her2st_b4):
    """A patch equals an independent crop at (pixel_x, pixel_y), not one with x/y swapped."""
    sample = her2st_b4
    table = pd.read_csv(HER2ST / "spots" / "B4_selection.tsv", sep="\t")
    rows = table[table["x"].astype(str) + "x" + table["y"].astype(str) == "13x23"]
    assert len(rows) == 1
    x, y = float(rows["pixel_x"].iloc[0]), float(rows["pixel_y"].iloc[0])
    side = 80.0 / sample.fullres_mpp
    manifest = pd.read_csv(extract_spots(
        sample, tmp_path / "one", patch_um=80.0, size=48, gene_sets=small_gene_sets(3),
        barcodes=["13x23"], progress=False,
    ))  # fmt: skip
    patch = np.asarray(Image.open(tmp_path / "one" / manifest["patch"].iloc[0]), dtype=float)

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # the 92 Mpx scan trips PIL's guard
    with Image.open(sample.image.path) as full:

        def crop(cx: float, cy: float) -> np.ndarray:
            box = (
                round(cx - side / 2),
                round(cy - side / 2),
                round(cx + side / 2),
                round(cy + side / 2),
            )
            return np.asarray(
                full.crop(box).resize((48, 48), Image.Resampling.BILINEAR), dtype=float
            )

        same, swapped = crop(x, y), crop(y, x)
    assert np.abs(patch - same).mean() < 6.0
    assert np.corrcoef(patch.ravel(), same.ravel())[0, 1] > 0.9
    assert np.abs(patch - swapped).mean() > 3 * np.abs(patch - same).mean()


# ------------------------------------------------------- Visium mouse embryo (real data)


@pytest.fixture(scope="module")
def embryo():
    return read_space_ranger(_need(VISIUM_EMBRYO))


def test_visium_embryo_positions_scalefactors_matrix_and_image(embryo):
    assert embryo.kind is SpatialKind.VISIUM
    positions = read_positions(VISIUM_EMBRYO / "spatial" / "tissue_positions.csv")
    assert len(positions) == 4992
    assert embryo.num_spots == 2898 and embryo.counts.shape[1] == 19465 - 11  # 11 symbols summed
    assert set(embryo.counts.index) <= set(positions.barcodes)
    # the filtered matrix holds exactly the in-tissue spots
    assert set(embryo.counts.index) == set(positions.barcodes[positions.frame["in_tissue"]])
    assert len(embryo.spots_without_counts) == 4992 - 2898
    assert embryo.fullres_mpp == pytest.approx(55.0 / 14.964878633873417)
    assert embryo.image.level is ImageLevel.LOWRES and embryo.image.scale == pytest.approx(0.2)
    row = positions.frame.loc["GTCACTTCCTTCTAGA-1"]  # first line of the CSV
    assert row["y_fullres_px"] == pytest.approx(773.1282581077176)  # pxl_row -> y
    assert row["x_fullres_px"] == pytest.approx(255.64454059010166)  # pxl_col -> x
    assert isinstance(embryo.counts.dtypes.iloc[0], pd.SparseDtype)  # 56 M cells -> sparse
    total = sp.csr_matrix(
        scipy.io.mmread(VISIUM_EMBRYO / "filtered_feature_bc_matrix" / "matrix.mtx.gz")
    ).sum()
    assert embryo.counts.sparse.to_coo().sum() == total


def test_visium_embryo_h5_and_mtx_agree_and_positions_formats_agree(tmp_path, embryo):
    mtx = read_mtx_folder(VISIUM_EMBRYO / "filtered_feature_bc_matrix")
    h5_path = tmp_path / "filtered_feature_bc_matrix.h5"
    write_10x_h5(h5_path, mtx.counts, mtx.barcodes, mtx.feature_ids, mtx.feature_names)
    h5 = read_10x_h5(h5_path)
    assert h5.barcodes == mtx.barcodes and h5.feature_names == mtx.feature_names
    assert (h5.counts != mtx.counts).nnz == 0

    csv = read_positions(VISIUM_EMBRYO / "spatial" / "tissue_positions.csv").frame
    frame = pd.read_csv(VISIUM_EMBRYO / "spatial" / "tissue_positions.csv")
    frame.to_csv(tmp_path / "tissue_positions_list.csv", header=False, index=False)
    frame.to_parquet(tmp_path / "tissue_positions.parquet")
    pd.testing.assert_frame_equal(read_positions(tmp_path / "tissue_positions_list.csv").frame, csv)
    pd.testing.assert_frame_equal(read_positions(tmp_path / "tissue_positions.parquet").frame, csv)


def test_visium_embryo_mouse_symbols_need_explicit_uppercase_matching(tmp_path, embryo):
    chosen = list(embryo.counts.index[:6])
    with pytest.raises(SpatialDataError, match="mouse-style.*--uppercase-symbols"):
        extract_spots(embryo, tmp_path / "e", gene_sets=small_gene_sets(4), barcodes=chosen,
                      size=32, progress=False)  # fmt: skip
    assert not (tmp_path / "e").exists()
    manifest = extract_spots(embryo, tmp_path / "e", gene_sets=small_gene_sets(4), barcodes=chosen,
                             size=32, uppercase_symbols=True, progress=False)  # fmt: skip
    summary = json.loads((manifest.parent / "summary.json").read_text())
    assert "approximate" in summary["scoring"]["symbol_matching"]
    assert summary["scoring"]["genes_overlapping"] > 0
    # 55 µm is ~3 px of the low-res image: enlarged, and said so
    assert summary["source_side_px"] == pytest.approx(55.0 / (embryo.fullres_mpp / 0.2))
    assert any("enlarged" in w for w in summary["warnings"])


# ------------------------------------------------------------- synthetic Space Ranger


GENES = None


def human_genes(n: int = 400) -> list[str]:
    global GENES
    if GENES is None:
        seen: dict[str, None] = {}
        for members in small_gene_sets(8).values():
            seen.update(dict.fromkeys(members))
        GENES = list(seen)
    extra = [f"GENE{i}" for i in range(max(0, n - len(GENES)))]
    return (GENES + extra)[:n]


def write_10x_h5(path, counts, barcodes, ids, names):
    """Minimal Space Ranger >= 3 HDF5 layout: /matrix (CSC genes x barcodes) + /matrix/features."""
    csc = sp.csc_matrix(sp.csr_matrix(counts).T)
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g["data"], g["indices"], g["indptr"] = csc.data, csc.indices, csc.indptr
        g["shape"] = np.array(csc.shape)
        g["barcodes"] = np.array(barcodes, dtype="S")
        feats = g.create_group("features")
        feats["id"] = np.array(ids, dtype="S")
        feats["name"] = np.array(names, dtype="S")
        feats["feature_type"] = np.array(["Gene Expression"] * len(ids), dtype="S")


def gradient_image(width: int, height: int) -> np.ndarray:
    """R encodes x, G encodes y, B constant: a patch's mean colour says where it was cut."""
    xs = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    ys = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return np.stack([xs, ys, np.full_like(xs, 128)], axis=-1).round().astype(np.uint8)


def make_visium(
    root: Path,
    *,
    spots: int = 12,
    image: np.ndarray | None = None,
    scalefactors: dict | None = None,
    positions_format: str = "csv",
    matrix_format: str = "mtx",
    outside: int = 0,
) -> Path:
    """A tiny Space Ranger folder: 600x400 px full-res frame, hires image at scale 0.5."""
    rng = np.random.default_rng(0)
    spatial = root / "spatial"
    spatial.mkdir(parents=True)
    barcodes = [f"AAAC{i:04d}GGTT-1" for i in range(spots)]
    xs = np.linspace(120, 480, spots)  # full-res px
    ys = np.linspace(100, 300, spots)
    xs[:outside] = 5.0  # near the left edge: a 55 µm patch leaves the image
    frame = pd.DataFrame(
        {
            "barcode": barcodes + ["CCCC0000AAAA-1"],  # one off-tissue spot without counts
            "in_tissue": [1] * spots + [0],
            "array_row": list(range(spots)) + [99],
            "array_col": list(range(spots)) + [99],
            "pxl_row_in_fullres": list(ys) + [10.0],
            "pxl_col_in_fullres": list(xs) + [10.0],
        }
    )
    if positions_format == "csv":
        frame.to_csv(spatial / "tissue_positions.csv", index=False)
    elif positions_format == "list":
        frame.to_csv(spatial / "tissue_positions_list.csv", index=False, header=False)
    else:
        frame.to_parquet(spatial / "tissue_positions.parquet")
    factors = {
        "spot_diameter_fullres": 110.0,
        "tissue_hires_scalef": 0.5,
        "tissue_lowres_scalef": 0.1,
    }
    factors = factors if scalefactors is None else scalefactors
    (spatial / "scalefactors_json.json").write_text(json.dumps(factors))
    pixels = gradient_image(300, 200) if image is None else image
    Image.fromarray(pixels).save(spatial / "tissue_hires_image.png")
    Image.fromarray(gradient_image(60, 40)).save(spatial / "tissue_lowres_image.png")

    genes = human_genes()
    counts = sp.csr_matrix(rng.poisson(2.0, size=(spots, len(genes))))
    ids = [f"ENSG{i:011d}" for i in range(len(genes))]
    if matrix_format == "mtx":
        folder = root / "filtered_feature_bc_matrix"
        folder.mkdir()
        scipy.io.mmwrite(folder / "matrix.mtx", sp.coo_matrix(counts.T))
        for name, lines in (
            ("features.tsv.gz", [f"{i}\t{g}\tGene Expression" for i, g in zip(ids, genes)]),
            ("barcodes.tsv.gz", barcodes),
        ):
            with gzip.open(folder / name, "wt") as handle:
                handle.write("\n".join(lines) + "\n")
    else:
        write_10x_h5(root / "filtered_feature_bc_matrix.h5", counts, barcodes, ids, genes)
    return root


def run_extract(folder: Path, out: Path, **kwargs) -> Path:
    kwargs.setdefault("gene_sets", small_gene_sets(4))
    kwargs.setdefault("size", 32)
    kwargs.setdefault("progress", False)
    return extract_spots(folder, out, **kwargs)


@pytest.mark.parametrize("positions_format", ["csv", "list", "parquet"])
def test_positions_in_all_three_formats_read_the_same(tmp_path, positions_format):
    folder = make_visium(tmp_path / "v", positions_format=positions_format)
    sample = read_space_ranger(folder)
    assert sample.num_spots == 12 and sample.spots_without_counts == ("CCCC0000AAAA-1",)
    assert sample.spots.frame["x_fullres_px"].iloc[0] == pytest.approx(120.0)
    assert sample.spots.frame["y_fullres_px"].iloc[-1] == pytest.approx(300.0)


def test_synthetic_patches_come_from_the_spot_position(tmp_path):
    folder = make_visium(tmp_path / "v", matrix_format="h5")
    manifest = pd.read_csv(run_extract(folder, tmp_path / "out", patch_um=55.0))
    sample = read_space_ranger(folder)
    # spot_diameter 110 full-res px = 55 µm -> 0.5 µm/px full-res, 1 µm/px in the hires image
    assert sample.fullres_mpp == pytest.approx(0.5)
    assert manifest["source_mpp"].iloc[0] == pytest.approx(1.0)
    assert manifest["source_side_px"].iloc[0] == pytest.approx(55.0)
    for row in manifest.itertuples():
        patch = np.asarray(Image.open(tmp_path / "out" / row.patch), dtype=float)
        # hires pixel (x, y) has R = 255 x / 299, G = 255 y / 199 (pixel-index centres)
        assert patch[..., 0].mean() == pytest.approx(255 * row.x_image_px / 299, abs=1.5)
        assert patch[..., 1].mean() == pytest.approx(255 * row.y_image_px / 199, abs=1.5)
    scores = pd.read_csv(tmp_path / "out" / "scores.csv", index_col=0)
    assert scores.shape == (12, 4) and scores.index.tolist() == manifest["barcode"].tolist()


@pytest.mark.parametrize(
    ("pixels", "suffix", "match"),
    [
        (np.full((200, 300, 4), 200, np.uint8), ".png", "alpha channel.*convert\\('RGB'\\)"),
        (np.full((200, 300), 30000, np.uint16), ".png", "not 8 bits"),
        (np.full((200, 300, 3), 30000, np.uint16), ".tif", "not 8 bits"),
        (np.full((200, 300, 4), 200, np.uint8), ".tif", "alpha channel"),
        (np.full((200, 300), 200, np.uint8), ".png", "not RGB"),
    ],
    ids=["rgba-png", "gray16-png", "rgb16-tiff", "rgba-tiff", "gray8-png"],
)
def test_unusable_images_are_rejected_with_a_conversion_hint(tmp_path, pixels, suffix, match):
    folder = make_visium(tmp_path / "v")
    path = tmp_path / f"fullres{suffix}"
    if suffix == ".tif":
        tifffile.imwrite(
            path, pixels, photometric="rgb", extrasamples=[2] if pixels.shape[-1] == 4 else None
        )
    else:
        Image.fromarray(pixels).save(path)
    with pytest.raises(SpotImageError, match=match):
        run_extract(folder, tmp_path / "out", image=path)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_rgb_tiff_fullres_image_is_used_with_scale_one(tmp_path):
    folder = make_visium(tmp_path / "v")
    path = tmp_path / "fullres.tif"
    tifffile.imwrite(path, gradient_image(600, 400), photometric="rgb")
    manifest = pd.read_csv(run_extract(folder, tmp_path / "out", image=path))
    assert manifest["source_mpp"].iloc[0] == pytest.approx(0.5)  # full-res frame
    row = manifest.iloc[3]
    patch = np.asarray(Image.open(tmp_path / "out" / row["patch"]), dtype=float)
    assert patch[..., 0].mean() == pytest.approx(255 * row["x_fullres_px"] / 599, abs=1.5)


def test_missing_scale_factors_say_which_and_how_to_fix(tmp_path):
    no_diameter = make_visium(tmp_path / "a", scalefactors={"tissue_hires_scalef": 0.5})
    with pytest.raises(ScaleFactorError, match="spot_diameter_fullres.*--mpp"):
        run_extract(no_diameter, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    run_extract(no_diameter, tmp_path / "out", mpp=0.5)  # a given mpp stands in
    assert (tmp_path / "out" / "manifest.csv").is_file()

    no_hires = make_visium(tmp_path / "b", scalefactors={"spot_diameter_fullres": 110.0})
    with pytest.raises(ScaleFactorError, match="tissue_hires_scalef"):
        read_space_ranger(no_hires)

    zero = make_visium(tmp_path / "z", scalefactors={"spot_diameter_fullres": 0.0})
    with pytest.raises(ScaleFactorError, match="must be a positive number"):
        read_space_ranger(zero)

    gone = make_visium(tmp_path / "c")
    (gone / "spatial" / "scalefactors_json.json").unlink()
    with pytest.raises(MissingSpatialFileError, match="scalefactors_json.json"):
        read_space_ranger(gone)


def test_missing_files_are_named(tmp_path):
    folder = make_visium(tmp_path / "v")
    (folder / "filtered_feature_bc_matrix" / "features.tsv.gz").unlink()
    with pytest.raises(MissingSpatialFileError, match="features.tsv"):
        read_space_ranger(folder)
    folder = make_visium(tmp_path / "w")
    (folder / "spatial" / "tissue_positions.csv").unlink()
    with pytest.raises(MissingSpatialFileError, match="tissue_positions"):
        read_space_ranger(folder)
    with pytest.raises(MissingSpatialFileError, match="does not exist"):
        load_sample(tmp_path / "nowhere")
    with pytest.raises(MissingSpatialFileError, match="complete sections"):
        read_her2st("Z9", tmp_path)


def test_mismatched_barcodes_are_an_error(tmp_path):
    folder = make_visium(tmp_path / "v")
    positions = folder / "spatial" / "tissue_positions.csv"
    frame = pd.read_csv(positions)
    frame["barcode"] = frame["barcode"].str.replace("-1", "-2")  # another run's barcodes
    frame.to_csv(positions, index=False)
    with pytest.raises(BarcodeMismatchError, match="12 of 12 barcodes.*same Space Ranger run"):
        read_space_ranger(folder)


def test_spots_outside_the_image_error_or_are_skipped_with_a_summary(tmp_path):
    folder = make_visium(tmp_path / "v", outside=2)
    with pytest.raises(SpotsOutsideImageError, match="2 of 12 spots.*--skip-outside") as caught:
        run_extract(folder, tmp_path / "out")
    assert caught.value.barcodes == ("AAAC0000GGTT-1", "AAAC0001GGTT-1")
    assert not (tmp_path / "out").exists()
    manifest = pd.read_csv(run_extract(folder, tmp_path / "out", skip_outside=True))
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert len(manifest) == 10 and summary["spots_written"] == 10
    assert [s["barcode"] for s in summary["skipped"]] == ["AAAC0000GGTT-1", "AAAC0001GGTT-1"]
    assert summary["skipped"][0]["reason"] == "patch leaves the image"
    assert len(list((tmp_path / "out" / "patches").iterdir())) == 10


def test_a_failure_while_writing_leaves_nothing_and_outputs_are_not_clobbered(
    tmp_path, monkeypatch
):
    folder = make_visium(tmp_path / "v")
    calls = {"n": 0}
    real_cut = extract_module.cut_patch

    def failing_cut(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full")
        return real_cut(*args, **kwargs)

    monkeypatch.setattr(extract_module, "cut_patch", failing_cut)
    with pytest.raises(OSError, match="disk full"):
        run_extract(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    monkeypatch.undo()

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="not an earlier"):
        run_extract(folder, tmp_path / "mine")
    run_extract(folder, tmp_path / "out")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        run_extract(folder, tmp_path / "out")
    run_extract(folder, tmp_path / "out", overwrite=True, patch_um=40.0)
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["patch_um"] == 40.0


def test_cli_extract_writes_outputs_and_reports_errors(tmp_path):
    from mupad.omics.genesets import write_gmt
    from mupad.omics.st_cli import st_app

    folder = make_visium(tmp_path / "v", outside=1)
    gmt = tmp_path / "sets.gmt"
    write_gmt(small_gene_sets(3), gmt)
    runner = CliRunner()
    args = ["extract", str(folder), "--out", str(tmp_path / "out"), "--gene-sets", str(gmt),
            "--size", "32", "--no-progress"]  # fmt: skip
    failed = runner.invoke(st_app, args)
    assert failed.exit_code == 2 and "--skip-outside" in failed.output
    result = runner.invoke(st_app, [*args, "--skip-outside", "--kind", "visium"])
    assert result.exit_code == 0, result.output
    assert "wrote 11 patches" in result.output and "skipped 1" in result.output
    assert len(pd.read_csv(tmp_path / "out" / "manifest.csv")) == 11


def make_her2st(root: Path, *, extra_count_rows: int = 0, zero_rows: int = 0) -> Path:
    """A tiny HER2ST-layout section "Z1": 4 x 3 spot grid at 100 px pitch on a 600x500 image."""
    (root / "counts").mkdir(parents=True)
    (root / "spots").mkdir()
    (root / "images").mkdir()
    grid = [(x, y) for x in range(2, 6) for y in range(2, 5)]
    table = pd.DataFrame(
        {
            "x": [x for x, _ in grid],
            "y": [y for _, y in grid],
            "pixel_x": [100.0 * x for x, _ in grid],
            "pixel_y": [100.0 * y for _, y in grid],
            "selected": 1,
        }
    )
    table.to_csv(root / "spots" / "Z1_selection.tsv", sep="\t", index=False)
    rows = [f"{x}x{y}" for x, y in grid] + [f"{20 + i}x{20 + i}" for i in range(extra_count_rows)]
    genes = human_genes(300)
    values = np.random.default_rng(1).poisson(2.0, size=(len(rows), len(genes)))
    values[:zero_rows] = 0
    pd.DataFrame(values, index=rows, columns=genes).to_csv(
        root / "counts" / "Z1.tsv.gz", sep="\t", compression="gzip"
    )
    Image.fromarray(gradient_image(600, 500)).save(root / "images" / "Z1_HE.jpg", quality=95)
    return root


def test_her2st_layout_reader_on_a_synthetic_section(tmp_path):
    root = make_her2st(tmp_path / "h", zero_rows=1)
    assert detect_kind(root) is SpatialKind.HER2ST
    sample = load_sample(root)  # the only section, picked without --section
    assert sample.name == "Z1" and sample.num_spots == 12
    assert sample.fullres_mpp == pytest.approx(2.0)  # 200 µm per 100 px step
    manifest = pd.read_csv(run_extract(sample, tmp_path / "out", patch_um=100.0))
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert len(manifest) == 11  # the all-zero spot cannot be normalised: skipped, with a reason
    assert summary["skipped"] == [
        {"barcode": "2x2", "reason": "no counts (cannot be normalised or scored)"}
    ]
    row = manifest.iloc[0]
    patch = np.asarray(Image.open(tmp_path / "out" / row["patch"]), dtype=float)
    assert patch[..., 0].mean() == pytest.approx(255 * row["x_fullres_px"] / 599, abs=3)

    bad = make_her2st(tmp_path / "bad", extra_count_rows=2)
    with pytest.raises(BarcodeMismatchError, match="2 of 14 spots of Z1.tsv.gz"):
        read_her2st("Z1", bad)
    with pytest.raises(SpatialDataError, match="section=.*applies to HER2ST"):
        load_sample(make_visium(tmp_path / "v"), section="B4")


@pytest.mark.parametrize("kind", list(SpatialKind))
def test_every_kind_choice_resolves_to_a_reader(tmp_path, request, kind):
    if kind is SpatialKind.VISIUM:
        folder = make_visium(tmp_path / "v")
        assert load_sample(folder, kind=kind).kind is kind and detect_kind(folder) is kind
    elif kind is SpatialKind.HEST:
        from test_spatial_hest import make_hest

        folder = make_hest(tmp_path / "hest")
        assert load_sample(folder, kind=kind).kind is kind and detect_kind(folder) is kind
    else:
        assert request.getfixturevalue("her2st_b4").kind is kind


@pytest.mark.parametrize("level", list(ImageLevel))
def test_every_image_level_choice_resolves_to_an_image(tmp_path, level):
    folder = make_visium(tmp_path / "v")
    image = None
    if level is ImageLevel.FULLRES:
        image = tmp_path / "fullres.png"
        Image.fromarray(gradient_image(600, 400)).save(image)
    sample = load_sample(folder, image=image, image_level=level)
    assert sample.image.level is level
    assert sample.image.scale == {"fullres": 1.0, "hires": 0.5, "lowres": 0.1}[level.value]
    manifest = pd.read_csv(run_extract(sample, tmp_path / "out"))
    # the same 55 µm whatever the image: 110 / 55 / 11 source pixels
    expected_side = {"fullres": 110.0, "hires": 55.0, "lowres": 11.0}[level.value]
    assert manifest["source_side_px"].iloc[0] == pytest.approx(expected_side)


@pytest.mark.parametrize("method", list(ScoringMethod))
def test_every_scoring_method_choice_scores_spots(tmp_path, method):
    folder = make_visium(tmp_path / "v")
    manifest = run_extract(folder, tmp_path / "out", method=method.value)
    scores = pd.read_csv(manifest.parent / "scores.csv", index_col=0)
    assert scores.shape == (12, 4) and np.isfinite(scores.to_numpy()).all()
    summary = json.loads((manifest.parent / "summary.json").read_text())
    assert summary["scoring"]["method"] == method.value
