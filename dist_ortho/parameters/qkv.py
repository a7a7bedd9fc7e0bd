"""Fused QKV weights: which rows of a shard belong to Q, K and V (and the gate), per query group.

Megatron's ``linear_qkv.weight`` and TransformerEngine's interleaved ``qkv``/``layernorm_qkv`` weights
stack, for each of ng query groups, the rows [q (np/ng * hn), k (hn), v (hn)] (gated attention:
[q, gate (np/ng * hn), k, v]). Q of all groups is one matrix for orthogonalization, K one, V one.

Tensor parallelism shards the rows. Rank r holds the global rows [start_r, start_r + size_r); its rows
of component c are contiguous in the global c matrix (both orders are group-major), so each component
is itself a row-sharded matrix with per-rank sizes computed here, whether a rank holds whole groups
(TP <= ng) or part of one (TP > ng, where some ranks hold no rows of a component).

Separate attention weights (torchtitan's ``wq``, ``wk``, ``wv``: [n_heads * head_dim, dim]) orthogonalized per
head are the same split with one component per ``head_dim`` rows (:func:`head_dim_of` says which weights, from the
optimizers' ``per_head=`` option or a ``head_dim`` attribute): head h is rows [h * head_dim, (h + 1) * head_dim),
a matrix of its own, whose rows TP may hold on one rank (colwise, n_heads % tp == 0) or cut over several (tp >
n_heads), and FSDP's pieces inside a TP block are gathered to its owner first, as for any weight.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from dist_ortho import comm
from dist_ortho.parameters.layout import Layout, tp_layout


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


PerHead = Mapping[str, int]  # parameter-name key -> head_dim (see :func:`per_head_option`)
HEAD_DIM_ATTRIBUTE = "head_dim"


def per_head_option(per_head: object) -> tuple[tuple[str, int], ...] | None:
    """The ``per_head=`` option checked, as (key, head_dim) pairs in the order given (hashable, for plans).

    A key is a parameter-name pattern: dotted segments that must appear consecutively in the name ("wq" matches
    ``layers.0.attention.wq.weight``, "attention.wq" too, "q" does not), or a glob over the whole name when it has
    ``*``, ``?`` or ``[`` (fnmatch, case-sensitive). A head_dim is a positive int."""
    if per_head is None:
        return None
    items = per_head.items() if isinstance(per_head, Mapping) else per_head if isinstance(per_head, tuple) else None
    if items is None:
        raise ValueError(f"per_head must be a mapping of parameter-name keys to head_dim (e.g. {{'wq': 64}}), "
                         f"got {type(per_head).__name__}")
    out = []
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise ValueError(f"per_head must map parameter-name keys to head_dim, got the entry {item!r}")
        key, head_dim = item
        if not isinstance(key, str) or not key.strip("."):
            raise ValueError(f"per_head keys must be non-empty parameter-name patterns (str), got {key!r} "
                             f"({type(key).__name__})")
        out.append((key, _check_head_dim(head_dim, f"per_head[{key!r}]")))
    return tuple(out)


def _check_head_dim(head_dim: object, what: str) -> int:
    if type(head_dim) is not int or head_dim <= 0:
        raise ValueError(f"{what} must be a positive int (the rows of one head), got {head_dim!r}")
    return head_dim


def name_matches(key: str, name: str) -> bool:
    """Whether a ``per_head`` key matches a parameter name (see :func:`per_head_option`)."""
    if any(c in key for c in "*?["):
        return fnmatch.fnmatchcase(name, key)
    have, want = name.split("."), key.strip(".").split(".")
    return any(have[i : i + len(want)] == want for i in range(len(have) - len(want) + 1))


def head_dim_of(p: torch.Tensor, name: str | None, per_head: tuple[tuple[str, int], ...] | None) -> int | None:
    """p's head_dim (None: p is not orthogonalized per head), from its ``head_dim`` attribute and the ``per_head``
    keys matching its name; two that disagree are a ValueError naming p."""
    found: dict[str, int] = {}
    attribute = getattr(p, HEAD_DIM_ATTRIBUTE, None)
    label = name or f"a parameter of shape {tuple(p.shape)}"
    if attribute is not None:
        found[f"its {HEAD_DIM_ATTRIBUTE} attribute"] = _check_head_dim(attribute, f"{label}: {HEAD_DIM_ATTRIBUTE}")
    if name is not None:
        found.update((f"per_head[{key!r}]", head_dim) for key, head_dim in per_head or () if name_matches(key, name))
    if len(set(found.values())) > 1:
        raise ValueError(f"{label}: head_dim given differently by {found}")
    return next(iter(found.values()), None)


def unmatched_keys(per_head: tuple[tuple[str, int], ...] | None, names: Sequence[str]) -> list[str]:
    """The ``per_head`` keys that match none of ``names`` (a misspelt key would otherwise split nothing)."""
    return [key for key, _ in per_head or () if not any(name_matches(key, name) for name in names)]


def check_per_head(p: torch.Tensor, name: str | None, head_dim: int, *, fused: bool, expert: bool) -> None:
    """Refuse, naming p, what cannot be split into heads of ``head_dim`` rows: a fused QKV weight (its heads are
    ``qkv_per_head``'s), a stack of experts, a tensor that is not 2D, Megatron's strided TP shards (rows of several
    heads interleaved by shard), or rows not a multiple of head_dim where the tensor knows its global rows (under
    TP attributes they are known after the layout exchange: :func:`split_layout` checks them there, alike on every
    rank). Reads nothing but p's own shape and attributes: alike on every rank, before any collective."""
    label = name or f"a parameter of shape {tuple(p.shape)}"
    if fused:
        raise ValueError(f"{label} is a fused QKV weight: orthogonalize its heads with qkv_per_head=True, not "
                         "per_head / a head_dim attribute")
    if expert:
        raise ValueError(f"{label} is a stack of experts [E, out, in]: per_head is for 2D attention weights")
    if p.ndim != 2:
        raise ValueError(f"{label}: per_head needs a 2D weight [n_heads * head_dim, dim], got shape {tuple(p.shape)}")
    tp = getattr(p, "tensor_model_parallel", False) is True and getattr(p, "partition_dim", -1) in (0, 1)
    if tp and getattr(p, "partition_stride", 1) != 1:
        raise ValueError(f"{label}: per_head with partition_stride={p.partition_stride}: its shards interleave rows of "
                         "different heads, which cannot be split by head; use partition_stride=1")
    rows_known = not (tp and p.partition_dim == 0)  # a DTensor's shape is the global one
    if rows_known and p.shape[0] % head_dim:
        raise ValueError(f"{label} has {p.shape[0]} rows, not a multiple of the head size {head_dim}")


def head_split(layout: Layout, local_rows: int, head_dim: int, name: str) -> list[tuple[torch.Tensor, Layout]]:
    """The heads of a weight of ``layout`` (this rank holding ``local_rows`` rows of its TP block): each head's row
    indices here and its own global layout (:func:`split_layout` with one component per head)."""
    return split_layout(layout, local_rows, [head_dim], True, name)
