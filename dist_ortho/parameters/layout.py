"""How a rank holds a tensor: one description for every framework's sharding.

A rank's tensor is a block of a global tensor (a matrix, or a stack of E matrices [E, rows, cols]) cut by an
ordered list of splits, each applied to the block the splits before it leave::

    global tensor --split 1--> block --split 2--> ... --> this rank's tensor

A :class:`Split` cuts along one tensor dim into consecutive ranges, one per rank of its process group in group rank
order: ``extents[r]`` real entries for rank r (uneven and empty ranges allowed). A rank may hold ``held`` entries,
its real ones first and then padding that belongs to no matrix (Megatron GTP pads the block so that every rank holds
the same number of rows). What the optimizer does with a split is its ``kind``:

- ``"tp"``: the tensor-parallel split the Newton-Schulz modes run over (dist_ortho.tp): a matrix dim, at most one;
- ``"pieces"``: ranges of that block held by the ranks of another group (FSDP's shards, Megatron GTP's weight remat,
  Megatron-FSDP's row-aligned buckets): one owner rank gathers them into its block, steps it and sends every rank
  its piece back (dist_ortho.parameters.pieces);
- ``"experts"``: whole matrices of a stack (expert parallelism, or data parallelism by experts): each rank steps
  its own.

The ranks of ``replicas`` hold the same block (data parallelism): one of them steps it and shares it
(dist_ortho.parameters.grid). Readers turn what frameworks set into a Layout (TE/Megatron attributes: dist_ortho.parameters.protocol;
DTensor placements: dist_ortho.parameters.dtensor), leaving ``extents`` to :func:`exchange_extents`, which asks the ranks of
each split's group; what a reader cannot describe it refuses by name (a ValueError), never guesses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal, get_args

import torch

from dist_ortho import comm
from dist_ortho.tp.jobs import block, even_sizes, exchange_shard_sizes, gather_shards

SplitKind = Literal["tp", "pieces", "experts"]
SPLIT_KINDS: tuple[str, ...] = get_args(SplitKind)


@dataclass(frozen=True)
class Held:
    """How the ranks of ``group`` hold a state tensor (the checkpoint contract, dist_ortho.optim.holding): contiguous
    blocks along tensor dim ``dim`` (``sizes`` by rank; None: equal blocks), or, with ``dim`` None, each the whole."""

    dim: int | None
    group: comm.ProcessGroup | None = None
    sizes: tuple[int, ...] | None = None

    def to_global(self, t: torch.Tensor) -> torch.Tensor:
        """The whole tensor from this rank's block (one all-gather; a copy when replicated)."""
        size = comm.group_size(self.group)
        if self.dim is None or size == 1:
            return t.clone()
        sizes = list(self.sizes) if self.sizes is not None else [t.size(self.dim)] * size
        if t.ndim >= 2:
            return gather_shards(t, self.dim - t.ndim + 2, self.group, sizes)
        return gather_shards(t[None], 1, self.group, sizes)[0]

    def to_local(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's block of the whole tensor ``full`` (a copy)."""
        size = comm.group_size(self.group)
        if self.dim is None or size == 1:
            return full.clone()
        sizes = list(self.sizes) if self.sizes is not None else even_sizes(full.size(self.dim), size)
        if sum(sizes) != full.size(self.dim):
            raise ValueError(f"a tensor of shape {tuple(full.shape)} cannot be cut into blocks {sizes} along dim {self.dim}")
        return block(full, self.dim, comm.group_rank(self.group), sizes)


REPLICATED_HELD = Held(None)


@dataclass(frozen=True)
class Split:
    """Consecutive ranges along tensor dim ``dim`` of the block it cuts, one per rank of ``group``: ``extents[r]``
    real entries for rank r (None until exchanged), ``held`` entries on every rank when padded (real first)."""

    kind: SplitKind
    dim: int
    group: comm.ProcessGroup | None
    extents: tuple[int, ...] | None = None
    held: int | None = None

    @property
    def size(self) -> int:
        return comm.group_size(self.group)

    @property
    def rank(self) -> int:
        return comm.group_rank(self.group)

    @property
    def padding(self) -> int:
        """Padding entries on this rank (after its real ones)."""
        return 0 if self.held is None or self.extents is None else self.held - self.extents[self.rank]

    def start(self, rank: int) -> int:
        """Where rank ``rank``'s range begins in the block this split cuts."""
        assert self.extents is not None
        return sum(self.extents[:rank])


@dataclass(frozen=True)
class Layout:
    """``shape``: the global tensor's; ``splits`` in the order they cut it; ``replicas``: the group whose ranks
    hold the same block (None: none known). A layout of the one block the optimizer steps (:meth:`compute`) has no
    splits but its TP one, and the stack's own experts as ``shape[0]``."""

    shape: tuple[int, ...]
    splits: tuple[Split, ...] = ()
    replicas: comm.ProcessGroup | None = None

    def split(self, kind: SplitKind) -> Split | None:
        """The split of ``kind`` over a group of more than one rank, or None."""
        return next((s for s in self.splits if s.kind == kind and s.size > 1), None)

    # -- the tensor-parallel view that the modes, the members' global quantities and the scale read --
    @property
    def tp(self) -> Split | None:
        return self.split("tp")

    @property
    def partition_dim(self) -> int | None:
        """The matrix dim (0 rows, 1 cols) of the TP split, None when the block is not split over TP."""
        tp = self.tp
        return None if tp is None else tp.dim - len(self.shape) + 2

    @property
    def group(self) -> comm.ProcessGroup | None:
        """The group to reduce over for a global quantity (None when not split over TP)."""
        tp = self.tp
        return None if tp is None else tp.group

    @property
    def sizes(self) -> tuple[int, ...] | None:
        """Every TP rank's extent along the partition dim (None when not split over TP)."""
        tp = self.tp
        return None if tp is None else tp.extents

    @property
    def rows(self) -> int:
        return self.shape[-2]

    @property
    def cols(self) -> int:
        return self.shape[-1]

    @property
    def pieces(self) -> Split | None:
        """The split whose ranks hold ranges of the TP block (gathered by an owner), or None."""
        return self.split("pieces")

    @property
    def experts(self) -> Split | None:
        """The split of a stack's matrices over ranks that each step their own, or None."""
        return self.split("experts")

    def block_shape(self, upto: int | None = None) -> tuple[int, ...]:
        """This rank's block after the first ``upto`` splits (all: its real entries), padding excluded."""
        shape = list(self.shape)
        for split in self.splits[:upto]:
            if split.size > 1:
                assert split.extents is not None, "extents not exchanged yet"
                shape[split.dim] = split.extents[split.rank]
        return tuple(shape)

    def compute(self) -> Layout:
        """What the optimizer steps on this rank: the TP block's matrix (pieces gathered; experts its own)."""
        shape = list(self.shape)
        experts = self.experts
        if experts is not None:
            shape[experts.dim] = self.block_shape()[experts.dim]
        tp = self.tp
        return Layout(tuple(shape), (tp,) if tp is not None else ())

    def held(self, reduced_dims: Sequence[int] = ()) -> Held:
        """How a tensor shaped like this (compute) layout's matrix, with matrix dims ``reduced_dims`` (0 rows, 1 cols)
        reduced to size 1, is held: like the matrix, or replicated when the TP-split dim is reduced."""
        pd = self.partition_dim
        if pd is None or pd in reduced_dims:
            return REPLICATED_HELD
        return Held(len(self.shape) - 2 + pd, self.group, self.sizes)


def whole(shape: Sequence[int]) -> Layout:
    """A tensor every rank holds whole."""
    return Layout(tuple(shape))


def tp_layout(shape: Sequence[int], partition_dim: int | None, group: comm.ProcessGroup | None,
              sizes: Sequence[int] | None) -> Layout:
    """A matrix (or batch) split over TP along matrix dim ``partition_dim`` by ``sizes`` (whole when None)."""
    if partition_dim is None or comm.group_size(group) == 1:
        return Layout(tuple(shape))
    dim = len(shape) - 2 + partition_dim
    return Layout(tuple(shape), (Split("tp", dim, group, tuple(sizes) if sizes is not None else None),))


@dataclass(frozen=True)
class Reading:
    """What a reader found on this rank before the ranks are asked: the splits (extents None where only the ranks
    of its group know them), this rank's real entries' shape, the global shape where the tensor knows it (a
    DTensor), and why this rank cannot step it (raised on every rank by the plan's agreement), if so."""

    splits: tuple[Split, ...]
    local_shape: tuple[int, ...]
    shape: tuple[int, ...] | None = None
    replicas: comm.ProcessGroup | None = None
    problem: str | None = None
    grid: tuple[tuple[int, ...], ...] | None = None  # HSDP: every replica's pieces-group ranks (global), by replica


def exchange_extents(readings: Sequence[Reading], names: Sequence[str | None],
                     problems: dict[int, str] | None = None) -> list[Layout]:
    """The layouts of ``readings``: every split's extents asked of its group's ranks, innermost split first (its
    extents make the block the next one cuts), with one all-gather of every rank's block shapes per group and level
    (dist_ortho.tp.jobs.exchange_shard_sizes, which raises the same ValueError on every rank when they do not fit one
    tensor). Splits whose extents a reader knew, and groups of one, ask nothing. A global shape the blocks do not
    make is a ValueError (alike on every rank: the extents are).

    With ``problems`` given, those ValueErrors are recorded there instead (by reading index), and every rank goes
    on through every level with stand-in extents: a group's error must not leave the ranks of another group
    waiting in the next level's exchange (the caller raises the problems on every rank, as the plan's agreement
    does)."""
    splits = [list(r.splits) for r in readings]
    blocks = [list(r.local_shape) for r in readings]
    for level in reversed(range(max(map(len, splits), default=0))):
        by_group: dict[int, list[int]] = {}
        for i, cuts in enumerate(splits):
            if level < len(cuts) and cuts[level].size > 1:
                if cuts[level].extents is None:
                    by_group.setdefault(id(cuts[level].group), []).append(i)
                else:
                    blocks[i][cuts[level].dim] = sum(cuts[level].extents)
        for members in by_group.values():
            group = splits[members[0]][level].group
            views = [_as_matrix(torch.zeros((), dtype=torch.int8).expand(blocks[i]), splits[i][level].dim) for i in members]
            dims = [_matrix_dim(len(blocks[i]), splits[i][level].dim) for i in members]
            try:
                found = exchange_shard_sizes(views, dims, group)
            except ValueError as e:
                if problems is None:
                    raise
                found = [[blocks[i][splits[i][level].dim]] * splits[i][level].size for i in members]
                for i in members:
                    problems.setdefault(i, f"{names[i] or 'a tensor'}: its ranks' blocks do not fit one tensor ({e})")
            for i, extents in zip(members, found):
                splits[i][level] = replace(splits[i][level], extents=tuple(extents))
                blocks[i][splits[i][level].dim] = sum(extents)
    out = []
    for reading, cuts, block_, name in zip(readings, splits, blocks, names):
        if reading.shape is not None and tuple(block_) != tuple(reading.shape):
            message = (f"{name or 'a tensor'}: its ranks' blocks make a {tuple(block_)} tensor, not its global shape "
                       f"{tuple(reading.shape)}: placements dist_ortho cannot reassemble")
            if problems is None:
                raise ValueError(message)
            problems.setdefault(len(out), message)
            block_ = list(reading.shape)
        out.append(Layout(tuple(block_), tuple(cuts), reading.replicas))
    return out


def _as_matrix(v: torch.Tensor, dim: int) -> torch.Tensor:
    """``v`` with tensor dim ``dim`` among its last two (a stack's expert dim moved to the rows)."""
    return v if dim >= v.ndim - 2 else v.movedim(dim, -2)


def _matrix_dim(ndim: int, dim: int) -> int:
    """The matrix dim that tensor dim ``dim`` of an ``ndim``-dim tensor is after :func:`_as_matrix`."""
    return dim - ndim + 2 if dim >= ndim - 2 else 0
