"""Matrices held in pieces over a group (a layout's "pieces" split: FSDP's shards, Megatron GTP's weight remat,
Megatron-FSDP's buckets): moved to the matrix's owner and back.

Every rank of the pieces group holds consecutive ranges (uneven, empty or followed by padding) of one TP block. The
optimizer steps the TP block on its owner: :func:`gather_blocks` brings every rank's piece of each owned parameter's
gradient (and, where the step reads the whole weight, its values) to the owner with one all-to-all per dtype, and
:func:`scatter_program` sends every rank its piece of the update (or of the new values) with one more. A rank's
piece is its real entries (:func:`piece`); padding is never read or written.

HSDP's replicas (:class:`Spread`): the moving group may be R replicas x the S ranks of the pieces group (owners
spread over both, each matrix stepped once in the world). Its rank c holds piece ``piece[c]`` of replica
``replica[c]``; the owner gathers its block from its own replica's ranks only (every replica holds the same
pieces, the gradients FSDP2 already reduced over the replicas) and sends every rank of every replica its piece.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from dist_ortho import comm
from dist_ortho.comm.coalesce import AllToAll, Program
from dist_ortho.parameters.dtensor import local
from dist_ortho.parameters.grid import _by_dtype
from dist_ortho.parameters.layout import Layout


@dataclass(frozen=True)
class Spread:
    """Where each rank of a moving group (R replicas x S pieces ranks) is: ``piece[c]`` (its rank in its pieces
    group) and ``replica[c]`` of group rank c."""

    piece: tuple[int, ...]
    replica: tuple[int, ...]


def _piece_of(spread: Spread | None, rank: int) -> int:
    """The piece that moving-group rank ``rank`` holds (itself without replicas)."""
    return rank if spread is None else spread.piece[rank]


def _together(spread: Spread | None, a: int, b: int) -> bool:
    """Whether moving-group ranks ``a`` and ``b`` are in one replica (always without replicas)."""
    return spread is None or spread.replica[a] == spread.replica[b]


def piece(t: torch.Tensor, layout: Layout) -> torch.Tensor:
    """This rank's real entries of ``t`` (a parameter or its gradient, held as ``layout`` says): its local tensor
    without the padding that follows them (a view)."""
    t = local(t)
    split = layout.pieces
    if split is None or split.held is None or split.padding == 0:
        return t
    return t.narrow(split.dim, 0, split.extents[split.rank])  # type: ignore[index]


def block_shape(layout: Layout) -> tuple[int, ...]:
    """The shape of the TP block the pieces make (what the owner steps)."""
    split = layout.pieces
    assert split is not None and split.extents is not None
    shape = list(layout.block_shape())
    shape[split.dim] = sum(split.extents)
    return tuple(shape)


def _numel(layout: Layout, rank: int) -> int:
    """Elements of rank ``rank``'s piece of the block."""
    split = layout.pieces
    assert split is not None and split.extents is not None
    shape = list(block_shape(layout))
    shape[split.dim] = split.extents[rank]
    count = 1
    for n in shape:
        count *= n
    return count


def _range(block: torch.Tensor, layout: Layout, rank: int) -> torch.Tensor:
    """Rank ``rank``'s range of the block (a view)."""
    split = layout.pieces
    assert split is not None and split.extents is not None
    return block.narrow(split.dim, split.start(rank), split.extents[rank])


def gather_blocks(
    params: Sequence[torch.Tensor], layouts: Sequence[Layout], owners: Sequence[int], group: comm.ProcessGroup | None,
    blocks: dict[torch.Tensor, tuple[torch.Tensor, torch.Tensor]], values: bool = True,
    grad_of: Callable[[torch.Tensor], torch.Tensor | None] = lambda p: p.grad,
    spreads: Sequence[Spread | None] | None = None,
) -> None:
    """Fill ``blocks[p] = (values, gradient)`` of the TP block of every parameter this rank owns, from every rank's
    piece over ``group`` (their pieces' group, or with ``spreads[i]`` replicas x it: the owner's replica's ranks
    send): one all-to-all per dtype (a missing gradient counts as zeros). ``values=False``: the gradients only (the
    values buffer is left as it is). Existing entries of ``blocks`` are reused as buffers."""
    size, rank = comm.group_size(group), comm.group_rank(group)
    spreads = spreads if spreads is not None else [None] * len(params)
    kinds = 2 if values else 1
    for members in _by_dtype(params):
        sent, sent_numels = [], []
        for dest in range(size):  # every destination's pieces, in rank order, packed once
            mine = [i for i in members if owners[i] == dest and _together(spreads[i], rank, dest)]
            for i in mine:
                value = piece(params[i], layouts[i])
                grad = grad_of(params[i])
                grad = piece(grad, layouts[i]).to(value.dtype) if grad is not None else torch.zeros_like(value)
                sent += [value.reshape(-1), grad.reshape(-1)] if values else [grad.reshape(-1)]
            sent_numels.append(sum(kinds * _numel(layouts[i], _piece_of(spreads[i], rank)) for i in mine))
        send = torch.cat(sent) if sent else local(params[members[0]]).new_empty(0)
        owned = [i for i in members if owners[i] == rank]
        recv = [sum(kinds * _numel(layouts[i], _piece_of(spreads[i], src)) for i in owned
                    if _together(spreads[i], src, rank)) for src in range(size)]
        received = comm.all_to_all(send, sent_numels, recv, group)
        offsets = [0] * size
        for i in owned:
            p, layout = params[i], layouts[i]
            if p not in blocks:
                blocks[p] = tuple(local(p).new_empty(block_shape(layout)) for _ in range(2))  # type: ignore[assignment]
            for src in range(size):
                if not _together(spreads[i], src, rank):
                    continue
                n = _numel(layout, _piece_of(spreads[i], src))
                for target in blocks[p] if values else blocks[p][1:]:
                    range_ = _range(target, layout, _piece_of(spreads[i], src))
                    range_.copy_(received[src][offsets[src] : offsets[src] + n].view(range_.shape))
                    offsets[src] += n


Land = Callable[[int, torch.Tensor, torch.Tensor, Optional[torch.Tensor]], None]


def scatter_program(
    params: Sequence[torch.Tensor], layouts: Sequence[Layout], owners: Sequence[int], group: comm.ProcessGroup | None,
    sources: dict[torch.Tensor, torch.Tensor], flag: torch.Tensor | None = None, land: Land | None = None,
    spreads: Sequence[Spread | None] | None = None,
) -> Program[tuple[torch.Tensor | None, Callable[[torch.Tensor | None], None]]]:
    """Program: send every rank of ``group`` its piece of each owned block ``sources[p]`` (the update, or the new
    values): one all-to-all per dtype; with ``flag`` also that value to every rank in the first one. Returns (the
    flags by rank, or None; ``write(ok)``, which writes the received pieces into the local pieces: only where the
    device bool ``ok`` is true when given). ``land(i, piece, received, ok)``: what to do with ``params[i]``'s
    received piece instead (the caller's, e.g. apply an update to the local piece). ``spreads[i]``: ``group`` is
    replicas x the pieces group of ``params[i]`` (:class:`Spread`): every replica's rank gets its piece."""
    size, rank = comm.group_size(group), comm.group_rank(group)
    spreads = spreads if spreads is not None else [None] * len(params)
    requests, by_dtype = [], []
    for members in _by_dtype(params):
        owned = [i for i in members if owners[i] == rank]
        flagged = flag is not None and not requests
        like = local(params[members[0]])
        chunks = []
        for dest in range(size):
            sent = [_range(sources[params[i]], layouts[i], _piece_of(spreads[i], dest)).reshape(-1) for i in owned]
            if flagged:
                sent.append(flag.reshape(1).to(like.dtype))
            chunks.append(torch.cat(sent) if sent else like.new_empty(0))
        recv = [sum(_numel(layouts[i], _piece_of(spreads[i], rank)) for i in members if owners[i] == src) + flagged
                for src in range(size)]
        requests.append(AllToAll(chunks, recv, group))
        by_dtype.append(members)
    received_by_dtype = yield requests
    flags = torch.stack([r[-1] for r in received_by_dtype[0]]) if flag is not None and requests else None

    def write(ok: torch.Tensor | None = None) -> None:
        for members, received in zip(by_dtype, received_by_dtype):
            offsets = [0] * size
            for i in members:
                src, mine = owners[i], piece(params[i], layouts[i])
                got = received[src][offsets[src] : offsets[src] + mine.numel()].view(mine.shape)
                if land is not None:
                    land(i, mine, got, ok)
                else:
                    mine.copy_(got if ok is None else torch.where(ok, got, mine))
                offsets[src] += mine.numel()

    return flags, write
