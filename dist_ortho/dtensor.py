"""DTensor parameters (FSDP2 ``fully_shard``, torch tensor parallel ``parallelize_module``): how their
placements hold a matrix, and moving the data-parallel pieces to the matrix's owner and back.

A 2D DTensor parameter lives on a device mesh whose dims are the optimizer's TP group and DP group (by
their ranks; dims of size 1 are ignored). Along the TP mesh dim, ``Shard(k)`` holds the matrix as the
TE/Megatron attributes ``tensor_model_parallel, partition_dim=k`` say (contiguous blocks along matrix dim
k) and ``Replicate`` as a whole matrix. Along the DP mesh dim, ``Replicate`` is plain data parallelism
(DDP, HSDP's replicas) and ``Shard(d)`` / ``_StridedShard(d)`` (FSDP2) splits this rank's TP block into
contiguous ranges along matrix dim d, one per DP rank, uneven or empty as torch.chunk leaves them.

The optimizer then works on the TP block (:attr:`DTensorHolding.block_shape`): for a DP-sharded
parameter, :func:`gather_blocks` brings every piece of an owned parameter's gradient (and, where the
optimizer needs the whole weight, its values) to its owner with one all-to-all per dtype over DP, and
:func:`scatter_program` sends the pieces of the update (or of the new values) back with one more; nothing
else about DTensor reaches the optimizer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.placement_types import Placement

from dist_ortho import comm
from dist_ortho.coalesce import AllToAll, Program
from dist_ortho.grid import _by_dtype


@dataclass(frozen=True)
class DTensorHolding:
    """How this rank holds a DTensor parameter: its TP block (``tp_dim`` the matrix dim split over TP, or
    None) and, with ``dp_dim`` set, the sizes of every DP rank's range of that block along ``dp_dim``."""

    tp_dim: int | None
    dp_dim: int | None
    pieces: tuple[int, ...]  # per DP rank, its extent along dp_dim (the whole block's when dp_dim is None)
    block_shape: tuple[int, ...]
    dp_local: bool = False  # an expert weight split over DP by whole experts: each DP rank updates its own
    expert_tp: bool = False  # an expert weight whose TP dim is the optimizer's expert_tp_group
    problem: str | None = None  # why this rank cannot step it (raised on every rank by the plan's agreement)

    def piece_numel(self, dp_rank: int) -> int:
        other = self.block_shape[1 - self.dp_dim] if self.dp_dim is not None else self.block_shape[1]
        return self.pieces[dp_rank] * other


def is_dtensor(p: torch.Tensor) -> bool:
    return isinstance(p, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The local tensor of a DTensor (shares its storage), or t itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The global tensor of a DTensor (a collective over its mesh), or t itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def piece_of(full: torch.Tensor, mesh: DeviceMesh, placements: Sequence[Placement]) -> torch.Tensor:
    """This rank's local piece of the global tensor ``full`` under ``placements`` on ``mesh`` (any, FSDP2's
    strided shards included; no communication)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(full.shape, mesh, placements)
    return full[tuple(slice(o, o + n) for o, n in zip(offset, shape))]


def _ranks(group: comm.ProcessGroup | None) -> tuple[int, ...] | None:
    return None if group is None else tuple(dist.get_process_group_ranks(group))


def _roles(p: DTensor, tp_group: comm.ProcessGroup | None, dp_group: comm.ProcessGroup | None, label: str) -> dict[str, object]:
    """The placement along the TP and the DP mesh dim (Replicate where the mesh has no such dim)."""
    mesh = p.device_mesh
    tp, dp = _ranks(tp_group), _ranks(dp_group)
    roles: dict[str, object] = {}
    names = mesh.mesh_dim_names or tuple(str(i) for i in range(mesh.ndim))
    for i, placement in enumerate(p.placements):
        if mesh.size(i) == 1:
            continue
        ranks = tuple(dist.get_process_group_ranks(mesh.get_group(i)))
        role = "tp" if ranks == tp else "dp" if ranks == dp else None
        if role is None:
            raise ValueError(
                f"{label} is a DTensor on mesh dim {names[i]!r} (ranks {list(ranks)}), which is neither the "
                f"optimizer's tp_group ({list(tp) if tp else None}) nor its dp_group ({list(dp) if dp else None}) "
                f"on this rank: pass tp_group= and dp_group= as mesh['{names[i]}'].get_group() for the mesh dims "
                "that shard the weight (e.g. device_mesh=mesh with dims named 'dp' and 'tp')"
            )
        roles[role] = placement
    return roles


def _dim(placement: object, role: str, label: str) -> int | None:
    if placement is None or placement.is_replicate():  # type: ignore[attr-defined]
        return None
    dim = getattr(placement, "dim", None)
    strided = type(placement).__name__ == "_StridedShard"
    if placement.is_partial() or dim not in (0, 1) or (strided and role == "tp"):  # type: ignore[attr-defined]
        raise ValueError(
            f"{label} has placement {placement} on its {role.upper()} mesh dim: dist_ortho orthogonalizes a "
            "DTensor exactly when it is Replicate or Shard(0|1) over TP and Replicate, Shard(0|1) or FSDP2's "
            "strided shard over DP"
        )
    return dim


def find_holdings(
    params: Sequence[DTensor], tp_group: comm.ProcessGroup | None, dp_group: comm.ProcessGroup | None,
    names: Sequence[str | None] | None = None,
) -> list[DTensorHolding]:
    """The holding of each DTensor parameter: placements read locally, the DP pieces found by one
    all-gather over ``dp_group`` of every rank's (offset, shape); raises ValueError (alike on every rank
    of the DP group) when a placement or the pieces cannot be handled exactly."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    found, rows = [], []
    for p, name in zip(params, names if names is not None else [None] * len(params)):
        label = f"parameter {name!r}" if name else f"a DTensor of shape {tuple(p.shape)}"
        if p.ndim != 2:
            raise ValueError(f"{label} is a DTensor with {p.ndim} dims: only 2D DTensor weights are orthogonalized; route it to the fallback")
        roles = _roles(p, tp_group, dp_group, label)
        tp_dim, dp_dim = _dim(roles.get("tp"), "tp", label), _dim(roles.get("dp"), "dp", label)
        shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        found.append((label, tp_dim, dp_dim, tuple(shape), _local_problem(p, tuple(shape), label)))
        rows.append([*offset, *shape])
    size = comm.group_size(dp_group)
    table = torch.tensor(rows, dtype=torch.int64).reshape(len(params), 4)
    if size > 1 and any(dp_dim is not None for _, _, dp_dim, _, _ in found):
        table = comm.all_gather(table.reshape(-1), dp_group).reshape(size, len(params), 4).transpose(0, 1)
    else:
        table = table[:, None, :].expand(len(params), size, 4)
    holdings = []
    for (label, tp_dim, dp_dim, shape, problem), pieces in zip(found, table.tolist()):
        if dp_dim is None:
            holdings.append(DTensorHolding(tp_dim, None, (shape[0],) * size, shape, problem=problem))
            continue
        holdings.append(DTensorHolding(tp_dim, dp_dim, _check_pieces(pieces, dp_dim, label), _block(pieces, dp_dim),
                                       problem=problem))
    return holdings


def _local_problem(p: DTensor, shape: tuple[int, ...], label: str) -> str | None:
    """Why this rank's local tensor of ``p`` is not the piece its placements give it (a ``DTensor.from_local``
    with another tensor, or with ``shape=`` that does not match), or None. Found locally; the plan's agreement
    raises it on every rank, before any collective that would move pieces of the wrong size."""
    actual = tuple(local(p).shape)
    if actual == shape:
        return None
    return (f"{label}: this rank's local tensor has shape {actual}, where its placements {tuple(p.placements)} "
            f"on the mesh give {shape} for its global shape {tuple(p.shape)} (was it made by DTensor.from_local "
            "from another tensor, or with a shape= that does not match?)")


_ROLES = {"tp": "tp_group", "dp": "dp_group"}


def mesh_groups(mesh: Any, tp_group: comm.ProcessGroup | None, dp_group: comm.ProcessGroup | None
                ) -> tuple[comm.ProcessGroup | None, comm.ProcessGroup | None]:
    """(tp_group, dp_group) of a DeviceMesh with dims named "tp" and "dp" (either may be absent)."""
    names = tuple(getattr(mesh, "mesh_dim_names", None) or ())
    if not names or set(names) - {"tp", "dp"}:
        raise ValueError(f"device_mesh must have dims named 'dp' and/or 'tp', got {names or 'unnamed dims'}; "
                         "or pass tp_group= and dp_group= instead")
    if tp_group is not None or dp_group is not None:
        raise ValueError("pass either device_mesh= or tp_group=/dp_group=, not both")
    group = {name: mesh[name].get_group() if mesh.ndim > 1 else mesh.get_group() for name in names}
    return group.get("tp"), group.get("dp")


def groups_from_meshes(params: Sequence[torch.Tensor], experts: Sequence[bool]) -> dict[str, comm.ProcessGroup | None]:
    """tp_group, dp_group and expert_tp_group read from the DTensor parameters' meshes, whose dims of size > 1
    must be named "tp", "dp" (or "ep", the experts' own); a 3D expert weight's "tp" is the expert TP group when
    it differs from the dense weights'. Raises ValueError (alike on every rank: meshes are global) when a dim is
    unnamed or named otherwise, or when two parameters disagree, saying which argument to pass instead."""
    found: dict[str, tuple[tuple[int, ...], comm.ProcessGroup]] = {}
    for p, expert in zip(params, experts):
        if not is_dtensor(p):
            continue
        mesh = p.device_mesh
        for i in range(mesh.ndim):
            if mesh.size(i) == 1:
                continue
            name = (mesh.mesh_dim_names or (None,) * mesh.ndim)[i]
            if name == "ep":
                continue
            if name not in _ROLES:
                raise ValueError(
                    f"a DTensor parameter of shape {tuple(p.shape)} is on a mesh dim {name!r}, which does not say "
                    "whether it is tensor or data parallel: name the mesh dims 'tp', 'dp' (and 'ep'), or pass "
                    "device_mesh= (dims 'dp' and 'tp') or tp_group= / dp_group="
                )
            role = "expert_tp_group" if expert and name == "tp" else _ROLES[name]
            group = mesh.get_group(i)
            ranks = tuple(dist.get_process_group_ranks(group))
            if role in found and found[role][0] != ranks:
                raise ValueError(f"the DTensor parameters' '{name}' mesh dims are different groups "
                                 f"({list(found[role][0])} and {list(ranks)}): pass {role}= explicitly")
            found[role] = (ranks, group)
    groups = {role: value[1] for role, value in found.items()}
    if "expert_tp_group" in groups and "tp_group" in found and found["tp_group"][0] == found["expert_tp_group"][0]:
        del groups["expert_tp_group"]  # the experts' TP is the dense one
    return groups


def expert_holding(
    p: DTensor, tp_group: comm.ProcessGroup | None, expert_tp_group: comm.ProcessGroup | None,
    dp_group: comm.ProcessGroup | None, name: str | None,
) -> DTensorHolding:
    """How this rank holds a 3D expert weight [E, out, in]: expert-major placements only. Along a mesh dim named
    "ep", Shard(0) (each rank its own experts, nothing to exchange); along the TP (or expert TP) group, Shard(1|2)
    (its matrices' rows or columns) or Replicate; along the DP group (or a dim named "dp"), Shard(0) (whole
    experts per DP rank: each updates its own) or Replicate (one owner replica, as a 2D weight)."""
    label = f"parameter {name!r}" if name else f"a DTensor of shape {tuple(p.shape)}"
    mesh = p.device_mesh
    names = mesh.mesh_dim_names or tuple(str(i) for i in range(mesh.ndim))
    tp_dim, dp_local, expert_tp = None, False, False
    for i, placement in enumerate(p.placements):
        if mesh.size(i) == 1:
            continue
        ranks = tuple(dist.get_process_group_ranks(mesh.get_group(i)))
        dim = getattr(placement, "dim", None) if placement.is_shard() else None
        where = f"{label} (an expert weight [E, out, in]) has {placement} on mesh dim {names[i]!r}"
        if names[i] == "ep":
            if dim != 0 or type(placement).__name__ == "_StridedShard":
                raise ValueError(f"{where}: over experts it must be Shard(0), whole experts per rank (expert-major)")
        elif ranks in (_ranks(tp_group), _ranks(expert_tp_group)) or names[i] in ("tp", "etp"):
            if not placement.is_replicate() and dim not in (1, 2):
                raise ValueError(f"{where}: over TP it must be Replicate, Shard(1) or Shard(2) (rows or columns)")
            tp_dim = None if placement.is_replicate() else dim - 1
            expert_tp = expert_tp_group is not None and ranks == _ranks(expert_tp_group)
        elif ranks == _ranks(dp_group) or names[i] == "dp":
            if not placement.is_replicate() and (dim != 0 or type(placement).__name__ == "_StridedShard"):
                raise ValueError(f"{where}: over DP it must be Shard(0) (whole experts per rank: expert-major) or "
                                 "Replicate")
            dp_local = dp_local or not placement.is_replicate()
        else:
            raise ValueError(f"{where}, which is neither 'ep', the TP group nor the DP group: name the mesh dims "
                             "'ep', 'tp', 'dp', or pass tp_group= / dp_group= (or device_mesh=)")
    shape = tuple(local(p).shape)
    return DTensorHolding(tp_dim, None, (shape[0],), shape, dp_local=dp_local, expert_tp=expert_tp)


def _check_pieces(pieces: list[list[int]], d: int, label: str) -> tuple[int, ...]:
    """Each DP rank's extent along d, after checking that the non-empty pieces tile one block in rank order."""
    other = 1 - d
    full = [q for q in pieces if q[2 + d] > 0]
    start = full[0][d] if full else 0
    for q in full:
        if q[d] != start or (q[other], q[2 + other]) != (full[0][other], full[0][2 + other]):
            raise ValueError(
                f"{label}: its DP pieces (offset, shape by DP rank: {pieces}) are not consecutive ranges of one TP "
                "block in DP rank order, which dist_ortho cannot reassemble exactly"
            )
        start += q[2 + d]
    return tuple(q[2 + d] for q in pieces)


def _block(pieces: list[list[int]], d: int) -> tuple[int, int]:
    extent = sum(q[2 + d] for q in pieces)
    width = max(q[3 - d] for q in pieces)
    return (extent, width) if d == 0 else (width, extent)


def _piece(block: torch.Tensor, holding: DTensorHolding, dp_rank: int) -> torch.Tensor:
    start = sum(holding.pieces[:dp_rank])
    return block.narrow(holding.dp_dim, start, holding.pieces[dp_rank])


def gather_blocks(
    params: Sequence[DTensor], holdings: Sequence[DTensorHolding], owners: Sequence[int],
    dp_group: comm.ProcessGroup | None, blocks: dict[DTensor, tuple[torch.Tensor, torch.Tensor]], values: bool = True,
) -> None:
    """Fill ``blocks[p] = (values, gradient)`` of this rank's TP block of every parameter this DP rank
    owns, from every DP rank's piece: one all-to-all per dtype (a missing gradient counts as zeros).
    ``values=False``: the gradients only (the values buffer is left as it is). Existing entries of ``blocks``
    are reused as buffers."""
    size, rank = comm.group_size(dp_group), comm.group_rank(dp_group)
    kinds = 2 if values else 1
    for members in _by_dtype(params):
        sent, sent_numels = [], []
        for dest in range(size):  # every destination's pieces, in rank order, packed once
            mine = [i for i in members if owners[i] == dest]
            for i in mine:
                p = params[i]
                grad = local(p.grad) if p.grad is not None else torch.zeros_like(local(p))
                sent += [local(p).reshape(-1), grad.reshape(-1)] if values else [grad.reshape(-1)]
            sent_numels.append(sum(kinds * local(params[i]).numel() for i in mine))
        send = torch.cat(sent) if sent else local(params[members[0]]).new_empty(0)
        owned = [i for i in members if owners[i] == rank]
        recv = [sum(kinds * holdings[i].piece_numel(src) for i in owned) for src in range(size)]
        received = comm.all_to_all(send, sent_numels, recv, dp_group)
        offsets = [0] * size
        for i in owned:
            p, holding = params[i], holdings[i]
            if p not in blocks:
                blocks[p] = tuple(local(p).new_empty(holding.block_shape) for _ in range(2))  # type: ignore[assignment]
            for src in range(size):
                n = holding.piece_numel(src)
                for target in blocks[p] if values else blocks[p][1:]:
                    piece = _piece(target, holding, src)
                    piece.copy_(received[src][offsets[src] : offsets[src] + n].view(piece.shape))
                    offsets[src] += n


Land = Callable[[int, torch.Tensor, torch.Tensor, Optional[torch.Tensor]], None]


def scatter_program(
    params: Sequence[DTensor], holdings: Sequence[DTensorHolding], owners: Sequence[int],
    dp_group: comm.ProcessGroup | None, blocks: dict[DTensor, tuple[torch.Tensor, torch.Tensor]],
    sources: dict[torch.Tensor, torch.Tensor] | None = None, flag: torch.Tensor | None = None, land: Land | None = None,
) -> Program[tuple[torch.Tensor | None, Callable[[torch.Tensor | None], None]]]:
    """Program: send every DP rank its piece of the updated blocks (``sources[p]``, default the owner's block):
    one all-to-all per dtype; with ``flag`` also that value to every rank in the first one. Returns (the flags
    by DP rank, or None; ``write(ok)``, which writes the received pieces into the local tensors: only where the
    device bool ``ok`` is true when given). ``land(i, local, piece, ok)``: what to do with ``params[i]``'s
    received piece instead (the caller's, e.g. apply an update to the local tensor)."""
    size, rank = comm.group_size(dp_group), comm.group_rank(dp_group)
    requests, layouts = [], []
    for members in _by_dtype(params):
        owned = [i for i in members if owners[i] == rank]
        flagged = flag is not None and not requests
        chunks = []
        for dest in range(size):
            sent = [_piece(sources[params[i]] if sources is not None else blocks[params[i]][0], holdings[i], dest).reshape(-1)
                    for i in owned]
            if flagged:
                sent.append(flag.reshape(1).to(local(params[members[0]]).dtype))
            chunks.append(torch.cat(sent) if sent else local(params[members[0]]).new_empty(0))
        recv = [sum(local(params[i]).numel() for i in members if owners[i] == src) + flagged for src in range(size)]
        requests.append(AllToAll(chunks, recv, dp_group))
        layouts.append(members)
    received_by_dtype = yield requests
    flags = torch.stack([r[-1] for r in received_by_dtype[0]]) if flag is not None and requests else None

    def write(ok: torch.Tensor | None = None) -> None:
        for members, received in zip(layouts, received_by_dtype):
            offsets = [0] * size
            for i in members:
                src, mine = owners[i], local(params[i])
                piece = received[src][offsets[src] : offsets[src] + mine.numel()].view(mine.shape)
                if land is not None:
                    land(i, mine, piece, ok)
                else:
                    mine.copy_(piece if ok is None else torch.where(ok, piece, mine))
                offsets[src] += mine.numel()

    return flags, write


class DTensorParams:
    """An optimizer's DTensor parameters: how each is held, a shape-only stand-in of this rank's TP block (with
    the TE attributes that say how it is sharded over TP), and, on the owner during a step, the gathered
    block's values and gradient (buffers reused from step to step)."""

    def __init__(self) -> None:
        self.holdings: dict[torch.Tensor, DTensorHolding] = {}
        self.standins: dict[torch.Tensor, torch.Tensor] = {}
        self.blocks: dict[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] = {}

    def __contains__(self, p: object) -> bool:
        return p in self.holdings

    def add(self, params: Sequence[torch.Tensor], tp_group: comm.ProcessGroup | None,
            dp_group: comm.ProcessGroup | None, names: Sequence[str | None],
            expert_tp_group: comm.ProcessGroup | None = None, experts: Sequence[bool] | None = None) -> None:
        """Find the holdings of the DTensors among ``params`` (one all-gather over DP when DP-sharded); those
        flagged in ``experts`` are 3D expert weights (:func:`expert_holding`)."""
        flags = list(experts) if experts is not None else [False] * len(params)
        found = [(p, name) for p, name, expert in zip(params, names, flags) if is_dtensor(p) and not expert]
        stacks = [(p, name) for p, name, expert in zip(params, names, flags) if is_dtensor(p) and expert]
        holdings = list(zip([p for p, _ in found], find_holdings([p for p, _ in found], tp_group, dp_group,
                                                                 [n for _, n in found]) if found else []))
        holdings += [(p, expert_holding(p, tp_group, expert_tp_group, dp_group, name)) for p, name in stacks]
        for p, holding in holdings:
            standin = torch.zeros((), dtype=p.dtype, device=local(p).device).expand(holding.block_shape)
            if holding.tp_dim is not None:
                standin.tensor_model_parallel, standin.partition_dim = True, holding.tp_dim
                standin.expert_tp = holding.expert_tp
            for attribute in ("is_qkv", "qkv_split_shapes"):
                if hasattr(p, attribute):
                    setattr(standin, attribute, getattr(p, attribute))
            self.holdings[p], self.standins[p] = holding, standin

    def problem(self, p: torch.Tensor) -> str | None:
        """Why this rank cannot step DTensor ``p`` (:func:`_local_problem`), or None."""
        holding = self.holdings.get(p)
        return holding.problem if holding is not None else None

    def dp_local(self, p: torch.Tensor) -> bool:
        """Whether p is an expert weight whose DP ranks each hold (and update) experts of their own."""
        holding = self.holdings.get(p)
        return holding is not None and holding.dp_local

    @staticmethod
    def is_expert_stack(p: torch.Tensor) -> bool:
        """A 3D DTensor on a mesh with a dim named "ep": a weight [E, out, in] of experts."""
        return is_dtensor(p) and p.ndim == 3 and "ep" in (p.device_mesh.mesh_dim_names or ())

    def dp_sharded(self, p: torch.Tensor) -> bool:
        """Whether p's TP block is split over DP (gathered to its owner for the step)."""
        holding = self.holdings.get(p)
        return holding is not None and holding.dp_dim is not None

    def source(self, p: torch.Tensor) -> torch.Tensor:
        """What p's layout is read from: the stand-in of a DTensor, else p."""
        return self.standins.get(p, p)

    def value(self, p: torch.Tensor) -> torch.Tensor:
        """The tensor the step updates for p: p itself, a DTensor's local tensor, or (DP-sharded) its TP block:
        the owner's buffer that each step gathers into, else the stand-in."""
        if p in self.blocks:
            return self.blocks[p][0]
        holding = self.holdings.get(p)
        if holding is not None and holding.dp_dim is None:
            return local(p)
        return self.standins.get(p, p)

    def grad(self, p: torch.Tensor) -> torch.Tensor | None:
        if p in self.blocks:
            return self.blocks[p][1]
        return local(p.grad) if p.grad is not None else None

    def gather(self, params: Sequence[torch.Tensor], owners: Sequence[int], dp_group: comm.ProcessGroup | None,
               values: bool = True) -> None:
        """Every DP piece of ``params`` (DP-sharded) to its owner, as one TP block: see :func:`gather_blocks`."""
        gather_blocks(params, [self.holdings[p] for p in params], owners, dp_group, self.blocks, values)

    def scatter(self, params: Sequence[torch.Tensor], owners: Sequence[int], dp_group: comm.ProcessGroup | None,
                sources: dict[torch.Tensor, torch.Tensor] | None = None, flag: torch.Tensor | None = None,
                land: Land | None = None) -> Program[tuple[torch.Tensor | None, Callable[[torch.Tensor | None], None]]]:
        """Program: the owners' updated blocks back to every DP rank's piece (see :func:`scatter_program`)."""
        return scatter_program(params, [self.holdings[p] for p in params], owners, dp_group, self.blocks, sources, flag,
                               land)
