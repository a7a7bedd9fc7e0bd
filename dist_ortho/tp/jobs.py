"""What every tensor-parallel mode shares: the job and spec types, argument checks and shard helpers.

A TP-sharded matrix is held as one contiguous block per rank along ``partition_dim`` (0 = rows,
1 = columns); ``sizes`` lists every rank's block size along it (shards may be unequal).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch

from dist_ortho import comm
from dist_ortho.comm.coalesce import AllGather, Program, run
from dist_ortho.math.coefficients import Triple, get_coefficients
from dist_ortho.math.iteration import DEFAULT_EPS
from dist_ortho.math.precision import check_ns_dtype
from dist_ortho.tp.batching import BatchMatrices

TpMode = Literal["duplicated", "distributed", "gram", "home", "auto", "blockwise"]
TP_MODES: tuple[str, ...] = get_args(TpMode)
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass(frozen=True)
class NsSpec:
    """How to orthogonalize: steps, coefficients and numerics of Newton-Schulz."""

    steps: int = 5
    coefficient_type: str = "quintic"
    custom_coefficient_sets: tuple | None = None
    eps: float = DEFAULT_EPS
    use_syrk: bool = False
    gram_restarts: tuple[int, ...] | None = None
    local_gram: str = "auto"  # whole matrices on one rank: "auto" (dist_ortho.tp.local.use_gram), "always", "never"
    batch: BatchMatrices = "auto"  # same-shape whole matrices on one rank as one batched iteration (tp.batching)
    sync_free: bool = False  # no host sync (capturable steps): gram mode normalizes with a float64 norm first
    ns_dtype: str | None = None  # "bf16" | "fp16" | "fp32": the compute dtype (dist_ortho.math.precision.compute_dtype)
    coefficients: list[Triple] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        check_ns_dtype(self.ns_dtype)
        object.__setattr__(
            self, "coefficients", get_coefficients(self.coefficient_type, self.steps, self.custom_coefficient_sets)
        )


@dataclass
class MatrixJob:
    """One matrix to orthogonalize: this rank's block ``x`` and how the others are held.

    ``partition_dim`` None (or a group of one) means x is the whole matrix. ``mode`` is never "auto"
    once a job reaches a mode's program (dist_ortho.tp.cost.resolve picks the mode first).
    """

    x: torch.Tensor
    partition_dim: int | None
    group: comm.ProcessGroup | None
    sizes: list[int] | None
    mode: str
    ns: NsSpec

    @property
    def sharded(self) -> bool:
        return self.partition_dim is not None and comm.group_size(self.group) > 1 and self.mode != "blockwise"

    @property
    def shard_sizes(self) -> list[int]:
        assert self.partition_dim is not None
        return self.sizes or [self.x.size(tensor_dim(self.x, self.partition_dim))] * comm.group_size(self.group)

    @property
    def global_shape(self) -> tuple[int, ...]:
        if not self.sharded:
            return tuple(self.x.shape)
        return summed_shape(self.x.shape, self.partition_dim, self.shard_sizes)


def summed_shape(shape: Sequence[int], partition_dim: int, sizes: Sequence[int]) -> tuple[int, ...]:
    """The global shape of a matrix (or batch) from a shard's ``shape``: matrix dim ``partition_dim`` is the
    sum of every rank's ``sizes`` along it."""
    out = list(shape)
    out[len(out) - 2 + partition_dim] = sum(sizes)
    return tuple(out)


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


def even_sizes(length: int, size: int) -> list[int]:
    """Block sizes of ``length`` over ``size`` ranks as torch.tensor_split cuts them."""
    base, extra = divmod(length, size)
    return [base + 1 if r < extra else base for r in range(size)]


def block(full: torch.Tensor, dim: int, rank: int, sizes: Sequence[int]) -> torch.Tensor:
    """Rank ``rank``'s contiguous block of ``full`` along tensor dim ``dim``, of ``sizes[rank]`` (a copy)."""
    return full.narrow(dim, sum(sizes[:rank]), sizes[rank]).contiguous()


def shard(x: torch.Tensor, partition_dim: int, rank: int, size: int) -> torch.Tensor:
    """Rank ``rank``'s block of ``x`` along matrix dim ``partition_dim``, equal split (torch.tensor_split sizes)."""
    dim = tensor_dim(x, partition_dim)
    return block(x, dim, rank, even_sizes(x.size(dim), size))


def own_block(full: torch.Tensor, partition_dim: int, rank: int, sizes: Sequence[int]) -> torch.Tensor:
    """This rank's block of a global matrix (or batch) along matrix dim ``partition_dim``."""
    return block(full, tensor_dim(full, partition_dim), rank, sizes)


def padded_block(x: torch.Tensor, dim: int, sizes: Sequence[int]) -> torch.Tensor:
    """x padded with zeros along tensor dim ``dim`` to the largest of the ranks' ``sizes`` (for an all-gather)."""
    largest = max(sizes)
    if x.size(dim) == largest:
        return x.contiguous()
    pad_shape = list(x.shape)
    pad_shape[dim] = largest - x.size(dim)
    return torch.cat([x, x.new_zeros(pad_shape)], dim=dim)


def joined_blocks(stacked: torch.Tensor, dim: int, sizes: Sequence[int]) -> torch.Tensor:
    """The whole tensor from an all-gather of :func:`padded_block`s (padding dropped)."""
    return torch.cat([stacked[r].narrow(dim, 0, sizes[r]) for r in range(len(sizes))], dim=dim)


def gather_program(
    x: torch.Tensor, dim: int, group: comm.ProcessGroup | None, sizes: Sequence[int]
) -> Program[torch.Tensor]:
    """Program: every rank's block concatenated along tensor dim ``dim`` (unequal blocks padded to the largest)."""
    stacked = yield AllGather(padded_block(x, dim, sizes), group)
    return joined_blocks(stacked, dim, sizes)


def gather_shards(x: torch.Tensor, partition_dim: int, tp_group: comm.ProcessGroup, sizes: Sequence[int]) -> torch.Tensor:
    """The global matrix from every rank's shard (one all-gather)."""
    return run(gather_program(x, tensor_dim(x, partition_dim), tp_group, sizes))


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
