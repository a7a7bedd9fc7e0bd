"""How a parameter is sharded, read from the attributes TransformerEngine and Megatron-LM set on it.

Both set ``tensor_model_parallel`` (bool), ``partition_dim`` (0 rows, 1 columns, -1 none) and
``partition_stride`` on their weights. A weight is sharded only when ``tensor_model_parallel is True``
and ``partition_dim`` is 0 or 1: TE sets partition_dim 0 even for ``parallel_mode=None``, and Megatron
sets tensor_model_parallel False on its duplicated TE linears. Megatron marks expert weights with
``expert_tp = True``: they are sharded over the expert TP group instead of the TP group.

``partition_stride`` s > 1 (Megatron's gated fc1: each shard holds its block of the gate rows, then its
block of the up rows) makes the shards, concatenated, a row (column) permutation P of the global matrix.
Every update of the family is equivariant to it (NS(P G) = P NS(G); norms, means over the other dim and the
shape scale are unchanged), so each shard's update is exactly its rows of the global update: such weights
are handled as contiguous blocks. Only a fused QKV weight, split by its row layout, must have stride 1.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dist_ortho import comm
from dist_ortho.tp.jobs import block, even_sizes, exchange_shard_sizes, gather_shards, summed_shape

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardSpec:
    """``partition_dim`` None means replicated (or a group of one); ``group`` holds the other shards."""

    partition_dim: int | None
    group: comm.ProcessGroup | None

    @property
    def size(self) -> int:
        return comm.group_size(self.group) if self.partition_dim is not None else 1


REPLICATED = ShardSpec(None, None)


def is_expert_stack(p: torch.Tensor, name: str | None = None) -> bool:
    """A 3D weight [E, out, in] that holds E expert matrices (torchtitan's GroupedExperts, TE's GroupedLinear in
    single-parameter mode): marked ``expert_stack=True``, or named like Megatron's experts ("experts" and not
    "shared"). Its ``partition_dim`` (TE/Megatron attributes) is a tensor dim, 1 (rows) or 2 (columns)."""
    if p.ndim != 3:
        return False
    if getattr(p, "expert_stack", False) is True:
        return True
    return name is not None and "experts" in name and "shared" not in name


def is_sharded(p: torch.Tensor) -> bool:
    return getattr(p, "tensor_model_parallel", False) is True and getattr(p, "partition_dim", -1) in (0, 1)


def unreadable(p: torch.Tensor, name: str | None = None) -> str | None:
    """Why the attributes on ``p`` describe a holding dist_ortho cannot read (a ValueError's text), or None.

    Megatron's GTP weight remat (megatron-core >= 0.19: ``is_gtp_weight_remat=True``) splits each TP block once
    more along dim 0 over its ``gtp_remat`` group, padded by ``pad_length`` rows: orthogonalizing such a piece as
    if it were the whole matrix is the inexact, TP-size-dependent update this library exists to remove, so it is
    refused until it is read. Local: every rank holds the same attributes, so every rank raises alike."""
    if getattr(p, "is_gtp_weight_remat", False) is not True:
        return None
    label = f"parameter {name!r}" if name else f"a parameter of shape {tuple(p.shape)}"
    size = getattr(p, "gtp_remat_size", None)
    return (f"{label} is split once more along dim 0 by Megatron's GTP weight remat (is_gtp_weight_remat=True, "
            f"gtp_remat_size={size}, pad_length={getattr(p, 'pad_length', None)}): dist_ortho does not read this "
            "layout, and orthogonalizing each piece alone would be inexact; run without GTP weight remat "
            "(tensor_parallel_num_weight_shards = tensor_model_parallel_size)")


def shard_spec(
    p: torch.Tensor,
    tp_group: comm.ProcessGroup | None,
    expert_tp_group: comm.ProcessGroup | None = None,
    name: str | None = None,
    shard_local: bool = False,
) -> ShardSpec:
    """The ShardSpec of ``p`` (raises ValueError for layouts that cannot be handled exactly).

    A sharded parameter with no group to reduce over is an error, unless ``shard_local`` (the caller opted
    into shard-by-shard, inexact, behaviour: ``tp_mode="blockwise"``); then it is treated as a whole matrix."""
    if not is_sharded(p):
        return REPLICATED
    label = f"parameter {name!r}" if name else f"a parameter of shape {tuple(p.shape)}"
    stride = getattr(p, "partition_stride", 1)
    if stride != 1 and getattr(p, "is_qkv", False):
        raise ValueError(
            f"{label} is a fused QKV weight with partition_stride={stride}: its Q/K/V rows are not laid out per query "
            "group in the shards, so they cannot be split; use partition_stride=1 or split_qkv=False"
        )
    if getattr(p, "expert_tp", False):
        if expert_tp_group is None and tp_group is not None:
            raise ValueError(
                f"{label} is an expert weight (expert_tp=True) but no expert_tp_group was given: pass "
                "expert_tp_group= (Megatron: pg_collection.expt_tp); the dense tp_group is not used for experts"
            )
        group = expert_tp_group
    else:
        group = tp_group
    if group is None:
        if shard_local:
            return REPLICATED
        which = "expert_tp_group" if getattr(p, "expert_tp", False) else "tp_group"
        raise ValueError(
            f"{label} is tensor-parallel (tensor_model_parallel=True, partition_dim={p.partition_dim}) but no {which} "
            f"was given: pass {which}= (Megatron: pg_collection), or tp_mode='blockwise' to orthogonalize each "
            "shard alone (not exact: the update then changes with the TP size)"
        )
    return ShardSpec(p.partition_dim, group)


def global_shape(shape: torch.Size | tuple[int, ...], spec: ShardSpec, sizes: Sequence[int] | None = None) -> tuple[int, ...]:
    """Shape of the whole matrix: the local shape with the sharded (matrix) dim summed over ranks
    (``sizes``; equal shards when None)."""
    if spec.partition_dim is None:
        return tuple(shape)
    if sizes is None:
        sizes = [shape[len(shape) - 2 + spec.partition_dim]] * spec.size
    return summed_shape(shape, spec.partition_dim, sizes)


@dataclass(frozen=True)
class Held:
    """How the ranks of ``group`` hold one tensor: contiguous blocks along tensor dim ``dim`` (``sizes``
    by rank; None: equal blocks), or, with ``dim`` None, every rank the whole tensor."""

    dim: int | None
    group: comm.ProcessGroup | None = None
    sizes: tuple[int, ...] | None = None

    def to_global(self, t: torch.Tensor) -> torch.Tensor:
        """The whole tensor from this rank's block (one all-gather; a copy when replicated)."""
        size = comm.group_size(self.group)
        if self.dim is None or size == 1:
            return t.clone()
        sizes = list(self.sizes) if self.sizes is not None else [t.size(self.dim)] * size
        return gather_shards(t, self.dim - t.ndim + 2, self.group, sizes) if t.ndim >= 2 else _gather_1d(t, self.group, sizes)

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


def _gather_1d(t: torch.Tensor, group: comm.ProcessGroup, sizes: list[int]) -> torch.Tensor:
    return gather_shards(t[None], 1, group, sizes)[0]


def held_like_param(p: torch.Tensor, group: comm.ProcessGroup | None) -> Held:
    """How ``group`` holds a tensor shaped like parameter ``p`` (equal blocks when p is sharded)."""
    return Held(p.partition_dim, group) if is_sharded(p) and comm.group_size(group) > 1 else REPLICATED_HELD


@dataclass(frozen=True)
class MatrixLayout:
    """How this rank's matrix (view of a parameter, or a fused QKV component) sits in the global one."""

    spec: ShardSpec
    sizes: tuple[int, ...] | None  # every rank's size along partition_dim (None when replicated)
    shape: tuple[int, ...]  # the global matrix's shape: (rows, cols) or (batch, rows, cols)

    @property
    def rows(self) -> int:
        return self.shape[-2]

    @property
    def cols(self) -> int:
        return self.shape[-1]

    @property
    def partition_dim(self) -> int | None:
        return self.spec.partition_dim

    @property
    def group(self) -> comm.ProcessGroup | None:
        """The group to reduce over for a global quantity (None when unsharded)."""
        return self.spec.group if self.spec.partition_dim is not None else None

    def held(self, reduced_dims: Sequence[int] = ()) -> Held:
        """How a tensor shaped like this matrix, with matrix dims ``reduced_dims`` (0 rows, 1 cols) reduced
        to size 1, is held: like the matrix, or replicated when the sharded dim is reduced."""
        pd = self.spec.partition_dim
        if pd is None or pd in reduced_dims:
            return REPLICATED_HELD
        return Held(len(self.shape) - 2 + pd, self.spec.group, self.sizes)



def find_layouts(
    views: Sequence[tuple[torch.Tensor, torch.Tensor]],
    tp_group: comm.ProcessGroup | None,
    expert_tp_group: comm.ProcessGroup | None = None,
    shard_local: Sequence[bool] | None = None,
    names: Sequence[str | None] | None = None,
) -> list[MatrixLayout]:
    """The layout of each (parameter, matrix view of it): one shape exchange per process group.

    ``shard_local[i]``: view i may be treated as a whole matrix when its group is missing (see shard_spec).
    ``names[i]``: the parameter's name, for messages.
    Raises the same ValueError on every rank when the ranks' shards do not fit one global matrix.
    """
    local = shard_local if shard_local is not None else [False] * len(views)
    labels = list(names) if names is not None else [None] * len(views)
    specs = [shard_spec(p, tp_group, expert_tp_group, name, ok) for (p, _), ok, name in zip(views, local, labels)]
    layouts: list[MatrixLayout | None] = [None] * len(views)
    by_group: dict[int, list[int]] = {}
    for i, ((p, view), spec) in enumerate(zip(views, specs)):
        if spec.partition_dim is None or spec.size == 1:
            layouts[i] = MatrixLayout(REPLICATED, None, tuple(view.shape))
        elif p.ndim != 2 and not getattr(p, "matrix_batch", False):
            name = labels[i] or f"a parameter of shape {tuple(p.shape)}"
            raise ValueError(f"{name} is tensor-parallel with {p.ndim} dims: only 2D weights can be sharded")
        else:
            by_group.setdefault(id(spec.group), []).append(i)
    for members in by_group.values():
        group = specs[members[0]].group
        sizes = exchange_shard_sizes([views[i][1] for i in members], [specs[i].partition_dim for i in members], group)
        for i, shard_sizes in zip(members, sizes):
            layouts[i] = MatrixLayout(specs[i], tuple(shard_sizes), global_shape(views[i][1].shape, specs[i], shard_sizes))
    return layouts  # type: ignore[return-value]
