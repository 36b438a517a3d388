"""RNA conditions for generation: a score file, an expression file or an ST spot -> tokens.

What the model's RNA stream takes (`RnaSpec`):
  * pathway tokens (ModelConfig.rna_pathways = P > 0): scores (1, P, 1), one per pathway, in
    the order the model was trained on; unscorable pathways (NaN) become padding tokens;
  * otherwise one vector token (1, 1, rna_dim).

Pathway order: the names the run recorded (metadata "rna_pathways", written by
`train --shards` from the `rna_<name>` columns `mupad prepare` read), or a standardiser's,
or a file passed by the user (`read_pathway_names`: one name per line, a one-column list
under a header, a score table whose header lists them, or a ScoreStandardiser JSON).
Scores made from other gene sets than the training scores (metadata
"rna_gene_sets_sha256" against an ST folder's summary or the gene sets given) are refused. With names known, tables are matched by
column name; without them a table must have exactly P columns, taken in file order, and
expression cannot be scored (except when the bundled default pathway list has exactly P).

Sources (one per prompt record):
  rna             .npy / numbers-only .txt/.csv: a vector in the model's order;
                  .csv/.tsv table (first column = row ids, header = pathway names), e.g.
                  `mupad omics score` output; `rna_row` picks the row of a multi-row table
  rna_expression  an expression file (see mupad.omics.expression.read_expression), scored
                  like training (standardiser's method, else ssGSEA) with the gene sets;
                  `rna_row` picks the sample of a multi-sample file
  st_folder +     a `mupad st extract` output folder and a spot barcode: the spot's row of
  st_spot         its scores.csv

A standardiser (metadata "rna_standardiser": inline or a path; or an option) turns raw
scores into z-scores, as the "pathways" encoder does at training time.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from mupad.conditions import ConditionStream
from mupad.config import ModelConfig
from mupad.errors import MupadError
from mupad.omics.errors import OmicsError

logger = logging.getLogger(__name__)

_SEPARATORS = {".csv": ",", ".tsv": "\t", ".txt": "\t", ".tab": "\t"}
ST_SCORES = "scores.csv"


class RnaInputError(MupadError, ValueError):
    """An RNA input cannot be turned into the model's RNA condition; says how to fix it."""


@dataclasses.dataclass(frozen=True)
class RnaSpec:
    """What the model's RNA stream takes."""

    width: int  # P pathway tokens, or rna_dim of a single vector token
    pathway_tokens: bool
    names: tuple[str, ...] | None = None  # pathway order, when known
    standardiser: Any = None  # mupad.conditioning.rna.ScoreStandardiser | None
    gene_sets: str | None = None  # GMT path for scoring expression (None: bundled)
    gene_sets_sha256: str | None = None  # GeneSets.sha256 of the training scores' gene sets

    def describe(self) -> dict[str, Any]:
        return {
            "width": self.width,
            "pathway_tokens": self.pathway_tokens,
            "names_known": self.names is not None,
            "standardised": self.standardiser is not None,
            "gene_sets": self.gene_sets,
            "gene_sets_sha256": self.gene_sets_sha256,
        }

    def check_gene_sets(self, digest: str | None, what: str) -> None:
        """Refuse scores made from other gene sets than the model's (when both are known)."""
        if digest and self.gene_sets_sha256 and digest != self.gene_sets_sha256:
            raise RnaInputError(
                f"{what} were scored with other gene sets than the model was trained on "
                f"(sha256 {digest[:12]}... vs the model's {self.gene_sets_sha256[:12]}...); "
                "score the input with the model's gene-set file (--gene-sets)"
            )


def _suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def read_pathway_names(path: str | Path) -> tuple[str, ...]:
    """Pathway names from a standardiser JSON, a score table's header (.csv/.tsv, first
    column = row ids) or a text file with one name per line."""
    path = Path(path)
    if not path.is_file():
        raise RnaInputError(f"pathway-name file {path} does not exist")
    suffix = _suffix(path)
    if suffix == ".json":
        from mupad.conditioning.rna import ScoreStandardiser

        return ScoreStandardiser.load(path).pathways
    if suffix in (".csv", ".tsv", ".tab"):
        table = pd.read_csv(path, sep=_SEPARATORS[suffix], dtype=str, keep_default_na=False)
        if table.shape[1] == 1:  # a list: a header (e.g. "pathway") above one name a row
            names = tuple(str(v).strip() for v in table.iloc[:, 0] if str(v).strip())
        else:  # a score table: row ids, then one column per pathway
            names = tuple(str(c) for c in table.columns[1:])
    else:
        names = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    if not names or len(set(names)) != len(names):
        raise RnaInputError(f"{path} lists no pathway names, or repeats one")
    return names


def rna_spec(
    config: ModelConfig,
    metadata: dict[str, Any],
    *,
    pathways: str | Path | None = None,
    standardiser: str | Path | None = None,
    gene_sets: str | Path | None = None,
) -> RnaSpec:
    """The RNA input contract of a model: options first, then the run's metadata."""
    from mupad.conditioning.rna import ScoreStandardiser

    if not config.rna_dim:
        raise RnaInputError("the model has no RNA stream")
    width = config.rna_pathways or config.rna_dim
    recorded = metadata.get("rna_standardiser")
    if standardiser is not None:
        fitted = ScoreStandardiser.load(standardiser)
    elif isinstance(recorded, dict):  # carried by the checkpoint itself
        fitted = ScoreStandardiser.from_dict(recorded)
    else:
        fitted = ScoreStandardiser.load(recorded) if recorded else None
    names: tuple[str, ...] | None = None
    if pathways is not None:
        names = read_pathway_names(pathways)
    elif metadata.get("rna_pathways"):
        names = tuple(str(n) for n in metadata["rna_pathways"])
    elif fitted is not None:
        names = fitted.pathways
    if fitted is not None and names is not None and names != fitted.pathways:
        raise RnaInputError(
            "the pathway names differ from the standardiser's pathways; drop one of them"
        )
    if names is not None and len(names) != width:
        raise RnaInputError(
            f"{len(names)} pathway names were given but the model's RNA stream takes {width} "
            f"({'rna_pathways' if config.rna_pathways else 'rna_dim'}); pass the names of the "
            "pathways the model was trained on"
        )
    return RnaSpec(
        width=width,
        pathway_tokens=bool(config.rna_pathways),
        names=names,
        standardiser=fitted,
        gene_sets=str(gene_sets or metadata.get("rna_gene_sets") or "") or None,
        gene_sets_sha256=metadata.get("rna_gene_sets_sha256"),
    )


# --------------------------------------------------------------------------------------
# Sources -> raw scores (P,)
# --------------------------------------------------------------------------------------


def _read_vector(path: Path) -> np.ndarray | None:
    """A numbers-only file as a vector, or None when the file is a table with a header."""
    if _suffix(path) == ".npy":
        try:
            return np.asarray(np.load(path, allow_pickle=False), dtype=np.float64).reshape(-1)
        except (OSError, ValueError) as error:
            raise RnaInputError(f"cannot read RNA scores {path}: {error}") from None
    delimiter = "," if _suffix(path) == ".csv" else None
    try:
        return np.loadtxt(path, delimiter=delimiter, dtype=np.float64, ndmin=1).reshape(-1)
    except ValueError:
        return None  # has non-numeric cells: a table


def _read_table(path: Path) -> pd.DataFrame:
    separator = _SEPARATORS.get(_suffix(path))
    if separator is None:
        raise RnaInputError(
            f"RNA scores {path}: use .npy, .txt (numbers) or a .csv/.tsv table of pathway "
            "scores (first column = row ids, header = pathway names)"
        )
    try:
        return pd.read_csv(path, sep=separator, index_col=0)
    except (OSError, ValueError) as error:
        raise RnaInputError(f"cannot read RNA score table {path}: {error}") from None


def _pick_row(table: pd.DataFrame, row: str | None, what: str, option: str) -> pd.Series:
    index = [str(i) for i in table.index]
    if row is None:
        if len(index) != 1:
            raise RnaInputError(
                f"{what} has {len(index)} rows; say which with {option} (e.g. {index[:3]})"
            )
        return table.iloc[0]
    if str(row) not in index:
        raise RnaInputError(f"{what} has no row {row!r} (rows are e.g. {index[:5]})")
    return table.iloc[index.index(str(row))]


def _named_to_vector(series: pd.Series, spec: RnaSpec, what: str) -> np.ndarray:
    series.index = [str(c) for c in series.index]
    if spec.names is None:
        if len(series) != spec.width:
            raise RnaInputError(
                f"{what} has {len(series)} pathway columns but the model takes {spec.width}, "
                "and the model's pathway names are unknown; pass them with --rna-pathways "
                "(e.g. the scores.csv the model was trained on)"
            )
        logger.info("%s: pathway names unknown; columns taken in file order", what)
        values = series.to_numpy()
    else:
        missing = [n for n in spec.names if n not in series.index]
        if missing:
            raise RnaInputError(
                f"{what} lacks {len(missing)} of the model's {spec.width} pathways (e.g. "
                f"{missing[:3]}); score the gene sets the model was trained on"
            )
        values = series.reindex(list(spec.names)).to_numpy()
    try:
        return np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise RnaInputError(f"{what} has non-numeric pathway scores") from None


def scores_from_file(path: str | Path, spec: RnaSpec, row: str | None = None) -> np.ndarray:
    """Raw scores (P,) from a vector file or a score table."""
    path = Path(path)
    if not path.is_file():
        raise RnaInputError(f"RNA score file {path} does not exist")
    vector = _read_vector(path)
    if vector is not None:
        if row is not None:
            raise RnaInputError(f"{path} is a single score vector; drop rna_row ({row!r})")
        if vector.shape[0] != spec.width:
            raise RnaInputError(
                f"{path} holds {vector.shape[0]} scores but the model takes {spec.width}"
            )
        return vector
    table = _read_table(path)
    return _named_to_vector(_pick_row(table, row, str(path), "rna_row"), spec, str(path))


def scores_from_st(folder: str | Path, spot: str, spec: RnaSpec) -> np.ndarray:
    """Raw scores (P,) of one spot of a `mupad st extract` output folder."""
    table_path = Path(folder) / ST_SCORES
    if not table_path.is_file():
        raise RnaInputError(
            f"{folder} has no {ST_SCORES}; give the output folder of `mupad st extract`"
        )
    spec.check_gene_sets(_st_gene_sets_sha256(Path(folder)), f"the scores in {table_path}")
    table = pd.read_csv(table_path, index_col=0)
    series = _pick_row(table, spot, f"{table_path}", "st_spot")
    return _named_to_vector(series, spec, f"spot {spot} of {table_path}")


def _st_gene_sets_sha256(folder: Path) -> str | None:
    """The gene-set digest a `mupad st extract` folder recorded (None for older outputs)."""
    try:
        summary = json.loads((folder / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    scoring = summary.get("scoring") if isinstance(summary, dict) else None
    return scoring.get("gene_sets_sha256") if isinstance(scoring, dict) else None


def scores_from_expression(
    path: str | Path, spec: RnaSpec, sample: str | None = None
) -> np.ndarray:
    """Raw scores (P,) of one sample of an expression file, scored like training."""
    from mupad.conditioning.base import EncoderError
    from mupad.conditioning.rna import RNAEncoder, default_pathways
    from mupad.omics.expression import read_expression
    from mupad.omics.pipeline import resolve_gene_sets

    try:
        gene_sets = resolve_gene_sets(spec.gene_sets)
        spec.check_gene_sets(gene_sets.sha256, f"pathway scores of {path}")
        names = spec.names
        if names is None:
            names = default_pathways(gene_sets)
            if len(names) != spec.width:
                raise RnaInputError(
                    "scoring expression needs the model's pathway names (pass --rna-pathways "
                    f"or a standardiser); the default pathway list has {len(names)} pathways "
                    f"but the model takes {spec.width}"
                )
        frame = read_expression(path)
        row = _pick_row(frame, sample, f"expression file {path}", "rna_row")
        encoder = RNAEncoder(
            standardiser=spec.standardiser,
            pathways=None if spec.standardiser is not None else names,
            gene_sets=gene_sets,
        )
        scores = encoder.scores(row.to_frame().T)  # (1, P) raw, NaN = unscorable
    except (OmicsError, EncoderError) as error:
        raise RnaInputError(f"cannot score {path}: {error}") from None
    return scores.reindex(columns=list(names)).to_numpy(dtype=np.float64)[0]


# --------------------------------------------------------------------------------------
# Raw scores -> condition stream
# --------------------------------------------------------------------------------------


def rna_stream(scores: np.ndarray, spec: RnaSpec, what: str = "RNA scores") -> ConditionStream:
    """Raw scores (P,) -> a batch-of-one stream: (1, P, 1) pathway tokens (NaN -> padding)
    or one (1, 1, rna_dim) vector token."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if scores.shape[0] != spec.width:
        raise RnaInputError(f"{what}: {scores.shape[0]} scores, the model takes {spec.width}")
    if np.isinf(scores).any():
        raise RnaInputError(f"{what} contain Inf; check the input")
    if spec.standardiser is not None:
        scores = spec.standardiser.transform(scores[None, :])[0]
    mask = ~np.isnan(scores)
    if not mask.any():
        raise RnaInputError(f"{what}: no pathway could be scored (all NaN)")
    if not spec.pathway_tokens and not mask.all():
        raise RnaInputError(f"{what} contain NaN; the model's RNA vector must be complete")
    values = torch.as_tensor(np.where(mask, scores, 0.0), dtype=torch.float32)
    if spec.pathway_tokens:
        return ConditionStream.from_tokens(
            values[None, :, None], torch.as_tensor(mask)[None, :]
        )  # (1, P, 1), (1, P)
    return ConditionStream.from_tokens(values[None, None, :])  # (1, 1, rna_dim)


def describe_names(names: tuple[str, ...] | None) -> str | None:
    """A short fingerprint of a pathway list for sidecars."""
    if names is None:
        return None
    import hashlib

    return hashlib.sha256(json.dumps(list(names)).encode()).hexdigest()
