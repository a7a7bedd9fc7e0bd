"""DTensor parameters (FSDP2 ``fully_shard``, torch tensor parallel ``parallelize_module``, experts over EP): their
placements read into dist_ortho.parameters.layout's description.

A DTensor parameter lives on a device mesh whose dims (of size > 1) are tensor parallel, data parallel or (for a stack
of experts) expert parallel: a dim whose ranks are the optimizer's ``tp_group`` / ``dp_group`` is that, any other is
known by its name (:data:`MESH_DIM_ROLES`: the names torch's, torchtitan's, Megatron-LM's and Megatron-FSDP's meshes
use); a dim neither given nor named so is refused by name. Along a TP mesh dim, ``Shard(k)`` is the TP split (as the TE/Megatron
attributes ``tensor_model_parallel, partition_dim=k`` say) and ``Replicate`` a whole matrix. Along the DP mesh dim,
``Replicate`` is plain data parallelism (DDP, HSDP's replicas) and ``Shard(d)`` / FSDP2's ``_StridedShard(d)`` cuts
this rank's TP block into consecutive pieces along matrix dim d, one per DP rank in rank order: a "pieces" split,
its extents read from the ranks' real local shapes (torch.chunk's for FSDP2; Megatron-FSDP's row-aligned bucket
views are uneven and may be empty), moved to and from the matrix's owner by dist_ortho.parameters.pieces. The order the shards cut
the tensor in is the mesh's, a strided shard cutting after the later dims' (:func:`read_dtensor`); that the reading
is right is checked against DTensor's own offsets (:func:`offset_problem`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.placement_types import Placement

from dist_ortho import comm
from dist_ortho.comm.coalesce import run
from dist_ortho.parameters.layout import Layout, Reading, Split
from dist_ortho.tp.jobs import gather_program


def is_dtensor(p: torch.Tensor) -> bool:
    return isinstance(p, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The local tensor of a DTensor (shares its storage), or t itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def _held_extents(t: DTensor) -> list[tuple[int, int, list[int]]]:
    """(mesh dim, tensor dim, every rank's extent) of each shard of ``t``, innermost first, read from the ranks'
    real local shapes (one object all-gather per sharded mesh dim): even (torch.chunk) or uneven (Megatron-FSDP)."""
    mesh, block, out = t.device_mesh, list(local(t).shape), []
    for i in reversed(_cuts_after(t)):
        if mesh.size(i) == 1:
            continue
        dim = t.placements[i].dim
        extents = [shape[dim] for shape in comm.all_gather_object(tuple(block), mesh.get_group(i))]
        out.append((i, dim, extents))
        block[dim] = sum(extents)
    return out


def gather_pieces(t: torch.Tensor) -> torch.Tensor:
    """The global tensor of a DTensor whose pieces may be uneven (DTensor.full_tensor assumes torch.chunk's), each
    shard gathered over its mesh dim innermost first; a tensor that is not a DTensor is itself."""
    if not isinstance(t, DTensor):
        return t
    if any(placement.is_partial() for placement in t.placements):
        raise ValueError(f"a DTensor of shape {tuple(t.shape)} with a Partial placement {tuple(t.placements)} is not "
                         "a held tensor: reduce it first")
    piece = local(t)
    for i, dim, extents in _held_extents(t):
        piece = run(gather_program(piece, dim, t.device_mesh.get_group(i), extents))
    return piece


def piece_like(full: torch.Tensor, t: DTensor) -> torch.Tensor:
    """This rank's piece of the global tensor ``full`` as DTensor ``t`` holds its own (uneven pieces too: offsets
    from the ranks' local shapes, one object all-gather per sharded mesh dim)."""
    offset = [0] * full.ndim
    for i, dim, extents in _held_extents(t):
        offset[dim] += sum(extents[: t.device_mesh.get_local_rank(i)])
    return full[tuple(slice(o, o + n) for o, n in zip(offset, local(t).shape))]


def piece_of(full: torch.Tensor, mesh: DeviceMesh, placements: Sequence[Placement]) -> torch.Tensor:
    """This rank's local piece of the global tensor ``full`` under ``placements`` on ``mesh`` (any, FSDP2's
    strided shards included; no communication)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(full.shape, mesh, placements)
    return full[tuple(slice(o, o + n) for o, n in zip(offset, shape))]


def _ranks(group: comm.ProcessGroup | None) -> tuple[int, ...] | None:
    return None if group is None else tuple(dist.get_process_group_ranks(group))


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


MeshRole = Literal["tp", "dp", "ep"]
MESH_DIM_ROLES: dict[str, MeshRole] = {
    "tp": "tp", "etp": "tp",
    # data parallel: plain, FSDP's shards, HSDP's replicas, context parallel (weights replicated over it), and the
    # flattened names of torchtitan (dp_shard_cp, efsdp), Megatron-LM's Megatron-FSDP (dp_cp, outer_fsdp_dp)
    "dp": "dp", "fsdp": "dp", "dp_shard": "dp", "dp_replicate": "dp", "cp": "dp", "dp_cp": "dp", "dp_shard_cp": "dp",
    "efsdp": "dp", "outer_fsdp_dp": "dp",
    "ep": "ep",
}
"""What a mesh dim is by its name, where its ranks are neither the optimizer's tp_group nor its dp_group."""
_ROLES = {"tp": "tp_group", "dp": "dp_group"}

MeshDims = Mapping[str, str]
"""The optimizers' ``mesh_dims=``: a mesh's own dim names -> the names :data:`MESH_DIM_ROLES` knows, e.g.
``{"replica": "dp_replicate", "shard": "fsdp", "model": "tp"}``."""


def check_mesh_dims(mesh_dims: Any) -> dict[str, str]:
    """``mesh_dims`` as a dict, or a TypeError / ValueError naming mesh_dims and what is wrong (before any
    collective: it is an argument)."""
    if mesh_dims is None:
        return {}
    if not isinstance(mesh_dims, Mapping):
        raise TypeError(f"mesh_dims must be a mapping of mesh dim names to role names, got {type(mesh_dims).__name__}")
    for name, known in mesh_dims.items():
        if not isinstance(name, str) or not isinstance(known, str):
            raise TypeError(f"mesh_dims must map str to str, got {name!r}: {known!r}")
        if known not in MESH_DIM_ROLES:
            raise ValueError(f"mesh_dims[{name!r}] = {known!r} is not a mesh-dim role dist_ortho knows: use one of "
                             f"{sorted(MESH_DIM_ROLES)}")
    return dict(mesh_dims)


def mesh_role(name: str | None, mesh_dims: MeshDims | None = None) -> MeshRole | None:
    """The role of mesh dim ``name``: through ``mesh_dims`` (a user's naming) first, else :data:`MESH_DIM_ROLES`."""
    if name is None:
        return None
    return MESH_DIM_ROLES.get((mesh_dims or {}).get(name, name))


def mesh_groups(mesh: Any, tp_group: comm.ProcessGroup | None, dp_group: comm.ProcessGroup | None
                ) -> tuple[comm.ProcessGroup | None, comm.ProcessGroup | None]:
    """(tp_group, dp_group) of a DeviceMesh with dims named "tp" and "dp" (either may be absent)."""
    names = tuple(getattr(mesh, "mesh_dim_names", None) or ())
    if not names or set(names) - {"tp", "dp"}:
        hint = (" (experts over 'ep': leave device_mesh= out, the parameters' own meshes say every group)"
                if "ep" in names else "")
        raise ValueError(f"device_mesh must have dims named 'dp' and/or 'tp', got {names or 'unnamed dims'}{hint}; "
                         "or pass tp_group= and dp_group= instead, or leave them all out where the parameters are "
                         f"DTensors on meshes whose dims are named as {sorted(MESH_DIM_ROLES)} name them")
    if tp_group is not None or dp_group is not None:
        raise ValueError("pass either device_mesh= or tp_group=/dp_group=, not both")
    group = {name: mesh[name].get_group() if mesh.ndim > 1 else mesh.get_group() for name in names}
    return group.get("tp"), group.get("dp")


def groups_from_meshes(params: Sequence[torch.Tensor], experts: Sequence[bool], mesh_dims: MeshDims | None = None,
                       labels: Sequence[str | None] | None = None) -> dict[str, comm.ProcessGroup | None]:
    """tp_group, dp_group, expert_tp_group and expert_dp_group read from the DTensor parameters' meshes, whose dims of
    size > 1 must be named as :data:`MESH_DIM_ROLES` knows them; a 3D expert weight's TP dim is the expert TP group,
    and the DP dim that shards it the expert DP group, when it differs from the dense weights' (one MoE model: dense
    weights FSDP'd over "fsdp", expert stacks over "efsdp"). Of several data-parallel dims (HSDP: replicas and shards), the one that shards the weights
    is the DP group (its ranks own their pieces; every replica of them steps its own, alike); a weight replicated
    over DP dims only gives its dim. Raises ValueError (alike on every rank: meshes are global) when a dim is unnamed
    or named otherwise (``mesh_dims`` maps other names to known ones), or when two parameters disagree, saying which
    argument to pass instead."""
    found: dict[str, tuple[Any, ...]] = {}  # role -> (ranks, group, ranks as a list, mesh dim name)
    replicated: dict[str, tuple[Any, ...]] = {}
    for k, (p, expert) in enumerate(zip(params, experts)):
        if not is_dtensor(p):
            continue
        mesh = p.device_mesh
        label = f"parameter {labels[k]!r}" if labels and labels[k] else f"a DTensor parameter of shape {tuple(p.shape)}"
        for i in range(mesh.ndim):
            if mesh.size(i) == 1:
                continue
            name = (mesh.mesh_dim_names or (None,) * mesh.ndim)[i]
            role = mesh_role(name, mesh_dims)
            if role == "ep":
                continue
            if role is None:
                raise ValueError(
                    f"{label} is on a mesh dim {name!r} (placement {p.placements[i]!r}), which does not say "
                    f"whether it is tensor or data parallel: name the mesh dims as {sorted(MESH_DIM_ROLES)} do, map "
                    f"them with mesh_dims= (e.g. {{{name!r}: 'fsdp'}}), or pass device_mesh= (dims 'dp' and 'tp') or "
                    "tp_group= / dp_group= (the groups of the mesh dims that shard the weights)")
            into = replicated if role == "dp" and p.placements[i].is_replicate() else found
            # an expert stack's own TP group, and its own DP group where it shards over another DP dim than the
            # dense weights do (torchtitan's efsdp beside fsdp; Megatron's expt_dp beside dp_cp)
            key = f"expert_{_ROLES[role]}" if expert and into is found else _ROLES[role]
            group = mesh.get_group(i)
            ranks = tuple(dist.get_process_group_ranks(group))
            if key in into and into[key][0] != ranks:
                fix = ("the expert stacks must shard over one DP group" if key == "expert_dp_group" else
                       f"pass {key}= explicitly")
                raise ValueError(f"the DTensor parameters' {'replicating ' if into is replicated else ''}"
                                 f"{role.upper()} mesh dims are different groups ({list(into[key][2])} on "
                                 f"{into[key][3]!r} and {list(ranks)} on {name!r}, where {label} has placement "
                                 f"{p.placements[i]!r} (placements {tuple(p.placements)})): {fix}")
            into[key] = (ranks, group, list(ranks), name)
    for key, value in replicated.items():
        found.setdefault(key, value)
    groups = {role: value[1] for role, value in found.items()}
    if "expert_tp_group" in groups and "tp_group" in found and found["tp_group"][0] == found["expert_tp_group"][0]:
        del groups["expert_tp_group"]  # the experts' TP is the dense one
    if "expert_dp_group" in groups and ("dp_group" not in found or found["dp_group"][0] == found["expert_dp_group"][0]):
        groups["dp_group"] = groups.pop("expert_dp_group")  # the experts' DP is the dense one, or there is no dense one
    return groups


def is_expert_dtensor(p: torch.Tensor, mesh_dims: MeshDims | None = None) -> bool:
    """A 3D DTensor on a mesh with a dim named "ep" (or mapped to it by ``mesh_dims``): a weight [E, out, in] of
    experts."""
    return is_dtensor(p) and p.ndim == 3 and any(
        (mesh_dims or {}).get(name, name) == "ep" for name in (p.device_mesh.mesh_dim_names or ()))


def _kind(placement: Placement) -> str:
    return "partial" if placement.is_partial() else "replicate" if placement.is_replicate() else (
        "strided" if type(placement).__name__ == "_StridedShard" else "shard")


def _cuts_after(p: DTensor) -> list[int]:
    """The mesh dims of p's shards in the order they cut the global tensor: mesh order, except that FSDP2's strided
    shard (and Megatron-FSDP's ``_shard_order`` on the mesh) cuts after the later mesh dims' shards of the tensor."""
    order = getattr(p.device_mesh, "_shard_order", None)
    dims = [i for i, placement in enumerate(p.placements) if _kind(placement) in ("shard", "strided")]
    if order is not None:
        return [i for i in order if i in dims] + [i for i in dims if i not in order]
    return [i for i in dims if _kind(p.placements[i]) != "strided"] + [i for i in dims if _kind(p.placements[i]) == "strided"]


def _later_cuts(p: DTensor, i: int, dim: int = 0) -> int:
    """Into how many ranges the mesh dims after ``i`` (of size > 1) cut p's tensor dim ``dim``: what FSDP2's strided
    shard on mesh dim ``i`` names its split factor when it cuts after them."""
    n = 1
    for j in range(i + 1, p.device_mesh.ndim):
        if p.device_mesh.size(j) > 1 and _kind(p.placements[j]) in ("shard", "strided") and p.placements[j].dim == dim:
            n *= p.device_mesh.size(j)
    return n


def read_dtensor(p: DTensor, tp_group: comm.ProcessGroup | None, dp_group: comm.ProcessGroup | None,
                 expert_tp_group: comm.ProcessGroup | None = None, expert: bool = False, name: str | None = None,
                 mesh_dims: MeshDims | None = None) -> Reading:
    """The holding of a DTensor parameter read from its placements (extents left to the ranks' exchange).

    Mesh dims of size 1 are ignored; the others must be the optimizer's TP group (``Shard(0|1)``: the TP split, or
    ``Replicate``), its DP group (``Replicate``: replicas; ``Shard(0|1)`` or FSDP2's strided shard: pieces of the TP
    block, consecutive in DP rank order) or, for a stack of experts [E, out, in] (``expert``), a dim named "ep"
    (``Shard(0)``: each rank its own experts); over DP a stack is ``Shard(0)`` or FSDP2's ``_StridedShard(0)`` after
    "ep" (each DP rank updates its own experts, consecutive in the EP rank's block), ``Shard(1|2)`` (pieces of
    every expert) or ``Replicate``, and over TP (or ``expert_tp_group``, or a dim named "etp") ``Shard(1|2)`` or
    ``Replicate``.
    Anything else is a ValueError naming the parameter and the placement (alike on every rank: meshes are global).
    Replicated over one DP dim and in pieces over another (HSDP), the reading also gives the grid of both
    (:func:`_replica_grid`), over which the pieces' owners are spread."""
    label = f"parameter {name!r}" if name else f"a DTensor of shape {tuple(p.shape)}"
    if p.ndim != (3 if expert else 2):
        raise ValueError(f"{label} is a DTensor with {p.ndim} dims: only 2D DTensor weights and 3D stacks of experts "
                         "[E, out, in] are orthogonalized; route it to the fallback")
    mesh = p.device_mesh
    dim_names = mesh.mesh_dim_names or tuple(str(i) for i in range(mesh.ndim))
    tp, dp, etp = _ranks(tp_group), _ranks(dp_group), _ranks(expert_tp_group)
    splits: dict[int, Split] = {}
    replicas, replica_dim, pieces_dim = None, None, None
    for i, placement in enumerate(p.placements):
        if mesh.size(i) == 1:
            continue
        group = mesh.get_group(i)
        ranks, kind, dim = _ranks(group), _kind(placement), getattr(placement, "dim", None)
        where = f"{label} has placement {placement!r} on mesh dim {dim_names[i]!r}"
        named = mesh_role(dim_names[i], mesh_dims)
        # An expert stack's dim named as EP is EP, also where its ranks are the dense TP group's (torchtitan's EP
        # borrows the TP ranks when ep == tp); elsewhere the groups the optimizer was given decide before names do.
        role = ("ep" if expert and named == "ep" else "tp" if ranks in (tp, etp) else "dp" if ranks == dp else named)
        if expert and role == "ep":
            if kind != "shard" or dim != 0:
                raise ValueError(f"{where}: over experts an expert weight [E, out, in] must be Shard(0), whole experts "
                                 "per rank (expert-major)")
            splits[i] = Split("experts", 0, group)
        elif role == "tp" and (ranks in (tp, etp) or expert or tp is None):
            if kind not in ("replicate", "shard") or (kind == "shard" and dim not in ((1, 2) if expert else (0, 1))):
                raise ValueError(f"{where}: over TP it must be Replicate or Shard along a matrix dim "
                                 f"({'Shard(1) or Shard(2)' if expert else 'Shard(0) or Shard(1)'})")
            if kind == "shard":
                splits[i] = Split("tp", dim, group)
        elif role == "dp":
            if kind == "replicate":
                if replicas is not None:
                    raise ValueError(f"{where}: replicated over two data-parallel mesh dims, which dist_ortho does not "
                                     "read yet: flatten them into one")
                replicas, replica_dim = group, i
            elif expert:
                if kind == "strided" and dim == 0 and placement.split_factor != _later_cuts(p, i):
                    raise ValueError(
                        f"{where}: {placement!r}'s split factor is not the {_later_cuts(p, i)} "
                        "range(s) the later mesh dims cut the experts into, so a rank's experts interleave (not "
                        "one range of the stack), which dist_ortho does not read: Shard(0) over ep, then FSDP's "
                        "strided shard over the DP dim")
                if kind in ("shard", "strided") and dim == 0:
                    # whole experts per DP rank; FSDP2's strided shard (torchtitan's experts over efsdp when efsdp x
                    # ep <= E) cuts each EP rank's experts after "ep" does: consecutive ranges of that EP rank's
                    # experts (rank (f, e) holds expert 2e + f at E = 4), as offset_problem checks against
                    # DTensor's own offsets
                    splits[i] = Split("experts", 0, group)
                elif kind == "shard" and dim in (1, 2) and not any(s.kind == "pieces" for s in splits.values()):
                    splits[i] = Split("pieces", dim, group)  # torchtitan's experts over efsdp: rows of each expert
                    pieces_dim = i
                else:
                    raise ValueError(f"{where}: over DP an expert weight must be Shard(0) or FSDP2's strided shard "
                                     "of dim 0 (whole experts per rank: expert-major), Shard(1|2) (ranges of every "
                                     "expert's rows or columns) or Replicate")
            elif kind in ("shard", "strided") and dim in (0, 1):
                if (kind == "strided" and getattr(mesh, "_shard_order", None) is None
                        and placement.split_factor != _later_cuts(p, i, dim)):
                    raise ValueError(
                        f"{where}: {placement!r}'s split factor is not the {_later_cuts(p, i, dim)} range(s) the later "
                        f"mesh dims cut tensor dim {dim} into (placements {tuple(p.placements)}), so a rank's piece is "
                        "not one range of its TP block, which dist_ortho does not read: fully_shard after "
                        "parallelize_module gives the strided shard it reads")
                if any(split.kind == "pieces" for split in splits.values()):
                    raise ValueError(f"{where}: sharded over two data-parallel mesh dims (e.g. HSDP's outer optimizer "
                                     "state sharding), which dist_ortho does not read yet: replicate over the outer one")
                splits[i] = Split("pieces", dim, group)
                pieces_dim = i
            else:
                raise ValueError(f"{where}: over DP it must be Replicate, Shard(0|1) or FSDP2's strided shard")
        else:
            raise ValueError(
                f"{where} (ranks {list(ranks or ())}), which is neither the optimizer's tp_group ({list(tp) if tp else None}) nor its dp_group "
                f"({list(dp) if dp else None}){' nor a dim named ep' if expert else ''} on this rank"
                f"{', nor a dim named as ' + str(sorted(MESH_DIM_ROLES)) if role is None else ''}: pass tp_group= and "
                f"dp_group= as mesh['{dim_names[i]}'].get_group() for the mesh dims that shard the weight (e.g. "
                "device_mesh=mesh with dims named 'dp' and 'tp')")
    ordered = tuple(splits[i] for i in _cuts_after(p) if i in splits)
    _check_order(ordered, f"{label} (placements {tuple(p.placements)})")
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, _ = compute_local_shape_and_global_offset(p.shape, mesh, p.placements)
    # Along a dim that DP pieces cut, the local tensor's own extent is the piece's (uneven ones: Megatron-FSDP), and
    # the ranks' exchange checks that the pieces make the block; along any other dim the placements' shape is
    # exchanged, and a local tensor that is not that piece is this rank's problem, raised on every rank by the
    # plan's agreement before any collective moves pieces of the wrong size.
    actual = local(p).shape
    pieces_dims = {split.dim for split in ordered if split.kind == "pieces"}
    shape = tuple(actual[d] if d in pieces_dims else n for d, n in enumerate(shape))
    grid = _replica_grid(mesh, replica_dim, pieces_dim) if replica_dim is not None and pieces_dim is not None else None
    return Reading(ordered, shape, tuple(p.shape), replicas, _local_problem(p, shape, label), grid)


def _replica_grid(mesh: DeviceMesh, replica_dim: int, pieces_dim: int) -> tuple[tuple[int, ...], ...]:
    """The global ranks of the mesh slice through this rank over ``replica_dim`` x ``pieces_dim``: per replica (in
    its mesh order), the ranks of its pieces group in mesh order (no communication: the mesh is global)."""
    coordinate = mesh.get_coordinate()
    assert coordinate is not None
    index: list[Any] = list(coordinate)
    index[replica_dim] = index[pieces_dim] = slice(None)
    plane = mesh.mesh[tuple(index)]
    if pieces_dim < replica_dim:
        plane = plane.t()
    return tuple(tuple(int(r) for r in row) for row in plane.tolist())


def _check_order(splits: Sequence[Split], label: str) -> None:
    """Pieces of the TP block: a DP split along the TP split's dim must cut after it (FSDP2's strided shard), or the
    TP ranks' rows (columns) interleave and no TP rank holds one block."""
    tp = next((k for k, s in enumerate(splits) if s.kind == "tp"), None)
    for k, split in enumerate(splits):
        if split.kind == "pieces" and tp is not None and k < tp and split.dim == splits[tp].dim:
            raise ValueError(
                f"{label}: its DP shard cuts the matrix along dim {split.dim} before its TP shard does, so no TP rank "
                "holds one block (rows interleave): shard over DP after TP (FSDP2's fully_shard of a "
                "parallelize_module'd model does: a strided shard), or over the other dim")


def layout_offset(layout: Layout) -> tuple[int, ...]:
    """Where this rank's block begins in the global tensor (sum of its ranges' starts along each dim)."""
    offset = [0] * len(layout.shape)
    for split in layout.splits:
        if split.size > 1:
            offset[split.dim] += split.start(split.rank)
    return tuple(offset)


def _chunk_sizes(n: int, parts: int) -> list[int]:
    """torch.chunk's (and DTensor Shard's) extents of n entries cut into ``parts``: ceil(n / parts) each, the last
    ones shorter or empty."""
    step = -(-n // parts) if n else 0
    return [max(0, min(n, (r + 1) * step) - r * step) for r in range(parts)]


def offset_problem(p: DTensor, layout: Layout, name: str | None) -> str | None:
    """Why p's placements put this rank's piece elsewhere than ``layout`` (read from them) says, or None: the check
    that the reading describes what DTensor holds (found locally; raised on every rank by the plan's agreement)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if any(split.kind == "pieces" and split.extents != tuple(_chunk_sizes(sum(split.extents), split.size))
           for split in layout.splits if split.size > 1 and split.extents is not None):
        return None  # uneven pieces (Megatron-FSDP): placed in rank order, as their exchanged extents say
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    if tuple(shape) != tuple(local(p).shape) or tuple(offset) == layout_offset(layout):
        return None
    label = f"parameter {name!r}" if name else f"a DTensor of shape {tuple(p.shape)}"
    return (f"{label}: its placements {tuple(p.placements)} put this rank's piece at {tuple(offset)}, where its ranges "
            f"in rank order begin at {layout_offset(layout)}: not consecutive ranges of one block, which dist_ortho "
            "cannot reassemble")
