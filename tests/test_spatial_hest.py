"""HEST-1k sample folders (st/<id>.h5ad, wsis/<id>.tif, metadata/<id>.json) wherever a
Space Ranger folder is accepted: load_sample, extract_spots and `mupad st extract`."""

from __future__ import annotations

import json
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import tifffile
from PIL import Image
from typer.testing import CliRunner

from mupad.data.wsi.write import write_pyramidal_tiff
from mupad.omics.genesets import default_gene_sets
from mupad.omics.spatial import (
    MissingSpatialFileError,
    MppSource,
    ScaleFactorError,
    SpatialDataError,
    SpatialKind,
    detect_kind,
    extract_spots,
    load_sample,
)

SPOTS_XY = np.array([[100.0, 80.0], [300.0, 80.0], [200.0, 220.0]])  # level-0 px


def make_hest(root: Path, sample: str = "TENX99", meta: dict | None = None) -> Path:
    """A one-sample HEST folder: 3 spots over a colour-ramp WSI (R = x, G = y)."""
    genes = [g for s in default_gene_sets().names[:4] for g in default_gene_sets()[s]][:40]
    genes = list(dict.fromkeys(genes))
    counts = np.random.default_rng(0).poisson(3.0, (3, len(genes))).astype(np.float32)
    adata = anndata.AnnData(
        X=sp.csr_matrix(counts),
        obs=pd.DataFrame(
            {"in_tissue": [1, 1, 0], "array_row": [0, 0, 2], "array_col": [0, 4, 2]},
            index=["AAAC-1", "AAAG-1", "AACT-1"],
        ),
        var=pd.DataFrame(index=genes),
    )
    adata.obsm["spatial"] = SPOTS_XY
    (root / "st").mkdir(parents=True)
    adata.write_h5ad(root / "st" / f"{sample}.h5ad")
    yy, xx = np.mgrid[:300, :400]
    ramp = np.stack([xx * 255 // 399, yy * 255 // 299, np.full_like(xx, 128)], axis=-1)
    (root / "wsis").mkdir()
    write_pyramidal_tiff(
        root / "wsis" / f"{sample}.tif", ramp.astype(np.uint8), mpp=0.5, num_levels=2,
        tile_size_px=64,
    )  # fmt: skip
    (root / "metadata").mkdir()
    meta = {"pixel_size_um_estimated": 0.5, "spot_diameter": 55.0} if meta is None else meta
    (root / "metadata" / f"{sample}.json").write_text(json.dumps(meta))
    return root


def test_hest_sample_is_read_like_a_space_ranger_folder(tmp_path):
    root = make_hest(tmp_path / "hest")
    assert detect_kind(root) is SpatialKind.HEST
    sample = load_sample(root)
    assert sample.kind is SpatialKind.HEST and sample.name == "TENX99"
    assert sample.fullres_mpp == 0.5 and sample.mpp_source is MppSource.METADATA
    assert sample.spot_diameter_um == 55.0 and sample.image.path.name == "TENX99.tif"
    frame = sample.spots.frame
    assert np.allclose(frame[["x_fullres_px", "y_fullres_px"]].to_numpy(), SPOTS_XY)
    assert frame["in_tissue"].tolist() == [True, True, False]
    assert sample.matrix.shape == (3, len(sample.genes))
    assert load_sample(root, mpp=0.25).fullres_mpp == 0.25


def test_hest_patches_come_from_the_spot_on_the_wsi(tmp_path):
    root = make_hest(tmp_path / "hest")
    gene_sets = default_gene_sets().subset(default_gene_sets().names[:4])
    manifest = pd.read_csv(
        extract_spots(root, tmp_path / "out", size=16, patch_um=10.0, gene_sets=gene_sets,
                      progress=False)
    )  # fmt: skip
    assert manifest["barcode"].tolist() == ["AAAC-1", "AAAG-1", "AACT-1"]
    for row, (x, y) in zip(manifest.itertuples(), SPOTS_XY):
        patch = np.asarray(Image.open(tmp_path / "out" / row.patch), dtype=float)
        assert patch[..., 0].mean() == pytest.approx(255 * x / 399, abs=3)
        assert patch[..., 1].mean() == pytest.approx(255 * y / 299, abs=3)
    assert tifffile.imread(root / "wsis" / "TENX99.tif").shape == (300, 400, 3)


def test_cli_extract_and_clear_errors(tmp_path):
    from mupad.omics.st_cli import st_app

    root = make_hest(tmp_path / "hest")
    result = CliRunner().invoke(
        st_app, ["extract", str(root), "--out", str(tmp_path / "o"), "--size", "16",
                 "--section", "TENX99", "--no-progress"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (tmp_path / "o" / "manifest.csv").is_file()

    bare = make_hest(tmp_path / "bare", meta={})
    with pytest.raises(ScaleFactorError, match="--mpp"):
        load_sample(bare)
    make_hest(tmp_path / "two", sample="A")
    st = tmp_path / "two" / "st"
    (st / "B.h5ad").write_bytes((st / "A.h5ad").read_bytes())
    with pytest.raises(SpatialDataError, match=r"HEST samples \['A', 'B'\]"):
        load_sample(tmp_path / "two")
    with pytest.raises(MissingSpatialFileError, match="lacks wsis/B.tif"):
        load_sample(tmp_path / "two", section="B")
