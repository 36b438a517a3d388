"""Multi-process training under torchrun: process groups, DDP/FSDP wrapping, full state dicts.

One process (no torchrun) is the degenerate case of everything here, so the trainer has a
single code path. Under `torchrun --nproc_per_node N`, the process group is gloo on CPU and
NCCL on CUDA; the global batch of a step is split into equal, contiguous row blocks, one per
rank (rank r takes rows [r*B/N, (r+1)*B/N)), so the data, the noise and the learning rate
of a step do not depend on N, and gradients averaged over ranks equal the one-process
gradient of the same global batch up to float summation order.

State dicts always go through `torch.distributed.checkpoint.state_dict`, which returns the
canonical parameter names (no `module.` / `_orig_mod.` prefixes) and gathers FSDP shards, so a
checkpoint written by any world size loads into any other and into `SiT.from_pretrained`.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mupad.config import ParallelKind
from mupad.errors import MupadError

_CPU = torch.device("cpu")
logger = logging.getLogger(__name__)


class DistributedError(MupadError, RuntimeError):
    """The multi-process setup is inconsistent; the message says how to launch correctly."""


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = _CPU

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rows(self, batch_size: int) -> tuple[int, int]:
        """This rank's contiguous rows [start, stop) of a global batch."""
        if batch_size % self.world_size:
            raise DistributedError(
                f"the global batch {batch_size} does not split evenly over {self.world_size} "
                "processes; choose a batch size divisible by the number of processes"
            )
        per_rank = batch_size // self.world_size
        return self.rank * per_rank, (self.rank + 1) * per_rank

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum a small fp64 vector over ranks (returns a new tensor on the CPU)."""
        values = values.detach().to(self.device, torch.float64).clone()
        if self.enabled:
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values.cpu()


def resolve_device(name: str | torch.device | None, local_rank: int = 0) -> torch.device:
    """"auto"/None -> this process's GPU when CUDA is available, else the CPU."""
    if name is None or str(name) == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device


def from_environment(device: str | torch.device | None = "auto") -> DistContext:
    """Join the torchrun process group when launched by torchrun, else a one-process context.

    The backend follows the device: NCCL for CUDA, gloo for the CPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device, local_rank)
    if world_size > 1:
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
        if not dist.is_initialized():
            backend = "nccl" if resolved.type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
        if dist.get_world_size() != world_size:
            raise DistributedError(
                f"WORLD_SIZE={world_size} but the process group has {dist.get_world_size()} ranks"
            )
        logger.info("rank %d of %d on %s", rank, world_size, resolved)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=resolved)


def shutdown(context: DistContext) -> None:
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()


def wrap(module: nn.Module, context: DistContext, kind: ParallelKind) -> nn.Module:
    """DDP or FSDP around `module` when more than one process runs; the module itself otherwise.

    FSDP shards every transformer block and the projector as their own units, then the rest.
    DDP looks for unused parameters because a condition stream absent from a whole batch
    (or a projector whose loss weight is 0) receives no gradient that step.
    """
    if not context.enabled:
        return module
    if kind is ParallelKind.DDP:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [context.device.index] if context.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=True)
    from torch.distributed.fsdp import fully_shard

    for block in getattr(getattr(module, "model", module), "blocks", []):
        fully_shard(block)
    projector = getattr(module, "projector", None)
    if projector is not None:
        fully_shard(projector)
    fully_shard(module)
    return module


@contextlib.contextmanager
def gradient_sync(module: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce for accumulation micro-batches before the last one."""
    if enabled:
        yield
        return
    no_sync = getattr(module, "no_sync", None)  # DDP
    if no_sync is not None:
        with no_sync():
            yield
        return
    set_sync = getattr(module, "set_requires_gradient_sync", None)  # FSDP2
    if set_sync is not None:
        set_sync(False)
        try:
            yield
        finally:
            set_sync(True)
        return
    yield


def _options(**kwargs: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kwargs)


def full_model_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded, unprefixed CPU weights of `module` (collective under FSDP; every rank must
    call it; ranks other than 0 may receive an empty dict)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    sharded = dist.is_initialized() and dist.get_world_size() > 1
    return get_model_state_dict(
        module, options=_options(full_state_dict=True, cpu_offload=sharded)
    )


def load_full_model_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load full weights (as written by `full_model_state`) into a plain, DDP or FSDP module."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(module, state, options=_options(full_state_dict=True, strict=True))


def full_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """{'state': {param name: {slot: tensor}}, 'param_groups': [...]} keyed by parameter name
    (collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    sharded = dist.is_initialized() and dist.get_world_size() > 1
    return get_optimizer_state_dict(
        module, optimizer, options=_options(full_state_dict=True, cpu_offload=sharded)
    )


def load_full_optimizer_state(
    module: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(module, optimizer, state, options=_options(full_state_dict=True))


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP shard) gathered to its full value; other tensors unchanged."""
    gather = getattr(value, "full_tensor", None)
    return gather() if gather is not None else value


def like(reference: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """`full` laid out like `reference`: sharded the same way when reference is a DTensor."""
    mesh = getattr(reference, "device_mesh", None)
    if mesh is None:
        return full.to(reference.device, reference.dtype)
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(reference.dtype), mesh, reference.placements)
