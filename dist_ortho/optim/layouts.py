"""How each parameter of an optimizer is held, found once for all of them at its first step.

For every parameter: how this rank holds it (a dist_ortho.parameters.layout.Layout read from its TE/Megatron attributes or its
DTensor placements), the block the step runs on (its TP block: :meth:`Layout.compute`), its fused-QKV components
(dist_ortho.parameters.qkv), and its owner: the rank of its owner group (the group whose ranks hold it in pieces, e.g. FSDP's or
Megatron GTP's, or the DP group that replicates it) that steps it (dist_ortho.parameters.grid). Reading is local; finding the extents
takes one shape exchange per process group and level, and checking the grid one more, so every rank then holds the
same layouts and an error found after it is raised alike on every rank.

HSDP (a DTensor replicated over one DP mesh dim and in pieces over another, e.g. (Replicate(), Shard(0)) on
("dp_replicate", "fsdp"), with or without TP): the owner group is the replicas x pieces grid of this TP rank (one
group over both, made once: dist_ortho.parameters.grid.grid_group), so each matrix is stepped once in the world, by one rank
of one replica, from its own replica's gradient pieces (FSDP2 all-reduces them over the replicas in backward: every
replica holds the same, nothing is reduced again), and every rank of every replica gets its piece of the result in
the same all-to-all (dist_ortho.parameters.pieces.Spread). Owners are balanced over grid places (replica, piece rank), so the
TP ranks of a matrix own it at the same place. A stack of experts whose DP ranks hold whole experts of their own
(FSDP's Shard(0) / strided shard over efsdp) and that is replicated over another DP dim is owned over that replicas
group: one replica steps it (balanced by cost over the stacks), the others receive it whole, as a weight replicated
over DP does. ``spread_replicas = False`` gives the rule before it (each replica
steps every matrix of its pieces, alike): what the benchmark compares against.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from dist_ortho import comm
from dist_ortho.comm.coalesce import Program
from dist_ortho.parameters import pieces
from dist_ortho.parameters.dtensor import is_dtensor, local, offset_problem, read_dtensor
from dist_ortho.parameters.grid import assign_owners, check_grid, grid_group
from dist_ortho.parameters.layout import Layout, Reading, exchange_extents
from dist_ortho.parameters.protocol import is_expert_stack, read_attributes, unreadable
from dist_ortho.parameters.qkv import head_dim_of, head_split, split_layout


def matrix_view(t: torch.Tensor, conv_mode: str | None) -> torch.Tensor:
    """t as a matrix (2D) or, for ``conv_mode="batched"``, a batch of (out, in) matrices per spatial position."""
    if t.ndim == 2:
        return t
    if conv_mode == "flatten":
        return t.reshape(t.size(0), -1)
    return t.flatten(2).permute(2, 0, 1)


def _ranks(group: comm.ProcessGroup | None) -> tuple[int, ...] | None:
    return tuple(dist.get_process_group_ranks(group)) if comm.group_size(group) > 1 else None


class ParamLayouts:
    """Layouts, fused-QKV parts and grid owners of an optimizer's parameters, and the owner's gathered blocks of
    those held in pieces."""

    def __init__(self, tp_group: comm.ProcessGroup | None, expert_tp_group: comm.ProcessGroup | None,
                 dp_group: comm.ProcessGroup | None, is_qkv: Callable[[torch.Tensor], bool]) -> None:
        self.tp_group, self.expert_tp_group, self.dp_group = tp_group, expert_tp_group, dp_group
        self.expert_dp_group: comm.ProcessGroup | None = None  # the experts' own DP group (see dp_of)
        self.is_qkv = is_qkv
        self.held: dict[torch.Tensor, Layout] = {}  # how this rank holds each parameter
        self.layouts: dict[torch.Tensor, Layout] = {}  # the block the step runs on
        self.parts: dict[torch.Tensor, list[tuple[torch.Tensor, Layout]]] = {}
        self.owners: dict[torch.Tensor, int] = {}
        self.experts: set[torch.Tensor] = set()  # 3D weights [E, out, in]: E matrices each
        self.problems: dict[torch.Tensor, str] = {}  # why this rank cannot step a parameter (raised on every rank)
        self.blocks: dict[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] = {}  # the owner's (values, grad) blocks
        self.owner_groups: dict[torch.Tensor, comm.ProcessGroup | None] = {}  # whose ranks own each parameter
        self.mesh_dims: dict[str, str] = {}  # the optimizer's mesh_dims= (dist_ortho.parameters.dtensor.mesh_role)
        self.spread_replicas = True  # HSDP: owners over replicas x pieces (see the module doc)
        self.grids: dict[torch.Tensor, tuple[tuple[int, ...], ...]] = {}  # HSDP: replicas x pieces ranks (Reading.grid)
        self.spreads: dict[torch.Tensor, pieces.Spread] = {}  # HSDP: where each owner-group rank is
        self.replica_stacks: set[torch.Tensor] = set()  # HSDP: stacks of each rank's own experts, owned over replicas

    def __contains__(self, p: object) -> bool:
        return p in self.layouts

    def find(self, new: Sequence[tuple[torch.Tensor, dict[str, Any]]], names: Callable[[torch.Tensor], str | None],
             is_expert: Callable[[torch.Tensor], bool]) -> None:
        """Layouts, parts and owners of the ``new`` (parameter, group) pairs (collectives: see the module doc)."""
        for p, _ in new:  # before any collective (a wrapper may have put new tensors into the groups)
            problem = unreadable(p, names(p))
            if problem is not None:
                raise ValueError(problem)
        self.experts.update(p for p, _ in new if is_expert_stack(p, names(p)) or is_expert(p))
        readings = [self._read(p, group, names(p)) for p, group in new]
        self.grids.update((p, r.grid) for (p, _), r in zip(new, readings) if r.grid is not None)
        first = not self.held
        if first:
            check_grid(self.tp_group, self.dp_group)
        for group in self._new_piece_groups(readings):
            check_grid(self.expert_tp_group if group in self._expert_groups(new, readings) else self.tp_group, group)
        exchanged: dict[int, str] = {}  # raised on every rank by the plan's agreement, as the readings' problems
        found = exchange_extents(readings, [names(p) for p, _ in new], exchanged)
        for i, ((p, _), reading, layout) in enumerate(zip(new, readings, found)):
            self.held[p] = layout
            self.layouts[p] = layout.compute()
            problem = reading.problem or exchanged.get(i) or (
                offset_problem(p, layout, names(p)) if is_dtensor(p) else None)
            if problem is not None:
                self.problems[p] = problem
        for p, group in new:  # every rank has the same layouts now: errors are alike
            self._split(p, group, names(p))
        self._own([p for p, _ in new])

    def _read(self, p: torch.Tensor, group: dict[str, Any], name: str | None) -> Reading:
        expert = p in self.experts
        if is_dtensor(p):
            return read_dtensor(p, self.tp_group, self.dp_of(p), self.expert_tp_group, expert, name, self.mesh_dims)
        blockwise = group["tp_mode"] == "blockwise"
        if not expert:
            return read_attributes(p, matrix_view(p.detach(), group["conv_mode"]), self.tp_group, self.expert_tp_group,
                                   blockwise, name)
        partition_dim = None
        if getattr(p, "tensor_model_parallel", False) is True:  # an expert weight's partition_dim is a tensor dim
            if getattr(p, "partition_dim", -1) not in (1, 2):
                raise ValueError(f"an expert weight [E, out, in] of shape {tuple(p.shape)} must be sharded along dim 1 "
                                 f"or 2 (its matrices' rows or columns), got partition_dim={p.partition_dim}")
            partition_dim = p.partition_dim - 1
        return read_attributes(p, p.detach(), self.tp_group, self.expert_tp_group, blockwise, name, partition_dim)

    def _new_piece_groups(self, readings: Sequence[Reading]) -> list[comm.ProcessGroup]:
        """The groups over which ``readings`` hold matrices in pieces that no parameter did before, in the order
        first seen (the same on every rank)."""
        known = {_ranks(g) for g in self.owner_groups.values()} | {_ranks(self.dp_group), _ranks(self.expert_dp_group)}
        out = []
        for reading in readings:
            for split in reading.splits:
                if split.kind == "pieces" and split.size > 1 and _ranks(split.group) not in known:
                    known.add(_ranks(split.group))
                    out.append(split.group)
        return out

    def _expert_groups(self, new: Sequence[tuple[torch.Tensor, dict[str, Any]]], readings: Sequence[Reading]) -> list:
        """The pieces groups of the expert weights among ``new`` (checked against the expert TP group)."""
        return [s.group for (p, _), r in zip(new, readings) for s in r.splits
                if s.kind == "pieces" and (p in self.experts or getattr(p, "expert_tp", False))]

    def owner_group(self, p: torch.Tensor) -> comm.ProcessGroup | None:
        """The group whose ranks own p (one of them steps it and keeps its state; see the module doc): its pieces'
        group, the DP group of a stack whose DP ranks each hold their own experts, or the DP group that replicates
        it; None when every rank holding it steps it (replicated without a DP group, or TP-split only)."""
        return self.owner_groups[p]

    def _spread(self, p: torch.Tensor) -> tuple[comm.ProcessGroup, pieces.Spread] | None:
        """HSDP: p's owner group over replicas x pieces and where each of its ranks is (see the module doc), or None
        (not replicated beside its pieces, or ``spread_replicas`` off). Makes the group at its first use."""
        grid = self.grids.get(p)
        if not self.spread_replicas or grid is None or self.held[p].pieces is None or len(grid) < 2 or self.dp_local(p):
            return None
        ranks = sorted(r for row in grid for r in row)
        place = {r: (replica, piece) for replica, row in enumerate(grid) for piece, r in enumerate(row)}
        return grid_group(ranks), pieces.Spread(tuple(place[r][1] for r in ranks), tuple(place[r][0] for r in ranks))

    def _own(self, new: Sequence[torch.Tensor]) -> None:
        """Owners, balanced by Newton-Schulz cost (LPT) within each owner group over its parameters in order; over
        an HSDP grid by place (replica, piece rank), the same for every TP rank of a matrix."""
        def shapes(p: torch.Tensor) -> list[tuple[int, ...]]:
            return [layout.shape for _, layout in self.parts.get(p, [])] or [self.layouts[p].shape]

        for p in new:
            layout, dp = self.held[p], self.dp_of(p)
            experts = next((s for s in layout.splits if s.kind == "experts" and s.size > 1
                            and _ranks(s.group) == _ranks(dp)), None)
            # replicas over a group other than the DP group (HSDP's outer dim beside a DP group of shards): every
            # replica steps its own, alike
            replicas_apart = _ranks(layout.replicas) not in (None, _ranks(dp))
            replicated = comm.group_size(dp) > 1 and not replicas_apart
            group = (layout.pieces.group if layout.pieces is not None else experts.group if experts is not None
                     else dp if replicated else None)
            if experts is not None and self.spread_replicas and replicas_apart:
                group = layout.replicas  # HSDP over experts of its own: one replica steps the stack, the others get it
                self.replica_stacks.add(p)
            spread = self._spread(p)
            if spread is not None:
                group, self.spreads[p] = spread
            self.owner_groups[p] = group
        by_group: dict[tuple[int, ...] | None, list[torch.Tensor]] = {}
        for p in new:
            by_group.setdefault(_ranks(self.owner_groups[p]), []).append(p)
        for key, members in by_group.items():
            group = self.owner_groups[members[0]]
            own = [p for p in members if self.steps_own(p)]  # every rank its own experts
            self.owners.update((p, comm.group_rank(group)) for p in own)
            shared = [p for p in members if not self.steps_own(p)]
            new_ids = {id(p) for p in shared}
            spread = self.spreads.get(members[0])
            # grid places (replica, piece rank) in order, and the group rank at each (identity without a grid)
            at = (list(range(comm.group_size(group))) if spread is None else
                  sorted(range(len(spread.piece)), key=lambda c: (spread.replica[c], spread.piece[c])))
            place_of = {c: k for k, c in enumerate(at)}
            taken = [(shapes(q), place_of[owner]) for q, owner in self.owners.items()
                     if id(q) not in new_ids and not self.steps_own(q) and _ranks(self.owner_groups[q]) == key]
            places = assign_owners([shapes(p) for p in shared], comm.group_size(group), taken)
            self.owners.update((p, at[k]) for p, k in zip(shared, places))

    @staticmethod
    def ranks(group: comm.ProcessGroup | None) -> tuple[int, ...] | None:
        """A group's ranks (None for a group of one)."""
        return _ranks(group)

    def owner_key(self, p: torch.Tensor) -> tuple[int, ...] | None:
        """The ranks of p's owner group (None: every rank holding p steps it)."""
        return _ranks(self.owner_groups[p])

    def owner_keys(self) -> list[tuple[int, ...]]:
        """The owner groups of the parameters (by their ranks), in the order first seen: the same on every rank of
        each."""
        out: list[tuple[int, ...]] = []
        for group in self.owner_groups.values():
            key = _ranks(group)
            if key is not None and key not in out:
                out.append(key)
        return out

    def _split(self, p: torch.Tensor, group: dict[str, Any], name: str | None) -> None:
        """The parts of p orthogonalized apart (dist_ortho.parameters.qkv): a fused QKV weight's components (``split_qkv``),
        or the heads of a weight given a head_dim (``per_head`` / its ``head_dim`` attribute); else none."""
        fused = group["split_qkv"] and self.is_qkv(p)
        head_dim = None if fused else head_dim_of(p, name, group.get("per_head"))
        if not fused and head_dim is None:
            return
        layout = self.layouts[p]
        device = local(p).device
        if head_dim is not None:
            split = head_split(layout, layout.block_shape()[0], head_dim, name or f"weight of shape {tuple(p.shape)}")
        else:
            name = name or f"fused QKV weight of shape {tuple(p.shape)}"
            shapes = getattr(p, "qkv_split_shapes", None) or group["qkv_split_shapes"]
            if shapes is None:
                raise ValueError(f"{name} is marked as fused QKV but has no qkv_split_shapes (set it on the parameter "
                                 "or pass qkv_split_shapes=)")
            if p.ndim != 2:
                raise ValueError(f"{name}: a fused QKV weight must be 2D, got shape {tuple(p.shape)}")
            split = split_layout(layout, layout.block_shape()[0], shapes, group["qkv_per_head"], name)
        self.parts[p] = [(index.to(device), part) for index, part in split]

    # -- how the step reads each parameter --
    def in_pieces(self, p: torch.Tensor) -> bool:
        """Whether p's TP block is held in pieces over the grid group (gathered to its owner for the step)."""
        return p in self.held and self.held[p].pieces is not None

    def dp_local(self, p: torch.Tensor) -> bool:
        """Whether p is a stack of experts whose DP ranks each hold (and update) experts of their own."""
        layout = self.held.get(p)
        return layout is not None and any(s.kind == "experts" and s.size > 1 and _ranks(s.group) == _ranks(self.dp_of(p))
                                          for s in layout.splits)

    def steps_own(self, p: torch.Tensor) -> bool:
        """Whether every rank steps its own experts of p (a stack split over its DP ranks and not replicated beside
        them; under HSDP one replica steps them, :attr:`replica_stacks`, and shares them with the others)."""
        return self.dp_local(p) and p not in self.replica_stacks

    def dp_of(self, p: torch.Tensor) -> comm.ProcessGroup | None:
        """p's DP group: the experts' own (``expert_dp_group``, where their DTensors shard over another DP dim than
        the dense weights: torchtitan's efsdp beside fsdp) for a stack of experts, else the DP group."""
        return self.expert_dp_group if self.expert_dp_group is not None and p in self.experts else self.dp_group

    def held_apart(self, p: torch.Tensor) -> bool:
        """Whether the step's tensors of p are not p itself: a DTensor's local tensor, or an owner's gathered block."""
        return is_dtensor(p) or self.in_pieces(p)

    def value(self, p: torch.Tensor) -> torch.Tensor:
        """The tensor the step updates for p: p itself, a DTensor's local tensor, or (held in pieces) its TP block:
        the owner's buffer that each step gathers into (before the first gather, a stand-in of its shape)."""
        if p in self.blocks:
            return self.blocks[p][0]
        if self.in_pieces(p):
            return torch.zeros((), dtype=p.dtype, device=local(p).device).expand(pieces.block_shape(self.held[p]))
        return local(p)

    def grad(self, p: torch.Tensor) -> torch.Tensor | None:
        if p in self.blocks:
            return self.blocks[p][1]
        return local(p.grad) if p.grad is not None else None

    def gather(self, params: Sequence[torch.Tensor], owners: Sequence[int], group: comm.ProcessGroup | None,
               values: bool = True) -> None:
        """Every piece of ``params`` (held in pieces over ``group``) to its owner, as one TP block (dist_ortho.parameters.pieces)."""
        pieces.gather_blocks(params, [self.held[p] for p in params], owners, group, self.blocks, values,
                             spreads=[self.spreads.get(p) for p in params])

    def scatter(self, params: Sequence[torch.Tensor], owners: Sequence[int], group: comm.ProcessGroup | None,
                sources: dict[torch.Tensor, torch.Tensor], flag: torch.Tensor | None = None, land: pieces.Land | None = None
                ) -> Program[tuple[torch.Tensor | None, Callable[[torch.Tensor | None], None]]]:
        """Program: the owners' blocks ``sources`` back to every rank's piece (dist_ortho.parameters.pieces.scatter_program)."""
        return pieces.scatter_program(params, [self.held[p] for p in params], owners, group, sources, flag, land,
                                      [self.spreads.get(p) for p in params])
