"""How a parameter is held, read from the attributes TransformerEngine and Megatron-LM set on it (dist_ortho.parameters.layout).

Both set ``tensor_model_parallel`` (bool), ``partition_dim`` (0 rows, 1 columns, -1 none) and
``partition_stride`` on their weights. A weight is split over TP only when ``tensor_model_parallel is True`` and
``partition_dim`` is 0 or 1: TE sets partition_dim 0 even for ``parallel_mode=None``, and Megatron sets
tensor_model_parallel False on its duplicated TE linears. Megatron marks expert weights with ``expert_tp = True``:
they are split over the expert TP group instead of the TP group.

``partition_stride`` s > 1 (Megatron's gated fc1: each shard holds its block of the gate rows, then its block of the
up rows) makes the shards, concatenated, a row (column) permutation P of the global matrix. Every update of the
family is equivariant to it (NS(P G) = P NS(G); norms, means over the other dim and the shape scale are unchanged),
so each shard's update is exactly its rows of the global update: such weights are handled as contiguous blocks.
Only a fused QKV weight, split by its row layout, must have stride 1.

Megatron's GTP weight remat (megatron-core >= 0.19, ``is_gtp_weight_remat=True``) splits each TP block once more
along dim 0 over the parameter's ``group`` (its ``gtp_remat`` / ``expt_gtp_remat`` process group): the block is
padded at the tail by ``pad_length`` zero rows and cut into equal pieces, so rank g of G holds rows
[g L, (g + 1) L) of the padded block (L its local rows), the real ones first. That is a "pieces" split whose owner
gathers the real rows (dist_ortho.parameters.pieces).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from dist_ortho import comm
from dist_ortho.parameters.layout import REPLICATED_HELD, Held, Layout, Reading, Split, exchange_extents

logger = logging.getLogger(__name__)


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
    """Whether p's attributes split it over TP."""
    return getattr(p, "tensor_model_parallel", False) is True and getattr(p, "partition_dim", -1) in (0, 1)


def _label(p: torch.Tensor, name: str | None) -> str:
    return f"parameter {name!r}" if name else f"a parameter of shape {tuple(p.shape)}"


GTP_ATTRIBUTES = ("is_gtp_weight_remat", "group", "pad_length", "gtp_remat_size")
"""What says how Megatron's GTP weight remat holds a weight (:func:`gtp_split`)."""


def gtp_split(p: torch.Tensor, name: str | None = None) -> Split | None:
    """The GTP weight remat split of ``p`` (its pieces of the TP block along dim 0, over its ``group``), None when
    p is not GTP-split; a ValueError naming p when its attributes do not describe one (local and alike on every
    rank: all ranks hold the same attributes)."""
    if getattr(p, "is_gtp_weight_remat", False) is not True:
        return None
    label = _label(p, name)
    group, pad = getattr(p, "group", None), getattr(p, "pad_length", 0)
    if not isinstance(group, comm.ProcessGroup):
        raise ValueError(f"{label} is split by Megatron's GTP weight remat (is_gtp_weight_remat=True) but carries no "
                         f"process group as .group (got {type(group).__name__}): dist_ortho cannot tell which ranks "
                         "hold its other pieces")
    if p.ndim != 2:
        raise ValueError(f"{label} is split by GTP weight remat with {p.ndim} dims: only 2D weights are read")
    size, rows = comm.group_size(group), p.size(0)
    if type(pad) is not int or not 0 <= pad <= size * rows:
        raise ValueError(f"{label}: GTP pad_length={pad!r} does not fit {size} pieces of {rows} rows")
    if size == 1:
        return None
    real = size * rows - pad  # rows of the TP block; rank g holds [g rows, (g + 1) rows) of it padded
    extents = tuple(min(rows, max(0, real - g * rows)) for g in range(size))
    return Split("pieces", 0, group, extents, held=rows)


def unreadable(p: torch.Tensor, name: str | None = None) -> str | None:
    """Why the attributes on ``p`` describe a holding dist_ortho cannot read (a ValueError's text), or None. Local:
    every rank holds the same attributes, so every rank raises alike, before any collective."""
    try:
        gtp_split(p, name)
    except ValueError as error:
        return str(error)
    return None


def tp_group_of(p: torch.Tensor, tp_group: comm.ProcessGroup | None, expert_tp_group: comm.ProcessGroup | None,
                name: str | None, blockwise: bool, partition_dim: int | None = None) -> comm.ProcessGroup | None:
    """The group of p's TP split (None: whole on every rank); raises ValueError for attributes that cannot be
    stepped exactly. A sharded parameter with no group to reduce over is an error, unless ``blockwise`` (the
    caller opted into shard-by-shard, inexact, behaviour: ``tp_mode="blockwise"``): then each shard is a matrix.
    ``partition_dim``: the matrix dim of a stack of experts (its attribute is a tensor dim)."""
    pd = getattr(p, "partition_dim", -1) if partition_dim is None else partition_dim
    if getattr(p, "tensor_model_parallel", False) is not True or pd not in (0, 1):
        return None
    label = _label(p, name)
    stride = getattr(p, "partition_stride", 1)
    if stride != 1 and getattr(p, "is_qkv", False):
        raise ValueError(
            f"{label} is a fused QKV weight with partition_stride={stride}: its Q/K/V rows are not laid out per query "
            "group in the shards, so they cannot be split; use partition_stride=1 or split_qkv=False"
        )
    expert = getattr(p, "expert_tp", False)
    if expert and expert_tp_group is None and tp_group is not None:
        raise ValueError(
            f"{label} is an expert weight (expert_tp=True) but no expert_tp_group was given: pass "
            "expert_tp_group= (Megatron: pg_collection.expt_tp); the dense tp_group is not used for experts"
        )
    group = expert_tp_group if expert else tp_group
    if group is None and not blockwise:
        which = "expert_tp_group" if expert else "tp_group"
        raise ValueError(
            f"{label} is tensor-parallel (tensor_model_parallel=True, partition_dim={p.partition_dim}) but no {which} "
            f"was given: pass {which}= (Megatron: pg_collection), or tp_mode='blockwise' to orthogonalize each "
            "shard alone (not exact: the update then changes with the TP size)"
        )
    return group


def read_attributes(p: torch.Tensor, view: torch.Tensor, tp_group: comm.ProcessGroup | None,
                    expert_tp_group: comm.ProcessGroup | None, blockwise: bool = False, name: str | None = None,
                    partition_dim: int | None = None) -> Reading:
    """The holding of ``view`` (p's matrix view: 2D, or a batch of matrices) from p's attributes: its TP split
    along matrix dim ``partition_dim`` (default p's, for 2D weights; given for a stack of experts, whose own is a
    tensor dim) and, under GTP weight remat, its pieces of the TP block. With ``blockwise`` and no group, a shard is
    read as a whole matrix."""
    group = tp_group_of(p, tp_group, expert_tp_group, name, blockwise, partition_dim)
    splits = []
    if group is not None and comm.group_size(group) > 1:
        if p.ndim != 2 and partition_dim is None:
            raise ValueError(f"{_label(p, name)} is tensor-parallel with {p.ndim} dims: only 2D weights can be sharded")
        pd = p.partition_dim if partition_dim is None else partition_dim
        splits.append(Split("tp", view.ndim - 2 + pd, group))
    local_shape = list(view.shape)
    gtp = gtp_split(p, name)
    if gtp is not None:
        splits.append(gtp)
        local_shape[0] = gtp.extents[gtp.rank]  # type: ignore[index]
    return Reading(tuple(splits), tuple(local_shape))


def held_like_param(p: torch.Tensor, group: comm.ProcessGroup | None) -> Held:
    """How ``group`` holds a tensor shaped like parameter ``p`` (equal blocks when p is sharded)."""
    return Held(p.partition_dim, group) if is_sharded(p) and comm.group_size(group) > 1 else REPLICATED_HELD


def find_layouts(
    views: Sequence[tuple[torch.Tensor, torch.Tensor]],
    tp_group: comm.ProcessGroup | None,
    expert_tp_group: comm.ProcessGroup | None = None,
    shard_local: Sequence[bool] | None = None,
    names: Sequence[str | None] | None = None,
) -> list[Layout]:
    """The layout of each (parameter, matrix view of it) read from its attributes: one shape exchange per process
    group and level (dist_ortho.parameters.layout.exchange_extents).

    ``shard_local[i]``: view i may be treated as a whole matrix when its group is missing (blockwise).
    ``names[i]``: the parameter's name, for messages. Raises the same ValueError on every rank when the ranks'
    blocks do not fit one global matrix."""
    local = shard_local if shard_local is not None else [False] * len(views)
    labels = list(names) if names is not None else [None] * len(views)
    readings = [read_attributes(p, view, tp_group, expert_tp_group, ok, name)
                for (p, view), ok, name in zip(views, local, labels)]
    return exchange_extents(readings, labels)
