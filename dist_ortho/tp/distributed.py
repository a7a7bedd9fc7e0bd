"""``distributed``: the sharded dim becomes the contraction dim of X X^T, so each rank forms its partial
k x k Gram matrix (k = the unsharded dim) and all-reduces it every step; the norm is one float64
all-reduce. steps + 1 collectives per matrix (coalesced: per step); the k^3 product A^2 runs on every rank.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dist_ortho import comm
from dist_ortho.comm import reductions
from dist_ortho.comm.coalesce import AllReduce, Program
from dist_ortho.math.coefficients import Triple
from dist_ortho.math.iteration import polynomial_step, scale_to_unit
from dist_ortho.math.kernels import gram
from dist_ortho.math.precision import NsDtype, compute_dtype
from dist_ortho.tp.jobs import MatrixJob


def column_sharded_newton_schulz(
    x: torch.Tensor, coefficients: Sequence[Triple], eps: float, group: comm.ProcessGroup | None, use_syrk: bool = False,
    ns_dtype: NsDtype | None = None,
) -> Program[torch.Tensor]:
    """Program: Newton-Schulz of the matrix whose columns ``group`` holds in blocks, x this rank's block."""
    dtype = compute_dtype(x.dtype, x.device, ns_dtype)
    X = scale_to_unit(x, (yield from reductions.sum_of_squares(x, group)), eps).to(dtype)
    for a, b, c in coefficients:
        A = yield AllReduce(gram(X, use_syrk), group)
        X = polynomial_step(X, A, a, b, c, use_syrk)
    return X.to(x.dtype).contiguous()


def program(job: MatrixJob) -> Program[torch.Tensor]:
    X = job.x.mT if job.partition_dim == 0 else job.x  # the sharded dim becomes the contraction dim
    ns = job.ns
    out = yield from column_sharded_newton_schulz(X, ns.coefficients, ns.eps, job.group, ns.use_syrk, ns.ns_dtype)
    return (out.mT if job.partition_dim == 0 else out).contiguous()
