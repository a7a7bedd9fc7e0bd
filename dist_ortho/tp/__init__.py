"""Newton-Schulz of a tensor-parallel matrix: each rank holds one contiguous block along ``partition_dim``.

Modes (global matrix m x n over t ranks, k = the unsharded dim), one module each:

- ``duplicated`` (tp/duplicated.py): all-gather, full iteration on every rank, keep this rank's block.
- ``distributed`` (tp/distributed.py): all-reduce the partial k x k Gram matrix every step.
- ``gram`` (tp/gram.py): iterate on k x k matrices only; one all-reduce (plus restarts).
- ``home`` (tp/home.py): each matrix orthogonalized once, on a home rank; two all-to-alls per step.
- ``auto`` (tp/cost.py): the cheapest of the above for each matrix under a cost model.
- ``blockwise``: orthogonalize the local shard alone. NOT exact: the update changes with TP size.
  Offered only as an explicit opt-in (Megatron's old behaviour).

Every mode is a program of collectives (dist_ortho.comm.coalesce), so the matrices of an optimizer step
share their calls: :func:`orthogonalize_many` runs them in lockstep, one flat buffer per round, group
and dtype. All exact modes equal the one-device iteration on the gathered matrix up to rounding;
shards may be of unequal size along ``partition_dim``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from dist_ortho import comm
from dist_ortho.comm.coalesce import DEFAULT_BUCKET_BYTES, Program, run_many, run_pipelined
from dist_ortho.math.coefficients import COEFFICIENT_TYPES
from dist_ortho.math.iteration import DEFAULT_EPS, check_matrix
from dist_ortho.tp import distributed, duplicated, gram, home
from dist_ortho.tp.cost import resolve
from dist_ortho.tp.jobs import (
    DTYPES,
    TP_MODES,
    MatrixJob,
    NsSpec,
    TpMode,
    block,
    check_partition_dim,
    check_tp_mode,
    exchange_shard_sizes,
    gather_shards,
    own_block,
    shard,
    tensor_dim,
)
from dist_ortho.tp.local import LOCAL_GRAM, local_many, local_newton_schulz

__all__ = [
    "PIPELINE_BUCKETS", "TP_MODES", "MatrixJob", "NsSpec", "TpMode", "block", "check_partition_dim", "check_tp_mode",
    "exchange_shard_sizes", "gather_shards", "newton_schulz_tp", "orthogonalize_many", "own_block", "shard",
    "tensor_dim",
]

_PER_MATRIX = {"distributed": distributed.program, "gram": gram.program}
_PER_GROUP = {"duplicated": duplicated.program, "home": home.program}


def _local(jobs: Sequence[MatrixJob]) -> Program[list[torch.Tensor]]:
    yield from ()
    return local_many([job.x for job in jobs], [job.ns for job in jobs])


def _held_whole(job: MatrixJob) -> bool | None:
    """For a sharded job that one rank holds all of (the others hold nothing of it: a head of a per-head split
    inside one TP rank's rows, dist_ortho.parameters.qkv): whether this rank is that one; None for any other job. Such a job
    runs on its holder alone as a whole matrix, with no collective, in every mode (the same result as "home" with
    the holder as home); the other ranks' blocks are empty."""
    if not job.sharded or job.sizes is None or sum(1 for n in job.sizes if n) != 1:
        return None
    return bool(job.sizes[comm.group_rank(job.group)])


def _empty(x: torch.Tensor) -> Program[torch.Tensor]:
    yield from ()
    return x


PIPELINE_BUCKETS = 4
"""The buckets of matrix shapes a pipelined step (``overlap=True``) cuts its Newton-Schulz into, at most."""


def orthogonalize_many(jobs: Sequence[MatrixJob], bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                       pipeline: int = 1) -> list[torch.Tensor]:
    """Orthogonalize every job with coalesced collectives (arguments checked, shard sizes known).

    "auto" jobs get their mode from :func:`dist_ortho.tp.cost.resolve`. Whole (unsharded) matrices run
    together on this rank; "duplicated" and "home" jobs of the same group and dtype share one program
    (one all-gather, or two all-to-alls, for all of them); "distributed" and "gram" run per matrix, their
    collectives coalesced round by round.

    ``pipeline`` > 1: the jobs are cut into up to that many buckets by matrix shape (every job of one shape,
    dtype and spec in one bucket, so that each matrix is batched with the same others; homes assigned over
    all jobs), plus one bucket of every "distributed" and "gram" job (their all-reduces coalesced as without
    buckets), run as a pipeline (:func:`dist_ortho.comm.coalesce.run_pipelined`): one bucket's collectives in
    flight while another computes. Bit-identical to ``pipeline=1``.
    """
    jobs = [resolve(job) for job in jobs]
    if pipeline > 1:
        return _pipelined(jobs, bucket_bytes, pipeline)
    programs, slots = _programs(jobs, range(len(jobs)))
    results = run_many(programs, bucket_bytes)
    return [results[p] if n is None else results[p][n] for p, n in (slots[i] for i in range(len(jobs)))]


def _programs(
    jobs: Sequence[MatrixJob], members: Sequence[int], homes: dict[int, tuple] | None = None,
) -> tuple[list[Program], dict[int, tuple[int, int | None]]]:
    """The programs of ``jobs[i]`` for i in ``members``: whole matrices together, one program per group and dtype
    of "duplicated" and of "home" jobs (``homes[i]``: job i's homes, when assigned over more jobs), one per
    "distributed" and "gram" job. Also each job's (program, index in its result, None: the whole result)."""
    programs: list[Program] = []
    slots: dict[int, tuple[int, int | None]] = {}
    shared: dict[tuple, list[int]] = {}
    for i in members:
        job, whole = jobs[i], _held_whole(jobs[i])
        if not job.sharded or whole:
            shared.setdefault(("local",), []).append(i)
        elif whole is False:
            slots[i] = (len(programs), None)
            programs.append(_empty(job.x))
        elif job.mode in _PER_GROUP:
            shared.setdefault((job.mode, id(job.group), job.x.dtype), []).append(i)
        else:
            slots[i] = (len(programs), None)
            programs.append(_PER_MATRIX[job.mode](job))
    for key, together in shared.items():
        for n, i in enumerate(together):
            slots[i] = (len(programs), n)
        group_jobs = [jobs[i] for i in together]
        if key[0] == "home" and homes is not None:
            programs.append(home.program(group_jobs, [homes[i] for i in together]))
        else:
            programs.append(_local(group_jobs) if key[0] == "local" else _PER_GROUP[key[0]](group_jobs))
    return programs, slots


def _pipelined(jobs: list[MatrixJob], bucket_bytes: int, pipeline: int) -> list[torch.Tensor]:
    shapes: dict[tuple, list[int]] = {}  # (global shape, dtype, spec) -> jobs
    reduced: list[int] = []  # distributed and gram jobs: one bucket
    for i, job in enumerate(jobs):
        if job.sharded and job.mode in _PER_MATRIX:
            reduced.append(i)
        else:
            shapes.setdefault((tuple(job.global_shape[-2:]), job.x.dtype, job.ns), []).append(i)
    # from the global shapes, as every rank has them (a rank's own shard sizes differ: QKV parts of partial groups)
    cost = {key: sum(math.prod(jobs[i].global_shape) * min(key[0]) for i in members) for key, members in shapes.items()}
    cut: list[list[int]] = [[] for _ in range(min(pipeline, len(shapes)))]
    loads = [0.0] * len(cut)
    for key in sorted(shapes, key=lambda k: -cost[k]):  # largest first, each to the lightest bucket
        b = loads.index(min(loads))
        cut[b] += shapes[key]
        loads[b] += cost[key]
    by_group: dict[tuple, list[int]] = {}  # homes over every home job of a group and dtype, as one program would
    for i, job in enumerate(jobs):
        if job.sharded and job.mode == "home":
            by_group.setdefault((id(job.group), job.x.dtype), []).append(i)
    homes = {i: found for members in by_group.values()
             for i, found in zip(members, home.job_homes([jobs[i] for i in members]))}
    buckets, slots = [], []
    for members in [sorted(b) for b in cut if b] + ([reduced] if reduced else []):
        programs, found = _programs(jobs, members, homes)
        buckets.append(programs)
        slots.append(found)
    results = run_pipelined(buckets, bucket_bytes)
    where = {i: (b, p, n) for b, found in enumerate(slots) for i, (p, n) in found.items()}
    return [results[b][p] if n is None else results[b][p][n] for b, p, n in (where[i] for i in range(len(jobs)))]


def newton_schulz_tp(
    x: torch.Tensor,
    steps: int,
    coefficient_type: str,
    tp_group: comm.ProcessGroup | None,
    partition_dim: int | None = None,
    tp_mode: TpMode = "duplicated",
    *,
    custom_coefficient_sets: Sequence[Sequence[float]] | None = None,
    eps: float = DEFAULT_EPS,
    use_syrk: bool = False,
    gram_restarts: Sequence[int] | None = None,
    validate: bool = True,
    shard_sizes: Sequence[int] | None = None,
    local_gram: str = "auto",
) -> torch.Tensor:
    """Orthogonalize a matrix of which this rank holds the block ``x`` along ``partition_dim``.

    Args:
        x: this rank's shard (2D, or 3D for a batch of matrices sharded alike).
        steps: Newton-Schulz steps, as in ``newton_schulz``.
        coefficient_type: the coefficient set, as in ``newton_schulz``.
        custom_coefficient_sets: as in ``newton_schulz``.
        eps: as in ``newton_schulz``.
        use_syrk: as in ``newton_schulz``.
        tp_group: the group whose ranks hold the other shards; required when partition_dim is set.
        partition_dim: 0 (rows sharded), 1 (columns sharded), or None / -1 (not sharded: one-device path).
        tp_mode: one of :data:`TP_MODES` (see the module doc).
        gram_restarts: steps before which gram mode re-forms X_l and R; None picks by dtype.
        validate: all-gather the shard shapes and call arguments first (one small collective), so that
            ranks that disagree all raise the same ValueError and unequal shards are handled. Pass False
            only when every rank is known to hold an equal shard of the same call.
        shard_sizes: every rank's size along partition_dim, when the caller already knows them (as the
            optimizers do after their one check at the first step); no check is made then.
        local_gram: where a whole matrix is orthogonalized on one rank (duplicated, home, unsharded):
            "auto" runs the Gram-space recursion where it is cheaper (dist_ortho.tp.local), "always", "never".

    Returns:
        This rank's block of the orthogonalized global matrix, contiguous, in x's dtype.
    """
    check_matrix(x, "x")
    custom = tuple(map(tuple, custom_coefficient_sets)) if custom_coefficient_sets is not None else None
    if local_gram not in LOCAL_GRAM:
        raise ValueError(f"local_gram must be one of {LOCAL_GRAM}, got {local_gram!r}")
    restarts = tuple(gram_restarts) if gram_restarts is not None else None
    ns = NsSpec(steps, coefficient_type, custom, eps, use_syrk, restarts, local_gram)
    partition_dim = check_partition_dim(partition_dim)
    check_tp_mode(tp_mode)
    if partition_dim is not None and tp_group is None:
        raise ValueError(f"tp_group is required when partition_dim={partition_dim} (the matrix is sharded)")
    size = comm.group_size(tp_group)
    if partition_dim is None or size == 1 or tp_mode == "blockwise":
        return local_newton_schulz(x, ns)
    if x.dtype not in DTYPES:
        raise TypeError(f"x must have dtype in {DTYPES}, got {x.dtype}")
    rank = comm.group_rank(tp_group)
    if shard_sizes is not None:
        sizes = list(shard_sizes)
        if len(sizes) != size or sizes[rank] != x.size(tensor_dim(x, partition_dim)):
            raise ValueError(f"shard_sizes={sizes} does not fit a group of {size} ranks where rank {rank} holds "
                             f"{x.size(tensor_dim(x, partition_dim))} along partition_dim")
    elif validate:
        signature = (TP_MODES.index(tp_mode), steps, COEFFICIENT_TYPES.index(coefficient_type), DTYPES.index(x.dtype))
        sizes = exchange_shard_sizes([x], [partition_dim], tp_group, signature)[0]
    else:
        sizes = [x.size(tensor_dim(x, partition_dim))] * size
    return orthogonalize_many([MatrixJob(x, partition_dim, tp_group, sizes, tp_mode, ns)])[0]
