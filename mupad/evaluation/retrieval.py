"""Retrieval benchmark: fine-tune a dual encoder on (synthetic) image–caption pairs with a
symmetric InfoNCE loss; report Recall@K image->text and text->image on held-out real pairs.

The paper fine-tunes CLIP ViT-B/16 on 100 K synthetic pairs. Here the towers are frozen
feature extractors with trainable projection heads (a CPU-sized version of the same
protocol; the frozen towers also make the "before" model a fixed random projection, so any
gain comes from the pairs):

    image: an image extractor of `mupad.evaluation.features` (default "inception": the
           2048-d pool3 features), features cached on disk per image set
    text:  a text encoder of `mupad.conditioning.text` (default "minilm": the 384-d
           all-MiniLM-L6-v2 sentence embedding, `TextEncoder.pooled`)
    heads: LayerNorm -> Linear(hidden) -> GELU -> Linear(embed_dim), outputs L2-normalised
    logit scale: exp(s), s learnable, initialised at log(1 / 0.07), clamped to
           temperatures in [0.01, 1] (scales in [1, 100])

Loss (`symmetric_info_nce`): the mean of the image->text and text->image cross-entropies of
the scaled cosine-similarity matrix of a batch. Several images of a batch may share one
caption (class-level captions); their texts are then identical and cannot be told apart, so
every pair with the same caption counts as a positive, with the target mass spread evenly
over them (with distinct captions this is exactly CLIP's loss).

Recall@K (`recall_at_k`) on N held-out pairs (image i, caption i), similarity = cosine of the
projected embeddings. Identical captions have identical embeddings, so they are one
candidate, not several:
  image->text: candidates = the M distinct captions of the test set; image i hits if its
               own caption is among its K most similar captions;
  text->image: candidates = the N images; the text of pair j hits if an image whose caption
               is identical to caption j is among its K most similar images;
  R@K = hits / N in each direction (one query per pair, so a caption shared by m pairs is
  queried m times). With distinct captions these are the usual CLIP recalls. Ties: a
  non-matching candidate scoring exactly as high as the best match counts as ranked above
  it (pessimistic; exact ties do not occur with real embeddings). K larger than M or N is an
  error (every query would hit): with class-level captions (M = number of classes) only
  small K are defined, and image->text Recall@K is then top-K classification accuracy.
`chance_recall` gives the expected R@K of a random ranking (K / M image->text; the
hypergeometric 1 - C(N-m, K) / C(N, K) for a caption shared by m images text->image), the
floor to compare against when captions repeat.

Train and test pairs are read by `read_pairs`: a tile folder `<class>/<image>` with captions
{class or "<class>/<file>": caption} (classes without one get `default_caption(class)`, as in
`mupad train`), a CSV manifest with columns image, caption (as `mupad prepare` reads it), or
the output folder of `mupad augment` (its index.csv: the synthetic images and their captions).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from scipy import stats as scipy_stats
from torch import nn
from tqdm.auto import tqdm

from mupad.conditioning.registry import get_encoder
from mupad.conditioning.text import DEFAULT_TEXT_MODEL, TextEncoder
from mupad.data.prepare_sources import PrepareError, SourceKind, discover_sources
from mupad.data.tiles import IMAGE_SUFFIXES
from mupad.evaluation.features import (
    DEFAULT_EXTRACTOR,
    FeatureExtractor,
    cached_features,
    extract_features,
    feature_extractor,
)
from mupad.evaluation.images import as_uint8_images
from mupad.evaluation.stats import EvaluationError
from mupad.fileio import atomic_directory
from mupad.training.captioned_tiles import default_caption

logger = logging.getLogger(__name__)

AUGMENT_INDEX = "index.csv"  # written by `mupad augment`
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "heads.safetensors"
DEFAULT_KS = (10, 50)
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 1.0


# ----------------------------------------------------------------------------- pairs


@dataclass(frozen=True)
class PairSet:
    """Image files and their captions, row-aligned."""

    paths: tuple[Path, ...]
    captions: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)


def _from_augment_folder(folder: Path) -> PairSet:
    try:
        table = pd.read_csv(folder / AUGMENT_INDEX, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as error:
        raise EvaluationError(f"cannot read {folder / AUGMENT_INDEX}: {error}") from None
    missing = [c for c in ("path", "kind", "caption") if c not in table.columns]
    if missing:
        raise EvaluationError(
            f"{folder / AUGMENT_INDEX} lacks the column(s) {missing}; expected the index of "
            "`mupad augment`"
        )
    table = table[table["kind"] == "synthetic"]
    if table.empty:
        raise EvaluationError(f"{folder / AUGMENT_INDEX} lists no synthetic images")
    return PairSet(
        tuple(folder / p for p in table["path"]), tuple(c.strip() for c in table["caption"])
    )


def read_pairs(source: str | Path, captions: Mapping[str, str] | None = None) -> PairSet:
    """Image–caption pairs of a tile folder (+ captions), a CSV manifest or an augment folder.

    Raises EvaluationError for a missing/empty input or a pair without a caption.
    """
    source = Path(source)
    if not source.exists():
        raise EvaluationError(f"pair source {source} does not exist")
    if source.is_dir() and (source / AUGMENT_INDEX).is_file():
        if captions:
            raise EvaluationError(
                f"{source} is a `mupad augment` folder whose index.csv carries the captions; "
                "drop the captions file"
            )
        pairs = _from_augment_folder(source)
    else:
        kind = SourceKind.PAIRED if source.is_file() else SourceKind.TILES
        mapping = dict(captions or {})
        if source.is_dir():  # classes without a caption: the caption `mupad train` uses
            classes = [
                p.name for p in source.iterdir() if p.is_dir() and not p.name.startswith(".")
            ]
            unknown = sorted(k for k in mapping if "/" not in k and k not in classes)
            if unknown:
                raise EvaluationError(
                    f"the captions name class(es) {unknown} that {source} does not have "
                    f"(classes: {sorted(classes)})"
                )
            for name in classes:
                mapping.setdefault(name, default_caption(name))
        try:
            found = discover_sources(source, kind, captions=mapping, tiles_per_source=1 << 30)
        except PrepareError as error:
            raise EvaluationError(str(error)) from None
        items = [item for found_source in found for item in found_source.items]
        pairs = PairSet(tuple(i.path for i in items), tuple(i.caption.strip() for i in items))
    empty = [str(p) for p, c in zip(pairs.paths, pairs.captions) if not c]
    if empty:
        raise EvaluationError(
            f"{len(empty)} image(s) of {source} have no caption (e.g. {', '.join(empty[:3])}); "
            "put images in class folders, give a caption per class, or fill the caption column"
        )
    if not pairs.paths:
        raise EvaluationError(f"no image–caption pairs in {source}")
    odd = [str(p) for p in pairs.paths if p.suffix.lower() not in IMAGE_SUFFIXES]
    if odd:
        raise EvaluationError(f"not image files: {', '.join(odd[:3])}")
    return pairs


# ----------------------------------------------------------------------------- towers


@dataclass(frozen=True)
class DualEncoderConfig:
    """Everything that defines a dual encoder; saved as config.json next to its heads."""

    image_extractor: str = DEFAULT_EXTRACTOR
    image_weights: str | None = None
    image_input_size: int | None = None  # network input side, for extractors with one
    text_encoder: str = DEFAULT_TEXT_MODEL
    text_weights: str | None = None
    image_dim: int = 2048
    text_dim: int = 384
    embed_dim: int = 256
    hidden_dim: int = 512
    init_temperature: float = 0.07
    seed: int = 0  # initial head weights

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DualEncoderConfig:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise EvaluationError(
                f"dual-encoder config has unknown field(s) {sorted(unknown)}; was it written "
                "by another version of mupad?"
            )
        return cls(**data)


class FrozenTowers:
    """The frozen image extractor and text encoder of a dual encoder."""

    def __init__(
        self, config: DualEncoderConfig, *, device: str = "cpu", batch_size: int = 32
    ) -> None:
        options = {} if config.image_input_size is None else {"image_size": config.image_input_size}
        try:
            self.image: FeatureExtractor = feature_extractor(
                config.image_extractor, config.image_weights, device=device,
                batch_size=batch_size, **options,
            )  # fmt: skip
        except TypeError as error:
            if not options:
                raise
            raise EvaluationError(
                f"the image extractor {config.image_extractor!r} does not take an input size; "
                f"leave it unset ({error})"
            ) from None
        text = get_encoder(config.text_encoder, weights=config.text_weights, device=device)
        if not isinstance(text, TextEncoder):
            raise EvaluationError(
                f"{config.text_encoder!r} is not a text encoder; use e.g. {DEFAULT_TEXT_MODEL!r}"
            )
        self.text = text

    @property
    def dims(self) -> tuple[int, int]:
        return self.image.dim, self.text.dim

    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """Captions -> pooled sentence embeddings (N, D_text); each distinct caption once."""
        if isinstance(texts, str) or not texts:
            raise EvaluationError("texts must be a non-empty list of captions")
        distinct = list(dict.fromkeys(texts))
        pooled = self.text.pooled(distinct).float().cpu()  # (M, D_text)
        row = {caption: i for i, caption in enumerate(distinct)}
        return pooled[torch.tensor([row[t] for t in texts])]  # (N, D_text)


def caption_ids(captions: Sequence[str]) -> torch.Tensor:
    """(N,) int64 ids in order of first appearance: equal ids <=> identical captions."""
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(c, len(ids)) for c in captions], dtype=torch.long)


@dataclass(frozen=True)
class PairFeatures:
    """Frozen-tower features of a pair set."""

    image: torch.Tensor  # (N, D_image) float32
    text: torch.Tensor  # (N, D_text) float32
    captions: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def caption_ids(self) -> torch.Tensor:
        """(N,) int64: equal ids <=> identical captions."""
        return caption_ids(self.captions)


def encode_pairs(
    pairs: PairSet,
    towers: FrozenTowers,
    *,
    size: int | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> PairFeatures:
    """Features of every pair; image features come from (and go to) the feature cache.

    `size`: centre-crop + resize side for reading images of different sizes (None: as is).
    """
    image = cached_features(
        list(pairs.paths), towers.image, cache_dir, size=size, progress=progress
    )  # (N, D_image) float64
    return PairFeatures(
        image=torch.from_numpy(image).float(),
        text=towers.text_features(pairs.captions),
        captions=pairs.captions,
    )


# ----------------------------------------------------------------------------- model


def _head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.LayerNorm(in_dim),  # frozen features come at very different scales
        nn.Linear(in_dim, hidden_dim),
        nn.GELU(),
        nn.Linear(hidden_dim, out_dim),
    )


class DualEncoder(nn.Module):
    """Projection heads over frozen towers; a `JointImageTextEmbedder` once towers are attached.

    The state dict holds only the heads and the logit scale; the towers are rebuilt from the
    config's names (`towers` built lazily on the first embed_images/embed_texts call).
    """

    def __init__(self, config: DualEncoderConfig) -> None:
        super().__init__()
        if config.embed_dim < 1 or config.hidden_dim < 1:
            raise EvaluationError("embed_dim and hidden_dim must be >= 1")
        if not MIN_TEMPERATURE <= config.init_temperature <= MAX_TEMPERATURE:
            raise EvaluationError(
                f"init_temperature must lie in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], got "
                f"{config.init_temperature}"
            )
        self.config = config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.image_head = _head(config.image_dim, config.hidden_dim, config.embed_dim)
            self.text_head = _head(config.text_dim, config.hidden_dim, config.embed_dim)
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.init_temperature)))
        self.towers: FrozenTowers | None = None

    @property
    def name(self) -> str:
        return f"dual-encoder({self.config.image_extractor}+{self.config.text_encoder})"

    def logit_scale(self) -> torch.Tensor:
        """exp(s) clamped to [1 / MAX_TEMPERATURE, 1 / MIN_TEMPERATURE]."""
        low, high = math.log(1.0 / MAX_TEMPERATURE), math.log(1.0 / MIN_TEMPERATURE)
        return self.log_logit_scale.clamp(low, high).exp()

    def project_images(self, features: torch.Tensor) -> torch.Tensor:
        """Frozen image features (N, D_image) -> unit embeddings (N, embed_dim)."""
        return F.normalize(self.image_head(features.float()), dim=-1)

    def project_texts(self, features: torch.Tensor) -> torch.Tensor:
        """Frozen text features (N, D_text) -> unit embeddings (N, embed_dim)."""
        return F.normalize(self.text_head(features.float()), dim=-1)

    def _towers(self) -> FrozenTowers:
        if self.towers is None:
            self.towers = FrozenTowers(self.config)
        return self.towers

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 images (N, 3, H, W) (or float in [-1, 1]) -> unit embeddings (N, embed_dim)."""
        pixels = as_uint8_images(images)
        features = extract_features(pixels, self._towers().image, progress=False)  # (N, D)
        return self.project_images(torch.from_numpy(features).float()).cpu()

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """N texts -> unit embeddings (N, embed_dim)."""
        return self.project_texts(self._towers().text_features(list(texts))).cpu()

    def save(self, folder: str | Path) -> Path:
        """config.json + heads.safetensors, written atomically into `folder`."""
        folder = Path(folder)
        with atomic_directory(folder) as tmp:
            (tmp / CONFIG_FILE).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
            state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_FILE))
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> DualEncoder:
        """Load a dual encoder written by `save` (safetensors only, no pickles)."""
        folder = Path(folder)
        try:
            config = DualEncoderConfig.from_dict(json.loads((folder / CONFIG_FILE).read_text()))
            state = load_file(str(folder / WEIGHTS_FILE))
        except (OSError, json.JSONDecodeError) as error:
            raise EvaluationError(
                f"cannot load a dual encoder from {folder} ({error}); expected {CONFIG_FILE} "
                f"and {WEIGHTS_FILE} written by DualEncoder.save"
            ) from None
        model = cls(config)
        model.load_state_dict(state)
        return model.eval()


def new_dual_encoder(towers: FrozenTowers, config: DualEncoderConfig) -> DualEncoder:
    """Fresh heads sized for `towers` (their feature widths override the config's)."""
    image_dim, text_dim = towers.dims
    model = DualEncoder(dataclasses.replace(config, image_dim=image_dim, text_dim=text_dim))
    model.towers = towers
    return model


# ----------------------------------------------------------------------------- loss, recall


def symmetric_info_nce(
    image_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    logit_scale: torch.Tensor | float,
    caption_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """CLIP's symmetric InfoNCE on unit embeddings (B, D); same-caption pairs share the target.

    With caption_ids None every pair has its own caption (targets = identity).
    """
    logits = logit_scale * image_embeddings @ text_embeddings.T  # (B, B) image rows
    size = logits.shape[0]
    if caption_ids is None:
        targets = torch.eye(size, device=logits.device)
    else:
        same = caption_ids[:, None] == caption_ids[None, :]  # (B, B)
        targets = same.float() / same.sum(dim=1, keepdim=True)
    image_to_text = F.cross_entropy(logits, targets)
    text_to_image = F.cross_entropy(logits.T, targets.T)
    return 0.5 * (image_to_text + text_to_image)


DIRECTIONS = ("image_to_text", "text_to_image")


def check_recall_ks(ks: Sequence[int], caption_ids: torch.Tensor) -> tuple[int, ...]:
    """K values both directions can rank: K <= M distinct captions (<= N images)."""
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise EvaluationError(f"Recall@K needs K >= 1, got {ks}")
    pairs, captions = int(caption_ids.shape[0]), int(caption_ids.unique().numel())
    too_large = [k for k in ks if k > captions]
    if too_large:
        raise EvaluationError(
            f"Recall@{too_large[0]} needs more than {captions} candidates: image->text ranks the "
            f"{captions} distinct captions of the test set ({pairs} pairs), so every query would "
            f"hit; use K <= {captions} (e.g. --k "
            f"{','.join(str(k) for k in (1, 5, 10) if k <= captions) or 1}) or a test set with "
            "more distinct captions"
        )
    return ks


def _hits(scores: torch.Tensor, match: torch.Tensor, ks: Sequence[int]) -> dict[int, float]:
    """Share of query rows (Q, C) whose best matching candidate ranks within the top K."""
    best = scores.masked_fill(~match, -math.inf).max(dim=1, keepdim=True).values  # (Q, 1)
    ranked_above = ((scores >= best) & ~match).sum(dim=1)  # (Q,) others at least as close
    return {k: float((ranked_above < k).float().mean()) for k in ks}


def recall_at_k(
    image_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    caption_ids: torch.Tensor,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, dict[int, float]]:
    """Recall@K in both directions (see the module docstring): {direction: {K: recall}}.

    Rows are pairs: image i, text i (its caption's embedding), caption_ids[i] (equal ids =
    identical captions, whose text rows must then be identical).
    """
    count = image_embeddings.shape[0]
    if text_embeddings.shape[0] != count or caption_ids.shape[0] != count:
        raise EvaluationError("recall needs one image, one text and one caption id per pair")
    ks = check_recall_ks(ks, caption_ids)
    images, texts = image_embeddings.float(), text_embeddings.float()
    _, first, inverse = np.unique(caption_ids.cpu().numpy(), return_index=True, return_inverse=True)
    inverse = torch.from_numpy(inverse.reshape(-1)).to(images.device)  # (N,) in [0, M)
    gallery = texts[torch.from_numpy(first).to(images.device)]  # (M, D): each caption once
    own_caption = inverse[:, None] == torch.arange(len(first), device=images.device)[None, :]
    same_caption = inverse[:, None] == inverse[None, :]  # (N, N)
    return {
        "image_to_text": _hits(images @ gallery.T, own_caption, ks),
        "text_to_image": _hits(texts @ images.T, same_caption, ks),
    }


def chance_recall(
    caption_ids: torch.Tensor, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, dict[int, float]]:
    """Expected Recall@K of a random ranking, per direction.

    image->text: one of M distinct captions matches: K / M. text->image: a caption shared by
    m of the N images: 1 - C(N-m, K) / C(N, K) (hypergeometric), averaged over the queries.
    """
    ks = check_recall_ks(ks, caption_ids)
    count = int(caption_ids.shape[0])
    _, inverse, counts = torch.unique(caption_ids, return_inverse=True, return_counts=True)
    matches = counts[inverse].numpy()  # (N,) images sharing each query's caption
    return {
        "image_to_text": {k: k / len(counts) for k in ks},
        "text_to_image": {
            k: float(np.mean(1.0 - scipy_stats.hypergeom.pmf(0, count, matches, k))) for k in ks
        },
    }


# ----------------------------------------------------------------------------- training


@dataclass(frozen=True)
class RetrievalTrainConfig:
    steps: int = 300
    batch_size: int = 256
    learning_rate: float = 1e-3
    weight_decay: float = 0.01  # AdamW, on the heads' weights only (not on the logit scale)
    seed: int = 0  # batch order

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fit_dual_encoder(
    model: DualEncoder,
    train: PairFeatures,
    config: RetrievalTrainConfig = RetrievalTrainConfig(),
    *,
    progress: bool = True,
) -> list[float]:
    """Train the heads and the logit scale in place; returns the loss of every step."""
    if config.steps < 1 or config.learning_rate <= 0 or config.weight_decay < 0:
        raise EvaluationError("steps >= 1, learning_rate > 0 and weight_decay >= 0 are required")
    if len(train) < 2:
        raise EvaluationError(f"training needs at least 2 pairs, got {len(train)}")
    batch = min(config.batch_size, len(train))
    if batch < 2:
        raise EvaluationError(f"batch_size must be >= 2, got {config.batch_size}")
    heads = [p for n, p in model.named_parameters() if n != "log_logit_scale"]
    optimizer = torch.optim.AdamW(
        [
            {"params": heads, "weight_decay": config.weight_decay},
            {"params": [model.log_logit_scale], "weight_decay": 0.0},
        ],
        lr=config.learning_rate,
    )
    ids = train.caption_ids
    generator = torch.Generator().manual_seed(config.seed)
    order, position, losses = torch.randperm(len(train), generator=generator), 0, []
    model.train()
    for _ in tqdm(range(config.steps), desc="dual encoder", unit="step", disable=not progress):
        if position + batch > len(train):  # a new epoch: a fresh order, no short batches
            order, position = torch.randperm(len(train), generator=generator), 0
        rows = order[position : position + batch]
        position += batch
        loss = symmetric_info_nce(
            model.project_images(train.image[rows]),
            model.project_texts(train.text[rows]),
            model.logit_scale(),
            ids[rows],
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


@dataclass(frozen=True)
class RetrievalScores:
    recall: Mapping[str, Mapping[int, float]]  # direction -> K -> recall
    num_pairs: int
    num_captions: int  # distinct captions

    def to_dict(self) -> dict[str, Any]:
        return {
            "recall": {d: {str(k): v for k, v in r.items()} for d, r in self.recall.items()},
            "num_pairs": self.num_pairs,
            "num_captions": self.num_captions,
        }


@torch.no_grad()
def score_retrieval(
    model: DualEncoder, test: PairFeatures, ks: Sequence[int] = DEFAULT_KS
) -> RetrievalScores:
    """Recall@K of the model's projections of held-out pair features."""
    model.eval()
    ids = test.caption_ids
    recall = recall_at_k(model.project_images(test.image), model.project_texts(test.text), ids, ks)
    return RetrievalScores(recall, len(test), int(ids.unique().numel()))


@dataclass(frozen=True)
class RetrievalResult:
    before: RetrievalScores  # the heads at initialisation (random projections)
    after: RetrievalScores  # after fine-tuning
    chance: Mapping[str, Mapping[int, float]]  # direction -> K -> random-ranking recall
    losses: tuple[float, ...]
    model_config: DualEncoderConfig
    train_config: RetrievalTrainConfig
    num_train_pairs: int
    temperature: float  # learned, after fine-tuning

    def to_dict(self) -> dict[str, Any]:
        return {
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "chance": {d: {str(k): v for k, v in r.items()} for d, r in self.chance.items()},
            "final_loss": self.losses[-1],
            "model_config": self.model_config.to_dict(),
            "train_config": self.train_config.to_dict(),
            "num_train_pairs": self.num_train_pairs,
            "temperature": self.temperature,
        }


def run_retrieval(
    model: DualEncoder,
    train: PairFeatures,
    test: PairFeatures,
    train_config: RetrievalTrainConfig = RetrievalTrainConfig(),
    ks: Sequence[int] = DEFAULT_KS,
    *,
    progress: bool = True,
) -> RetrievalResult:
    """Score the untrained heads, fine-tune on `train`, score again on `test`."""
    chance = chance_recall(test.caption_ids, ks)  # checks K against the test set first
    before = score_retrieval(model, test, ks)
    losses = fit_dual_encoder(model, train, train_config, progress=progress)
    after = score_retrieval(model, test, ks)
    return RetrievalResult(
        before=before,
        after=after,
        chance=chance,
        losses=tuple(losses),
        model_config=model.config,
        train_config=train_config,
        num_train_pairs=len(train),
        temperature=1.0 / model.logit_scale().item(),
    )
