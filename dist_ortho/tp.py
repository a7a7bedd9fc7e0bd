"""Newton-Schulz of a tensor-parallel matrix: each rank holds one contiguous block along ``partition_dim``.

Modes (global matrix m x n over t ranks, k = the unsharded dim):

- ``duplicated``: all-gather the shards, run the full iteration on every rank, keep this rank's block.
  One collective; t-fold redundant compute.
- ``distributed``: the sharded dim becomes the contraction dim of X X^T, so each rank forms its partial
  k x k Gram matrix and all-reduces it every step; the norm is one scalar all-reduce. steps + 1
  collectives.
- ``gram``: every X_j = Q_j X_0 with Q_j a polynomial in R_0 = X_0 X_0^T, so the iteration runs on k x k
  matrices only: R <- allreduce(X_l X_l^T) once, ||X||_F^2 = trace(R), per step Z = b R + c R^2,
  Q <- a Q + Z Q, R <- (a I + Z)^2 R, finally X_l <- Q X_l. One collective, plus one per restart,
  which re-forms X_l and R to shed accumulated rounding error (see :func:`default_gram_restarts`).
- ``home``: each matrix is orthogonalized once, by one home rank (longest-processing-time-first
  balance); two all-to-alls for all matrices of a step; bit-identical to duplicated (see dist_ortho.home).
- ``auto``: the cheapest of the above for each matrix under a cost model (see dist_ortho.plan).
- ``blockwise``: orthogonalize the local shard alone. NOT exact: the update changes with TP size.
  Offered only as an explicit opt-in (Megatron's old behaviour).

Every mode is written as a program of collectives (dist_ortho.coalesce), so that the matrices of an
optimizer step share their calls: one flat buffer per round, group and dtype.

All exact modes equal :func:`~dist_ortho.newton_schulz.newton_schulz` on the gathered matrix up to
rounding. Shards may be of unequal size along ``partition_dim`` (``validate=True`` finds the sizes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch

from dist_ortho import comm
from dist_ortho.coalesce import DEFAULT_BUCKET_BYTES, AllGather, AllReduce, Program, run, run_many
from dist_ortho.coefficients import COEFFICIENT_TYPES, Triple, get_coefficients
from dist_ortho.kernels import gram
from dist_ortho.newton_schulz import (
    DEFAULT_EPS,
    check_matrix,
    compute_dtype,
    matmul_precision,
    newton_schulz_program,
    normalize,
)

TpMode = Literal["duplicated", "distributed", "gram", "home", "auto", "blockwise"]
TP_MODES: tuple[str, ...] = get_args(TpMode)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# trace(R_0) outside this band means squares of entries under- or overflowed in the Gram matrix.
_GRAM_TRACE_BAND = (1e-24, 1e30)


@dataclass(frozen=True)
class NsSpec:
    """How to orthogonalize: steps, coefficients and numerics of Newton-Schulz."""

    steps: int = 5
    coefficient_type: str = "quintic"
    custom_coefficient_sets: tuple | None = None
    eps: float = DEFAULT_EPS
    use_syrk: bool = False
    gram_restarts: tuple[int, ...] | None = None
    coefficients: list[Triple] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "coefficients", get_coefficients(self.coefficient_type, self.steps, self.custom_coefficient_sets)
        )


@dataclass
class MatrixJob:
    """One sharded matrix to orthogonalize: this rank's block ``x`` and how the others are held."""

    x: torch.Tensor
    partition_dim: int | None
    group: comm.ProcessGroup | None
    sizes: list[int] | None
    mode: str
    ns: NsSpec


def check_partition_dim(partition_dim: object) -> int | None:
    """None for an unsharded matrix (partition_dim None or -1), else 0 (rows) or 1 (columns)."""
    if partition_dim is None or (type(partition_dim) is int and partition_dim == -1):
        return None
    if type(partition_dim) is not int or partition_dim not in (0, 1):
        raise ValueError(f"partition_dim must be None, -1, 0 (rows) or 1 (columns), got {partition_dim!r}")
    return partition_dim


def check_tp_mode(tp_mode: object) -> str:
    if tp_mode not in TP_MODES:
        raise ValueError(f"tp_mode must be one of {TP_MODES}, got {tp_mode!r}")
    return tp_mode  # type: ignore[return-value]


def tensor_dim(x: torch.Tensor, partition_dim: int) -> int:
    """The tensor dim of matrix dim ``partition_dim`` (a 3D input is a batch of matrices)."""
    return x.ndim - 2 + partition_dim


def shard(x: torch.Tensor, partition_dim: int, rank: int, size: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous block of ``x`` along matrix dim ``partition_dim`` (torch.tensor_split sizes)."""
    return torch.tensor_split(x, size, dim=tensor_dim(x, partition_dim))[rank].contiguous()


def exchange_shard_sizes(
    xs: Sequence[torch.Tensor],
    partition_dims: Sequence[int],
    tp_group: comm.ProcessGroup,
    signature: Sequence[int] = (),
) -> list[list[int]]:
    """All-gather every rank's shapes of ``xs`` and call ``signature`` in one collective; for each x, the
    shard sizes along its partition_dim by rank.

    Raises the same ValueError on every rank when the ranks disagree on anything but the sharded sizes
    (or on how many matrices there are), so that no rank goes on into a collective the others skip.
    """
    rows = [[x.ndim, *x.shape, *([0] * (3 - x.ndim)), pd, *signature] for x, pd in zip(xs, partition_dims)]
    header = torch.tensor([len(rows), *(v for row in rows for v in row)], dtype=torch.int64)
    device = xs[0].device if xs else torch.device("cpu")
    if len(xs) != 1:  # the header's length varies: agree on it first (one call with a single matrix)
        counts = comm.all_gather(torch.tensor([header.numel()], device=device), tp_group).flatten().tolist()
        if len(set(counts)) != 1:
            raise ValueError(
                f"ranks of tp_group disagree on the number of sharded matrices (header sizes by rank: {counts})"
            )
    table = comm.all_gather(header.to(device), tp_group).cpu()
    sizes: list[list[int]] = []
    width = (table.size(1) - 1) // max(len(rows), 1)
    for i, (x, pd) in enumerate(zip(xs, partition_dims)):
        part = table[:, 1 + i * width : 1 + (i + 1) * width]
        dim = tensor_dim(x, pd)
        unsharded = torch.cat([part[:, : 1 + dim], part[:, 2 + dim :]], dim=1)
        if not bool((unsharded == unsharded[0]).all()):
            raise ValueError(
                "ranks of tp_group disagree on a sharded matrix: every rank must pass a shard of the same "
                "global matrix with the same partition_dim, tp_mode, steps, coefficient_type and dtype. "
                f"Per rank [ndim, shape..., partition_dim, call signature...]: {part.tolist()}"
            )
        sizes.append(part[:, 1 + dim].tolist())
    return sizes


def gather_program(
    x: torch.Tensor, partition_dim: int, tp_group: comm.ProcessGroup | None, sizes: Sequence[int]
) -> Program[torch.Tensor]:
    """Program: every rank's shard concatenated along partition_dim (unequal shards padded to the largest)."""
    dim = tensor_dim(x, partition_dim)
    largest = max(sizes)
    padded = x
    if x.size(dim) < largest:
        pad_shape = list(x.shape)
        pad_shape[dim] = largest - x.size(dim)
        padded = torch.cat([x, x.new_zeros(pad_shape)], dim=dim)
    stacked = yield AllGather(padded.contiguous(), tp_group)
    return torch.cat([stacked[r].narrow(dim, 0, sizes[r]) for r in range(len(sizes))], dim=dim)


def gather_shards(x: torch.Tensor, partition_dim: int, tp_group: comm.ProcessGroup, sizes: Sequence[int]) -> torch.Tensor:
    """The global matrix from every rank's shard (one all-gather)."""
    return run(gather_program(x, partition_dim, tp_group, sizes))


def own_block(full: torch.Tensor, partition_dim: int, rank: int, sizes: Sequence[int]) -> torch.Tensor:
    dim = tensor_dim(full, partition_dim)
    return full.narrow(dim, sum(sizes[:rank]), sizes[rank]).contiguous()


def default_gram_restarts(dtype: torch.dtype, steps: int) -> tuple[int, ...]:
    """Steps before which gram mode re-forms X_l and R (one more all-reduce each).

    The Gram recursion amplifies the rounding error of R_0 along small singular values (by up to
    prod(a_j), ~10^3 for polar_express). In float32 that reaches ~1e-4 max abs against float64 when k
    is the larger side; a restart every 3 steps keeps it under ~5e-5. In 16-bit compute the k x k
    recursion already runs in float32 and its error is far below bf16's own, so no restart is needed
    (orthogonality measured equal to the distributed mode's); float64 needs none either.
    """
    return tuple(range(3, steps, 3)) if compute_dtype(dtype) == torch.float32 else ()


def local_newton_schulz(x: torch.Tensor, ns: NsSpec) -> torch.Tensor:
    """One-device Newton-Schulz of a whole matrix (smaller Gram side)."""
    return run(newton_schulz_program(x, ns.coefficients, ns.eps, x.size(-2) > x.size(-1), None, ns.use_syrk))


def gram_newton_schulz(
    x: torch.Tensor,
    coefficients: Sequence[Triple],
    eps: float,
    tp_group: comm.ProcessGroup | None,
    restarts: Sequence[int] = (),
    use_syrk: bool = False,
    global_cols: int | None = None,
) -> Program[torch.Tensor]:
    """Program: Gram-space Newton-Schulz of x (k x n_l, its columns sharded over tp_group).

    ``global_cols`` is n, the sum of the shards' columns (x's own when None). The products with X_l
    (the final Q X_l, restarts) run in the compute dtype (bf16 under "medium"); R is formed with a
    float32 result and the k x k recursion runs in float32 or wider at "highest" matmul precision:
    bf16 there loses the orthogonality (max |sigma - 1| 0.1 to 60 where NS has 0.03). When k > n,
    R is singular and the recursion amplifies rounding in its null space by up to prod(a_j), so the
    products with X_l then also run at "highest" precision: that case costs float32 k^2 n products
    and k^3 work on the larger side, and ``tp_mode="auto"`` does not pick gram for it.
    """
    dtype = compute_dtype(x.dtype)
    small = torch.promote_types(dtype, torch.float32)
    singular = x.size(-2) > (global_cols or x.size(-1))
    gram_precision = "highest" if singular else torch.get_float32_matmul_precision()

    def local_gram(X: torch.Tensor) -> torch.Tensor:
        with matmul_precision(gram_precision):
            return gram(X.to(small), use_syrk)

    def apply(Q: torch.Tensor | None, X: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        with matmul_precision(gram_precision):
            return (X.to(small) if Q is None else Q @ X.to(small)) * scale

    # The iterate is Q X scale; R is always the Gram matrix of exactly the X held (in its dtype), since
    # any mismatch between the two lands in R's null space and is amplified when k > n.
    X = x.to(dtype)
    R = yield AllReduce(local_gram(X), tp_group)
    trace = R.diagonal(dim1=-2, dim2=-1).double().sum(-1)
    low, high = _GRAM_TRACE_BAND
    if bool(((trace > 0) & (trace < low) | (trace > high)).any()):
        # Entries too small or large for a Gram matrix in this dtype: normalize first, then re-form R.
        # R is the same on every rank, so every rank takes this branch together.
        X = (yield from normalize(x, eps, tp_group)).to(dtype)
        R = yield AllReduce(local_gram(X), tp_group)
        scale = torch.ones_like(trace, dtype=small)[..., None, None]
    else:
        scale = (1.0 / (trace.sqrt() + eps)).to(small)[..., None, None]
        R = R * scale.square()
    eye = torch.eye(R.size(-1), dtype=small, device=R.device).expand_as(R)
    Q = None  # None stands for the identity, which saves a k x k product after every (re)start
    for step, (a, b, c) in enumerate(coefficients):
        if step in restarts:
            X = apply(Q, X, scale).to(dtype)
            R = yield AllReduce(local_gram(X), tp_group)
            Q, scale = None, torch.ones_like(scale)
        with matmul_precision("highest"):
            Z = b * R + (c * (R @ R) if c != 0 else 0)
            Q = a * eye + Z if Q is None else a * Q + Z @ Q
            if step + 1 < len(coefficients) and step + 1 not in restarts:  # R is read again
                P = a * eye + Z
                R = P @ (P @ R)
    return apply(Q, X, scale)


def matrix_program(job: MatrixJob) -> Program[torch.Tensor]:
    """Program orthogonalizing one job in its mode (not "home" or "auto", which span matrices)."""
    x, pd, group, ns = job.x, job.partition_dim, job.group, job.ns
    if pd is None or comm.group_size(group) == 1 or job.mode == "blockwise":
        return (yield from newton_schulz_program(x, ns.coefficients, ns.eps, x.size(-2) > x.size(-1), None, ns.use_syrk))
    sizes = job.sizes or [x.size(tensor_dim(x, pd))] * comm.group_size(group)
    if job.mode == "duplicated":
        full = yield from gather_program(x, pd, group, sizes)
        return own_block(local_newton_schulz(full, ns), pd, comm.group_rank(group), sizes)
    X = x.mT if pd == 0 else x  # the sharded dim becomes the contraction dim
    if job.mode == "distributed":
        out = yield from newton_schulz_program(X, ns.coefficients, ns.eps, False, group, ns.use_syrk)
    elif job.mode == "gram":
        restarts = ns.gram_restarts if ns.gram_restarts is not None else default_gram_restarts(x.dtype, ns.steps)
        out = yield from gram_newton_schulz(X, ns.coefficients, ns.eps, group, restarts, ns.use_syrk, sum(sizes))
        out = out.to(x.dtype)
    else:
        raise ValueError(f"matrix_program cannot run tp_mode={job.mode!r}")
    return (out.mT if pd == 0 else out).contiguous()


def orthogonalize_many(jobs: Sequence[MatrixJob], bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> list[torch.Tensor]:
    """Orthogonalize every job with coalesced collectives (arguments already checked and shard sizes known).

    "auto" jobs get their mode from :func:`dist_ortho.plan.choose_mode`; "home" jobs of the same group
    and dtype share one home-rank program (two all-to-alls for all of them).
    """
    from dist_ortho.home import home_program
    from dist_ortho.plan import choose_mode

    jobs = [job if job.mode != "auto" else _with_mode(job, choose_mode(job)) for job in jobs]
    programs: list[Program] = []
    slots: list[tuple[int, int | None]] = []  # job -> (program, index in a home program's result)
    homes: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        sharded = job.partition_dim is not None and comm.group_size(job.group) > 1
        if job.mode == "home" and sharded:
            homes.setdefault((id(job.group), job.x.dtype), []).append(i)
            slots.append((-1, None))
        else:
            slots.append((len(programs), None))
            programs.append(matrix_program(job))
    for members in homes.values():
        for n, i in enumerate(members):
            slots[i] = (len(programs), n)
        programs.append(home_program([jobs[i] for i in members]))
    results = run_many(programs, bucket_bytes)
    return [results[p] if n is None else results[p][n] for p, n in slots]


def _with_mode(job: MatrixJob, mode: str) -> MatrixJob:
    return MatrixJob(job.x, job.partition_dim, job.group, job.sizes, mode, job.ns)


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

    Returns:
        This rank's block of the orthogonalized global matrix, contiguous, in x's dtype.
    """
    check_matrix(x, "x")
    custom = tuple(map(tuple, custom_coefficient_sets)) if custom_coefficient_sets is not None else None
    ns = NsSpec(steps, coefficient_type, custom, eps, use_syrk, tuple(gram_restarts) if gram_restarts is not None else None)
    partition_dim = check_partition_dim(partition_dim)
    check_tp_mode(tp_mode)
    if partition_dim is not None and tp_group is None:
        raise ValueError(f"tp_group is required when partition_dim={partition_dim} (the matrix is sharded)")
    size = comm.group_size(tp_group)
    if partition_dim is None or size == 1 or tp_mode == "blockwise":
        return local_newton_schulz(x, ns)
    if x.dtype not in _DTYPES:
        raise TypeError(f"x must have dtype in {_DTYPES}, got {x.dtype}")
    rank = comm.group_rank(tp_group)
    if shard_sizes is not None:
        sizes = list(shard_sizes)
        if len(sizes) != size or sizes[rank] != x.size(tensor_dim(x, partition_dim)):
            raise ValueError(f"shard_sizes={sizes} does not fit a group of {size} ranks where rank {rank} holds "
                             f"{x.size(tensor_dim(x, partition_dim))} along partition_dim")
    elif validate:
        signature = (TP_MODES.index(tp_mode), steps, COEFFICIENT_TYPES.index(coefficient_type), _DTYPES.index(x.dtype))
        sizes = exchange_shard_sizes([x], [partition_dim], tp_group, signature)[0]
    else:
        sizes = [x.size(tensor_dim(x, partition_dim))] * size
    return orthogonalize_many([MatrixJob(x, partition_dim, tp_group, sizes, tp_mode, ns)])[0]
