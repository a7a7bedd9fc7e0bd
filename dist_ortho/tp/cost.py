"""``tp_mode="auto"``: a per-matrix cost model that picks the cheapest exact mode.

For a global m x n matrix sharded along s (the other dim u) over t ranks (largest shard s_l), e bytes per
element of the parameter, c of the compute dtype, FLOPs and bytes sent per rank (:func:`matrix_counts`;
the FLOPs are exactly the matmuls the modes run, tp.local.plain_flops / gram_recursion_flops):

    duplicated   FLOPs of the whole matrix (plain or one-device Gram)     bytes (t-1) s_l u e             calls 1
    distributed  the plain iteration on u x s_l                           bytes steps 2(t-1)/t u^2 c + norm  calls steps + 1
    gram         the Gram recursion on u x s_l, r restarts                bytes (1 + r) 2(t-1)/t u^2 c' + norm  calls 2 + r
                 (c' = c in 16-bit compute at s >= 2u, else 4 or 8); not offered when u > s (its Gram matrix is singular,
                 see tp.gram_newton_schulz), nor in 16-bit compute (its error, tp/gram.py)
    home         duplicated's / t (balanced over many matrices)           bytes 2 (t-1)/t m n / t e       calls 2

predicted seconds = FLOPs / flops_per_s + bytes / bytes_per_s + calls * latency_s / sharing (the n sharded
matrices of a group that run coalesced share their collectives), with a
:class:`CostProfile` per device type (defaults below; :func:`set_cost_profile` overrides them, e.g. with
``dist_ortho.plan.DeviceProfile.cost_profile()``). The planner (``python -m dist_ortho.plan``) adds up the
same counts over a whole model, with the real home and owner assignments.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dist_ortho.math.precision import compute_dtype
from dist_ortho.tp.gram import HALF_MIN_ASPECT, restarts_of
from dist_ortho.tp.jobs import MatrixJob, NsSpec
from dist_ortho.tp.local import gram_recursion_flops, local_flops

AUTO_CANDIDATES = ("duplicated", "distributed", "gram", "home")
NORM_BYTES = 8  # distributed and gram modes' float64 sum of squares, one per matrix


@dataclass(frozen=True)
class Counts:
    """What one rank does for a step: Newton-Schulz FLOPs, bytes it sends, collectives it enters."""

    flops: float = 0.0
    bytes: float = 0.0
    calls: int = 0

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.flops + other.flops, self.bytes + other.bytes, self.calls + other.calls)


@dataclass(frozen=True)
class CostProfile:
    flops_per_s: float
    bytes_per_s: float
    latency_s: float

    def seconds(self, counts: Counts, sharing: int = 1) -> float:
        """Predicted seconds of ``counts``, the latency of its calls shared by ``sharing`` coalesced matrices."""
        return counts.flops / self.flops_per_s + counts.bytes / self.bytes_per_s + counts.calls * self.latency_s / sharing


DEFAULT_PROFILES = {
    # dist_ortho.plan's "CPU" profile at 2 ranks (the 2-core CI machine kind, gloo on loopback, float32).
    "cpu": CostProfile(flops_per_s=5.55e10, bytes_per_s=9.28e8, latency_s=1.82e-3),
    # dist_ortho.plan's "H100" profile in bf16 over NVLink (0.6 x 989 TFLOP/s; 80% of 450 GB/s; 10 us).
    "cuda": CostProfile(flops_per_s=5.9e14, bytes_per_s=3.6e11, latency_s=1e-5),
}
_override: CostProfile | None = None


def set_cost_profile(profile: CostProfile | None) -> None:
    """Use ``profile`` for every device (None: back to DEFAULT_PROFILES)."""
    global _override
    _override = profile


def cost_profile(device: torch.device) -> CostProfile:
    return _override or DEFAULT_PROFILES.get(device.type, DEFAULT_PROFILES["cuda"])


def distributed_flops(u: int, s_local: int, ns: NsSpec) -> float:
    """FLOPs of tp_mode="distributed" on a rank holding u x s_local of the matrix: per step X X^T and B X
    (2 u^2 s_local each) and A A when c != 0 (2 u^3; the k x k products are repeated on every rank)."""
    return sum(4 * u * u * s_local + (2 * u**3 if c != 0 else 0) for _, _, c in ns.coefficients)


@dataclass(frozen=True)
class Rounds:
    """``count`` consecutive rounds of one collective ``kind`` from round ``first`` of a mode's program, each
    with ``nbytes`` of this matrix in its (coalesced) buffer."""

    kind: str
    first: int
    count: int
    nbytes: float


SENT_PER_BUFFER_BYTE = {  # bytes a rank sends per byte of its buffer under the usual ring algorithms (dist_ortho.comm)
    "all_gather": lambda t: t - 1,
    "all_reduce": lambda t: 2 * (t - 1) / t,
    "all_to_all": lambda t: (t - 1) / t,
}


def mode_rounds(
    mode: str, shape: Sequence[int], partition_dim: int, sizes: Sequence[int], ns: NsSpec, dtype: torch.dtype,
    compute: torch.dtype, restarts: Sequence[int],
) -> list[Rounds]:
    """The table of modes: the collectives one global matrix (or batch) of ``shape`` sharded along
    ``partition_dim`` into ``sizes`` adds to its mode's program, round by round (the planner coalesces them
    over matrices; :func:`matrix_counts` sums them)."""
    batch = math.prod(shape[:-2])
    m, n = shape[-2], shape[-1]
    u = n if partition_dim == 0 else m
    t, s_l = len(sizes), max(sizes)
    half = compute.itemsize == 2 and sum(sizes) >= HALF_MIN_ASPECT * u  # R in 16-bit (tp.gram)
    r_bytes = (compute if half else torch.promote_types(compute, torch.float32)).itemsize
    table = {
        "duplicated": [Rounds("all_gather", 0, 1, batch * s_l * u * dtype.itemsize)],
        "distributed": [Rounds("all_reduce", 0, 1, batch * NORM_BYTES),
                        Rounds("all_reduce", 1, ns.steps, batch * u * u * compute.itemsize)],
        "gram": [Rounds("all_reduce", 0, 1, batch * NORM_BYTES),
                 Rounds("all_reduce", 1, 1 + len(restarts), batch * u * u * r_bytes)],
        "home": [Rounds("all_to_all", 0, 2, batch * m * n / t * dtype.itemsize)],
    }
    return table[mode]


def rank_flops(mode: str, shape: Sequence[int], partition_dim: int, size: int, t: int, ns: NsSpec,
               restarts: Sequence[int], whole_flops: float) -> float:
    """Newton-Schulz FLOPs of a rank holding ``size`` rows (partition_dim 0) or columns of the sharded dim in
    ``mode`` (home: the average over ranks; the planner counts each home's matrices)."""
    batch = math.prod(shape[:-2])
    u = shape[-1] if partition_dim == 0 else shape[-2]
    return {
        "duplicated": whole_flops,
        "distributed": batch * distributed_flops(u, size, ns),
        "gram": batch * gram_recursion_flops(u, size, ns, restarts),
        "home": whole_flops / t,
    }[mode]


def matrix_counts(
    shape: Sequence[int], partition_dim: int, sizes: Sequence[int], ns: NsSpec, dtype: torch.dtype,
    compute: torch.dtype, restarts: Sequence[int], whole_flops: float | None = None,
) -> dict[str, Counts]:
    """Per-rank counts of each mode for one global matrix (or batch) of ``shape`` in ``dtype``, sharded along
    ``partition_dim`` into ``sizes`` (the rank with the largest shard), Newton-Schulz in ``compute``;
    ``whole_flops``: the whole matrix on one rank (tp.local.local_flops by default). From the table of
    :func:`mode_rounds` and :func:`rank_flops`."""
    t = len(sizes)
    whole = whole_flops if whole_flops is not None else local_flops(shape, ns, compute)
    out = {}
    for mode in AUTO_CANDIDATES:
        rounds = mode_rounds(mode, shape, partition_dim, sizes, ns, dtype, compute, restarts)
        out[mode] = Counts(rank_flops(mode, shape, partition_dim, max(sizes), t, ns, restarts, whole),
                           sum(r.count * r.nbytes * SENT_PER_BUFFER_BYTE[r.kind](t) for r in rounds),
                           sum(r.count for r in rounds))
    return out


def mode_costs(counts: dict[str, Counts], profile: CostProfile, gram_offered: bool = True, sharing: int = 1) -> dict[str, float]:
    """Predicted seconds of each mode from :func:`matrix_counts`. ``sharing``: how many sharded matrices of the
    group run coalesced in one step; their collectives are shared, so each pays 1/sharing of the latency."""
    costs = {mode: profile.seconds(c, sharing) for mode, c in counts.items()}
    if not gram_offered:
        costs["gram"] = math.inf
    return costs


def gram_offered(shape: Sequence[int], partition_dim: int, compute: torch.dtype = torch.float32) -> bool:
    """Whether ``auto`` may pick gram mode: the unsharded dim u <= the sharded s (else its Gram matrix is
    singular), and float32 or float64 compute (16-bit: up to ~2x the plain 16-bit iteration's error, tp/gram.py)."""
    s, u = (shape[-2], shape[-1]) if partition_dim == 0 else (shape[-1], shape[-2])
    return u <= s and compute in (torch.float32, torch.float64)


def cheapest(costs: dict[str, float]) -> str:
    """The mode ``auto`` picks from predicted costs (ties: the earlier of AUTO_CANDIDATES)."""
    return min(AUTO_CANDIDATES, key=lambda mode: (costs[mode], AUTO_CANDIDATES.index(mode)))


def job_costs(job: MatrixJob, sharing: int = 1) -> dict[str, float]:
    """mode_costs of a job's global matrix, under the current fp32 matmul precision."""
    shape = job.global_shape
    compute = compute_dtype(job.x.dtype, job.x.device, job.ns.ns_dtype)
    whole = local_flops(shape, job.ns, job.x.dtype, job.x.device)
    counts = matrix_counts(shape, job.partition_dim, job.shard_sizes, job.ns, job.x.dtype, compute, restarts_of(job), whole)
    return mode_costs(counts, cost_profile(job.x.device), gram_offered(shape, job.partition_dim, compute), sharing)


def choose_mode(job: MatrixJob, sharing: int = 1) -> str:
    """The cheapest exact mode for a job (duplicated when it is not sharded)."""
    if not job.sharded:
        return "duplicated"
    return cheapest(job_costs(job, sharing))


def resolve(job: MatrixJob, sharing: int = 1) -> MatrixJob:
    """The job with ``auto`` replaced by the mode it runs (other modes unchanged)."""
    if job.mode != "auto":
        return job
    return MatrixJob(job.x, job.partition_dim, job.group, job.sizes, choose_mode(job, sharing), job.ns)


def plan_row(name: str, job: MatrixJob, sharing: int = 1) -> dict:
    """One row of a printed plan: the job's global shape, the mode it runs (after ``resolve``) and costs."""
    if not job.sharded:
        return {"name": name, "shape": job.global_shape, "partition_dim": None, "mode": "local",
                "costs": dict.fromkeys(AUTO_CANDIDATES, float("nan"))}
    return {"name": name, "shape": job.global_shape, "partition_dim": job.partition_dim, "mode": job.mode,
            "costs": job_costs(job, sharing)}


def format_plan(rows: list[dict]) -> str:
    """A table of plan rows {name, shape, partition_dim, mode, costs}."""
    lines = [f"{'matrix':<48} {'global shape':>14} {'pdim':>4} {'mode':>11}  " + "  ".join(f"{m:>11}" for m in AUTO_CANDIDATES)]
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        costs = "  ".join(f"{1e3 * r['costs'][m]:>9.3f}ms" if math.isfinite(r["costs"][m]) else f"{'-':>11}" for m in AUTO_CANDIDATES)
        lines.append(f"{r['name'][:48]:<48} {shape:>14} {str(r['partition_dim']):>4} {r['mode']:>11}  {costs}")
    return "\n".join(lines)
