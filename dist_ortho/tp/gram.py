"""``gram``: Newton-Schulz iterated on k x k matrices only (k = the unsharded dim).

Every X_j = Q_j X_0 with Q_j a polynomial in R_0 = X_0 X_0^T, so: R <- allreduce(X_l X_l^T) once, per step
Z = b R + c R^2, P = a I + Z, Q <- P Q, R <- P R P, finally X_l <- Q X_l. Published for one device as Gram
Newton-Schulz (Dao-AILab); here the Gram matrix is the sum of the shards' partial ones.

The recursion amplifies whatever makes R differ from the Gram matrix of Q X_0 (its own rounding, and R_0's)
along R's small eigenvalues, by up to the product of the a_j since R was formed: ~500-1000 over 5 steps, 8e4
over deepseekv4's 10. Three things keep it as accurate as the plain iteration (scripts/bench_local_gram.py,
tests/test_gram_accuracy.py):

- restarts (:func:`default_gram_restarts`): X_l <- Q X_l and a fresh R (one more all-reduce each);
- R <- P R P with one P on each side (:func:`_congruence`), not P (P R);
- in float32/float64 compute X is normalized with a float64 norm first (one scalar all-reduce), and R formed
  from it: R scaled after the fact is not the Gram matrix of any X, by a rounding the recursion amplifies
  (measured 2-4x the plain iteration's error on rank-1 inputs). 16-bit compute, whose rounding dominates,
  takes the norm from trace(R) instead (one collective) unless ``sync_free``; :data:`GRAM_TRACE_BAND`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from dist_ortho import comm, reductions
from dist_ortho.coalesce import AllReduce, Program
from dist_ortho.coefficients import Triple
from dist_ortho.iteration import add_product, scale_to_unit
from dist_ortho.kernels import gram, symmetric_polynomial
from dist_ortho.precision import compute_dtype, matmul_precision
from dist_ortho.tp.jobs import MatrixJob, NsSpec

GRAM_TRACE_BAND = (1e-24, 1e30)
"""16-bit compute: trace(R_0) outside this band (a zero trace included) means squares of entries under- or
overflowed in the Gram matrix, or a zero matrix: then X is normalized first with a float64 norm (one more
all-reduce, taken by every rank together since R is global) and R re-formed from it."""

GRAM_MILD_GROWTH = 700.0
"""Coefficient sets whose steps amplify rounding along small singular values by at most this much in all
(prod |a_j|: cubic5 119, aol 417, simple 485, quintic 493) restart at step 2 and every 3 steps after. Those
above (polar_express_safer 970, polar_express 976, cans 1049, deepseekv4 79263; quintic at 7 steps 7952) run
their first two steps as plain steps (restarts at 1 and 2), so that the rounding every later step amplifies
most is the plain iteration's own, then restart every 3 steps (measured on the battery of
tests/gram_battery.py with scripts/bench_local_gram.py --search: docs/benchmarks.md)."""


def default_gram_restarts(coefficients: Sequence[Triple], dtype: torch.dtype, device: torch.device | str | None = None) -> tuple[int, ...]:
    """Steps before which the Gram recursion re-forms X and R (gram mode: one more all-reduce each).

    float32 and float64 compute: see :data:`GRAM_MILD_GROWTH` (5 steps: (2,) or (1, 2); deepseekv4's 10:
    (1, 2, 5, 8)). Each restart costs 4 k^2 n FLOPs and saves 6 k^3, so with r restarts over s steps the
    recursion needs fewer FLOPs than the plain iteration exactly when r <= s - 2 and n > 1.5 k
    (tp.local.gram_recursion_flops). 16-bit compute: none, its k x k recursion runs in float32 already.
    """
    if compute_dtype(dtype, device) not in (torch.float32, torch.float64):
        return ()
    steps = len(coefficients)
    if math.prod(abs(a) for a, _, _ in coefficients) <= GRAM_MILD_GROWTH:
        return tuple(range(2, steps, 3))
    return tuple(s for s in (1, 2, *range(5, steps, 3)) if s < steps)


def restarts_for(ns: NsSpec, dtype: torch.dtype, device: torch.device | str | None = None) -> tuple[int, ...]:
    """The restarts a matrix of ``dtype`` runs with: ``ns.gram_restarts`` when given (steps outside 1 ..
    steps - 1 dropped: they would do nothing), else :func:`default_gram_restarts`."""
    if ns.gram_restarts is None:
        return default_gram_restarts(ns.coefficients, dtype, device)
    return tuple(sorted({s for s in ns.gram_restarts if 0 < s < ns.steps}))


def restarts_of(job: MatrixJob) -> tuple[int, ...]:
    return restarts_for(job.ns, job.x.dtype, job.x.device)


def normalizes_first(dtype: torch.dtype, sync_free: bool) -> bool:
    """Whether gram mode takes X's float64 norm first (one scalar all-reduce before R's) in compute ``dtype``."""
    return sync_free or dtype in (torch.float32, torch.float64)


_Q = tuple[float, torch.Tensor] | torch.Tensor | None
"""The polynomial of R_0 applied so far since the last (re)start: None for the identity, (a, Z) for a I + Z
(one step: applied as a X + Z X, exactly the plain iteration's step), else the k x k matrix."""


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

    With a restart before every step it is the plain iteration, bit for bit on one device. ``sync_free``: X
    is normalized with a float64 norm first in every dtype, so that the program never waits for the device.
    """
    dtype = compute_dtype(x.dtype, x.device)
    small = torch.promote_types(dtype, torch.float32)
    singular = x.size(-2) > (global_cols or x.size(-1))
    gram_precision = "highest" if singular else torch.get_float32_matmul_precision()

    def local_gram(X: torch.Tensor) -> torch.Tensor:
        with matmul_precision(gram_precision):
            return gram(X.to(small), use_syrk)

    def apply(Q: _Q, X: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        with matmul_precision(gram_precision):
            X = X.to(small)
            if Q is None:
                out = X
            elif isinstance(Q, tuple):
                out = add_product(X, Q[1], X, Q[0])
            else:
                out = Q @ X
            return out * scale

    # The iterate is Q X scale; R is always the Gram matrix of exactly the X held (in its dtype), since
    # any mismatch between the two lands in R's null space and is amplified when k > n.
    X = x.to(dtype)
    first = normalizes_first(dtype, sync_free)
    if not first:
        R = yield AllReduce(local_gram(X), tp_group)
        trace = R.diagonal(dim1=-2, dim2=-1).double().sum(-1)
    low, high = GRAM_TRACE_BAND
    if first or bool(((trace < low) | (trace > high)).any()):
        # Normalized with a float64 norm (zero stays zero, entries of 1e-30 whose squares underflow are still
        # scaled to unit norm), R formed from the normalized X. Outside the band R is the same on every rank,
        # so every rank takes this branch together.
        X = scale_to_unit(x, (yield from reductions.sum_of_squares(x, tp_group)), eps).to(dtype)
        R = yield AllReduce(local_gram(X), tp_group)
        scale = torch.ones(R.shape[:-2], dtype=small, device=R.device)[..., None, None]
    else:
        scale = (1.0 / (trace.sqrt() + eps)).to(small)[..., None, None]
        R = R * scale.square()
    Q: _Q = None
    for step, (a, b, c) in enumerate(coefficients):
        if step in restarts:
            X = apply(Q, X, scale).to(dtype)
            R = yield AllReduce(local_gram(X), tp_group)
            Q, scale = None, torch.ones_like(scale)
        with matmul_precision("highest"):
            Z = symmetric_polynomial(R, b, c, use_syrk)
            if Q is None:
                Q = (a, Z)
            else:
                if isinstance(Q, tuple):
                    Q = Q[0] * torch.eye(R.size(-1), dtype=small, device=R.device) + Q[1]
                Q = a * Q + Z @ Q
            if step + 1 < len(coefficients) and step + 1 not in restarts:  # R is read again
                R = _congruence(R, Z, a)
    return apply(Q, X, scale)


def _congruence(R: torch.Tensor, Z: torch.Tensor, a: float) -> torch.Tensor:
    """P R P for P = a I + Z (a polynomial of R_0, as R is: they commute), as W = a R + Z R, then a W + W Z.

    One P on each side: P (P R) multiplies the rounding of P R by P again from the same side, by up to a
    (P's eigenvalue on R's small eigenvalues), and measured 2-10x the error with one restart on
    ill-conditioned inputs."""
    W = add_product(R, Z, R, a)
    return add_product(W, W, Z, a)


def program(job: MatrixJob) -> Program[torch.Tensor]:
    X = job.x.mT if job.partition_dim == 0 else job.x  # the sharded dim becomes the contraction dim
    ns = job.ns
    out = yield from gram_newton_schulz(
        X, ns.coefficients, ns.eps, job.group, restarts_of(job), ns.use_syrk, sum(job.shard_sizes), ns.sync_free
    )
    out = out.to(job.x.dtype)
    return (out.mT if job.partition_dim == 0 else out).contiguous()
