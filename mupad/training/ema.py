"""Exponential moving average of the weights, kept in fp32."""

from __future__ import annotations

import torch
from torch import nn

from mupad.training.distributed import full_tensor, like


class EMA:
    """Shadow copy of a model's floating-point parameters and buffers.

    The effective decay warms up as min(decay, (1 + n) / (10 + n)) over the first updates so
    that short runs are not dominated by the random initialisation; it reaches `decay`
    (0.9999 by default) after ~10^5 updates, as in long pretraining runs.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = {
            name: value.detach().float().clone()
            for name, value in model.state_dict().items()
            if value.is_floating_point()
        }

    def current_decay(self) -> float:
        return min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        state = model.state_dict()
        names = list(self.shadow)
        shadows = [self.shadow[n] for n in names]
        current = [state[n].detach().float() for n in names]
        # shadow <- decay * shadow + (1 - decay) * current, as one fused foreach kernel
        torch._foreach_lerp_(shadows, current, 1.0 - decay)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into `model` (in the model's dtypes; same sharding)."""
        state = model.state_dict()
        for name, value in self.shadow.items():
            state[name].copy_(value.to(state[name].dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full (unsharded) shadow tensors; collective when the model is FSDP-sharded."""
        return {name: full_tensor(value) for name, value in self.shadow.items()}

    @torch.no_grad()
    def load_state_dict(self, tensors: dict[str, torch.Tensor], num_updates: int) -> None:
        """Load full tensors (as `state_dict` returns them), re-sharded like the shadow."""
        missing = set(self.shadow) - set(tensors)
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:5]}")
        for name, shadow in self.shadow.items():
            shadow.copy_(like(shadow, tensors[name].float()))
        self.num_updates = num_updates
