"""Newton-Schulz of a tensor-parallel matrix: each rank holds one contiguous block along ``partition_dim``.

Modes (global matrix m x n over t ranks, k = the unsharded dim), one module each:

- ``duplicated`` (tp/duplicated.py): all-gather, full iteration on every rank, keep this rank's block.
- ``distributed`` (tp/distributed.py): all-reduce the partial k x k Gram matrix every step.
- ``gram`` (tp/gram.py): iterate on k x k matrices only; one all-reduce (plus restarts).
- ``home`` (tp/home.py): each matrix orthogonalized once, on a home rank; two all-to-alls per step.
- ``auto`` (tp/cost.py): the cheapest of the above for each matrix under a cost model.
- ``blockwise``: orthogonalize the local shard alone. NOT exact: the update changes with TP size.
  Offered only as an explicit opt-in (Megatron's old behaviour).

Every mode is a program of collectives (dist_ortho.coalesce), so the matrices of an optimizer step
share their calls: :func:`orthogonalize_many` runs them in lockstep, one flat buffer per round, group
and dtype. All exact modes equal the one-device iteration on the gathered matrix up to rounding;
shards may be of unequal size along ``partition_dim``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dist_ortho import comm
from dist_ortho.coalesce import DEFAULT_BUCKET_BYTES, Program, run_many
from dist_ortho.coefficients import COEFFICIENT_TYPES
from dist_ortho.iteration import DEFAULT_EPS, check_matrix
from dist_ortho.tp import distributed, duplicated, gram, home
from dist_ortho.tp.cost import resolve
from dist_ortho.tp.local import LOCAL_GRAM, local_many, local_newton_schulz
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

__all__ = [
    "TP_MODES", "MatrixJob", "NsSpec", "TpMode", "block", "check_partition_dim", "check_tp_mode",
    "exchange_shard_sizes", "gather_shards", "newton_schulz_tp", "orthogonalize_many", "own_block", "shard",
    "tensor_dim",
]

_PER_MATRIX = {"distributed": distributed.program, "gram": gram.program}
_PER_GROUP = {"duplicated": duplicated.program, "home": home.program}


def _local(jobs: Sequence[MatrixJob]) -> Program[list[torch.Tensor]]:
    yield from ()
    return local_many([job.x for job in jobs], [job.ns for job in jobs])


def orthogonalize_many(jobs: Sequence[MatrixJob], bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> list[torch.Tensor]:
    """Orthogonalize every job with coalesced collectives (arguments checked, shard sizes known).

    "auto" jobs get their mode from :func:`dist_ortho.tp.cost.resolve`. Whole (unsharded) matrices run
    together on this rank; "duplicated" and "home" jobs of the same group and dtype share one program
    (one all-gather, or two all-to-alls, for all of them); "distributed" and "gram" run per matrix, their
    collectives coalesced round by round.
    """
    jobs = [resolve(job) for job in jobs]
    programs: list[Program] = []
    slots: list[tuple[int, int | None]] = [(-1, None)] * len(jobs)  # job -> (program, index in its result)
    shared: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        if not job.sharded:
            shared.setdefault(("local",), []).append(i)
        elif job.mode in _PER_GROUP:
            shared.setdefault((job.mode, id(job.group), job.x.dtype), []).append(i)
        else:
            slots[i] = (len(programs), None)
            programs.append(_PER_MATRIX[job.mode](job))
    for key, members in shared.items():
        for n, i in enumerate(members):
            slots[i] = (len(programs), n)
        make = _local if key[0] == "local" else _PER_GROUP[key[0]]
        programs.append(make([jobs[i] for i in members]))
    results = run_many(programs, bucket_bytes)
    return [results[p] if n is None else results[p][n] for p, n in slots]


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
        steps, coefficient_type, custom_coefficient_sets, eps, use_syrk: as in ``newton_schulz``.
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
