"""Attention layers: self-attention, decoupled cross-attention (DCA) and shared cross-attention.

All attention goes through `torch.nn.functional.scaled_dot_product_attention`, which picks a
fused kernel (flash / memory-efficient / CPU flash) for the device and dtype.

Condition handling is split in two:

* `prepare_streams` runs once per forward pass. It looks at every condition stream once (a
  single host-device sync for the whole batch), drops streams that no sample has present,
  zeroes tokens that are padding or belong to an absent sample (so that garbage or NaN there
  can reach neither the output nor the gradients) and builds the boolean key masks.
* The per-block layers (`DecoupledCrossAttention`, `SharedCrossAttention`) only do tensor
  maths on those prepared streams, so they are cheap to call in every block.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mupad.conditions import Conditions, Modality


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, L, D) -> (B, H, L, D/H) as a strided view (SDPA accepts strided inputs)."""
    batch, length, dim = x.shape
    return x.view(batch, length, num_heads, dim // num_heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, L, d) -> (B, L, H*d)."""
    batch, heads, length, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * head_dim)


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused Q/K/V projection."""

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)  # one GEMM instead of three
        self.proj = nn.Linear(hidden_size, hidden_size)
        # Attention control (`mupad.models.attention_control`): a callable (q, k, v) -> (q, k, v)
        # bound only inside `attention_control(model, controller)`. None (the default) leaves
        # the forward pass the plain fused-QKV + SDPA call below.
        self.control: Callable[..., tuple[torch.Tensor, ...]] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape  # (B, N, D)
        head_dim = dim // self.num_heads
        qkv = self.qkv(x).view(batch, length, 3, self.num_heads, head_dim)  # (B, N, 3, H, d)
        # Unbind along the "3" axis of the (B, N, 3, H, d) layout, then transpose each: the
        # same strided views as permuting first, but in backward the three gradients are
        # stacked straight into (B, N, 3, H, d), the layout the qkv Linear wants, which saves
        # a full copy of the (B, N, 3D) gradient per block.
        q, k, v = (part.transpose(1, 2) for part in qkv.unbind(2))  # each (B, H, N, d)
        if self.control is not None:
            q, k, v = self.control(q, k, v)  # record and/or replace rows, each (B, H, N, d)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, d)
        return self.proj(_merge_heads(out))  # (B, N, D)


# --------------------------------------------------------------------------------------
# Condition streams, prepared once per forward pass
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PreparedStream:
    """One modality's tokens, ready for every block's cross-attention."""

    name: str  # modality value, e.g. "text"
    tokens: torch.Tensor  # (B, T, D_k); padding and absent samples' tokens are exactly 0
    used: torch.Tensor  # (B, T) bool: real token of a present sample
    all_used: bool  # every token of every sample is real and present (`used` is all True)
    # (B, 1, 1, T) bool for SDPA, or None when no present sample has padding (SDPA's fastest
    # path; absent samples then attend over their zeroed tokens and are gated away).
    key_mask: torch.Tensor | None
    present: torch.Tensor  # (B, 1, 1) bool, the m_k gate broadcast over (N, D)
    # The caller's (tokens, mask, present) tensors this stream was made from: everything the
    # per-block K/V depend on besides the weights, so they key `condition_kv_cache`.
    sources: tuple[torch.Tensor, ...] = ()


def prepare_streams(
    cond: Conditions | None,
    names: Sequence[str],
    dtype: torch.dtype,
    sync_also: Sequence[torch.Tensor] = (),
) -> tuple[list[PreparedStream], list[float]]:
    """Prepare the streams this model has (in `names` order) for cross-attention.

    A stream that no sample has present is dropped — exactly what a zero gate would give,
    without its cost. `sync_also` are extra scalar tensors the caller wants on the host
    (e.g. the time range for validation); they ride along in the same single sync and come
    back as floats.
    """
    candidates = []
    if cond is not None:
        for name in names:
            stream = cond.get(Modality(name))
            if stream is not None:
                candidates.append((name, stream))

    # Everything we need on the host, gathered into one tensor -> one device sync.
    probes: list[torch.Tensor] = [p.float().reshape(()) for p in sync_also]
    useds = []
    for _, stream in candidates:
        used = stream.mask & stream.present[:, None]  # (B, T)
        useds.append(used)
        probes.append(stream.present.any().float())
        probes.append(used.all().float())
        probes.append((stream.mask | ~stream.present[:, None]).all().float())
    host = torch.stack(probes).tolist() if probes else []
    extras, flags = host[: len(sync_also)], host[len(sync_also) :]

    prepared = []
    for i, (name, stream) in enumerate(candidates):
        any_present, all_used, no_padding = (flag > 0.5 for flag in flags[3 * i : 3 * i + 3])
        if not any_present:
            continue
        used = useds[i]
        tokens = stream.tokens.to(dtype)  # (B, T, D_k)
        if not all_used:
            # Zero what must not matter (padding, absent samples): garbage or NaN there then
            # reaches neither the output nor, through 0 * NaN, the K/V weight gradients.
            tokens = torch.where(used[..., None], tokens, 0.0)
        key_mask = None
        if not no_padding:
            # A sample with no usable key (absent) would give an all-masked softmax row,
            # i.e. NaN. Let it attend to its (zeroed) tokens instead; its output is gated
            # to exactly 0 afterwards, so what it attends to does not matter.
            key_mask = used | ~used.any(dim=1, keepdim=True)  # (B, T)
            key_mask = key_mask[:, None, None, :]  # (B, 1, 1, T)
        prepared.append(
            PreparedStream(
                name=name,
                tokens=tokens,
                used=used,
                all_used=all_used,
                key_mask=key_mask,
                present=stream.present[:, None, None],
                sources=(stream.tokens, stream.mask, stream.present),
            )
        )
    return prepared, extras


@dataclasses.dataclass(frozen=True)
class CachedKV:
    """A stream's K/V in one block, with the exact source tensors (and versions) they came from.

    Holding the source tensors keeps them alive, so no new tensor can reuse their identity:
    a hit (`is` + unchanged `_version`, same dtype) means the same condition values.
    """

    sources: tuple[torch.Tensor, ...]
    versions: tuple[int, ...]
    dtype: torch.dtype
    kv: torch.Tensor  # (B, T, 2D)

    @classmethod
    def of(cls, stream: PreparedStream, kv: torch.Tensor) -> CachedKV:
        versions = tuple(t._version for t in stream.sources)
        return cls(stream.sources, versions, stream.tokens.dtype, kv)

    def matches(self, stream: PreparedStream) -> bool:
        return (
            len(self.sources) == len(stream.sources)
            and all(a is b for a, b in zip(self.sources, stream.sources))
            and self.versions == tuple(t._version for t in stream.sources)
            and self.dtype == stream.tokens.dtype
        )


# --------------------------------------------------------------------------------------
# Decoupled cross-attention (the paper's eq. 1)
# --------------------------------------------------------------------------------------


class DecoupledCrossAttention(nn.Module):
    """One cross-attention stream per modality, gated per sample and summed.

    out = sum_k m_k * Out_k(softmax(Q_k(x) K_k(c_k)^T / sqrt(d)) V_k(c_k))

    Each modality has its own Q, K, V and output projections; K and V share one fused
    Linear per modality. The Q projections are deliberately *not* fused across modalities:
    a fused GEMM would either compute Q for streams that are absent from the batch (most
    training batches carry only one or two modalities) or, if sliced, give last-bit
    differences depending on which other streams are present. Separate per-stream Q keeps
    every stream's result independent of the others, bit for bit.
    """

    def __init__(self, hidden_size: int, num_heads: int, condition_dims: Mapping[str, int]) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.ModuleDict(
            {name: nn.Linear(hidden_size, hidden_size) for name in condition_dims}
        )
        self.kv = nn.ModuleDict(
            {name: nn.Linear(dim, 2 * hidden_size) for name, dim in condition_dims.items()}
        )
        self.out = nn.ModuleDict(
            {name: nn.Linear(hidden_size, hidden_size) for name in condition_dims}
        )
        # Bound to a dict only inside `condition_kv_cache(model)` (mupad.models.kv_cache);
        # None (the default, and always in training) computes K/V on every call.
        self.kv_cache: dict[str, CachedKV] | None = None

    def _stream_kv(self, stream: PreparedStream) -> torch.Tensor:
        """K/V of one stream (B, T, 2D), from the cache when its source tensors are unchanged."""
        if self.kv_cache is None or torch.is_grad_enabled() or not stream.sources:
            return self.kv[stream.name](stream.tokens)
        entry = self.kv_cache.get(stream.name)
        if entry is not None and entry.matches(stream):
            return entry.kv
        kv = self.kv[stream.name](stream.tokens)
        self.kv_cache[stream.name] = CachedKV.of(stream, kv)
        return kv

    def forward(self, x: torch.Tensor, streams: Sequence[PreparedStream]) -> torch.Tensor | None:
        """x (B, N, D) -> summed gated stream outputs (B, N, D), or None if no stream is active."""
        total: torch.Tensor | None = None
        for stream in streams:
            q = _split_heads(self.q[stream.name](x), self.num_heads)  # (B, H, N, d)
            kv = self._stream_kv(stream)  # (B, T, 2D)
            k, v = (_split_heads(part, self.num_heads) for part in kv.chunk(2, dim=-1))
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=stream.key_mask)
            out = self.out[stream.name](_merge_heads(attended))  # (B, N, D)
            # torch.where, not multiplication: an absent sample contributes exactly 0 even
            # if its attention output were non-finite (0 * NaN = NaN).
            out = torch.where(stream.present, out, 0.0)
            total = out if total is None else total + out
        return total


# --------------------------------------------------------------------------------------
# Shared cross-attention (the ablation baseline)
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SharedContext:
    """Condition tokens of every present modality, projected and concatenated."""

    tokens: torch.Tensor  # (B, T_total, D)
    key_mask: torch.Tensor | None  # (B, 1, 1, T_total) bool, None when every key is used
    any_present: torch.Tensor  # (B, 1, 1) bool: at least one modality present


class SharedConditionEncoder(nn.Module):
    """Projects each modality's tokens to the hidden width and tags them with a learned
    modality embedding, so one attention can tell the modalities apart. Runs once per forward
    pass; every block then has its own K/V projection of the shared context."""

    def __init__(self, hidden_size: int, condition_dims: Mapping[str, int]) -> None:
        super().__init__()
        self.proj = nn.ModuleDict(
            {name: nn.Linear(dim, hidden_size) for name, dim in condition_dims.items()}
        )
        self.modality_embedding = nn.ParameterDict(
            {name: nn.Parameter(torch.zeros(hidden_size)) for name in condition_dims}
        )

    def forward(self, streams: Sequence[PreparedStream]) -> SharedContext | None:
        if not streams:
            return None
        tokens, useds = [], []
        for stream in streams:
            projected = self.proj[stream.name](stream.tokens)  # (B, T_k, D)
            tokens.append(projected + self.modality_embedding[stream.name].to(projected.dtype))
            useds.append(stream.used)
        used = torch.cat(useds, dim=1)  # (B, T_total): token mask & present
        any_present = torch.stack([s.present.reshape(-1) for s in streams], dim=1).any(dim=1)
        if all(s.all_used for s in streams):
            key_mask = None  # every token of every stream is real and present
        else:
            # Samples with nothing present attend to everything (finite: tokens were zeroed
            # before projection); their output is gated to exactly 0.
            key_mask = (used | ~any_present[:, None])[:, None, None, :]  # (B, 1, 1, T_total)
        return SharedContext(
            tokens=torch.cat(tokens, dim=1),
            key_mask=key_mask,
            any_present=any_present[:, None, None],
        )


class SharedCrossAttention(nn.Module):
    """One cross-attention over the concatenated condition tokens of all modalities."""

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(hidden_size, hidden_size)
        self.kv = nn.Linear(hidden_size, 2 * hidden_size)
        self.out = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, context: SharedContext | None) -> torch.Tensor | None:
        """x (B, N, D) -> (B, N, D), exactly 0 for samples with no modality present."""
        if context is None:
            return None
        q = _split_heads(self.q(x), self.num_heads)  # (B, H, N, d)
        k, v = (_split_heads(p, self.num_heads) for p in self.kv(context.tokens).chunk(2, dim=-1))
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=context.key_mask)
        out = self.out(_merge_heads(attended))  # (B, N, D)
        return torch.where(context.any_present, out, 0.0)
