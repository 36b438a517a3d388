"""The command line's precision choice, with "auto" resolved once per run to a concrete
`Precision` (configs and checkpoints only ever hold fp32 or bf16).

"auto" gives bf16 autocast where the hardware computes bf16 natively — a CUDA GPU with bf16
support, a CPU with AMX or AVX512-BF16 — and fp32 elsewhere: on an AVX2-only CPU, bf16
autocast emulates every matmul and made a training step of the recipes' SiT 18x slower than
fp32 (0.33 vs 5.9 images/s on 2 cores).
"""

from __future__ import annotations

import enum
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from mupad.config import Precision, parse_enum

if TYPE_CHECKING:
    import torch

NATIVE_BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


class PrecisionChoice(str, enum.Enum):
    AUTO = "auto"  # bf16 where the hardware has native bf16, else fp32
    FP32 = "fp32"
    BF16 = "bf16"  # bf16 autocast with fp32 master weights


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags the kernel reports (Linux /proc/cpuinfo); empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def cpu_has_native_bf16() -> bool:
    return bool(NATIVE_BF16_CPU_FLAGS & cpu_flags())


def _device_type(device: str | torch.device) -> str:
    import torch  # here, not at the top: `mupad --help` reads PrecisionChoice without torch

    if str(device) == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device).type


def resolve_precision(
    choice: PrecisionChoice | Precision | str, device: str | torch.device = "auto"
) -> Precision:
    """fp32 / bf16 pass through; "auto" -> bf16 on hardware with native bf16, else fp32.
    `device` is the run's device ("auto": a GPU when present)."""
    choice = parse_enum(PrecisionChoice, getattr(choice, "value", choice))
    if choice is not PrecisionChoice.AUTO:
        return Precision(choice.value)
    kind = _device_type(device)
    if kind == "cuda":
        import torch

        native = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    elif kind == "cpu":
        native = cpu_has_native_bf16()
    else:
        native = False
    return Precision.BF16 if native else Precision.FP32
