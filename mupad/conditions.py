"""The container that carries condition tokens from encoders to the network.

A batch of conditions holds, per modality, token states (B, T, D), a padding mask
(B, T) (True = a real token) and a per-sample presence flag (B,) — the m_k of the
decoupled cross-attention. A modality that is absent for a sample has present = False;
the network then behaves exactly as if that stream did not exist for that sample.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Mapping

import torch

from mupad.errors import MupadError


class Modality(str, enum.Enum):
    IMAGE = "image"
    TEXT = "text"
    RNA = "rna"


class ConditionError(MupadError, ValueError):
    """Condition tensors are malformed; the message says what is wrong and how to fix it."""


@dataclasses.dataclass(frozen=True)
class ConditionStream:
    tokens: torch.Tensor  # (B, T, D) float
    mask: torch.Tensor  # (B, T) bool, True where the token is real (not padding)
    present: torch.Tensor  # (B,) bool, m_k: is this modality given for the sample

    @classmethod
    def from_tokens(
        cls,
        tokens: torch.Tensor,
        mask: torch.Tensor | None = None,
        present: torch.Tensor | None = None,
    ) -> ConditionStream:
        """Wrap token states; a (B, D) tensor is taken as one token per sample."""
        if tokens.dim() == 2:
            tokens = tokens[:, None, :]
        batch, length = tokens.shape[:2]
        if mask is None:
            mask = torch.ones(batch, length, dtype=torch.bool, device=tokens.device)
        if present is None:
            present = torch.ones(batch, dtype=torch.bool, device=tokens.device)
        return cls(tokens=tokens, mask=mask.bool(), present=present.bool())

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    def validate(self, name: str) -> None:
        if self.tokens.dim() != 3:
            raise ConditionError(
                f"{name} tokens must be (batch, tokens, dim), got shape {tuple(self.tokens.shape)}"
            )
        if not self.tokens.is_floating_point():
            raise ConditionError(f"{name} tokens must be floating point, got {self.tokens.dtype}")
        batch, length, _ = self.tokens.shape
        if tuple(self.mask.shape) != (batch, length):
            raise ConditionError(
                f"{name} mask must be (batch, tokens) = {(batch, length)}, got {tuple(self.mask.shape)}"
            )
        if tuple(self.present.shape) != (batch,):
            raise ConditionError(
                f"{name} presence must be (batch,) = ({batch},), got {tuple(self.present.shape)}"
            )
        used = self.mask & self.present[:, None]
        if not torch.isfinite(self.tokens[used]).all():
            raise ConditionError(
                f"{name} tokens contain NaN or Inf; clean the condition input (e.g. missing "
                "RNA values) or mark that sample's modality as absent"
            )
        missing = self.present & ~self.mask.any(dim=1)
        if missing.any():
            raise ConditionError(
                f"{name} is marked present for sample(s) {missing.nonzero().flatten().tolist()} "
                "but all of their tokens are padding"
            )

    def with_presence(self, present: torch.Tensor) -> ConditionStream:
        return dataclasses.replace(self, present=present.bool())

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> ConditionStream:
        return ConditionStream(
            tokens=self.tokens.to(device=device, dtype=dtype or self.tokens.dtype),
            mask=self.mask.to(device),
            present=self.present.to(device),
        )


@dataclasses.dataclass(frozen=True)
class Conditions:
    """Condition streams keyed by modality; any subset may be given."""

    streams: Mapping[Modality, ConditionStream]

    @classmethod
    def build(cls, **streams: ConditionStream | torch.Tensor | None) -> Conditions:
        """`Conditions.build(text=stream_or_tokens, rna=...)`; None entries are skipped."""
        built: dict[Modality, ConditionStream] = {}
        for name, value in streams.items():
            if value is None:
                continue
            modality = Modality(name)
            if isinstance(value, torch.Tensor):
                value = ConditionStream.from_tokens(value)
            built[modality] = value
        return cls(built)

    def __post_init__(self) -> None:
        sizes = {m: s.batch_size for m, s in self.streams.items()}
        if len(set(sizes.values())) > 1:
            raise ConditionError(f"condition streams disagree on batch size: {sizes}")

    @property
    def batch_size(self) -> int | None:
        for stream in self.streams.values():
            return stream.batch_size
        return None

    def __contains__(self, modality: object) -> bool:
        return modality in self.streams

    def get(self, modality: Modality) -> ConditionStream | None:
        return self.streams.get(modality)

    def validate(self, batch_size: int | None = None) -> None:
        for modality, stream in self.streams.items():
            stream.validate(modality.value)
            if batch_size is not None and stream.batch_size != batch_size:
                raise ConditionError(
                    f"{modality.value} conditions have batch size {stream.batch_size} but the "
                    f"images have {batch_size}"
                )

    def without(self, modalities: Iterable[Modality]) -> Conditions:
        """The same batch with the given modalities marked absent for every sample."""
        drop = set(modalities)
        return Conditions(
            {
                m: s.with_presence(torch.zeros_like(s.present)) if m in drop else s
                for m, s in self.streams.items()
            }
        )

    def dropout(self, probability: float, generator: torch.Generator | None = None) -> Conditions:
        """Mark each modality absent independently per sample with `probability` (for CFG)."""
        if probability <= 0.0:
            return self
        out = {}
        for modality in sorted(self.streams, key=lambda m: m.value):  # fixed RNG order
            stream = self.streams[modality]
            keep = torch.rand(stream.batch_size, generator=generator) >= probability
            out[modality] = stream.with_presence(stream.present & keep.to(stream.present.device))
        return Conditions(out)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Conditions:
        return Conditions({m: s.to(device, dtype) for m, s in self.streams.items()})

    def index(self, rows: torch.Tensor | slice) -> Conditions:
        """Select samples (rows) from every stream."""
        return Conditions(
            {
                m: ConditionStream(s.tokens[rows], s.mask[rows], s.present[rows])
                for m, s in self.streams.items()
            }
        )

    @staticmethod
    def concat(parts: list[Conditions]) -> Conditions:
        """Stack batches along the batch axis; token lengths are padded to the longest."""
        if not parts:
            raise ConditionError("nothing to concatenate")
        modalities = set(parts[0].streams)
        if any(set(p.streams) != modalities for p in parts):
            raise ConditionError("cannot concatenate conditions with different modalities")
        out = {}
        for modality in modalities:
            streams = [p.streams[modality] for p in parts]
            length = max(s.tokens.shape[1] for s in streams)
            tokens, masks = [], []
            for s in streams:
                pad = length - s.tokens.shape[1]
                tokens.append(torch.nn.functional.pad(s.tokens, (0, 0, 0, pad)))
                masks.append(torch.nn.functional.pad(s.mask, (0, pad), value=False))
            out[modality] = ConditionStream(
                torch.cat(tokens), torch.cat(masks), torch.cat([s.present for s in streams])
            )
        return Conditions(out)


def is_empty(cond: Conditions | None) -> bool:
    """True when no sample has any modality present (the unconditional model)."""
    return cond is None or not any(bool(s.present.any()) for s in cond.streams.values())
