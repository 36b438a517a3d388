"""The README's "Python API" snippets run as written (tiny model, stand-in image encoder)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mupad.config import model_preset
from mupad.models import SiT
from test_prepare_patch_coords import ENCODER  # a stand-in image encoder (dim 3)

SHARED_SLIDE = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "package_samples"
    / "cmu_small_region.svs"
)


@pytest.mark.skipif(not SHARED_SLIDE.is_file(), reason=f"shared CC0 slide missing: {SHARED_SLIDE}")
def test_slide_to_generated_tiles(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = SiT(model_preset("tiny", in_channels=3, sample_size=16, image_dim=3)).save_pretrained(
        tmp_path / "run"
    )
    # --- as in the README (checkpoint, image encoder, tile size and steps made tiny) ---
    from PIL import Image

    from mupad.applications.batch_generate import sample_chunk
    from mupad.applications.generation_model import GenerationModel, GenerationSettings
    from mupad.applications.prompts import PromptRecord
    from mupad.config import SampleConfig
    from mupad.data.wsi import iter_tiles, open_slide

    with open_slide(SHARED_SLIDE) as slide:
        coord, tile = next(iter_tiles(slide, tile_size=64, target_mpp=2.0))  # uint8 (64, 64, 3)
    Image.fromarray(tile).save("reference.png")
    model = GenerationModel(GenerationSettings(checkpoint=str(run), image_encoder=ENCODER))
    cond = model.encode(PromptRecord(id="r", seed=0, image="reference.png")).cond
    images = sample_chunk(model, cond, SampleConfig(num_steps=3), 4).numpy()
    # ---
    assert images.dtype == np.uint8 and images.shape == (4, 3, 16, 16)


def test_spot_table_to_pathway_scores(tmp_path):
    from test_spatial_hest import make_hest

    make_hest(tmp_path / "hest_data")
    # --- as in the README ---
    from mupad.omics.genesets import default_gene_sets
    from mupad.omics.spatial import load_sample, score_spots

    sample = load_sample(tmp_path / "hest_data", section="TENX99")
    scores = score_spots(sample.counts, default_gene_sets()).scores  # spots x pathways
    # ---
    assert isinstance(scores, pd.DataFrame) and scores.shape[0] == 3
    assert scores.shape[1] > 0 and np.isfinite(scores.to_numpy()).all()
