"""Newton-Schulz of whole matrices on this rank: the plain iteration, or the Gram-space recursion where it
is cheaper, and same-shape matrices as one batch.

Gram on one device (Dao-AILab's Gram Newton-Schulz; tp/gram.py with no group): for X of k x n, k <= n,
aspect a = n / k and s steps, the plain iteration costs s (4 a + 2) k^3 FLOPs (s 4 a k^3 for cubic sets),
the Gram recursion (4 + 4 r) a k^3 + at most 8 s k^3 (6 s k^3 for cubic) with r restarts (exactly:
:func:`gram_recursion_flops`). :func:`use_gram` picks
it when the compute dtype is float32 or float64, a >= :data:`GRAM_MIN_ASPECT` and it needs fewer FLOPs.
Then no restart is needed: measured against float64 (64 x 64a, every coefficient set, a = 2, 4, 8) its max
error is at most 2.4x the plain iteration's and at most 1.8e-6 (the exact modes' float32 tolerance is 2e-5;
scripts/bench_local_gram.py, docs/benchmarks.md); near a = 1 it would need restarts (errors up to 2e-4 for
deepseekv4's 10 steps), and there the plain iteration is cheaper anyway. In bf16 the recursion's float32 k x k products cost more than
the bf16 iteration saves, so bf16 keeps the plain iteration.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import torch

from dist_ortho.coalesce import run
from dist_ortho.iteration import orthogonalize
from dist_ortho.precision import compute_dtype
from dist_ortho.tp import batching
from dist_ortho.tp.gram import gram_newton_schulz
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
    when c != 0), Q <- a Q + Z Q (2 k^3, none right after a (re)start) and R <- P (P R) (4 k^3, unless the
    next step is the last or a restart)."""
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


def gram_flops(shape: Sequence[int], ns: NsSpec, restarts: Sequence[int] = ()) -> float:
    """FLOPs of the Gram-space recursion on a whole matrix (or batch) of ``shape``."""
    k, n = min(shape[-2:]), max(shape[-2:])
    return _batch(shape) * gram_recursion_flops(k, n, ns, restarts)


def local_flops(shape: Sequence[int], ns: NsSpec, dtype: torch.dtype, device: torch.device | str | None = None) -> float:
    """FLOPs of :func:`local_newton_schulz` on a whole matrix (or batch) of ``shape``."""
    return gram_flops(shape, ns) if use_gram(shape, ns, dtype, device) else plain_flops(shape, ns)


def use_gram(shape: Sequence[int], ns: NsSpec, dtype: torch.dtype, device: torch.device | str | None = None) -> bool:
    """Whether a whole matrix of ``shape`` runs the Gram recursion on one device (see the module doc)."""
    if ns.local_gram != "auto":
        return ns.local_gram == "always"
    k, n = min(shape[-2:]), max(shape[-2:])
    return (
        compute_dtype(dtype, device) in (torch.float32, torch.float64)
        and k > 0
        and n >= GRAM_MIN_ASPECT * k
        and gram_flops(shape, ns) < plain_flops(shape, ns)
    )


def _one_device(x: torch.Tensor, ns: NsSpec) -> torch.Tensor:
    if not use_gram(x.shape, ns, x.dtype, x.device):
        return orthogonalize(x, ns.coefficients, ns.eps, None, ns.use_syrk)
    transpose = x.size(-2) > x.size(-1)
    X = x.mT if transpose else x
    # normalized with its float64 norm first: no host sync, and no collective to save on one device
    out = run(gram_newton_schulz(X, ns.coefficients, ns.eps, None, (), ns.use_syrk, sync_free=True)).to(x.dtype)
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
