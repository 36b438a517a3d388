"""Floating-point dtype names accepted on the command line and in configs."""

from __future__ import annotations

import torch

FLOAT_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def parse_dtype(
    dtype: torch.dtype | str, error: type[Exception] = ValueError, what: str = "dtype"
) -> torch.dtype:
    """fp32 / bf16 / fp16 (a torch dtype or its name) -> torch dtype; else raise `error`."""
    if isinstance(dtype, torch.dtype):
        if dtype in FLOAT_DTYPES.values():
            return dtype
    elif str(dtype).lower() in FLOAT_DTYPES:
        return FLOAT_DTYPES[str(dtype).lower()]
    raise error(f"unsupported {what} {dtype!r}; choose one of: fp32, bf16, fp16")
