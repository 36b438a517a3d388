"""Generation from conditions with a trained model: noise -> sampler -> decoder -> images."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from mupad.conditions import Conditions
from mupad.config import SampleConfig
from mupad.data.tiles import to_uint8
from mupad.latents import IdentityCodec, LatentCodec
from mupad.transport.samplers import sample


def initial_noise(
    model: nn.Module, batch_size: int, generator: torch.Generator, size: int | None = None
) -> torch.Tensor:
    """Gaussian noise shaped like the model's input: (B, C, S, S) with S = sample_size."""
    config = model.config  # type: ignore[attr-defined]
    side = size or config.sample_size
    return torch.randn(batch_size, config.in_channels, side, side, generator=generator)


@torch.no_grad()
def generate(
    model: nn.Module,
    cond: Conditions | None,
    sample_config: SampleConfig,
    *,
    batch_size: int | None = None,
    codec: LatentCodec | None = None,
    size: int | None = None,
    bf16: bool = False,
    progress: bool = False,
) -> torch.Tensor:
    """Sample images for a batch of conditions; returns uint8 images (B, 3, H, W).

    The same `sample_config.seed` and conditions always give the same images.
    """
    if batch_size is None:
        batch_size = cond.batch_size if cond is not None else None
        if batch_size is None:
            raise ValueError("give batch_size when there are no conditions")
    codec = codec or IdentityCodec()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(sample_config.seed)
    noise = initial_noise(model, batch_size, generator, size).to(device)
    if cond is not None:
        cond = cond.to(device)
    model.eval()
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        if bf16
        else contextlib.nullcontext()
    )
    with autocast:
        latents = sample(
            model.velocity,  # type: ignore[attr-defined]
            noise,
            cond,
            sample_config,
            generator=generator,
            progress=progress,
        )
    return to_uint8(codec.decode(latents.float()).cpu())
