"""Cosine similarity of generated images to their references and to their prompts.

    image_image_similarity(generated_features, reference_features)   paired rows (N, D)
    text_image_similarity(images, texts, embedder)                   paired image/prompt
    -> SimilarityResult(per_pair (N,), mean Estimate with a paired bootstrap interval)

Image–image works with any feature extractor (`mupad.evaluation.features`). Text–image needs
a model that embeds images and texts into one space — a `JointImageTextEmbedder`: CONCH's
contrastive towers (`ConchJointEmbedder`, when the `conch` package and its weights are
installed) or a dual encoder fine-tuned with `mupad.evaluation.retrieval`. Image-only
extractors such as Inception cannot score text–image similarity; asking for it raises an
EvaluationError that says so.

Pairing files (`pair_image_files`): by NAME, each generated image is matched to the
reference image with the same path relative to its folder, ignoring the suffix
(`gen/tumor/007.png` <-> `ref/tumor/007.jpg`); references with no generated counterpart are
ignored, a generated image without a reference is an error. By ORDER, the i-th generated
file (sorted paths) goes with the i-th reference file and the counts must be equal.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from mupad.conditioning.image import ConchEncoder, image_encoder_names
from mupad.conditioning.image_encoders.base import require
from mupad.conditioning.image_encoders.conch import CONCH_INSTALL, CONCH_NAME
from mupad.evaluation.fid import DEFAULT_BOOTSTRAP_ITERATIONS
from mupad.evaluation.images import as_uint8_images, image_files
from mupad.evaluation.stats import Estimate, EvaluationError, bootstrap


class PairBy(str, enum.Enum):
    """How generated images find their reference images (see the module doc)."""

    NAME = "name"
    ORDER = "order"


def _keyed(root: Path, files: list[Path], what: str) -> dict[str, Path]:
    keyed: dict[str, Path] = {}
    for path in files:
        key = path.relative_to(root).with_suffix("").as_posix() if root.is_dir() else path.stem
        if key in keyed:
            raise EvaluationError(
                f"{what} {keyed[key]} and {path} have the same name; pairing by name needs "
                "one file per name (or pair by order)"
            )
        keyed[key] = path
    return keyed


def pair_image_files(
    generated: str | Path, reference: str | Path, by: PairBy = PairBy.NAME
) -> list[tuple[Path, Path]]:
    """(generated file, reference file) pairs from two folders, in sorted generated order."""
    generated, reference = Path(generated), Path(reference)
    gen_files, ref_files = image_files(generated), image_files(reference)
    for root, files in ((generated, gen_files), (reference, ref_files)):
        if not files:
            raise EvaluationError(f"no images under {root}")
    if PairBy(by) is PairBy.ORDER:
        if len(gen_files) != len(ref_files):
            raise EvaluationError(
                f"pairing by order needs as many reference as generated images, got "
                f"{len(ref_files)} under {reference} and {len(gen_files)} under {generated}"
            )
        return list(zip(gen_files, ref_files))
    gen_keyed = _keyed(generated, gen_files, "generated images")
    ref_keyed = _keyed(reference, ref_files, "reference images")
    unmatched = [key for key in gen_keyed if key not in ref_keyed]
    if unmatched:
        raise EvaluationError(
            f"{len(unmatched)} generated image(s) have no reference of the same name under "
            f"{reference}, e.g. {', '.join(unmatched[:5])}; name them alike or pair by order"
        )
    return [(gen_keyed[key], ref_keyed[key]) for key in gen_keyed]


def cosine_similarities(features_a: np.ndarray, features_b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of paired (N, D) arrays -> (N,) float64 in [-1, 1]."""
    a = np.asarray(features_a, dtype=np.float64)
    b = np.asarray(features_b, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise EvaluationError(
            f"paired features must be two (N, D) arrays of one shape, got {a.shape}, {b.shape}"
        )
    if a.shape[0] == 0:
        raise EvaluationError("no pairs to compare")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise EvaluationError("features contain NaN or infinite values; re-extract them")
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)  # (N,)
    if np.any(norms == 0):
        rows = np.flatnonzero(norms == 0)[:5].tolist()
        raise EvaluationError(f"zero feature vectors at pair(s) {rows}: cosine is undefined")
    return np.clip(np.einsum("nd,nd->n", a, b) / norms, -1.0, 1.0)


@dataclass(frozen=True)
class SimilarityResult:
    """Per-pair cosine similarities and their mean with a paired bootstrap interval."""

    kind: str  # "image-image" or "text-image"
    embedder: str
    per_pair: tuple[float, ...]
    mean: Estimate

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "embedder": self.embedder,
            "mean": self.mean.to_dict(),
            "per_pair": list(self.per_pair),
        }


def _result(
    kind: str, embedder: str, values: np.ndarray, iterations: int, seed: int
) -> SimilarityResult:
    if len(values) < 2:
        raise EvaluationError(f"{kind} similarity needs at least 2 pairs, got {len(values)}")
    mean = bootstrap(np.mean, values, iterations=iterations, seed=seed, paired=True)
    return SimilarityResult(kind, embedder, tuple(float(v) for v in values), mean)


def image_image_similarity(
    generated_features: np.ndarray,
    reference_features: np.ndarray,
    *,
    extractor: str = "",
    iterations: int = DEFAULT_BOOTSTRAP_ITERATIONS,
    seed: int = 0,
) -> SimilarityResult:
    """Cosine similarity of each generated image's features to its reference's (rows paired)."""
    values = cosine_similarities(generated_features, reference_features)
    return _result("image-image", extractor, values, iterations, seed)


@runtime_checkable
class JointImageTextEmbedder(Protocol):
    """Embeds images and texts into one space (rows comparable by cosine)."""

    name: str

    def embed_images(self, images: torch.Tensor) -> torch.Tensor | np.ndarray:
        """uint8 images (N, 3, H, W) -> (N, D)."""
        ...

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor | np.ndarray:
        """N texts -> (N, D)."""
        ...


def _as_array(embeddings: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(embeddings, torch.Tensor):
        embeddings = embeddings.detach().to("cpu", torch.float64).numpy()
    return np.asarray(embeddings, dtype=np.float64)


def text_image_similarity(
    images: torch.Tensor | np.ndarray,
    texts: Sequence[str],
    embedder: JointImageTextEmbedder,
    *,
    iterations: int = DEFAULT_BOOTSTRAP_ITERATIONS,
    seed: int = 0,
) -> SimilarityResult:
    """Cosine similarity of each image (N, 3, H, W) to its prompt `texts[i]` in a joint space."""
    if not isinstance(embedder, JointImageTextEmbedder):
        raise EvaluationError(
            f"{getattr(embedder, 'name', type(embedder).__name__)} embeds images only; "
            "text–image similarity needs a joint image–text embedder (CONCH, or a dual encoder "
            "from mupad.evaluation.retrieval). With image features alone only image–image "
            "similarity is available"
        )
    if isinstance(texts, str):
        raise EvaluationError("texts must be a sequence of prompts, one per image, not a string")
    pixels = as_uint8_images(images)  # (N, 3, H, W)
    if len(texts) != pixels.shape[0]:
        raise EvaluationError(f"{pixels.shape[0]} images but {len(texts)} prompts; pass one each")
    image_embeddings = _as_array(embedder.embed_images(pixels))  # (N, D)
    text_embeddings = _as_array(embedder.embed_texts(list(texts)))  # (N, D)
    values = cosine_similarities(image_embeddings, text_embeddings)
    return _result("text-image", embedder.name, values, iterations, seed)


class ConchJointEmbedder:
    """CONCH's contrastive image and text towers (512-d, the space of its zero-shot use).

    Images go through CONCH's own preprocessing (`ConchEncoder`) and
    `encode_image(x, proj_contrast=True)`; texts through CONCH's tokenizer and `encode_text`.
    Needs the `conch` package (not on PyPI) and the MahmoodLab/CONCH weights.
    """

    name = CONCH_NAME

    def __init__(
        self,
        weights: str | Path | None = None,
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        encoder: ConchEncoder | None = None,
    ) -> None:
        # The package first, so a missing install is reported before missing weights.
        self._conch = require("conch.open_clip_custom", CONCH_INSTALL, "CONCH text–image scores")
        self.encoder = encoder or ConchEncoder(weights, device=device, batch_size=batch_size)
        self.tokenizer = self._conch.get_tokenizer()

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        parts = []
        for start in range(0, images.shape[0], self.encoder.batch_size):
            inputs = self.encoder.preprocess(images[start : start + self.encoder.batch_size])
            parts.append(
                self.encoder.model.encode_image(inputs, proj_contrast=True, normalize=False)
            )
        return torch.cat(parts)  # (N, 512)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        parts = []
        for start in range(0, len(texts), self.encoder.batch_size):
            chunk = list(texts[start : start + self.encoder.batch_size])
            tokens = self._conch.tokenize(self.tokenizer, chunk).to(self.encoder.device)
            parts.append(self.encoder.model.encode_text(tokens, normalize=False))
        return torch.cat(parts)  # (N, 512)


JOINT_EMBEDDERS = (CONCH_NAME,)


def joint_embedder(
    name: str = CONCH_NAME,
    weights: str | Path | None = None,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
) -> JointImageTextEmbedder:
    """A built-in joint image–text embedder by name (today: "conch")."""
    key = str(name).strip().lower()
    if key == CONCH_NAME:
        return ConchJointEmbedder(weights, device=device, batch_size=batch_size)
    if key in image_encoder_names():
        raise EvaluationError(
            f"{key} has no text tower: it gives image features only, so only image–image "
            f"similarity is available with it. For text–image similarity use one of: "
            f"{', '.join(JOINT_EMBEDDERS)}, or a dual encoder from mupad.evaluation.retrieval"
        )
    raise EvaluationError(
        f"unknown joint image–text embedder {name!r}; choose one of: {', '.join(JOINT_EMBEDDERS)}"
    )


__all__ = [
    "JOINT_EMBEDDERS",
    "ConchJointEmbedder",
    "JointImageTextEmbedder",
    "PairBy",
    "SimilarityResult",
    "cosine_similarities",
    "image_image_similarity",
    "joint_embedder",
    "pair_image_files",
    "text_image_similarity",
]
