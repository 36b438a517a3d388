"""Generation from conditions with a trained model: noise -> sampler -> decoder -> images.

Models with a CLS token (cls_dim > 0) generate the image and the CLS state jointly: the
sampler integrates the packed state (B, C*H*W + cls_dim) of `mupad.models.cls_joint`, and
only the image part is decoded (the CLS part can be returned with `return_cls=True`).
"""

from __future__ import annotations

import contextlib
from typing import Literal, overload

import torch
from torch import nn

from mupad.conditions import Conditions
from mupad.config import SampleConfig
from mupad.data.tiles import to_uint8
from mupad.latents import IdentityCodec, LatentCodec
from mupad.models.cls_joint import pack_state, unpack_state, velocity_fn
from mupad.models.kv_cache import condition_kv_cache
from mupad.transport.samplers import sample


def _image_shape(model: nn.Module, size: int | None) -> tuple[int, int, int]:
    """(C, S, S) of one generated latent; S = size or the model's sample_size."""
    config = model.config  # type: ignore[attr-defined]
    side = size or config.sample_size
    return (config.in_channels, side, side)


def initial_noise(
    model: nn.Module, batch_size: int, generator: torch.Generator, size: int | None = None
) -> torch.Tensor:
    """The sampler's starting state at t = 1, with S = size or the model's sample_size.

    Without a CLS token: Gaussian noise shaped like the model's input, (B, C, S, S).
    With one (cls_dim > 0): the same image noise, drawn first, then the CLS noise
    (B, cls_dim), packed into (B, C*S*S + cls_dim) (`mupad.models.cls_joint.pack_state`);
    the image part is therefore the same as a CLS-free model's for the same generator.
    """
    config = model.config  # type: ignore[attr-defined]
    image_noise = torch.randn(batch_size, *_image_shape(model, size), generator=generator)
    if not config.cls_dim:
        return image_noise  # (B, C, S, S)
    cls_noise = torch.randn(batch_size, config.cls_dim, generator=generator)  # (B, K)
    return pack_state(image_noise, cls_noise)  # (B, C*S*S + K)


@overload
def generate(
    model: nn.Module,
    cond: Conditions | None,
    sample_config: SampleConfig,
    *,
    batch_size: int | None = ...,
    codec: LatentCodec | None = ...,
    size: int | None = ...,
    bf16: bool = ...,
    progress: bool = ...,
    return_cls: Literal[False] = ...,
) -> torch.Tensor: ...


@overload
def generate(
    model: nn.Module,
    cond: Conditions | None,
    sample_config: SampleConfig,
    *,
    batch_size: int | None = ...,
    codec: LatentCodec | None = ...,
    size: int | None = ...,
    bf16: bool = ...,
    progress: bool = ...,
    return_cls: Literal[True],
) -> tuple[torch.Tensor, torch.Tensor]: ...


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
    return_cls: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sample images for a batch of conditions; returns uint8 images (B, 3, H, W).

    With `return_cls=True` (models with a CLS token only) returns (images, cls), where cls
    (B, cls_dim) float32 on the CPU is the generated global-semantics (CLS) state at t = 0.
    The same `sample_config.seed` and conditions always give the same images.
    """
    if batch_size is None:
        batch_size = cond.batch_size if cond is not None else None
        if batch_size is None:
            raise ValueError("give batch_size when there are no conditions")
    cls_dim = model.config.cls_dim  # type: ignore[attr-defined]
    if return_cls and not cls_dim:
        raise ValueError(
            "return_cls=True needs a model with a CLS token (cls_dim > 0); this model has none"
        )
    codec = codec or IdentityCodec()
    device = next(model.parameters()).device
    image_shape = _image_shape(model, size)
    generator = torch.Generator().manual_seed(sample_config.seed)
    # (B, C, S, S), or (B, C*S*S + cls_dim) packed with the CLS state
    noise = initial_noise(model, batch_size, generator, size).to(device)
    if cond is not None:
        cond = cond.to(device)
    model.eval()
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        if bf16
        else contextlib.nullcontext()
    )
    # Condition K/V are the same at every step: compute them once per run.
    with autocast, condition_kv_cache(model):
        state = sample(
            velocity_fn(model, image_shape),  # type: ignore[arg-type]
            noise,
            cond,
            sample_config,
            generator=generator,
            progress=progress,
        )
    if cls_dim:
        latents, cls = unpack_state(state, image_shape, cls_dim)  # (B, C, S, S), (B, K)
    else:
        latents, cls = state, None
    images = to_uint8(codec.decode(latents.float()).cpu())
    if return_cls:
        return images, cls.float().cpu()
    return images
