"""The battery of inputs on which the Gram-space recursion is held to the plain iteration's accuracy (issue 30):
the matrices Muon meets beyond well-conditioned random ones, written without dist_ortho.

Each input is a k x n matrix (k <= n, aspect n / k), built in float64 from a generator seeded by its name,
then cast to the dtype under test:

- ``random``: standard normal entries;
- ``rank1``, ``rank2``, ``rank8``: a product of k x r and r x n normal factors (only where r < k);
- ``cond1e2`` ... ``cond1e8``: U diag(s) V^T with Haar-random orthonormal U, V and s geometric from 1 to
  1 / condition (1e8 only in float64, where float32 would round it away);
- ``lowrank_noise``: rank min(4, k // 2) plus normal noise of 1e-4 (relative to the factors' entries ~1);
- ``tiny``, ``tiny_rank2``: ``random`` and ``rank2`` times 1e-30 (their squares underflow in float32);
- ``zero``: zeros (the result must be exactly zero).

References: :func:`reference` is the plain iteration in float64 (tests.reference.newton_schulz_ref); for
float64 inputs :func:`reference_longdouble` runs it in numpy's extended precision (80-bit on x86, eps 1.1e-19).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from tests.reference import triples

KINDS_FLOAT32 = (
    "random", "rank1", "rank2", "rank8", "cond1e2", "cond1e4", "cond1e6", "lowrank_noise", "tiny", "tiny_rank2", "zero",
)
KINDS_FLOAT64 = KINDS_FLOAT32 + ("cond1e8",)


@dataclass(frozen=True)
class Case:
    kind: str
    k: int
    aspect: int
    tall: bool = False  # the n x k transpose: the same matrix through the transposing path
    seed: int = 0

    @property
    def shape(self) -> tuple[int, int]:
        return (self.k * self.aspect, self.k) if self.tall else (self.k, self.k * self.aspect)

    def __str__(self) -> str:
        return f"{self.kind} {'x'.join(map(str, self.shape))}"


def applies(kind: str, k: int) -> bool:
    """Rank-r inputs only where r < k (else they are full-rank random ones)."""
    if kind.startswith("rank"):
        return int(kind[4:]) < k
    if kind == "tiny_rank2":
        return k > 2
    return True


def cases(kinds: tuple[str, ...], ks: tuple[int, ...], aspects: tuple[int, ...], seeds: int = 1) -> Iterator[Case]:
    for k in ks:
        for aspect in aspects:
            for kind in kinds:
                if applies(kind, k):
                    for seed in range(seeds):
                        yield Case(kind, k, aspect, seed=seed)


def _generator(case: Case) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{case.kind} {case.k} {case.aspect} {case.seed}".encode()))


def _orthonormal_columns(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))  # Haar-distributed


def _low_rank(k: int, n: int, r: int, gen: torch.Generator) -> torch.Tensor:
    f64 = torch.float64
    return torch.randn(k, r, generator=gen, dtype=f64) @ torch.randn(r, n, generator=gen, dtype=f64) / r**0.5


def make(case: Case, dtype: torch.dtype) -> torch.Tensor:
    """The input of ``case`` in ``dtype`` (float64 values rounded once)."""
    k, n = case.k, case.k * case.aspect
    gen = _generator(case)
    kind = case.kind.removeprefix("tiny_") if case.kind != "tiny" else "random"
    if kind == "zero":
        x = torch.zeros(k, n, dtype=torch.float64)
    elif kind == "random":
        x = torch.randn(k, n, generator=gen, dtype=torch.float64)
    elif kind.startswith("rank"):
        x = _low_rank(k, n, int(kind[4:]), gen)
    elif kind.startswith("cond"):
        s = torch.logspace(0, -float(kind[4:].replace("1e", "")), k, dtype=torch.float64)
        x = (_orthonormal_columns(k, k, gen) * s) @ _orthonormal_columns(n, k, gen).T
    elif kind == "lowrank_noise":
        x = _low_rank(k, n, min(4, k // 2), gen) + 1e-4 * torch.randn(k, n, generator=gen, dtype=torch.float64)
    else:
        raise ValueError(f"unknown battery input {case.kind!r}")
    if case.kind.startswith("tiny"):
        x = x * 1e-30
    x = x.to(dtype)
    return x.T.contiguous() if case.tall else x


def reference(x: torch.Tensor, coefficient_type: str, steps: int, custom=None) -> torch.Tensor:
    """The plain iteration in float64 on ``x`` as given (its rounding to x's dtype included)."""
    from tests.reference import newton_schulz_ref

    return newton_schulz_ref(x, coefficient_type, steps, custom)


def reference_longdouble(x: torch.Tensor, coefficient_type: str, steps: int, custom=None) -> torch.Tensor:
    """The plain iteration in numpy's long double (x86: 64-bit mantissa), returned as float64."""
    X = x.double().numpy().astype(np.longdouble)
    transpose = X.shape[0] > X.shape[1]
    if transpose:
        X = X.T
    norm = np.sqrt((X * X).sum())
    X = X / max(norm, np.longdouble(1e-300))
    for a, b, c in triples(coefficient_type, steps, custom):
        A = X @ X.T
        X = np.longdouble(a) * X + (np.longdouble(b) * A + np.longdouble(c) * (A @ A)) @ X
    if transpose:
        X = X.T
    return torch.from_numpy(X.astype(np.float64))


def max_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out.double() - ref.double()).abs().max().item()
