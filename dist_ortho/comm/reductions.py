"""Global scalars of a tensor-parallel matrix: the one place where shard-local sums become global.

Each function is a program (dist_ortho.comm.coalesce) over this rank's shard and the TP group that holds the
other shards (``None`` for an unsharded tensor); it returns the value for the whole matrix, on every
rank. Many matrices' reductions run together as one flat all-reduce. Sums run in float64 so that
matrices of tiny or huge norm neither underflow nor overflow.
"""

from __future__ import annotations

import torch

from dist_ortho import comm
from dist_ortho.comm.coalesce import AllReduce, Program
from dist_ortho.math.iteration import sum_of_squares as local_sum_of_squares

MatrixDims = tuple[int, ...]


def sum_of_squares(x: torch.Tensor, group: comm.ProcessGroup | None, dims: MatrixDims = (-2, -1)) -> Program[torch.Tensor]:
    """sum(x**2) over ``dims`` of the global matrix, float64, reduced dims squeezed."""
    return (yield AllReduce(local_sum_of_squares(x, dims), group))


def frobenius_norm(x: torch.Tensor, group: comm.ProcessGroup | None, dims: MatrixDims = (-2, -1)) -> Program[torch.Tensor]:
    """||x||_F of the global matrix (per slice of a batch), float64."""
    return (yield from sum_of_squares(x, group, dims)).sqrt()


def inner_product(a: torch.Tensor, b: torch.Tensor, group: comm.ProcessGroup | None) -> Program[torch.Tensor]:
    """<a, b>_F = sum(a * b) over the last two dims of the global matrices, float64."""
    return (yield AllReduce((a.double() * b.double()).sum(dim=(-2, -1)), group))


def mean_over(x: torch.Tensor, dim: int, group: comm.ProcessGroup | None, global_len: int) -> Program[torch.Tensor]:
    """Mean of x over ``dim`` (kept), where ``group`` holds the rest of that dim (None: x has all of it)."""
    total = x.sum(dim=dim, keepdim=True, dtype=torch.float32 if x.dtype != torch.float64 else torch.float64)
    return (yield AllReduce(total, group)) / global_len
