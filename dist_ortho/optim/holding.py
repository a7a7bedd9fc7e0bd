"""The checkpoint contract of every optimizer: how each state tensor is held across ranks, and who keeps it.

A checkpoint is written with global tensors keyed by parameter name (never by rank), so it loads at any TP
and DP size. For that it asks, per state tensor ``state[p][path...]`` (a split fused weight's component keeps
its own under ``part<i>``, see :func:`state_tensors`):

- :func:`holding`: a :class:`~dist_ortho.parameters.layout.Held` saying how to gather it (like its matrix, along a reduced
  dim, or replicated), or for a stack whose experts are split over ranks a :class:`StackHeld` (which experts this
  rank holds, each held as a Held says). dist_ortho's optimizers declare it (``state_holding``, from each member's
  ``held_state``); a torch optimizer's state is held like its parameter, its ``step`` replicated.
- :func:`owns`: whether this rank keeps it (on the DP x TP grid only the owner replica does; a matrix held in pieces
  only its owner rank, under HSDP one rank of the replicas x shards grid: the other replicas keep none).

dist_ortho.train.checkpoint (torch.distributed.checkpoint) and the Megatron integration
(dist-checkpointing) both read the contract here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch

from dist_ortho import comm
from dist_ortho.comm.coalesce import run
from dist_ortho.parameters.layout import REPLICATED_HELD, Held, Split
from dist_ortho.parameters.protocol import held_like_param
from dist_ortho.tp.jobs import block, gather_program


@dataclass(frozen=True)
class StackHeld:
    """How the ranks hold a state tensor [e, ...] of a stack whose experts are split over ranks: this rank's e experts
    are the range the ``experts`` splits (of tensor dim 0, outermost first, each cutting the range the ones before
    leave: EP's, then FSDP's over experts) leave it, :meth:`first` onward, and each expert's tensor is held as
    ``matrix`` says (its TP split, or whole). The owner of a stack held in pieces keeps its experts' gathered
    block, so this describes the owner's state there too."""

    matrix: Held
    experts: tuple[Split, ...]

    def first(self) -> int:
        """The global index of this rank's first expert."""
        return sum(s.start(s.rank) for s in self.experts)

    def count(self) -> int:
        """How many experts this rank holds."""
        return self.experts[-1].extents[self.experts[-1].rank]

    def to_global(self, t: torch.Tensor) -> torch.Tensor:
        """The whole stack's tensor from this rank's experts' (one all-gather per split, and the matrix's own)."""
        if t.ndim < 1 or t.size(0) != self.count():
            raise ValueError(f"a state tensor of shape {tuple(t.shape)} is not one entry per expert of this rank's "
                             f"{self.count()}: its holding over the expert splits is unknown")
        out = self.matrix.to_global(t)
        for split in reversed(self.experts):
            out = run(gather_program(out, 0, split.group, split.extents))
        return out

    def to_local(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's experts' block of the whole stack's tensor ``full`` (a copy)."""
        for split in self.experts:
            if sum(split.extents) != full.size(0):
                raise ValueError(f"a state tensor of {full.size(0)} experts cannot be cut into {list(split.extents)}")
            full = block(full, 0, split.rank, split.extents)
        return self.matrix.to_local(full)


Holding = Union[Held, StackHeld]
"""What :func:`holding` answers: both gather a rank's tensor (``to_global``) and cut it back (``to_local``)."""


def part_key(number: int) -> str:
    """The state key under which component ``number`` of a split fused weight keeps its own state."""
    return f"part{number}"


def part_of(path: Sequence[str]) -> int | None:
    """The component a state path belongs to (``["part1", "moment2"]`` -> 1), None for the weight's own."""
    return int(path[0].removeprefix("part")) if len(path) == 2 and path[0].startswith("part") else None


def state_tensors(state: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[list[str], Any]]:
    """(path, value) of every entry of a parameter's state, a component's (``part<i>``) included."""
    out = []
    for key, value in state.items():
        if isinstance(value, dict):  # a component of a split fused weight: key part<i>
            out += state_tensors(value, (*prefix, key))
        else:
            out.append(([*prefix, key], value))
    return out


def fallback_holding(p: torch.Tensor, path: Sequence[str], tp_group: comm.ProcessGroup | None) -> Held:
    """How a torch optimizer's (AdamW's) state of ``p`` is held: ``step`` replicated, the rest like p."""
    return REPLICATED_HELD if path[-1] == "step" else held_like_param(p, tp_group)


def holding(optimizer: torch.optim.Optimizer, p: torch.Tensor, path: Sequence[str], tp_group: Any) -> Holding:
    """How the ranks hold ``optimizer``'s state tensor ``path`` of ``p`` (see the module doc)."""
    declared = getattr(optimizer, "state_holding", None)
    return declared(p, list(path)) if declared is not None else fallback_holding(p, path, tp_group)


def owns(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> bool:
    """Whether this rank keeps ``optimizer``'s state of ``p`` (always, for an optimizer without owners)."""
    owner = getattr(optimizer, "owns", None)
    return owner(p) if owner is not None else True


def declares(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> bool:
    """Whether a dist_ortho optimizer (not a torch one) holds ``p``'s state."""
    of = getattr(optimizer, "optimizer_of", None)
    inner = of(p) if of is not None else optimizer
    return hasattr(inner, "held_state")


def declared_holding(optimizer: Any, p: torch.Tensor, path: Sequence[str]) -> Held | StackHeld:
    """How the ranks hold a dist_ortho optimizer's state tensor ``state[p][path[0]]...``: the member's ``held_state``
    for the matrix (or the split component ``part<i>``) it belongs to; for a stack whose experts are split over ranks
    (EP, FSDP over experts) a StackHeld of it. An undeclared key is a KeyError."""
    layout = optimizer.layout(p)
    experts = tuple(s for s in optimizer.layouts.held[p].splits if s.kind == "experts" and s.size > 1)
    part = part_of(path)
    if part is not None:
        layout = optimizer.part_layouts(p)[part]
    held = optimizer.held_state(path[-1], layout, optimizer.group_of(p))
    if held is None:
        raise KeyError(f"{type(optimizer).__name__} does not declare how its state {'/'.join(path)!r} is held")
    return StackHeld(held, experts) if experts else held
