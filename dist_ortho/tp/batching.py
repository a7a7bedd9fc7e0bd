"""Whether same-shape whole matrices run Newton-Schulz as one batched iteration (``bmm``) or one at a time (``mm``).

Batching pays where a device's per-call cost dominates (every GPU; small matrices on a CPU) and can lose
where a CPU's BLAS runs one large ``mm`` faster than its batched kernel (measured on an AVX-512 CPU: a batch
of 128 x 128 matrices 1.4-1.75x slower than a loop, of 32 x 32 2.2x faster). On a CPU a batch also loses once
its working set leaves the cache (measured on an AVX2 AMD EPYC, float32, per matrix: 128 x 128 in batches of
4 or 16 930 us, of 64 or 256 1,200-1,320 us, one at a time 1,020 us; 32 x 32: 22-58 us batched, 120 us
alone). So the choice is made per device class and matrix size:

- CUDA (any non-CPU device): batch, all the matrices at once.
- CPU: batches of :func:`chunk` matrices (:data:`CPU_CHUNK_BYTES` of them), where a one-time
  micro-measurement per (k, n, compute dtype) (:func:`measure`, a few ms) finds one Newton-Schulz step on such
  a batch faster than on its matrices one at a time; else one at a time. Matrices with more than
  :data:`PROBE_MAX_NUMEL` elements are not timed: each is big enough that a loop costs nothing extra.

A measured choice can differ between processes (timing noise), and ranks that compute the same replicated
matrix must round alike, so the optimizer measures, then agrees on the choices over its process groups
(one small all-reduce when its plan is new) and :func:`record`\\ s them; :func:`batched` reads them.
Overrides: the optimizers' ``batch_matrices=True|False`` per group, or for everything
:func:`set_batching` / the environment variable ``DIST_ORTHO_BATCH`` (``always`` or ``never``).
Every recorded choice is logged once.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Sequence
from typing import Literal

import torch

from dist_ortho.math.iteration import polynomial_step
from dist_ortho.math.kernels import gram
from dist_ortho.math.precision import compute_dtype

logger = logging.getLogger(__name__)

BatchMatrices = Literal["auto"] | bool
BATCH_ENV = "DIST_ORTHO_BATCH"
CPU_CHUNK_BYTES = 256 * 1024
PROBE_MAX_NUMEL = 64 * 1024
_REPEATS = 3

Key = tuple[str, int, int, str]  # (device type, k = the short side, n = the long side, compute dtype)
_override: bool | None = None
_recorded: dict[Key, bool] = {}


def set_batching(choice: Literal["always", "never"] | None) -> None:
    """Batch always, never, or (None) as measured per device class (see the module doc)."""
    global _override
    if choice not in ("always", "never", None):
        raise ValueError(f"set_batching takes 'always', 'never' or None, got {choice!r}")
    _override = None if choice is None else choice == "always"


def _forced() -> bool | None:
    if _override is not None:
        return _override
    value = os.environ.get(BATCH_ENV)
    if value:
        if value not in ("always", "never"):
            raise ValueError(f"{BATCH_ENV} must be 'always' or 'never', got {value!r}")
        return value == "always"
    return None


def key(shape: Sequence[int], dtype: torch.dtype, device: torch.device | str) -> Key:
    """The batching key of a whole matrix (or batch) of ``shape`` (its Newton-Schulz compute dtype)."""
    k, n = min(shape[-2:]), max(shape[-2:])
    return (torch.device(device).type, k, n, str(compute_dtype(dtype, device)).removeprefix("torch."))


def batched(shape: Sequence[int], dtype: torch.dtype, device: torch.device | str, choice: BatchMatrices = "auto") -> bool:
    """Whether same-shape matrices of ``shape`` run batched: ``choice`` when it is a bool, else the override,
    else the recorded choice (batch where none is recorded: the one-device functions, called directly)."""
    if choice is not True and choice is not False:
        forced = _forced()
        if forced is not None:
            return forced
        return _recorded.get(key(shape, dtype, device), True)
    return choice


def chunk(shape: Sequence[int], dtype: torch.dtype, device: torch.device | str) -> int | None:
    """Matrices of ``shape`` per batched call: None (all of them) on a GPU, :data:`CPU_CHUNK_BYTES` of them
    (at least 1) on a CPU."""
    if torch.device(device).type != "cpu":
        return None
    itemsize = compute_dtype(dtype, device).itemsize
    return max(1, CPU_CHUNK_BYTES // (shape[-2] * shape[-1] * itemsize))


def overridden() -> bool:
    """Whether an override (:func:`set_batching`, or the environment) decides every shape."""
    return _forced() is not None


def recorded(k: Key) -> bool | None:
    """The choice recorded for ``k`` (None: none yet)."""
    return _recorded.get(k)


def needs_measuring(keys: Iterable[Key]) -> list[Key]:
    """The keys (in first-seen order) with no recorded choice, where no override decides."""
    if _forced() is not None:
        return []
    return list(dict.fromkeys(k for k in keys if k not in _recorded))


def _probe_seconds(x: torch.Tensor, batch: bool) -> float:
    a, b, c = 3.4445, -4.7750, 2.0315
    best = float("inf")
    for _ in range(_REPEATS):
        began = time.perf_counter()
        if batch:
            polynomial_step(x, gram(x), a, b, c)
        else:
            for i in range(x.size(0)):
                polynomial_step(x[i], gram(x[i]), a, b, c)
        best = min(best, time.perf_counter() - began)
    return best


def measure(k: Key) -> bool:
    """This process's choice for ``k``: batch on non-CPU devices; on the CPU the faster of one batched and one
    looped Newton-Schulz step (no communication; see the module doc for why the optimizer then agrees)."""
    device, rows, cols, dtype_name = k
    if device != "cpu":
        return True
    dtype = getattr(torch, dtype_name)
    size = chunk((rows, cols), dtype, device) or 1
    if rows * cols > PROBE_MAX_NUMEL or size == 1:
        return False
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(size, rows, cols, generator=generator).to(dtype) / (rows * cols) ** 0.5
    _probe_seconds(x, True)  # warm both paths
    _probe_seconds(x, False)
    return _probe_seconds(x, True) <= _probe_seconds(x, False)


def record(choices: dict[Key, bool]) -> None:
    """Keep agreed choices for :func:`batched`, logging each new one."""
    for k, choice in choices.items():
        if _recorded.get(k) != choice:
            logger.info("Newton-Schulz of %d x %d matrices in %s on %s: %s (override: batch_matrices=, %s)",
                        k[1], k[2], k[3], k[0], "batched" if choice else "one at a time", BATCH_ENV)
        _recorded[k] = choice
