"""Newton-Schulz of whole matrices on this rank: the plain iteration, or the Gram-space recursion where it
is cheaper, and same-shape matrices as one batch.

Gram on one device (Dao-AILab's Gram Newton-Schulz; tp/gram.py with no group): for X of k x n, k <= n,
aspect a = n / k, s steps and r restarts, the plain iteration costs s (4 a + 2) k^3 FLOPs (s 4 a k^3 for cubic
sets), the Gram recursion (4 + 4 r) a k^3 + (2 s + 6 (s - 1 - r)) k^3 (cubic: 6 (s - 1 - r) k^3), exactly
:func:`gram_recursion_flops`; plain minus Gram is (s - 1 - r)(4 a - 6) k^3, so with r <= s - 2 it is
cheaper exactly when a > 1.5. :func:`use_gram` picks it when the compute dtype is float32 or float64, a >=
:data:`GRAM_MIN_ASPECT` and it needs fewer FLOPs with the restarts it runs there
(:func:`dist_ortho.tp.gram.default_gram_restarts`: (2,) for quintic, simple, aol, cubic5; (1, 2) for
polar_express, polar_express_safer, cans; (1, 2, 5, 8) for deepseekv4's 10 steps): 0.67x the plain iteration's
FLOPs at a = 4 with one restart (cubic5 0.62x), 0.78x with two, 0.72x for deepseekv4 (0.54x, 0.69x, 0.62x at
a = 8; 0.56x and 0.39x at a = 4 and 8 without restarts).

Accuracy with those restarts, float32 at "highest", on the battery of tests/gram_battery.py (random; rank 1, 2,
8; condition 1e2 .. 1e6; rank 4 plus noise 1e-4; entries of 1e-30; zero; k = 4 .. 256 at a = 2, 4, 8, and k = 1024
at a = 2 for the low-rank and condition-1e6 inputs; every coefficient set): max |O - O_float64| <= max(2 x the plain float32 iteration's, 2e-5) on every
input, measured at most 0.63 of that bound for k <= 256 and 0.79 at k = 1024 (deepseekv4, condition 1e6); zero
gives exactly zero. float64 likewise against a long-double reference up to condition 1e8 (at most 0.70 of the
bound, its floor scaled by eps64 / eps32). Without restarts 417 of the 1512 float32 inputs with k <= 256 miss the
bound, and deepseekv4 overflows on rank-deficient ones (tests/test_gram_accuracy.py; tables in docs/benchmarks.md,
scripts/bench_local_gram.py). Near a = 1 the plain iteration is cheaper and stays.

bfloat16 / float16 compute (``fp32_matmul_prec="medium"``, 16-bit matrices, or ``ns_dtype``): with
``local_gram="always"`` the recursion runs wholly in that dtype with the restarts of
:func:`dist_ortho.tp.gram.default_gram_restarts` (two or three over 5 steps: 0.78x / 0.89x the plain
iteration's FLOPs at a = 4, 0.69x / 0.85x at a = 8); measured up to 1.2-3.3x the plain 16-bit iteration's max
error (tp/gram.py), above the 1.5x at which it would count as that iteration's error, so "auto" keeps the
plain iteration there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import torch

from dist_ortho.comm.coalesce import run
from dist_ortho.math.iteration import orthogonalize
from dist_ortho.math.precision import compute_dtype
from dist_ortho.tp import batching
from dist_ortho.tp.gram import gram_newton_schulz, restarts_for
from dist_ortho.tp.jobs import NsSpec

LocalGram = Literal["auto", "always", "never"]
LOCAL_GRAM: tuple[str, ...] = get_args(LocalGram)
GRAM_MIN_ASPECT = 2.0


def _batch(shape: Sequence[int]) -> int:
    batch = 1
    for d in shape[:-2]:
        batch *= d
    return batch


def plain_flops(shape: Sequence[int], ns: NsSpec) -> float:
    """FLOPs of the plain iteration on a matrix (or batch) of ``shape``: per step X X^T (2 k^2 n), A A when
    c != 0 (2 k^3) and B X (2 k^2 n)."""
    k, n = min(shape[-2:]), max(shape[-2:])
    return _batch(shape) * sum(4 * k * k * n + (2 * k**3 if c != 0 else 0) for _, _, c in ns.coefficients)


def gram_recursion_flops(k: int, n_local: int, ns: NsSpec, restarts: Sequence[int] = ()) -> float:
    """FLOPs of :func:`dist_ortho.tp.gram.gram_newton_schulz` on a k x n_local block, exactly as it runs: R = X X^T
    and the final Q X (2 k^2 n each), 4 k^2 n per restart (Q X, then R), and per step Z = b R + c R^2 (2 k^3
    when c != 0), Q <- a Q + Z Q (2 k^3, none right after a (re)start: Q is then a I + Z, applied as a X + Z X)
    and R <- P R P (4 k^3, unless the next step is the last or a restart)."""
    steps = len(ns.coefficients)
    total = (4 + 4 * len(restarts)) * k * k * n_local
    fresh = True
    for step, (_, _, c) in enumerate(ns.coefficients):
        if step in restarts:
            fresh = True
        total += (2 * k**3 if c != 0 else 0) + (0 if fresh else 2 * k**3)
        if step + 1 < steps and step + 1 not in restarts:
            total += 4 * k**3
        fresh = False
    return total


def gram_flops(shape: Sequence[int], ns: NsSpec, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None) -> float:
    """FLOPs of the Gram-space recursion on a whole matrix (or batch) of ``shape`` in ``dtype``, with the
    restarts it runs there (:func:`dist_ortho.tp.gram.restarts_for`)."""
    k, n = min(shape[-2:]), max(shape[-2:])
    return _batch(shape) * gram_recursion_flops(k, n, ns, restarts_for(ns, dtype, device))


def local_flops(shape: Sequence[int], ns: NsSpec, dtype: torch.dtype, device: torch.device | str | None = None) -> float:
    """FLOPs of :func:`local_newton_schulz` on a whole matrix (or batch) of ``shape``."""
    return gram_flops(shape, ns, dtype, device) if use_gram(shape, ns, dtype, device) else plain_flops(shape, ns)


def use_gram(shape: Sequence[int], ns: NsSpec, dtype: torch.dtype, device: torch.device | str | None = None) -> bool:
    """Whether a whole matrix of ``shape`` runs the Gram recursion on one device (see the module doc)."""
    if ns.local_gram != "auto":
        return ns.local_gram == "always"
    k, n = min(shape[-2:]), max(shape[-2:])
    return (
        compute_dtype(dtype, device, ns.ns_dtype) in (torch.float32, torch.float64)
        and k > 0
        and n >= GRAM_MIN_ASPECT * k
        and gram_flops(shape, ns, dtype, device) < plain_flops(shape, ns)
    )


def _one_device(x: torch.Tensor, ns: NsSpec) -> torch.Tensor:
    if not use_gram(x.shape, ns, x.dtype, x.device):
        return orthogonalize(x, ns.coefficients, ns.eps, None, ns.use_syrk, ns.ns_dtype)
    transpose = x.size(-2) > x.size(-1)
    X = x.mT if transpose else x
    # normalized with its float64 norm first: no host sync, and no collective to save on one device
    restarts = restarts_for(ns, x.dtype, x.device)
    out = run(gram_newton_schulz(X, ns.coefficients, ns.eps, None, restarts, ns.use_syrk, sync_free=True,
                                 ns_dtype=ns.ns_dtype)).to(x.dtype)
    return (out.mT if transpose else out).contiguous()


def local_newton_schulz(x: torch.Tensor, ns: NsSpec) -> torch.Tensor:
    """Newton-Schulz of a whole matrix (or batch) on this device: Gram recursion or plain iteration; a batch
    runs in batched iterations of :func:`dist_ortho.tp.batching.chunk` matrices, or one matrix at a time, as
    :func:`dist_ortho.tp.batching.batched` says."""
    if x.ndim == 2:
        return _one_device(x, ns)
    flat = x.reshape(-1, *x.shape[-2:])
    count = flat.size(0)
    if batching.batched(x.shape, x.dtype, x.device, ns.batch):
        size = batching.chunk(x.shape, x.dtype, x.device)
        if size is None or size >= count:
            return _one_device(x, ns)
        return torch.cat([_one_device(flat[i : i + size], ns) for i in range(0, count, size)]).view(x.shape)
    out = torch.empty_like(flat)
    for i in range(count):  # each in its own memory: a BLAS may round by the address's alignment
        out[i] = _one_device(flat[i].clone(), ns)
    return out.view(x.shape)


def local_many(xs: Sequence[torch.Tensor], specs: Sequence[NsSpec]) -> list[torch.Tensor]:
    """``local_newton_schulz`` of each matrix (2D) or batch (3D); those of one matrix shape, dtype and spec run
    as one batch where batching pays (:mod:`dist_ortho.tp.batching`; a batched matmul may round differently
    from single ones), else one matrix at a time."""
    out: list[torch.Tensor | None] = [None] * len(xs)
    same: dict[tuple, list[int]] = {}
    for i, (x, ns) in enumerate(zip(xs, specs)):
        same.setdefault((tuple(x.shape[-2:]), x.dtype, x.device, ns), []).append(i)
    for (shape, dtype, device, ns), members in same.items():
        if len(members) == 1 or not batching.batched(shape, dtype, device, ns.batch):
            for i in members:
                out[i] = local_newton_schulz(xs[i], ns)
            continue
        stacked = local_newton_schulz(torch.cat([xs[i].reshape(-1, *shape) for i in members]), ns)
        for i, result in zip(members, stacked.split([xs[i].numel() // (shape[0] * shape[1]) for i in members])):
            out[i] = result.view(xs[i].shape)
    return out  # type: ignore[return-value]
