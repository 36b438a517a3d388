"""The one interface every condition encoder implements.

An encoder turns a batch of raw inputs (captions, image tensors, RNA profiles) into token
states (B, T, D) and a padding mask (B, T) (True = a real token). `encode_stream` wraps
that into a `ConditionStream` with the per-sample presence flag m_k; samples marked absent
are never fed to the encoder, so their raw input may be a placeholder (None, "").
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

import torch

from mupad.conditions import ConditionStream, Modality
from mupad.errors import MupadError


class EncoderError(MupadError, ValueError):
    """The encoder's input or setup is invalid; the message says how to fix it."""


class WeightsNotFoundError(EncoderError):
    """An encoder's weights are not on disk; the message lists where we looked and what to fetch."""


class ConditionEncoder(abc.ABC):
    """Raw condition inputs -> (tokens (B, T, D), mask (B, T) bool).

    Subclasses set `modality` and `dim`, implement `encode`, and report the `dtype` and
    `device` of the tokens they return. Encoders are frozen feature extractors: `encode`
    runs without gradients.
    """

    # Subclasses set these (as class attributes or in __init__).
    modality: Modality
    dim: int  # width D of the returned token states
    name: str = "encoder"
    dtype: torch.dtype = torch.float32  # dtype of the returned token states
    device: torch.device = torch.device("cpu")  # device of the returned tokens and mask

    @abc.abstractmethod
    def encode(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of B raw inputs -> (tokens (B, T, D), mask (B, T) bool, True = real)."""

    def __call__(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode(batch)

    def batch_size_of(self, batch: Any) -> int:
        """Number of samples in a raw batch (a tensor's first axis or a sequence's length)."""
        if isinstance(batch, torch.Tensor):
            return int(batch.shape[0])
        if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)):
            return len(batch)
        raise EncoderError(
            f"{self.name}: cannot tell the batch size of a {type(batch).__name__}; pass a list "
            "of inputs or a tensor whose first axis is the batch"
        )

    def select(self, batch: Any, rows: list[int]) -> Any:
        """The raw inputs of the given rows (tensor indexing or list selection)."""
        if isinstance(batch, torch.Tensor):
            return batch[torch.as_tensor(rows, dtype=torch.long, device=batch.device)]
        return [batch[i] for i in rows]

    def encode_stream(
        self, batch: Any, present: torch.Tensor | Sequence[bool] | None = None
    ) -> ConditionStream:
        """Encode into a ConditionStream carrying the presence flags m_k (B,).

        Only rows with present = True are encoded. Absent rows get zero tokens with a single
        unmasked slot (so attention never sees an all-padding row); the presence gate removes
        them in the network.
        """
        batch_size = self.batch_size_of(batch)
        if batch_size == 0:
            raise EncoderError(f"{self.name}: the batch is empty")
        if present is None:
            tokens, mask = self.encode(batch)
            return self._checked(ConditionStream.from_tokens(tokens, mask), batch_size)

        flags = torch.as_tensor(present, dtype=torch.bool).flatten().cpu()  # (B,)
        if flags.numel() != batch_size:
            raise EncoderError(
                f"{self.name}: `present` has {flags.numel()} flags but the batch has "
                f"{batch_size} samples; give one bool per sample"
            )
        if bool(flags.all()):
            tokens, mask = self.encode(batch)
            return self._checked(ConditionStream.from_tokens(tokens, mask), batch_size)

        rows = flags.nonzero().flatten().tolist()
        if rows:
            sub_tokens, sub_mask = self.encode(self.select(batch, rows))  # (P, T, D), (P, T)
            length = sub_tokens.shape[1]
            dtype, device = sub_tokens.dtype, sub_tokens.device
        else:
            length, dtype, device = 1, self.dtype, self.device
        tokens = torch.zeros(batch_size, length, self.dim, dtype=dtype, device=device)
        mask = torch.zeros(batch_size, length, dtype=torch.bool, device=device)
        mask[:, 0] = True  # absent rows: one zero token, gated off by `present`
        if rows:
            index = torch.as_tensor(rows, dtype=torch.long, device=device)
            tokens[index] = sub_tokens
            mask[index] = sub_mask.to(device)
        stream = ConditionStream(tokens=tokens, mask=mask, present=flags.to(device))
        return self._checked(stream, batch_size)

    def _checked(self, stream: ConditionStream, batch_size: int) -> ConditionStream:
        if stream.batch_size != batch_size or stream.tokens.shape[-1] != self.dim:
            raise EncoderError(
                f"{self.name}: produced tokens of shape {tuple(stream.tokens.shape)}, expected "
                f"({batch_size}, T, {self.dim})"
            )
        stream.validate(self.modality.value)
        return stream

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, modality={self.modality.value}, dim={self.dim})"
