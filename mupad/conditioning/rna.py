"""RNA conditions: expression or pathway scores -> one token per pathway.

The "pathways" encoder turns a batch of samples into tokens (B, P, 1): the standardised score
of each of P pathways (mask all True; a pathway that cannot be scored for a batch, because
none of its genes is measured, becomes a padding token). The network's `PathwayTokenizer`
(ModelConfig.rna_pathways = P) embeds each scalar into an rna_dim-wide token with a learned
pathway identity.

Accepted batches:
  * a DataFrame of pathway scores (samples x pathways): every column is a known pathway;
  * a DataFrame of expression (samples x genes, or genes x samples; raw counts unless the
    encoder was built with normalise=False), or a path to an expression file: scored with
    `mupad.omics.pipeline.expression_to_scores`;
  * an array or tensor (B, P) of raw scores in the encoder's pathway order.

Standardisation: z = (score - mean) / std per pathway, with mean/std fitted on training data
(`fit`) and kept in a JSON file (`ScoreStandardiser.save/load`), which also records the
scoring method and pathway order. Pass that file as the encoder's `weights`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from mupad.conditioning.base import ConditionEncoder, EncoderError
from mupad.conditioning.registry import register_encoder
from mupad.conditions import ConditionStream, Modality
from mupad.config import ConfigError, parse_enum
from mupad.fileio import atomic_write_text
from mupad.omics.errors import OmicsError
from mupad.omics.expression import Orientation, detect_orientation, read_expression
from mupad.omics.filters import MITOCHONDRIAL_PREFIX, housekeeping_genes
from mupad.omics.genesets import GeneSets
from mupad.omics.pipeline import GeneMapSource, expression_to_scores, resolve_gene_sets
from mupad.omics.scoring import DEFAULT_MIN_SIZE, ScoringMethod, SsgseaNormalisation

logger = logging.getLogger(__name__)

ENCODER_NAME = "pathways"
STANDARDISER_FORMAT = "mupad.pathway_standardiser"
STANDARDISER_VERSION = 1
_MIN_STD = 1e-8  # pathways with a smaller spread in the training data are centred only


@dataclasses.dataclass(frozen=True)
class ScoreStandardiser:
    """Per-pathway mean and standard deviation fitted on training scores, plus how the
    scores were made (method, ssGSEA scale, gene-set source), so inference scores alike."""

    pathways: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    method: ScoringMethod = ScoringMethod.SSGSEA
    normalisation: SsgseaNormalisation = SsgseaNormalisation.UNIVERSE
    gene_sets: str = ""  # label/path of the gene-set collection (informational)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pathways", tuple(str(p) for p in self.pathways))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        object.__setattr__(self, "method", parse_enum(ScoringMethod, self.method))
        object.__setattr__(
            self, "normalisation", parse_enum(SsgseaNormalisation, self.normalisation)
        )
        if not self.pathways:
            raise EncoderError("a score standardiser needs at least one pathway")
        if not len(self.pathways) == len(self.mean) == len(self.std):
            raise EncoderError(
                f"standardiser lengths differ: {len(self.pathways)} pathways, {len(self.mean)} "
                f"means, {len(self.std)} stds"
            )
        if len(set(self.pathways)) != len(self.pathways):
            raise EncoderError("standardiser pathway names repeat")
        values = np.asarray(self.mean + self.std)
        if not np.isfinite(values).all() or min(self.std) <= 0:
            raise EncoderError("standardiser means must be finite and stds finite and positive")

    @classmethod
    def fit(
        cls,
        scores: pd.DataFrame,
        *,
        method: ScoringMethod | str = ScoringMethod.SSGSEA,
        normalisation: SsgseaNormalisation | str = SsgseaNormalisation.UNIVERSE,
        gene_sets: str = "",
    ) -> ScoreStandardiser:
        """Fit on training scores (samples x pathways, at least 2 samples, no NaN)."""
        values = scores.to_numpy(dtype=np.float64)  # (S, P)
        if values.shape[0] < 2:
            raise EncoderError(
                f"fitting a standardiser needs at least 2 samples, got {values.shape[0]}"
            )
        if not np.isfinite(values).all():
            raise EncoderError(
                "training scores contain NaN or Inf; score every pathway for every training "
                "sample (or drop the pathways that cannot be scored) before fitting"
            )
        std = values.std(axis=0)
        flat = std < _MIN_STD
        if flat.any():
            logger.warning(
                "%d pathway(s) are constant in the training scores (e.g. %s); they are "
                "centred but not scaled",
                int(flat.sum()), list(scores.columns[flat][:3]),
            )  # fmt: skip
        return cls(
            pathways=tuple(scores.columns),
            mean=tuple(values.mean(axis=0)),
            std=tuple(np.where(flat, 1.0, std)),
            method=method,
            normalisation=normalisation,
            gene_sets=gene_sets,
        )

    def transform(self, scores: np.ndarray) -> np.ndarray:
        """Raw scores (B, P) in `pathways` order -> standardised (B, P)."""
        return (scores - np.asarray(self.mean)) / np.asarray(self.std)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": STANDARDISER_FORMAT,
            "version": STANDARDISER_VERSION,
            "method": self.method.value,
            "normalisation": self.normalisation.value,
            "gene_sets": self.gene_sets,
            "pathways": list(self.pathways),
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScoreStandardiser:
        if data.get("format") != STANDARDISER_FORMAT:
            raise EncoderError(
                f"not a pathway standardiser (format {data.get('format')!r}); write one with "
                "ScoreStandardiser.save"
            )
        if data.get("version") != STANDARDISER_VERSION:
            raise EncoderError(
                f"pathway standardiser version {data.get('version')} is not supported (this "
                f"mupad reads version {STANDARDISER_VERSION})"
            )
        try:
            return cls(
                pathways=tuple(data["pathways"]),
                mean=tuple(data["mean"]),
                std=tuple(data["std"]),
                method=data["method"],
                normalisation=data["normalisation"],
                gene_sets=data.get("gene_sets", ""),
            )
        except (KeyError, TypeError, ConfigError) as error:
            raise EncoderError(f"malformed pathway standardiser: {error}") from None

    def save(self, path: str | Path) -> Path:
        """Write as JSON (atomically)."""
        path = Path(path)
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> ScoreStandardiser:
        path = Path(path)
        if not path.is_file():
            raise EncoderError(
                f"no pathway standardiser at {path}; fit one with RNAEncoder.fit(training "
                "batch) and save it with ScoreStandardiser.save"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise EncoderError(f"{path} is not valid JSON: {error}") from None
        return cls.from_dict(data)


def default_pathways(gene_sets: GeneSets, min_size: int = DEFAULT_MIN_SIZE) -> tuple[str, ...]:
    """Sets that keep at least `min_size` genes once mitochondrial and housekeeping genes
    are dropped (e.g. a ribosomal-protein pathway is made of housekeeping genes only)."""
    uninformative = housekeeping_genes()
    return tuple(
        name
        for name, genes in gene_sets.items()
        if len(
            [g for g in genes if g not in uninformative and not g.startswith(MITOCHONDRIAL_PREFIX)]
        )
        >= min_size
    )


class RNAEncoder(ConditionEncoder):
    """Samples -> pathway-score tokens (B, P, 1) and mask (B, P).

    Args:
        weights: path of a saved ScoreStandardiser (JSON), the encoder's fitted state.
        standardiser: a ScoreStandardiser object instead of `weights`.
        gene_sets: GeneSets or GMT path used to score expression (default: bundled
            WikiPathways). Must contain the standardiser's pathways.
        pathways: token order when no standardiser is given; default: every gene set with at
            least `min_size` genes besides mitochondrial and housekeeping ones.
        method, normalisation: scoring; default: the standardiser's, else ssGSEA / universe.
        gene_lengths, gene_map, normalise: passed to `expression_to_scores`.
        min_size: minimum gene-set size for the default pathway list.
        device, dtype: of the returned tokens.
    """

    modality = Modality.RNA
    dim = 1
    name = ENCODER_NAME

    def __init__(
        self,
        weights: str | Path | None = None,
        *,
        standardiser: ScoreStandardiser | None = None,
        gene_sets: GeneSets | str | Path | None = None,
        pathways: Sequence[str] | None = None,
        method: ScoringMethod | str | None = None,
        normalisation: SsgseaNormalisation | str | None = None,
        gene_lengths: pd.Series | str | Path | None = None,
        gene_map: GeneMapSource | None = None,
        normalise: bool = True,
        min_size: int = DEFAULT_MIN_SIZE,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if weights is not None and standardiser is not None:
            raise EncoderError("pass the standardiser either as `weights` (a path) or as an object")
        if weights is not None:
            standardiser = ScoreStandardiser.load(weights)
        try:
            self.gene_sets = resolve_gene_sets(gene_sets)
        except OmicsError as error:
            raise EncoderError(f"{self.name}: {error}") from None
        self.standardiser = standardiser
        self.method = self._resolve(ScoringMethod, method, "method", ScoringMethod.SSGSEA)
        self.normalisation = self._resolve(
            SsgseaNormalisation, normalisation, "normalisation", SsgseaNormalisation.UNIVERSE
        )
        if standardiser is not None:
            if pathways is not None and tuple(pathways) != standardiser.pathways:
                raise EncoderError(
                    f"{self.name}: `pathways` differ from the standardiser's pathways; drop "
                    "`pathways` (the standardiser fixes the token order)"
                )
            self.pathways = standardiser.pathways
        elif pathways is not None:
            self.pathways = tuple(pathways)
        else:
            self.pathways = default_pathways(self.gene_sets, min_size)
        if not self.pathways or len(set(self.pathways)) != len(self.pathways):
            raise EncoderError(f"{self.name}: the pathway list is empty or has repeats")
        self.gene_lengths = gene_lengths
        self.gene_map = gene_map
        self.normalise = normalise
        self.device = torch.device(device)
        self.dtype = dtype

    def _resolve(self, enum_type: type, value: Any, field: str, default: Any) -> Any:
        fitted = getattr(self.standardiser, field, None)
        if value is None:
            return fitted if fitted is not None else default
        parsed = parse_enum(enum_type, value)
        if fitted is not None and parsed is not fitted:
            raise EncoderError(
                f"{self.name}: {field}={parsed.value!r} but the standardiser was fitted on "
                f"{fitted.value!r} scores; drop the argument or refit the standardiser"
            )
        return parsed

    @property
    def num_pathways(self) -> int:
        """P, the number of tokens (ModelConfig.rna_pathways of a matching model)."""
        return len(self.pathways)

    # ----------------------------------------------------------------------------------
    # Raw scores
    # ----------------------------------------------------------------------------------

    def scores(self, batch: Any) -> pd.DataFrame:
        """Raw (unstandardised) scores, samples x `pathways`; NaN where not scorable."""
        if isinstance(batch, (str, Path)):
            batch = self._read(batch)
        if isinstance(batch, pd.Series):
            batch = batch.to_frame().T
        if isinstance(batch, pd.DataFrame):
            if len(batch.columns) and set(batch.columns) <= set(self.pathways):
                frame = batch.astype(np.float64)
            else:
                frame = self._score_expression(batch)
            return frame.reindex(columns=list(self.pathways))
        if isinstance(batch, (np.ndarray, torch.Tensor)):
            values = np.asarray(
                batch.detach().cpu().numpy() if isinstance(batch, torch.Tensor) else batch,
                dtype=np.float64,
            )
            if values.ndim == 3 and values.shape[-1] == 1:
                values = values[..., 0]
            if values.ndim != 2 or values.shape[1] != self.num_pathways:
                raise EncoderError(
                    f"{self.name}: score arrays must be (batch, {self.num_pathways}) in the "
                    f"encoder's pathway order, got shape {values.shape}"
                )
            return pd.DataFrame(values, columns=list(self.pathways))
        raise EncoderError(
            f"{self.name}: cannot encode a {type(batch).__name__}; pass a DataFrame of pathway "
            "scores or expression, an expression file path, or a (batch, P) score array"
        )

    def _read(self, path: str | Path) -> pd.DataFrame:
        try:
            return read_expression(path)
        except OmicsError as error:
            raise EncoderError(f"{self.name}: {error}") from None

    def _score_expression(self, expression: pd.DataFrame) -> pd.DataFrame:
        unknown = [p for p in self.pathways if p not in self.gene_sets]
        if unknown:
            raise EncoderError(
                f"{self.name}: {len(unknown)} pathway(s) are not in the gene sets "
                f"{self.gene_sets.source or '(given)'} (e.g. {unknown[:3]}); pass the GMT the "
                "standardiser was fitted with as gene_sets"
            )
        try:
            scores = expression_to_scores(
                expression,
                self.gene_sets.subset(self.pathways),
                self.gene_lengths,
                self.method,
                normalise=self.normalise,
                gene_map=self.gene_map,
                min_size=1,  # every pathway with any measured gene keeps its token
                normalisation=self.normalisation,
            )
        except OmicsError as error:
            raise EncoderError(f"{self.name}: {error}") from None
        missing = len(self.pathways) - scores.shape[1]
        if missing:
            logger.warning(
                "%s: %d of %d pathways have no measured gene; their tokens are padding",
                self.name, missing, len(self.pathways),
            )  # fmt: skip
        return scores

    # ----------------------------------------------------------------------------------
    # The ConditionEncoder interface
    # ----------------------------------------------------------------------------------

    def fit(self, batch: Any) -> ScoreStandardiser:
        """Fit (and use from now on) a standardiser on a training batch; returns it.

        Pathways that cannot be scored on any training sample (no measured gene) are
        dropped from the token list, with a warning.
        """
        raw = self.scores(batch)
        unscored = raw.columns[raw.isna().all(axis=0)]
        if len(unscored):
            logger.warning(
                "%s: dropping %d pathway(s) that no training sample can score (e.g. %s)",
                self.name, len(unscored), list(unscored[:3]),
            )  # fmt: skip
            raw = raw.drop(columns=unscored)
        if raw.shape[1] == 0:
            raise EncoderError(f"{self.name}: no pathway could be scored on the training data")
        self.standardiser = ScoreStandardiser.fit(
            raw,
            method=self.method,
            normalisation=self.normalisation,
            gene_sets=self.gene_sets.source,
        )
        self.pathways = self.standardiser.pathways
        return self.standardiser

    @torch.no_grad()
    def encode(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch -> (tokens (B, P, 1), mask (B, P) bool, True = scored pathway)."""
        raw = self.scores(batch).to_numpy(dtype=np.float64)  # (B, P)
        if raw.shape[0] == 0:
            raise EncoderError(f"{self.name}: the batch is empty")
        if np.isinf(raw).any():
            raise EncoderError(f"{self.name}: pathway scores contain Inf; check the input")
        mask = ~np.isnan(raw)  # (B, P)
        values = raw if self.standardiser is None else self.standardiser.transform(raw)
        values = np.where(mask, values, 0.0)
        tokens = torch.as_tensor(values, dtype=self.dtype, device=self.device)[..., None]
        return tokens, torch.as_tensor(mask, device=self.device)

    def batch_size_of(self, batch: Any) -> int:
        if isinstance(batch, (pd.DataFrame, np.ndarray)):
            return int(batch.shape[0])
        return super().batch_size_of(batch)

    def select(self, batch: Any, rows: list[int]) -> Any:
        if isinstance(batch, pd.DataFrame):
            return batch.iloc[rows]
        if isinstance(batch, np.ndarray):
            return batch[rows]
        return super().select(batch, rows)

    def encode_stream(
        self, batch: Any, present: torch.Tensor | Sequence[bool] | None = None
    ) -> ConditionStream:
        """As the base class; a file path is read first (samples are its rows)."""
        if isinstance(batch, (str, Path)):
            batch = self._read(batch)
        elif isinstance(batch, pd.DataFrame) and not set(batch.columns) <= set(self.pathways):
            batch = self._oriented(batch)
        return super().encode_stream(batch, present)

    def _oriented(self, expression: pd.DataFrame) -> pd.DataFrame:
        """Expression as samples x genes, so that rows can be selected per sample."""
        try:
            if detect_orientation(expression) is Orientation.GENES_X_SAMPLES:
                return expression.T
        except OmicsError as error:
            raise EncoderError(f"{self.name}: {error}") from None
        return expression

    def __repr__(self) -> str:
        fitted = "fitted" if self.standardiser is not None else "unfitted"
        return (
            f"RNAEncoder(name={self.name!r}, pathways={self.num_pathways}, "
            f"method={self.method.value}, {fitted})"
        )


@register_encoder(ENCODER_NAME)
def _pathways(weights: str | Path | None = None, **kwargs: Any) -> RNAEncoder:
    """Pathway-score tokens (B, P, 1); `weights` is a saved ScoreStandardiser (JSON)."""
    return RNAEncoder(weights, **kwargs)
