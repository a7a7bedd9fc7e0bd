"""``gram``: Newton-Schulz iterated on k x k matrices only (k = the unsharded dim).

Every X_j = Q_j X_0 with Q_j a polynomial in R_0 = X_0 X_0^T, so: R <- allreduce(X_l X_l^T) once,
||X||_F^2 = trace(R), per step Z = b R + c R^2, Q <- a Q + Z Q, R <- (a I + Z)^2 R, finally
X_l <- Q X_l. One collective, plus one per restart, which re-forms X_l and R to shed accumulated
rounding error (see :func:`default_gram_restarts`). Published for one device as Gram Newton-Schulz
(Dao-AILab); here the Gram matrix is the sum of the shards' partial ones.

Constants that steer its numerics: :data:`GRAM_TRACE_BAND` (when R_0 is re-formed from a normalized X)
and :func:`default_gram_restarts` (the restart period).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dist_ortho import comm, reductions
from dist_ortho.coalesce import AllReduce, Program
from dist_ortho.coefficients import Triple
from dist_ortho.iteration import scale_to_unit
from dist_ortho.kernels import gram, symmetric_polynomial
from dist_ortho.precision import compute_dtype, matmul_precision
from dist_ortho.tp.jobs import MatrixJob

GRAM_TRACE_BAND = (1e-24, 1e30)
"""trace(R_0) outside this band (a zero trace included) means squares of entries under- or overflowed in the
Gram matrix, or a zero matrix: then X is normalized first with a float64 norm (one more all-reduce, taken by
every rank together since R is global) and R re-formed from it."""

GRAM_RESTART_PERIOD = 3
"""float32 compute restarts (re-forms X_l and R) before every 3rd step."""


def default_gram_restarts(dtype: torch.dtype, steps: int, device: torch.device | str | None = None) -> tuple[int, ...]:
    """Steps before which gram mode re-forms X_l and R (one more all-reduce each).

    The Gram recursion amplifies the rounding error of R_0 along small singular values (by up to
    prod(a_j), ~10^3 for polar_express). In float32 that reaches ~1e-4 max abs against float64 when k
    is the larger side; a restart every 3 steps keeps it under ~5e-5. In 16-bit compute the k x k
    recursion already runs in float32 and its error is far below bf16's own, so no restart is needed
    (orthogonality measured equal to the distributed mode's); float64 needs none either.
    """
    return tuple(range(GRAM_RESTART_PERIOD, steps, GRAM_RESTART_PERIOD)) if compute_dtype(dtype, device) == torch.float32 else ()


def restarts_of(job: MatrixJob) -> tuple[int, ...]:
    ns = job.ns
    return ns.gram_restarts if ns.gram_restarts is not None else default_gram_restarts(job.x.dtype, ns.steps, job.x.device)


def gram_newton_schulz(
    x: torch.Tensor,
    coefficients: Sequence[Triple],
    eps: float,
    tp_group: comm.ProcessGroup | None,
    restarts: Sequence[int] = (),
    use_syrk: bool = False,
    global_cols: int | None = None,
    sync_free: bool = False,
) -> Program[torch.Tensor]:
    """Program: Gram-space Newton-Schulz of x (k x n_l, its columns sharded over tp_group).

    ``global_cols`` is n, the sum of the shards' columns (x's own when None). The products with X_l
    (the final Q X_l, restarts) run in the compute dtype (bf16 under "medium"); R is formed with a
    float32 result and the k x k recursion runs in float32 or wider at "highest" matmul precision:
    bf16 there loses the orthogonality (max |sigma - 1| 0.1 to 60 where NS has 0.03). When k > n,
    R is singular and the recursion amplifies rounding in its null space by up to prod(a_j), so the
    products with X_l then also run at "highest" precision: that case costs float32 k^2 n products
    and k^3 work on the larger side, and ``tp_mode="auto"`` does not pick gram for it.

    ``sync_free``: X is always normalized with a float64 norm first (one more all-reduce), instead of testing
    trace(R_0) on the host, so that the program never waits for the device (capturable steps).
    """
    dtype = compute_dtype(x.dtype, x.device)
    small = torch.promote_types(dtype, torch.float32)
    singular = x.size(-2) > (global_cols or x.size(-1))
    gram_precision = "highest" if singular else torch.get_float32_matmul_precision()

    def local_gram(X: torch.Tensor) -> torch.Tensor:
        with matmul_precision(gram_precision):
            return gram(X.to(small), use_syrk)

    def apply(Q: torch.Tensor | None, X: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        with matmul_precision(gram_precision):
            return (X.to(small) if Q is None else Q @ X.to(small)) * scale

    # The iterate is Q X scale; R is always the Gram matrix of exactly the X held (in its dtype), since
    # any mismatch between the two lands in R's null space and is amplified when k > n.
    X = x.to(dtype)
    if not sync_free:
        R = yield AllReduce(local_gram(X), tp_group)
        trace = R.diagonal(dim1=-2, dim2=-1).double().sum(-1)
    low, high = GRAM_TRACE_BAND
    if sync_free or bool(((trace < low) | (trace > high)).any()):
        # Entries too small or large for a Gram matrix in this dtype (squares of 1e-30 underflow to a zero
        # trace), or a zero matrix: normalize with a float64 norm first (zero stays zero), then re-form R.
        # R is the same on every rank, so every rank takes this branch together.
        X = scale_to_unit(x, (yield from reductions.sum_of_squares(x, tp_group)), eps).to(dtype)
        R = yield AllReduce(local_gram(X), tp_group)
        scale = torch.ones(R.shape[:-2], dtype=small, device=R.device)[..., None, None]
    else:
        scale = (1.0 / (trace.sqrt() + eps)).to(small)[..., None, None]
        R = R * scale.square()
    eye = torch.eye(R.size(-1), dtype=small, device=R.device).expand_as(R)
    Q = None  # None stands for the identity, which saves a k x k product after every (re)start
    for step, (a, b, c) in enumerate(coefficients):
        if step in restarts:
            X = apply(Q, X, scale).to(dtype)
            R = yield AllReduce(local_gram(X), tp_group)
            Q, scale = None, torch.ones_like(scale)
        with matmul_precision("highest"):
            Z = symmetric_polynomial(R, b, c, use_syrk)
            Q = a * eye + Z if Q is None else a * Q + Z @ Q
            if step + 1 < len(coefficients) and step + 1 not in restarts:  # R is read again
                P = a * eye + Z
                R = P @ (P @ R)
    return apply(Q, X, scale)


def program(job: MatrixJob) -> Program[torch.Tensor]:
    X = job.x.mT if job.partition_dim == 0 else job.x  # the sharded dim becomes the contraction dim
    ns = job.ns
    out = yield from gram_newton_schulz(
        X, ns.coefficients, ns.eps, job.group, restarts_of(job), ns.use_syrk, sum(job.shard_sizes), ns.sync_free
    )
    out = out.to(job.x.dtype)
    return (out.mT if job.partition_dim == 0 else out).contiguous()
