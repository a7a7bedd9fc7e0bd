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
- X is normalized with a float64 norm first (one scalar all-reduce), and R formed from it: R scaled after the
  fact is not the Gram matrix of any X, by a rounding the recursion amplifies (measured 2-4x the plain
  iteration's error on rank-1 inputs).

bfloat16 / float16 compute (``fp32_matmul_prec="medium"``, 16-bit inputs, or ``ns_dtype``): every product,
the k x k recursion included, runs in that dtype, restarting every two steps (:data:`HALF_STEEP_FIRST_STEP`).
Measured (scripts/bench_local_gram.py --half, tests/test_gram_half.py) its max |O - O_float64| is still up to
~2x the plain 16-bit iteration's, on well-conditioned random inputs as much as on ill-conditioned ones: the
16-bit rounding of R, Z and Q is amplified along R's small eigenvalues as float32's is, but from 2^-8 (bf16)
or 2^-11 (fp16) instead of 2^-24. So ``local_gram="auto"`` and ``tp_mode="auto"`` keep the plain iteration
in 16-bit compute; the recursion runs where asked for (``local_gram="always"``, ``tp_mode="gram"``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from dist_ortho import comm
from dist_ortho.comm import reductions
from dist_ortho.comm.coalesce import AllReduce, Program
from dist_ortho.math.coefficients import Triple
from dist_ortho.math.iteration import add_product, scale_to_unit
from dist_ortho.math.kernels import gram, symmetric_polynomial
from dist_ortho.math.precision import NsDtype, compute_dtype, matmul_precision
from dist_ortho.tp.jobs import MatrixJob, NsSpec

GRAM_MILD_GROWTH = 700.0
"""Coefficient sets whose steps amplify rounding along small singular values by at most this much in all
(prod |a_j|: cubic5 119, aol 417, simple 485, quintic 493) restart at step 2 and every 3 steps after. Those
above (polar_express_safer 970, polar_express 976, cans 1049, deepseekv4 79263; quintic at 7 steps 7952) run
their first two steps as plain steps (restarts at 1 and 2), so that the rounding every later step amplifies
most is the plain iteration's own, then restart every 3 steps (measured on the battery of
tests/gram_battery.py with scripts/bench_local_gram.py --search: docs/benchmarks.md)."""


HALF_MIN_ASPECT = 2.0
"""16-bit compute runs the recursion in 16-bit only for n >= this x k; nearer square R's small eigenvalues are
many and the 16-bit recursion's orthogonality measured 0.17 (max |sigma - 1|) where the plain bf16 iteration's
is 0.035 (tests/test_tp.py, 24 x 20), so there X is cast to float32 and the recursion runs at "highest"."""

HALF_STEEP_FIRST_STEP = 6.0
"""bfloat16 / float16 compute restarts before steps 1, 3, 5, ... and, where the first step's a_0 exceeds this
(polar_express 8.2, polar_express_safer 8.2, cans 8.5), before step 2 too. Worst max |O - O_float64| over
the battery (k = 16, 64, 128; aspects 2, 4, 8; scripts/bench_local_gram.py --half --search), as a multiple of
the plain bf16 iteration's on the same input: quintic (1, 3) 1.6, simple 2.1, aol 2.5, cubic5 3.3;
polar_express (1, 2, 3) 1.5, polar_express_safer 1.8, cans 1.3; deepseekv4 (1, 3, 5, 7, 9) 1.2. One restart
is 2.1-6.8x, two for the steep sets up to 7x, none diverges on rank-deficient inputs."""


def default_gram_restarts(coefficients: Sequence[Triple], dtype: torch.dtype, device: torch.device | str | None = None) -> tuple[int, ...]:
    """Steps before which the Gram recursion re-forms X and R (gram mode: one more all-reduce each).

    float32 and float64 compute: see :data:`GRAM_MILD_GROWTH` (5 steps: (2,) or (1, 2); deepseekv4's 10:
    (1, 2, 5, 8)). Each restart costs 4 k^2 n FLOPs and saves 6 k^3, so with r restarts over s steps the
    recursion needs fewer FLOPs than the plain iteration exactly when r <= s - 2 and n > 1.5 k
    (tp.local.gram_recursion_flops). bfloat16 / float16 compute: :data:`HALF_STEEP_FIRST_STEP`.
    """
    steps = len(coefficients)
    if compute_dtype(dtype, device) not in (torch.float32, torch.float64):
        steep = {2} if steps > 2 and coefficients[0][0] > HALF_STEEP_FIRST_STEP else set()
        return tuple(sorted(steep | set(range(1, steps, 2))))
    if math.prod(abs(a) for a, _, _ in coefficients) <= GRAM_MILD_GROWTH:
        return tuple(range(2, steps, 3))
    return tuple(s for s in (1, 2, *range(5, steps, 3)) if s < steps)


def restarts_for(ns: NsSpec, dtype: torch.dtype, device: torch.device | str | None = None) -> tuple[int, ...]:
    """The restarts a matrix of ``dtype`` runs with: ``ns.gram_restarts`` when given (steps outside 1 ..
    steps - 1 dropped: they would do nothing), else :func:`default_gram_restarts` (of the compute dtype
    ``ns.ns_dtype`` gives)."""
    if ns.gram_restarts is None:
        return default_gram_restarts(ns.coefficients, compute_dtype(dtype, device, ns.ns_dtype))
    return tuple(sorted({s for s in ns.gram_restarts if 0 < s < ns.steps}))


def restarts_of(job: MatrixJob) -> tuple[int, ...]:
    return restarts_for(job.ns, job.x.dtype, job.x.device)


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
    ns_dtype: NsDtype | None = None,
) -> Program[torch.Tensor]:
    """Program: Gram-space Newton-Schulz of x (k x n_l, its columns sharded over tp_group).

    ``global_cols`` is n, the sum of the shards' columns (x's own when None). X is first normalized with its
    float64 norm (one scalar all-reduce; zero stays zero, entries of 1e-30 whose squares underflow are still
    scaled to unit norm: ||X||_F = 1 keeps every later iterate's entries and R's eigenvalues below ~1.5, in
    range for float16 too), then cast to the compute dtype (:func:`dist_ortho.math.precision.compute_dtype` with
    ``ns_dtype``). float32 / float64: R and the k x k recursion at "highest" precision. bfloat16 / float16:
    every product, R = X X^T and the k x k recursion included, in that dtype (:func:`default_gram_restarts`
    gives the restarts that keep it at the plain 16-bit iteration's error). When k > n, R is singular and the
    recursion amplifies rounding in its null space by up to prod(a_j), so everything then runs in float32 or
    wider at "highest" precision: that case costs float32 k^2 n products and k^3 work on the larger side, and
    ``tp_mode="auto"`` does not pick gram for it. ``sync_free`` is kept for the callers: the program never
    waits for the device in any dtype.

    With a restart before every step it is the plain iteration, bit for bit on one device.
    """
    dtype = compute_dtype(x.dtype, x.device, ns_dtype)
    cols = global_cols or x.size(-1)
    singular = x.size(-2) > cols
    half = dtype.itemsize == 2 and cols >= HALF_MIN_ASPECT * x.size(-2)
    small = dtype if half else torch.promote_types(dtype, torch.float32)
    gram_precision = "highest" if singular else torch.get_float32_matmul_precision()
    recursion_precision = gram_precision if half else "highest"

    def local_gram(X: torch.Tensor) -> torch.Tensor:
        with matmul_precision(gram_precision):
            return gram(X.to(small), use_syrk)

    def apply(Q: _Q, X: torch.Tensor) -> torch.Tensor:
        with matmul_precision(gram_precision):
            X = X.to(small)
            if Q is None:
                return X
            if isinstance(Q, tuple):
                return add_product(X, Q[1], X, Q[0])
            return Q @ X

    # R is always the Gram matrix of exactly the X held (in its dtype), since any mismatch between the two
    # lands in R's null space and is amplified when k > n.
    X = scale_to_unit(x, (yield from reductions.sum_of_squares(x, tp_group)), eps).to(dtype)
    if not half:
        X = X.to(small)  # 16-bit compute at aspect < 2 (HALF_MIN_ASPECT): the float32 recursion on its copy
    R = yield AllReduce(local_gram(X), tp_group)
    Q: _Q = None
    for step, (a, b, c) in enumerate(coefficients):
        if step in restarts:
            X = apply(Q, X).to(dtype if half else X.dtype)
            R = yield AllReduce(local_gram(X), tp_group)
            Q = None
        with matmul_precision(recursion_precision):
            Z = symmetric_polynomial(R, b, c, use_syrk)
            if Q is None:
                Q = (a, Z)
            else:
                if isinstance(Q, tuple):
                    Q = add_diagonal(Q[1], Q[0])
                Q = add_product(Q, Z, Q, a) if half else a * Q + Z @ Q  # float32: as measured in issue 30 item 0
            if step + 1 < len(coefficients) and step + 1 not in restarts:  # R is read again
                R = _congruence(R, Z, a)
    return apply(Q, X)


def add_diagonal(Z: torch.Tensor, a: float) -> torch.Tensor:
    """a I + Z (a matrix or a batch)."""
    out = Z.clone()
    out.diagonal(dim1=-2, dim2=-1).add_(a)
    return out


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
        X, ns.coefficients, ns.eps, job.group, restarts_of(job), ns.use_syrk, sum(job.shard_sizes), ns.sync_free,
        ns.ns_dtype,
    )
    out = out.to(job.x.dtype)
    return (out.mT if job.partition_dim == 0 else out).contiguous()
