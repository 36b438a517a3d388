"""Reuse condition-stream K/V across the forward passes of one sampling run.

The cross-attention keys and values of a condition stream depend only on its tokens (and the
weights), not on x_t or t, so in a sampler that calls the model many times with the same
conditions they are the same in every call. Inside

    with condition_kv_cache(model):
        images = sample(model.velocity, noise, cond, config)

each `DecoupledCrossAttention` keeps the last K/V it computed per stream, keyed by the
identity and version of the caller's condition tensors, and reuses them while those stay the
same objects (the guidance wrapper reuses its concatenated conditions for this). Nothing is
cached while gradients are enabled, so training never sees stale K/V; outside the `with`
every layer is back to computing K/V on each call. The model never learns which sampler
runs it: the cache only compares tensors.

The shared cross-attention ablation variant concatenates all streams through its own
encoder; it is not cached.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from mupad.models.attention import DecoupledCrossAttention


@contextlib.contextmanager
def condition_kv_cache(model: nn.Module) -> Iterator[None]:
    """Cache every decoupled cross-attention layer's condition K/V for the duration."""
    layers = [m for m in model.modules() if isinstance(m, DecoupledCrossAttention)]
    previous = [layer.kv_cache for layer in layers]
    for layer in layers:
        layer.kv_cache = {}
    try:
        yield
    finally:
        for layer, cache in zip(layers, previous):
            layer.kv_cache = cache
