"""Fused QKV weights: which rows of a shard belong to Q, K and V (and the gate), per query group.

Megatron's ``linear_qkv.weight`` and TransformerEngine's interleaved ``qkv``/``layernorm_qkv`` weights
stack, for each of ng query groups, the rows [q (np/ng * hn), k (hn), v (hn)] (gated attention:
[q, gate (np/ng * hn), k, v]). Q of all groups is one matrix for orthogonalization, K one, V one.

Tensor parallelism shards the rows. Rank r holds the global rows [start_r, start_r + size_r); its rows
of component c are contiguous in the global c matrix (both orders are group-major), so each component
is itself a row-sharded matrix with per-rank sizes computed here, whether a rank holds whole groups
(TP <= ng) or part of one (TP > ng, where some ranks hold no rows of a component).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dist_ortho import comm
from dist_ortho.layout import Layout, tp_layout


@dataclass(frozen=True)
class QkvPart:
    """One component: this rank's row indices in its shard, every rank's row count, the global row count."""

    index: torch.Tensor
    sizes: list[int]
    rows: int


def qkv_split_shapes(num_attention_heads: int, num_query_groups: int, kv_channels: int, gated: bool = False) -> list[int]:
    """Per-group row counts: [q, k, v], or [q, gate, k, v] with an output gate."""
    if num_attention_heads % num_query_groups:
        raise ValueError(
            f"num_attention_heads={num_attention_heads} must be a multiple of num_query_groups={num_query_groups}"
        )
    q = num_attention_heads // num_query_groups * kv_channels
    return [q, q, kv_channels, kv_channels] if gated else [q, kv_channels, kv_channels]


def qkv_parts(
    rank_rows: Sequence[int], rank: int, split_shapes: Sequence[int], name: str = "a fused QKV weight"
) -> list[QkvPart]:
    """Split a row-sharded fused weight (``rank_rows``: every rank's row count) into its components."""
    split = [int(s) for s in split_shapes]
    if not split or any(s <= 0 for s in split):
        raise ValueError(f"qkv_split_shapes must be positive row counts, got {list(split_shapes)}")
    group_rows, total = sum(split), sum(rank_rows)
    if total % group_rows:
        raise ValueError(
            f"{name} has {total} rows, not a multiple of sum(qkv_split_shapes)={group_rows} ({split}): check "
            "num_attention_heads, num_query_groups, kv_channels (and the output gate)"
        )
    within = torch.arange(total) % group_rows
    owner = torch.repeat_interleave(torch.arange(len(rank_rows)), torch.tensor(list(rank_rows)))
    start = sum(rank_rows[:rank])
    parts = []
    offset = 0
    for rows in split:
        member = (within >= offset) & (within < offset + rows)
        sizes = torch.bincount(owner[member], minlength=len(rank_rows)).tolist()
        index = torch.nonzero(member[start : start + rank_rows[rank]]).flatten()
        parts.append(QkvPart(index, sizes, total // group_rows * rows))
        offset += rows
    return parts


def split_layout(
    layout: Layout, local_rows: int, split_shapes: Sequence[int], per_head: bool, name: str
) -> list[tuple[torch.Tensor, Layout]]:
    """The components of a fused QKV weight of ``layout`` (this rank holding ``local_rows`` rows): for each, this
    rank's row indices and the component's own global layout. ``per_head``: every head (``split_shapes[-1]``
    rows, the kv_channels) is a component of its own."""
    if layout.partition_dim == 0:
        rank_rows, rank = list(layout.sizes), comm.group_rank(layout.group)
    else:
        rank_rows, rank = [local_rows], 0
    shapes = list(split_shapes)
    if per_head:  # every head its own matrix: one "group" of head-sized pieces
        head, rows = shapes[-1], sum(rank_rows)
        if rows % head:
            raise ValueError(f"{name} has {rows} rows, not a multiple of the head size {head}")
        shapes = [head] * (rows // head)
    return [
        (part.index, tp_layout((part.rows, layout.cols), layout.partition_dim, layout.group,
                               part.sizes if layout.partition_dim == 0 else layout.sizes))
        for part in qkv_parts(rank_rows, rank, shapes, name)
    ]
