"""The checkpoint contract of every optimizer: how each state tensor is held across ranks, and who keeps it.

A checkpoint is written with global tensors keyed by parameter name (never by rank), so it loads at any TP
and DP size. For that it asks, per state tensor ``state[p][path...]`` (a split fused weight's component keeps
its own under ``part<i>``, see :func:`state_tensors`):

- :func:`holding`: a :class:`~dist_ortho.layout.Held` saying how to gather it (like its matrix, along a reduced
  dim, or replicated). dist_ortho's optimizers declare it (``state_holding``, from each member's
  ``held_state``); a torch optimizer's state is held like its parameter, its ``step`` replicated.
- :func:`owns`: whether this rank keeps it (on the DP x TP grid only the owner replica does).

dist_ortho.train.checkpoint (torch.distributed.checkpoint) and the Megatron integration
(dist-checkpointing) both read the contract here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dist_ortho import comm
from dist_ortho.layout import REPLICATED_HELD, Held
from dist_ortho.params import held_like_param


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


def holding(optimizer: torch.optim.Optimizer, p: torch.Tensor, path: Sequence[str], tp_group: Any) -> Held:
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
