"""Matmul precision: the one definition of the ``fp32_matmul_prec`` choices and of the compute dtype."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal, get_args

import torch

MatmulPrecision = Literal["highest", "high", "medium"]
MATMUL_PRECISIONS: tuple[str, ...] = get_args(MatmulPrecision)


@contextlib.contextmanager
def matmul_precision(precision: MatmulPrecision) -> Iterator[None]:
    """Run the block under ``torch.set_float32_matmul_precision(precision)``, then restore the old one."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype the Newton-Schulz iterations run in.

    float32 runs in bfloat16 when ``torch.get_float32_matmul_precision() == "medium"`` (as
    emerging_optimizers does) and in float32 under "high" / "highest". bfloat16, float16 and float64
    run in their own dtype. Results are always returned in the input's dtype.
    """
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "medium":
        return torch.bfloat16
    return dtype
