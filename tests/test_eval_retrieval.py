"""Retrieval benchmark: the symmetric InfoNCE loss, Recall@K with repeated captions, the dual
encoder's save/load and JointImageTextEmbedder behaviour, and a real fine-tuning check on
the bundled Kather tiles with their class captions (frozen Inception + MiniLM towers).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from mupad.applications.demo import KATHER_CAPTIONS
from mupad.data.tiles import bundled_kather_dir
from mupad.evaluation.cli import evaluate_app
from mupad.evaluation.images import load_image_set
from mupad.evaluation.retrieval import (
    DualEncoder,
    DualEncoderConfig,
    FrozenTowers,
    RetrievalTrainConfig,
    chance_recall,
    encode_pairs,
    new_dual_encoder,
    read_pairs,
    recall_at_k,
    run_retrieval,
    symmetric_info_nce,
)
from mupad.evaluation.similarity import JointImageTextEmbedder, text_image_similarity
from mupad.evaluation.stats import EvaluationError

KATHER = bundled_kather_dir()  # 8 classes x 12 tiles
INPUT_SIZE = 75  # Inception's smallest input: 16x fewer pixels than 299, same features' role
TEST_PER_CLASS = 4


# ----------------------------------------------------------------------------- loss


def _unit(rows: int, dim: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_info_nce_is_symmetric_and_equals_clip_loss_for_distinct_captions():
    images, texts = _unit(6, 5, 0), _unit(6, 5, 1)
    ids = torch.tensor([0, 0, 1, 2, 2, 2])
    assert symmetric_info_nce(images, texts, 10.0) == pytest.approx(
        float(symmetric_info_nce(texts, images, 10.0)), abs=1e-6
    )
    assert symmetric_info_nce(images, texts, 10.0, ids) == pytest.approx(
        float(symmetric_info_nce(texts, images, 10.0, ids)), abs=1e-6
    )
    logits = 10.0 * images @ texts.T
    labels = torch.arange(6)
    clip = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    assert float(symmetric_info_nce(images, texts, 10.0)) == pytest.approx(float(clip), abs=1e-6)


def test_info_nce_closed_forms():
    count = 8
    same = F.normalize(torch.ones(count, 4), dim=1)  # uninformative: every logit equal
    assert float(symmetric_info_nce(same, same, 20.0)) == pytest.approx(math.log(count), abs=1e-5)
    ids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    assert float(symmetric_info_nce(same, same, 20.0, ids)) == pytest.approx(
        math.log(count), abs=1e-5
    )
    sharp = torch.eye(count, 16)  # perfectly matched, orthonormal, scale 100
    assert float(symmetric_info_nce(sharp, sharp, 100.0)) < 1e-6


# ----------------------------------------------------------------------------- recall


def _brute_force_recall(images, texts, ids, k):
    """Sort the candidates of every query and look at the top K (no tie handling needed:
    random embeddings, and identical captions are one gallery entry)."""
    distinct = sorted(set(ids.tolist()))
    gallery = torch.stack([texts[ids.tolist().index(c)] for c in distinct])
    hits = {"image_to_text": 0, "text_to_image": 0}
    for query in range(len(ids)):
        top_captions = torch.argsort(images[query] @ gallery.T, descending=True)[:k]
        hits["image_to_text"] += ids[query].item() in {distinct[i] for i in top_captions}
        top_images = torch.argsort(texts[query] @ images.T, descending=True)[:k]
        hits["text_to_image"] += bool((ids[top_images] == ids[query]).any())
    return {d: h / len(ids) for d, h in hits.items()}


IDS = torch.tensor([3, 3, 3, 1, 7, 7, 0, 4, 4, 4, 4, 5])  # 6 distinct captions over 12 pairs


def test_recall_matches_brute_force_with_repeated_captions():
    images = _unit(12, 6, 2)
    texts = _unit(8, 6, 3)[IDS]  # identical captions have identical text embeddings
    recall = recall_at_k(images, texts, IDS, ks=range(1, 7))
    for k in range(1, 7):
        expected = _brute_force_recall(images, texts, IDS, k)
        assert recall["image_to_text"][k] == pytest.approx(expected["image_to_text"])
        assert recall["text_to_image"][k] == pytest.approx(expected["text_to_image"])
    assert recall["image_to_text"][6] == 1.0
    assert 0 < recall["image_to_text"][1] < 1 and 0 < recall["text_to_image"][1] < 1
    # Perfectly aligned embeddings hit at K = 1 in both directions.
    perfect = recall_at_k(texts, texts, IDS, ks=(1,))
    assert perfect == {"image_to_text": {1: 1.0}, "text_to_image": {1: 1.0}}


def test_chance_recall_closed_forms_and_simulation():
    count, distinct = len(IDS), 6
    chance = chance_recall(IDS, [1, 3, 6])
    for k in (1, 3, 6):
        assert chance["image_to_text"][k] == pytest.approx(k / distinct)
        expected = (
            sum(1 - math.comb(count - int((IDS == i).sum()), k) / math.comb(count, k) for i in IDS)
            / count
        )
        assert chance["text_to_image"][k] == pytest.approx(expected)
    # Random embeddings: the mean recall over many draws approaches the chance level.
    draws = [
        recall_at_k(_unit(12, 8, s), _unit(8, 8, 1000 + s)[IDS], IDS, (3,)) for s in range(400)
    ]
    for direction in ("image_to_text", "text_to_image"):
        simulated = sum(d[direction][3] for d in draws) / len(draws)
        assert simulated == pytest.approx(chance[direction][3], abs=0.03)


def test_k_larger_than_the_candidates_is_an_error():
    with pytest.raises(EvaluationError, match="Recall@13 needs more than 12 candidates"):
        recall_at_k(_unit(12, 3, 0), _unit(12, 3, 1), torch.arange(12), ks=(1, 13))
    with pytest.raises(EvaluationError, match="Recall@10 needs more than 6 candidates.*K <= 6"):
        chance_recall(IDS, [1, 10])
    with pytest.raises(EvaluationError, match="K >= 1"):
        chance_recall(IDS, [0])


# ----------------------------------------------------------------------------- pairs


def test_read_pairs_from_tiles_csv_and_augment_folders(tmp_path):
    tiles = read_pairs(KATHER, {"01_TUMOR": "a tumour"})
    assert len(tiles) == 96 and tiles.captions[0] == "a tumour"
    assert tiles.captions[-1] == "H&E histology: empty"  # `mupad train`'s default caption
    csv = tmp_path / "pairs.csv"
    pd.DataFrame({"image": [str(p) for p in tiles.paths[:3]], "caption": ["x", "y", "x"]}).to_csv(
        csv, index=False
    )
    assert read_pairs(csv).captions == ("x", "y", "x")
    augment = tmp_path / "aug"
    augment.mkdir()
    pd.DataFrame(
        {
            "path": ["01_TUMOR/a_aug0.png", "01_TUMOR/a.png"],
            "class": ["01_TUMOR"] * 2,
            "kind": ["synthetic", "real"],
            "source": ["/x/a.png"] * 2,
            "caption": ["a tumour", ""],
        }
    ).to_csv(augment / "index.csv", index=False)
    pairs = read_pairs(augment)
    assert pairs.paths == (augment / "01_TUMOR" / "a_aug0.png",) and pairs.captions == ("a tumour",)


def test_read_pairs_bad_input(tmp_path):
    with pytest.raises(EvaluationError, match="does not exist"):
        read_pairs(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvaluationError, match="no images"):
        read_pairs(tmp_path / "empty")
    with pytest.raises(EvaluationError, match=r"class\(es\) \['09_MUSCLE'\]"):
        read_pairs(KATHER, {"09_MUSCLE": "skeletal muscle"})
    csv = tmp_path / "pairs.csv"
    pd.DataFrame({"image": [str(next(KATHER.glob("*/*.png")))], "caption": [""]}).to_csv(
        csv, index=False
    )
    with pytest.raises(EvaluationError, match="have no caption"):
        read_pairs(csv)


# ----------------------------------------------------------------------------- real data


def _split_csvs(folder: Path) -> tuple[Path, Path]:
    """train.csv (8 tiles per class) and test.csv (4 per class) of the bundled tiles."""
    pairs = read_pairs(KATHER, KATHER_CAPTIONS)
    rows = {"train": [], "test": []}
    for path, caption in zip(pairs.paths, pairs.captions):
        index = sorted(path.parent.glob("*.png")).index(path)
        rows["test" if index < TEST_PER_CLASS else "train"].append(
            {"image": str(path), "caption": caption}
        )
    for name, table in rows.items():
        pd.DataFrame(table).to_csv(folder / f"{name}.csv", index=False)
    return folder / "train.csv", folder / "test.csv"


@pytest.fixture(scope="module")
def kather(tmp_path_factory):
    """Frozen towers and cached features of the bundled tiles, split 8 / 4 per class."""
    folder = tmp_path_factory.mktemp("retrieval")
    train_csv, test_csv = _split_csvs(folder)
    config = DualEncoderConfig(image_input_size=INPUT_SIZE, embed_dim=64, hidden_dim=128)
    towers = FrozenTowers(config)
    cache = folder / "cache"
    train, test = (
        encode_pairs(read_pairs(csv), towers, cache_dir=cache, progress=False)
        for csv in (train_csv, test_csv)
    )
    return {
        "config": config,
        "towers": towers,
        "train": train,
        "test": test,
        "csv": (train_csv, test_csv),
        "cache": cache,
    }


def test_fine_tuning_on_kather_raises_held_out_recall_far_above_chance(kather):
    model = new_dual_encoder(kather["towers"], kather["config"])
    ks = (1, 5)
    train_config = RetrievalTrainConfig(steps=60, batch_size=64, learning_rate=2e-3)
    result = run_retrieval(model, kather["train"], kather["test"], train_config, ks, progress=False)
    assert result.after.num_pairs == 32 and result.after.num_captions == 8
    assert result.chance["image_to_text"][1] == pytest.approx(1 / 8)
    assert result.chance["text_to_image"][1] == pytest.approx(TEST_PER_CLASS / 32)
    for direction in ("image_to_text", "text_to_image"):
        assert result.after.recall[direction][1] > result.chance[direction][1] + 0.3
        assert result.after.recall[direction][1] > result.before.recall[direction][1] + 0.2
    # 8 identical captions per class in a batch of 64: the loss floor is log(8).
    assert result.losses[-1] < result.losses[0] and result.losses[-1] > math.log(8) - 1e-3
    json.dumps(result.to_dict(), allow_nan=False)


def test_dual_encoder_round_trip_and_joint_embedder_protocol(kather, tmp_path):
    model = new_dual_encoder(kather["towers"], kather["config"])
    assert isinstance(model, JointImageTextEmbedder)
    test = kather["test"]
    model.save(tmp_path / "model")
    assert {p.name for p in (tmp_path / "model").iterdir()} == {"config.json", "heads.safetensors"}
    loaded = DualEncoder.from_pretrained(tmp_path / "model")
    assert loaded.config == model.config
    assert torch.equal(loaded.project_texts(test.text), model.project_texts(test.text))
    loaded.towers = kather["towers"]
    pairs = read_pairs(kather["csv"][1])
    images = load_image_set(pairs.paths[:2]).images
    embedded = loaded.embed_images(images)
    assert embedded.shape == (2, 64)
    assert torch.allclose(embedded, model.project_images(test.image[:2]), atol=1e-4)
    assert torch.allclose(embedded.norm(dim=1), torch.ones(2), atol=1e-5)
    result = text_image_similarity(images, list(pairs.captions[:2]), loaded, iterations=2)
    assert len(result.per_pair) == 2


def test_cli_writes_metrics_report_figure_and_model(kather, tmp_path):
    train_csv, test_csv = kather["csv"]
    out = tmp_path / "out"
    common = [
        "retrieval", "--train", str(train_csv), "--test", str(test_csv), "--out", str(out),
        "--input-size", str(INPUT_SIZE), "--cache-dir", str(kather["cache"]), "--no-progress",
    ]  # fmt: skip
    result = CliRunner().invoke(evaluate_app, [*common, "--k", "1,5", "--steps", "5"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())["sections"]["Retrieval"]["metrics"]
    assert {"image_to_text_R@5_after", "text_to_image_R@1_chance"} <= set(metrics)
    assert (out / "recall.png").is_file() and (out / "dual_encoder" / "heads.safetensors").is_file()
    too_large = CliRunner().invoke(evaluate_app, common)  # default K = 10,50 > 8 distinct captions
    assert too_large.exit_code == 2 and "Recall@10 needs more than 8 candidates" in too_large.output
    overlap = CliRunner().invoke(
        evaluate_app, [*common[:4], str(train_csv), *common[5:], "--k", "1"]
    )
    assert overlap.exit_code == 2 and "both the training and the test pairs" in overlap.output
