"""Global scalars of a tensor-parallel matrix: the one place where shard-local sums become global.

Each function takes this rank's shard and the TP group that holds the other shards (``None`` for an
unsharded tensor) and returns the value for the whole matrix, on every rank. Sums run in float64 so
that matrices of tiny or huge norm neither underflow nor overflow.
"""

from __future__ import annotations

import torch

from dist_ortho import comm

MatrixDims = tuple[int, ...]


def local_sum_of_squares(x: torch.Tensor, dims: MatrixDims = (-2, -1)) -> torch.Tensor:
    """sum(x**2) over ``dims`` of this rank's block, float64 (to be summed over the group)."""
    return torch.linalg.vector_norm(x, dim=dims, dtype=torch.float64).square()


def sum_of_squares(x: torch.Tensor, tp_group: comm.ProcessGroup | None, dims: MatrixDims = (-2, -1)) -> torch.Tensor:
    """sum(x**2) over ``dims`` of the global matrix, float64, kept dims squeezed."""
    return comm.all_reduce(local_sum_of_squares(x, dims), tp_group)


def frobenius_norm(x: torch.Tensor, tp_group: comm.ProcessGroup | None, dims: MatrixDims = (-2, -1)) -> torch.Tensor:
    """||x||_F of the global matrix (per slice of a batch), float64."""
    return sum_of_squares(x, tp_group, dims).sqrt()


def inner_product(a: torch.Tensor, b: torch.Tensor, tp_group: comm.ProcessGroup | None) -> torch.Tensor:
    """<a, b>_F = sum(a * b) over the last two dims of the global matrices, float64."""
    local = (a.double() * b.double()).sum(dim=(-2, -1))
    return comm.all_reduce(local, tp_group)


def mean_over(x: torch.Tensor, dim: int, tp_group: comm.ProcessGroup | None, global_len: int) -> torch.Tensor:
    """Mean of x over ``dim`` (kept), where ``tp_group`` holds the rest of that dim (None: x has all of it)."""
    total = x.sum(dim=dim, keepdim=True, dtype=torch.float32 if x.dtype != torch.float64 else torch.float64)
    return comm.all_reduce(total, tp_group) / global_len
