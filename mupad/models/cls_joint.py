"""Joint (image, CLS) state for sampling models that carry a CLS token.

A SiT with `cls_dim > 0` is trained with its CLS state noised on the same path as the
image (`mupad.transport.paths`: t = 0 data, t = 1 noise, target eps - x0), so at sampling
time the CLS state has to be generated together with the image: at every step the network
reads the current (x_t, cls_t) and returns the velocity of both.

Samplers, guidance and the reverse ODE integrate a plain callable v(state, t, cond) on any
(B, ...) state and know nothing of CLS tokens. This module packs the two parts into one
flat state per sample,

    state = [ x.flatten() | cls ]    (B, C*H*W + cls_dim)

and adapts the model to a velocity function on that state (`JointClsVelocity`). Everything
the samplers do per element (Euler / Heun updates, SDE noise, the score from the velocity)
then applies to both parts on the same time grid, and guidance's batch concatenation
repeats both together. `velocity_fn(model, image_shape)` picks the right callable for any
model: `model.velocity` without a CLS token, the joint adapter with one.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from mupad.conditions import Conditions
from mupad.models.errors import ModelInputError
from mupad.transport.velocity import VelocityFn

if TYPE_CHECKING:
    from mupad.models.sit import SiT

ImageShape = tuple[int, int, int]  # (C, H, W) of one sample


def _check_image_shape(image_shape: ImageShape) -> ImageShape:
    shape = tuple(image_shape)
    if len(shape) != 3 or not all(isinstance(n, int) and n > 0 for n in shape):
        raise ModelInputError(
            f"image_shape must be (channels, height, width) of positive ints, got {image_shape!r}"
        )
    return shape  # type: ignore[return-value]


def state_width(image_shape: ImageShape, cls_dim: int) -> int:
    """Width of one packed sample: C*H*W + cls_dim."""
    channels, height, width = _check_image_shape(image_shape)
    return channels * height * width + cls_dim


def pack_state(x: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) image and (B, K) CLS -> one flat state (B, C*H*W + K) in x's dtype."""
    if x.dim() != 4:
        raise ModelInputError(
            f"pack_state: x must be (batch, channels, height, width), got shape {tuple(x.shape)}"
        )
    if cls.dim() != 2:
        raise ModelInputError(
            f"pack_state: cls must be (batch, cls_dim), got shape {tuple(cls.shape)}"
        )
    if cls.shape[0] != x.shape[0]:
        raise ModelInputError(
            f"pack_state: x has batch size {x.shape[0]} but cls has {cls.shape[0]}"
        )
    if cls.device != x.device:
        raise ModelInputError(f"pack_state: x is on {x.device} but cls is on {cls.device}")
    return torch.cat([x.flatten(1), cls.to(x.dtype)], dim=1)  # (B, C*H*W + K)


def unpack_state(
    state: torch.Tensor, image_shape: ImageShape, cls_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C*H*W + K) -> image (B, C, H, W) and CLS (B, K), both views of `state`."""
    channels, height, width = _check_image_shape(image_shape)
    if cls_dim < 0:
        raise ModelInputError(f"cls_dim must be >= 0, got {cls_dim}")
    expected = channels * height * width + cls_dim
    if state.dim() != 2 or state.shape[1] != expected:
        raise ModelInputError(
            f"the joint (image, CLS) state must be (batch, C*H*W + cls_dim) = (batch, "
            f"{channels}*{height}*{width} + {cls_dim}) = (batch, {expected}), got shape "
            f"{tuple(state.shape)}; build it with pack_state(x, cls) for images of shape "
            f"{(channels, height, width)}"
        )
    num_pixels = expected - cls_dim
    x = state[:, :num_pixels].unflatten(1, (channels, height, width))  # (B, C, H, W), a view
    cls = state[:, num_pixels:]  # (B, K), a view
    return x, cls


@dataclasses.dataclass(frozen=True)
class JointClsVelocity:
    """v(state, t, cond) for a CLS model on the packed state (B, C*H*W + cls_dim).

    Each call unpacks (x, cls), runs `model(x, t, cond, cls_token=cls)` once and packs
    (velocity, cls_velocity) back into a tensor shaped and typed like `state`.
    """

    model: SiT = dataclasses.field(repr=False)
    image_shape: ImageShape  # (C, H, W) of the generated image (latent) per sample

    def __post_init__(self) -> None:
        shape = _check_image_shape(self.image_shape)
        object.__setattr__(self, "image_shape", shape)
        config = self.model.config
        if not config.cls_dim:
            raise ModelInputError(
                "JointClsVelocity needs a model with a CLS token (cls_dim > 0); for this model "
                "use model.velocity, or velocity_fn(model, image_shape), which picks it"
            )
        if shape[0] != config.in_channels:
            raise ModelInputError(
                f"image_shape has {shape[0]} channels but the model takes "
                f"in_channels={config.in_channels}"
            )
        if config.out_channels != config.in_channels:
            raise ModelInputError(
                f"the model outputs {config.out_channels} channels for {config.in_channels} "
                "input channels; only a velocity shaped like its input can be integrated"
            )

    @property
    def cls_dim(self) -> int:
        return self.model.config.cls_dim

    @property
    def state_width(self) -> int:
        """C*H*W + cls_dim: the width of one packed sample."""
        return state_width(self.image_shape, self.cls_dim)

    def unpack(self, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C*H*W + K) -> (x (B, C, H, W), cls (B, K)), views of `state`."""
        return unpack_state(state, self.image_shape, self.cls_dim)

    def __call__(
        self, state: torch.Tensor, t: torch.Tensor, cond: Conditions | None
    ) -> torch.Tensor:
        x, cls = self.unpack(state)  # (B, C, H, W), (B, K)
        out = self.model(x, t, cond, cls_token=cls)
        # velocity (B, C, H, W), cls_velocity (B, K) -> (B, C*H*W + K)
        return pack_state(out.velocity.to(state.dtype), out.cls_velocity.to(state.dtype))


def velocity_fn(model: SiT, image_shape: ImageShape) -> VelocityFn:
    """The velocity callable that samplers integrate for `model`.

    Without a CLS token (cls_dim == 0): `model.velocity`, on image states (B, C, H, W).
    With one: `JointClsVelocity(model, image_shape)`, on packed states
    (B, C*H*W + cls_dim) built with `pack_state`; `image_shape` is (C, H, W) per sample.
    """
    if not model.config.cls_dim:
        return model.velocity
    return JointClsVelocity(model, image_shape)


__all__ = [
    "ImageShape",
    "JointClsVelocity",
    "pack_state",
    "state_width",
    "unpack_state",
    "velocity_fn",
]
