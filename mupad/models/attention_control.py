"""Attention control: record, or replace, the self-attention of chosen blocks and batch rows.

Every `SelfAttention` has a `control` attribute that is None by default; its forward pass is
then exactly the plain fused-QKV + `scaled_dot_product_attention` call (no extra work, no
extra kernels). Inside

    with attention_control(model, controller):
        out = model(x, t, cond)

each block's self-attention calls `controller(block_index, q, k, v)` right before SDPA, with
q, k, v of shape (B, H, N, d) (N counts a CLS prefix token when the model has one), and uses
the (q, k, v) it returns. On leaving the `with`, every layer is unbound again (also on error).

Controllers:

* `RowInjection` — one batched pass carries both a donor and a recipient (e.g. rows
  [source; target]); in the chosen blocks the recipient rows take the donor rows' tensors.
  With `InjectionMode.MAPS`, q and k are copied, so the recipient's attention probabilities
  softmax(q k^T / sqrt(d)) are exactly the donor's while the values stay its own
  (out = A_donor V_recipient): "self-attention map injection", computed by the fused SDPA
  kernels without materialising the N x N map. With `InjectionMode.KV`, k and v are copied
  (out = softmax(q_recipient k_donor^T) v_donor): the recipient's queries read the donor's
  content (mutual self-attention).
* `AttentionRecorder` — keeps (detached) q, k, v of the chosen blocks, e.g. from a
  source-only pass.
* `AttentionReplay` — writes recorded tensors into chosen rows of a later pass: the same
  injection as `RowInjection` when the two passes cannot share a batch (memory).

A controller with `active = False` returns its inputs untouched, so "present but inactive"
gives bit-identical outputs to "absent".
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
from collections.abc import Iterable, Iterator
from typing import Protocol

import torch
from torch import nn

from mupad.errors import MupadError
from mupad.models.attention import SelfAttention

QKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class AttentionControlError(MupadError, ValueError):
    """An attention controller was set up or used in a way that cannot work."""


class InjectionMode(str, enum.Enum):
    MAPS = "maps"  # copy q and k: the attention probabilities are the donor's
    KV = "kv"  # copy k and v: the recipient's queries attend over the donor's keys/values


class AttentionController(Protocol):
    def __call__(self, block: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> QKV: ...


def self_attention_layers(model: nn.Module) -> list[SelfAttention]:
    """The self-attention layers of `model` in block order."""
    layers = getattr(model, "self_attention_layers", None)
    if callable(layers):
        return list(layers())
    found = [m for m in model.modules() if isinstance(m, SelfAttention)]
    if not found:
        raise AttentionControlError(f"{type(model).__name__} has no SelfAttention layers")
    return found


def resolve_blocks(blocks: Iterable[int] | None, depth: int) -> frozenset[int]:
    """None -> every block; otherwise 0-based block indices, each checked against `depth`."""
    if blocks is None:
        return frozenset(range(depth))
    chosen = frozenset(int(b) for b in blocks)
    bad = sorted(b for b in chosen if not 0 <= b < depth)
    if bad:
        raise AttentionControlError(
            f"block indices {bad} are outside the model's blocks 0..{depth - 1} (0-based)"
        )
    return chosen


@dataclasses.dataclass
class _Bound:
    """A controller bound to one block index: the callable a SelfAttention holds."""

    controller: AttentionController
    block: int

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> QKV:
        return self.controller(self.block, q, k, v)


@contextlib.contextmanager
def attention_control(model: nn.Module, controller: AttentionController) -> Iterator[None]:
    """Bind `controller` to every self-attention layer of `model` for the `with` block."""
    layers = self_attention_layers(model)
    if any(layer.control is not None for layer in layers):
        raise AttentionControlError(
            "this model already has an attention controller bound; nested attention_control "
            "blocks are not supported (combine the controllers into one)"
        )
    try:
        for index, layer in enumerate(layers):
            layer.control = _Bound(controller, index)
        yield
    finally:
        for layer in layers:
            layer.control = None


def _copy_rows(tensor: torch.Tensor, row_map: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B, ...) with row i taken from row row_map[i]."""
    return tensor.index_select(0, row_map.to(tensor.device))


@dataclasses.dataclass
class RowInjection:
    """Copy donor rows' self-attention tensors into recipient rows of the same batch.

    `row_map` (B,) long: row i of the batch takes its injected tensors from row row_map[i]
    (row_map[i] = i leaves it alone). Only `blocks` (0-based; None = all) are touched, and
    nothing at all while `active` is False.
    """

    row_map: torch.Tensor
    blocks: frozenset[int] | None = None
    mode: InjectionMode = InjectionMode.MAPS
    active: bool = True

    def __post_init__(self) -> None:
        self.mode = InjectionMode(self.mode)
        if self.row_map.dim() != 1 or self.row_map.dtype != torch.long:
            raise AttentionControlError(
                f"row_map must be a (B,) int64 tensor, got {self.row_map.dtype} "
                f"{tuple(self.row_map.shape)}"
            )
        if len(self.row_map) and not (
            0 <= int(self.row_map.min()) and int(self.row_map.max()) < len(self.row_map)
        ):
            raise AttentionControlError("row_map entries must index rows of the same batch")

    @classmethod
    def from_pairs(
        cls,
        batch_size: int,
        donors: Iterable[int],
        recipients: Iterable[int],
        **kwargs,
    ) -> RowInjection:
        """Recipient row recipients[j] takes donor row donors[j]; other rows are untouched."""
        donors, recipients = list(donors), list(recipients)
        if len(donors) != len(recipients):
            raise AttentionControlError(
                f"{len(donors)} donor rows for {len(recipients)} recipient rows"
            )
        if len(set(recipients)) != len(recipients):
            raise AttentionControlError("a row can be the recipient of one donor only")
        for row in donors + recipients:
            if not 0 <= row < batch_size:
                raise AttentionControlError(f"row {row} is outside the batch of {batch_size}")
        row_map = torch.arange(batch_size)
        if recipients:
            row_map[torch.tensor(recipients)] = torch.tensor(donors)
        return cls(row_map=row_map, **kwargs)

    def __call__(self, block: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> QKV:
        if not self.active or (self.blocks is not None and block not in self.blocks):
            return q, k, v
        if q.shape[0] != len(self.row_map):
            raise AttentionControlError(
                f"the injection was set up for a batch of {len(self.row_map)} rows, but the "
                f"model ran on {q.shape[0]}"
            )
        if self.mode is InjectionMode.MAPS:
            return _copy_rows(q, self.row_map), _copy_rows(k, self.row_map), v
        return q, _copy_rows(k, self.row_map), _copy_rows(v, self.row_map)


@dataclasses.dataclass
class AttentionRecorder:
    """Keeps detached copies of q, k, v per block (the latest call of each block wins)."""

    blocks: frozenset[int] | None = None
    records: dict[int, QKV] = dataclasses.field(default_factory=dict)
    active: bool = True

    def __call__(self, block: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> QKV:
        if self.active and (self.blocks is None or block in self.blocks):
            self.records[block] = (q.detach().clone(), k.detach().clone(), v.detach().clone())
        return q, k, v


@dataclasses.dataclass
class AttentionReplay:
    """Writes recorded tensors into a later pass: `rows` (R,) of this batch take rows
    `source_rows` (R,) of the recording, in every recorded block (and only those)."""

    records: dict[int, QKV]
    rows: torch.Tensor
    source_rows: torch.Tensor
    mode: InjectionMode = InjectionMode.MAPS
    active: bool = True

    def __post_init__(self) -> None:
        self.mode = InjectionMode(self.mode)
        if self.rows.shape != self.source_rows.shape or self.rows.dim() != 1:
            raise AttentionControlError("rows and source_rows must be (R,) tensors of equal length")

    def __call__(self, block: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> QKV:
        if not self.active or block not in self.records:
            return q, k, v
        rq, rk, rv = self.records[block]
        if rq.shape[1:] != q.shape[1:]:
            raise AttentionControlError(
                f"block {block}: recorded tensors are {tuple(rq.shape[1:])} per row but this pass "
                f"has {tuple(q.shape[1:])}; replay into inputs of the recorded size"
            )
        rows = self.rows.to(q.device)
        source = self.source_rows.to(q.device)

        def put(current: torch.Tensor, recorded: torch.Tensor) -> torch.Tensor:
            return current.index_copy(0, rows, recorded.index_select(0, source).to(current.dtype))

        if self.mode is InjectionMode.MAPS:
            return put(q, rq), put(k, rk), v
        return q, put(k, rk), put(v, rv)


__all__ = [
    "AttentionControlError",
    "AttentionController",
    "AttentionRecorder",
    "AttentionReplay",
    "InjectionMode",
    "RowInjection",
    "attention_control",
    "resolve_blocks",
    "self_attention_layers",
]
