"""A step's plan: which parameters this replica updates, as groups (stacks) of same-shape ones, with each group's
Newton-Schulz spec and TP mode (``auto`` resolved), made once and reused while nothing that shapes it changes.

:func:`build_stacks` groups parameters (dist_ortho.optim.groups), :func:`resolve_modes` sets each part's spec
and mode (the per-matrix cost model of dist_ortho.tp.cost, with the latency of coalesced collectives shared),
:func:`plan_table` prints what ``tp_mode="auto"`` chose, and :func:`batching_keys` lists the whole-matrix
Newton-Schulz shapes whose batching (dist_ortho.tp.batching) ranks must agree on.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dist_ortho.math.precision import matmul_precision
from dist_ortho.optim.groups import GroupState, ParamStack, Part
from dist_ortho.optim.holding import part_key
from dist_ortho.optim.layouts import ParamLayouts
from dist_ortho.tp import MatrixJob, NsSpec, batching
from dist_ortho.tp.cost import format_plan, plan_row, resolve


@dataclass(eq=False)
class Share:
    """What one owner group moves after a step: its parameters held in pieces (every rank its piece back) and those
    it replicates (the owner's values to every rank), with their owners; and every rank's finite verdict about the
    matrices the group owns, in its first call."""

    group: Any  # the owner group (a process group)
    key: tuple[int, ...]  # its ranks
    sharded: list[torch.Tensor]
    sharded_owners: list[int]
    replicated: list[torch.Tensor]
    replicated_owners: list[int]


@dataclass(eq=False)
class StepPlan:
    """What a step does, made once while its parameters and structural options are unchanged."""

    owned: list[tuple[torch.Tensor, dict[str, Any]]]  # the parameters this rank updates, with their groups
    stacks: list[ParamStack]
    shares: list[Share]  # one per owner group, in the order first seen (the same on every rank)


def build_stacks(params: Sequence[tuple[torch.Tensor, dict[str, Any]]], layouts: ParamLayouts, states: Callable[[], Any],
                 name_of: Callable[[torch.Tensor], str], batched: bool) -> list[ParamStack]:
    """The parameters as stacks of same-shape ones (one each when the member is not ``batched``); ``states()``
    is the optimizer's state mapping (read anew at each refresh: load_state_dict replaces it)."""
    stacks: list[ParamStack] = []
    same: dict[tuple, ParamStack] = {}
    for p, group in params:
        value, layout, parts = layouts.value(p), layouts.layouts[p], layouts.parts.get(p)
        kind = ("experts" if p in layouts.experts else "conv_batched" if p.ndim > 2 and group["conv_mode"] == "batched"
                else "flatten" if p.ndim > 2 else "matrix")
        count = value.size(0) if kind == "experts" else 1
        stacked = batched and kind != "conv_batched"
        signature = tuple((tuple(index.tolist()), part) for index, part in parts) if parts else None
        owner_key = layouts.owner_key(p)
        key = (id(group), tuple(value.shape), value.dtype, value.device, layout, signature, kind, owner_key)
        apart = layouts.held_apart(p)
        if stacked and key in same:
            stack = same[key]
            stack.params.append(p)
            stack.names.append(name_of(p))
            stack.held_apart = stack.held_apart or apart
            continue
        members: list[torch.Tensor] = [p]
        stack = ParamStack(members, group, layout, GroupState(lambda members=members: [states()[q] for q in members]),
                           [], kind=kind, count=count, batched=stacked, names=[name_of(p)], held_apart=apart,
                           owner_key=owner_key)
        if parts:
            stack.parts = [
                Part(index, part, GroupState(lambda members=members, i=i: [states()[q].setdefault(part_key(i), {})
                                                                          for q in members]), number=i)
                for i, (index, part) in enumerate(parts)
            ]
        else:  # the matrices' own state: the weights' (count E for experts: one slice per matrix)
            own = stack.state if count == 1 else GroupState(lambda members=members: [states()[q] for q in members], count)
            stack.parts = [Part(None, layout, own)]
        stacks.append(stack)
        if stacked:
            same[key] = stack
    return stacks


def standin(shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """A tensor of ``shape`` with like's dtype and device and no storage of its own (for cost lookups)."""
    return torch.zeros((), dtype=like.dtype, device=like.device).expand(*shape)


def part_shape(stack: ParamStack, part: Part, local_shape: Sequence[int]) -> tuple[int, ...]:
    """The shape of what a context of ``part`` carries, from a member's local shape."""
    shape = list(stack.view_shape(local_shape))
    if part.index is not None:
        shape[-2] = part.index.numel()
    return tuple(shape)


def _matrix_count(shape: Sequence[int]) -> int:
    count = 1
    for d in shape[:-2]:
        count *= d
    return count


def _sharing(stacks: Sequence[ParamStack], shapes: dict[int, tuple[int, ...]]) -> dict[int, int]:
    """Per part (by id), how many sharded matrices run coalesced with it in its TP group and precision (the
    latency share of ``tp_mode="auto"``)."""
    def key(stack: ParamStack, part: Part) -> tuple | None:
        sharded = part.layout.partition_dim is not None and part.layout.group is not None
        return (id(part.layout.group), stack.options["fp32_matmul_prec"]) if sharded and stack.options["coalesce"] else None

    counts: Counter = Counter()
    for stack in stacks:
        for part in stack.parts:
            counts[key(stack, part)] += _matrix_count(shapes[id(part)])
    return {id(part): counts[key(stack, part)] if key(stack, part) is not None else 1
            for stack in stacks for part in stack.parts}


def resolve_modes(stacks: Sequence[ParamStack], ns_of: Callable[[dict[str, Any]], NsSpec | None],
                  local_of: Callable[[ParamStack], torch.Tensor]) -> list[tuple[ParamStack, Part, MatrixJob, int]]:
    """Set every part's NsSpec and TP mode (``auto`` resolved per matrix under the group's precision, with the
    matrices' latency share); the (stack, part, job stand-in, sharing) of each part that runs Newton-Schulz.
    ``local_of(stack)``: a tensor with a member's local shape, dtype and device."""
    shapes = {id(part): part_shape(stack, part, local_of(stack).shape) for stack in stacks for part in stack.parts}
    shares = _sharing(stacks, shapes)
    out = []
    for stack in stacks:
        like = local_of(stack)
        for part in stack.parts:
            part.ns = ns_of(stack.options)
            if part.ns is None:  # a member without Newton-Schulz
                continue
            layout, shape = part.layout, shapes[id(part)]
            one = shape[-2:] if stack.batched else shape  # auto decides per matrix: all of a batch are alike
            job = MatrixJob(standin(one, like), layout.partition_dim, layout.group,
                            list(layout.sizes) if layout.sizes else None, stack.options["tp_mode"], part.ns)
            with matmul_precision(stack.options["fp32_matmul_prec"]):
                job = resolve(job, shares[id(part)])
            part.mode = job.mode
            out.append((stack, part, job, shares[id(part)]))
    return out


def plan_table(rows: Sequence[tuple[ParamStack, Part, MatrixJob, int]], label: Callable[[torch.Tensor, Part, dict], str]) -> str:
    """Each matrix with its global shape, the mode it runs and the predicted cost per mode."""
    lines = []
    for stack, part, job, shares in rows:
        with matmul_precision(stack.options["fp32_matmul_prec"]):
            for member in stack.params:
                lines.append(plan_row(label(member, part, stack.options), job, shares))
    return format_plan(lines)


def batching_keys(stacks: Sequence[ParamStack], local_of: Callable[[ParamStack], torch.Tensor]) -> list[batching.Key]:
    """The batching keys of the whole matrices that several ranks orthogonalize alike (replicated ones, and
    duplicated mode's gathered ones) or that a home batches, with ``batch_matrices="auto"``."""
    keys = []
    for stack in stacks:
        if stack.options["batch_matrices"] != "auto":
            continue
        value = local_of(stack)
        for part in stack.parts:
            if part.ns is not None and (part.layout.group is None or part.mode in ("duplicated", "home")):
                keys.append(batching.key(part.layout.shape, value.dtype, value.device))
    return keys


def refresh_states(stacks: Sequence[ParamStack]) -> None:
    """Read the members' state dicts again (new plan, or load_state_dict replaced them)."""
    for stack in stacks:
        stack.state.refresh()
        for part in stack.parts:
            if part.state is not None:
                part.state.refresh()
