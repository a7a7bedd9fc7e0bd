"""``tp_mode="auto"``: a per-matrix cost model that picks the cheapest exact mode.

For a global m x n matrix sharded along s (the other dim u) over t ranks, steps of Newton-Schulz, e bytes
per element (k = min(m, n), N = max(m, n)); FLOPs and bytes are per rank:

    duplicated   FLOPs steps (4 k^2 N + 2 k^3) (or the     bytes (t-1) m n / t e            calls 1
                 Gram recursion's, dist_ortho.tp.local)
    distributed  FLOPs steps (4 u^2 s/t + 2 u^3)         bytes steps 2 (t-1)/t u^2 e      calls steps + 1
    gram         FLOPs (2 + 4 r) u^2 s/t + 8 steps u^3   bytes (1 + r) 2 (t-1)/t u^2 4    calls 1 + r   (r restarts)
                 not offered when u > s (its Gram matrix is singular, see tp.gram_newton_schulz)
    home         FLOPs duplicated's / t (balanced)       bytes 2 (t-1)/t m n / t e        calls 2

predicted seconds = FLOPs / flops_per_s + bytes / bytes_per_s + calls * latency_s, with a
:class:`CostProfile` per device type (defaults below; :func:`set_cost_profile` overrides them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dist_ortho import comm
from dist_ortho.precision import compute_dtype
from dist_ortho.tp.gram import restarts_of
from dist_ortho.tp.jobs import MatrixJob
from dist_ortho.tp.local import gram_flops, plain_flops, use_gram

AUTO_CANDIDATES = ("duplicated", "distributed", "gram", "home")


@dataclass(frozen=True)
class CostProfile:
    flops_per_s: float
    bytes_per_s: float
    latency_s: float


DEFAULT_PROFILES = {
    # Measured on the 2-core CI machine with gloo (float32 matmul, loopback TCP).
    "cpu": CostProfile(flops_per_s=3e10, bytes_per_s=1e9, latency_s=2e-4),
    # A datacenter GPU with NVLink: bf16 dense matmul and NCCL bus bandwidth, order of magnitude.
    "cuda": CostProfile(flops_per_s=4e14, bytes_per_s=1e11, latency_s=2e-5),
}
_override: CostProfile | None = None


def set_cost_profile(profile: CostProfile | None) -> None:
    """Use ``profile`` for every device (None: back to DEFAULT_PROFILES)."""
    global _override
    _override = profile


def cost_profile(device: torch.device) -> CostProfile:
    return _override or DEFAULT_PROFILES.get(device.type, DEFAULT_PROFILES["cuda"])


def mode_costs(
    shape: tuple[int, ...], partition_dim: int, tp_size: int, steps: int, element_size: int, restarts: int,
    profile: CostProfile, local_flops: float | None = None,
) -> dict[str, float]:
    """Predicted seconds of each mode for one matrix (see the module doc). ``local_flops``: FLOPs of the
    whole matrix on one rank (duplicated's, t times home's), when not the plain iteration's."""
    batch = math.prod(shape[:-2])
    m, n = shape[-2], shape[-1]
    s, u = (m, n) if partition_dim == 0 else (n, m)
    k, N, t, e = min(m, n), max(m, n), tp_size, element_size
    ring = 2 * (t - 1) / t
    full = local_flops if local_flops is not None else batch * steps * (4 * k * k * N + 2 * k**3)
    table = {
        "duplicated": (full, (t - 1) * batch * m * n / t * e, 1),
        "distributed": (batch * steps * (4 * u * u * s / t + 2 * u**3), steps * ring * batch * u * u * e, steps + 1),
        "gram": (batch * ((2 + 4 * restarts) * u * u * s / t + 8 * steps * u**3), (1 + restarts) * ring * batch * u * u * 4,
                 1 + restarts),
        "home": (full / t, 2 * (t - 1) / t * batch * m * n / t * e, 2),
    }
    costs = {mode: f / profile.flops_per_s + b / profile.bytes_per_s + c * profile.latency_s
             for mode, (f, b, c) in table.items()}
    if u > s:
        costs["gram"] = math.inf
    return costs


def job_costs(job: MatrixJob) -> dict[str, float]:
    """mode_costs of a job's global matrix, under the current fp32 matmul precision (its element size)."""
    element = torch.empty((), dtype=compute_dtype(job.x.dtype, job.x.device)).element_size()
    t = comm.group_size(job.group)
    shape = job.global_shape
    local = gram_flops(shape, job.ns) if use_gram(shape, job.ns, job.x.dtype, job.x.device) else plain_flops(shape, job.ns)
    return mode_costs(shape, job.partition_dim, t, job.ns.steps, element, len(restarts_of(job)),
                      cost_profile(job.x.device), local)


def choose_mode(job: MatrixJob) -> str:
    """The cheapest exact mode for a job (duplicated when it is not sharded)."""
    if not job.sharded:
        return "duplicated"
    costs = job_costs(job)
    return min(AUTO_CANDIDATES, key=lambda mode: (costs[mode], AUTO_CANDIDATES.index(mode)))


def resolve(job: MatrixJob) -> MatrixJob:
    """The job with ``auto`` replaced by the mode it runs (other modes unchanged)."""
    if job.mode != "auto":
        return job
    return MatrixJob(job.x, job.partition_dim, job.group, job.sizes, choose_mode(job), job.ns)


def plan_row(name: str, job: MatrixJob) -> dict:
    """One row of a printed plan: the job's global shape, the mode it runs (after ``resolve``) and costs."""
    if not job.sharded:
        return {"name": name, "shape": job.global_shape, "partition_dim": None, "mode": "local",
                "costs": dict.fromkeys(AUTO_CANDIDATES, float("nan"))}
    return {"name": name, "shape": job.global_shape, "partition_dim": job.partition_dim, "mode": job.mode,
            "costs": job_costs(job)}


def format_plan(rows: list[dict]) -> str:
    """A table of plan rows {name, shape, partition_dim, mode, costs}."""
    lines = [f"{'matrix':<48} {'global shape':>14} {'pdim':>4} {'mode':>11}  " + "  ".join(f"{m:>11}" for m in AUTO_CANDIDATES)]
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        costs = "  ".join(f"{1e3 * r['costs'][m]:>9.3f}ms" if math.isfinite(r["costs"][m]) else f"{'-':>11}" for m in AUTO_CANDIDATES)
        lines.append(f"{r['name'][:48]:<48} {shape:>14} {str(r['partition_dim']):>4} {r['mode']:>11}  {costs}")
    return "\n".join(lines)
