"""Beyond one TP group: every matrix owned by one data-parallel replica of the DP x TP grid.

Data parallelism replicates each TP group; with gradients averaged over DP (DDP, or :func:`reduce_to_owners`
with ``reduce_grads=True``: half the bytes, since only the owner needs them), every replica
would run the same Newton-Schulz and keep the same state. Instead each parameter (as the set of its TP
shards) gets an owner replica, balanced by Newton-Schulz cost max(m, n) min(m, n)^2 (longest processing
time first, deterministic from the parameters' global shapes and order). Only the owner's TP group
updates it (in any TP mode) and keeps its state; afterwards :func:`share_program` brings every replica's
shards up to date with one all-gather per dtype over the DP group. Per-rank Newton-Schulz work is then
about total / (DP x TP), and optimizer state about 1 / DP of the unsharded optimizer's.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch
import torch.distributed as dist

from dist_ortho import comm
from dist_ortho.comm.coalesce import AllGather, Program
from dist_ortho.parameters.dtensor import is_dtensor
from dist_ortho.parameters.protocol import is_sharded
from dist_ortho.tp.home import assign_homes, ns_cost


def assign_owners(
    shapes: Sequence[Sequence[Sequence[int]]], dp_size: int, taken: Sequence[tuple[Sequence[Sequence[int]], int]] = ()
) -> list[int]:
    """The owning DP rank of each new parameter, given the global matrix shapes it is orthogonalized as;
    ``taken`` lists (shapes, owner) of parameters already owned, which keep their owner and count as load."""
    loads = [0.0] * dp_size
    for matrices, owner in taken:
        loads[owner] += sum(ns_cost(s) for s in matrices)
    return assign_homes([sum(ns_cost(s) for s in matrices) for matrices in shapes], dp_size, loads)


_GRID_GROUPS: dict[tuple[int, tuple[int, ...]], tuple[Any, comm.ProcessGroup]] = {}


def grid_group(ranks: Sequence[int]) -> comm.ProcessGroup:
    """A process group of ``ranks`` (HSDP's replicas x shards of one TP rank: the owners spread over both), made by
    its members only (``use_local_synchronization``: other ranks, e.g. other pipeline stages, call nothing) and once
    per world: the same group for every optimizer that asks (a second group of the same ranks would take the same
    name)."""
    world = dist.distributed_c10d._get_default_group()
    key = (id(world), tuple(sorted(ranks)))
    if key not in _GRID_GROUPS:  # the world kept alive beside its group: its id is not reused while cached
        seconds = comm.timeout_s()  # the store barrier among the members: bounded like the library's waits
        timeout = datetime.timedelta(seconds=seconds) if seconds > 0 else None
        _GRID_GROUPS[key] = (world, dist.new_group(list(key[1]), timeout=timeout, use_local_synchronization=True))
    return _GRID_GROUPS[key][1]


def check_grid(tp_group: comm.ProcessGroup | None, dp_group: comm.ProcessGroup | None) -> None:
    """Raise ValueError unless ``tp_group`` and ``dp_group`` form a DP x TP grid around this rank: they meet
    only here, and the DP groups of this TP group's ranks are disjoint, of one size, and place them at one
    DP rank (the replica index). One object
    all-gather over TP and a flag all-reduce over DP (once, at the first step), so that every rank of both
    groups raises."""
    if comm.group_size(tp_group) == 1 or comm.group_size(dp_group) == 1:
        return
    mine = (tuple(dist.get_process_group_ranks(tp_group)), tuple(dist.get_process_group_ranks(dp_group)))
    views = comm.all_gather_object(mine, tp_group)
    problem = None
    seen: set[int] = set()
    for me, (tp, dp) in zip(mine[0], views):
        if set(tp) & set(dp) != {me} or tp != mine[0]:
            problem = f"rank {me}'s tp_group {list(tp)} and dp_group {list(dp)} must meet in rank {me} alone"
        elif len(dp) != len(mine[1]) or seen & set(dp) or dp.index(me) != views[0][1].index(mine[0][0]):
            problem = (f"the dp_groups of tp_group {list(mine[0])}'s ranks overlap, differ in size or put them at different "
                       f"DP ranks ({[list(d) for _, d in views]})")
        seen |= set(dp)
    flag = comm.all_reduce(torch.tensor([float(problem is not None)], device=comm.collective_device(dp_group)), dp_group, "max")
    if problem is not None or flag.item() > 0:
        raise ValueError(f"tp_group and dp_group do not form a DP x TP grid: {problem or 'on another rank of this dp_group'}")


def grid_sum_problem(named: Sequence[tuple[str, torch.Tensor]], tp_group: comm.ProcessGroup | None,
                     dp_group: comm.ProcessGroup | None) -> str | None:
    """Why :func:`grid_sum` over ``tp_group`` and ``dp_group`` cannot give a norm over these parameters, or None: a
    DTensor on a mesh dim whose ranks are in neither group (HSDP's replica dim beside the FSDP group, experts on a
    DP dim other than the DP group) is held over ranks the sum does not reach, so each rank would count a
    different part of it. Local, from the meshes: alike on every rank."""
    spans = [set(dist.get_process_group_ranks(g)) for g in (tp_group, dp_group) if comm.group_size(g) > 1]
    seen: set[int] = set()  # many parameters share a mesh: each is read once
    for name, p in named:
        mesh = getattr(p, "device_mesh", None)
        if mesh is None or not hasattr(p, "placements") or id(mesh) in seen:
            continue
        seen.add(id(mesh))
        names = mesh.mesh_dim_names or tuple(str(i) for i in range(mesh.ndim))
        for i in range(mesh.ndim):
            if mesh.size(i) == 1:
                continue
            ranks = set(dist.get_process_group_ranks(mesh.get_group(i)))
            if not any(ranks <= span for span in spans):
                return (f"{name} is on mesh dim {names[i]!r} (ranks {sorted(ranks)}), which is within neither the TP "
                        "nor the DP group the gradient norm is summed over (e.g. HSDP's replica dim): its norm is not "
                        "computed here; clip with torch.nn.utils.clip_grad_norm_ on the DTensor gradients (torchtitan's "
                        "dist_utils.clip_grad_norm_ does)")
    return None


def grid_sum(value: torch.Tensor, tp_group: comm.ProcessGroup | None, dp_group: comm.ProcessGroup | None) -> torch.Tensor:
    """The sum of a scalar over the DP x TP grid: one all-reduce over TP and one over DP (tiny)."""
    value = value.reshape(1).clone()
    for group in (tp_group, dp_group):
        if comm.group_size(group) > 1:
            value = comm.all_reduce(value.to(comm.collective_device(group, value.device)), group).cpu()
    return value[0]


def _by_dtype(params: Sequence[torch.Tensor]) -> list[list[int]]:
    """Indices of ``params`` grouped by dtype (one collective per group), in first-seen order."""
    groups: dict[torch.dtype, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault(p.dtype, []).append(i)
    return list(groups.values())


def _padded_parts(tensors: list[torch.Tensor], like: torch.Tensor, length: int) -> list[torch.Tensor]:
    """The tensors flattened, and the zeros that pad them to ``length`` elements: parts to concatenate once."""
    return [*(t.reshape(-1) for t in tensors), like.new_zeros(length - sum(t.numel() for t in tensors))]


Writer = Callable[[Optional[torch.Tensor]], None]


def share_program(
    params: Sequence[torch.Tensor], owners: Sequence[int], dp_group: comm.ProcessGroup | None,
    sources: Sequence[torch.Tensor | None] | None = None, flag: torch.Tensor | None = None,
) -> Program[tuple[torch.Tensor | None, Writer]]:
    """Program: every parameter's owner values to every DP rank (one all-gather per dtype over ``dp_group``).

    Each rank sends the flat concatenation of what it owns (``sources[i]``, default ``params[i]``), padded to
    the largest such buffer; with ``flag`` (a 0-dim tensor) also that value, in the first buffer, so that
    every rank learns every rank's flag (the step's finite decision) in the same call. Returns (the flags by
    DP rank, or None; ``write(ok)``, which copies the owners' values into the parameters this rank does not
    own: only where the device bool ``ok`` is true when given)."""
    size, rank = comm.group_size(dp_group), comm.group_rank(dp_group)
    sent = sources if sources is not None else params
    requests, layouts = [], []
    for members in _by_dtype(params):
        numel = [sum(params[i].numel() for i in members if owners[i] == r) for r in range(size)]
        mine = [sent[i].detach() for i in members if owners[i] == rank]
        parts = _padded_parts(mine, params[members[0]], max(numel))
        if flag is not None and not requests:
            parts.append(flag.reshape(1).to(parts[0].dtype))
        requests.append(AllGather(torch.cat(parts), dp_group))
        layouts.append(members)
    gathered = yield requests
    flags = gathered[0][:, -1] if flag is not None and gathered else None

    def write(ok: torch.Tensor | None = None) -> None:
        for members, stacked in zip(layouts, gathered):
            offsets = [0] * size
            for i in members:
                owner, n = owners[i], params[i].numel()
                if owner != rank:
                    received = stacked[owner, offsets[owner] : offsets[owner] + n].view_as(params[i])
                    target = params[i].detach()
                    target.copy_(received if ok is None else torch.where(ok, received, target))
                offsets[owner] += n

    return flags, write


def verdict_program(flag: torch.Tensor, group: comm.ProcessGroup | None) -> Program[tuple[torch.Tensor, Writer]]:
    """Program: every rank's ``flag`` (a 0-dim tensor: the step's finite verdict) by rank, for an owner group whose
    share has nothing else in its first call (one all-gather of one value); its write does nothing."""
    gathered = yield [AllGather(flag.reshape(1), group)]
    return gathered[0][:, 0], lambda ok=None: None


def reduce_to_owners(
    grads: Sequence[torch.Tensor | None], like: Sequence[torch.Tensor], owners: Sequence[int], dp_group: comm.ProcessGroup | None
) -> list[torch.Tensor | None]:
    """Every gradient averaged over ``dp_group``, returned to its owner only (``None`` elsewhere): one
    reduce-scatter per dtype (each rank sends (DP - 1) / DP of the gradient bytes, half an all-reduce's).

    ``grads[i]`` is this rank's gradient of a tensor shaped and typed like ``like[i]`` (``None``: zeros). Each
    rank's buffer holds, per owner rank, the gradients of the tensors that rank owns, padded to the largest
    owner's share. The caller writes the averages where its gradients live."""
    return start_reduce_to_owners(grads, like, owners, dp_group)()


def start_reduce_to_owners(
    grads: Sequence[torch.Tensor | None], like: Sequence[torch.Tensor], owners: Sequence[int], dp_group: comm.ProcessGroup | None
) -> Callable[[], list[torch.Tensor | None]]:
    """:func:`reduce_to_owners` with its reduce-scatters issued and not waited for: the gradients are read now;
    the returned function waits and gives the averages."""
    size, rank = comm.group_size(dp_group), comm.group_rank(dp_group)
    started = []
    for members in _by_dtype(like):
        per_owner = [[i for i in members if owners[i] == r] for r in range(size)]
        longest = max(sum(like[i].numel() for i in owned) for owned in per_owner)
        owned_grads = [[grads[i] if grads[i] is not None else torch.zeros_like(like[i]) for i in owned] for owned in per_owner]
        # every owner's gradients in rank order, each padded to longest, packed once
        send = torch.cat([part for g in owned_grads for part in _padded_parts(g, like[members[0]], longest)])
        started.append((per_owner[rank], comm.reduce_scatter(send, dp_group, async_op=True)))

    def averages() -> list[torch.Tensor | None]:
        out: list[torch.Tensor | None] = [None] * len(like)
        for mine, handle in started:
            summed = handle.wait() / size
            offset = 0
            for i in mine:
                n = like[i].numel()
                out[i] = summed[offset : offset + n].view_as(like[i])
                offset += n
        return out

    return averages


def counts_in_grid_sum(p: torch.Tensor, tp_group: comm.ProcessGroup | None, dp_group: comm.ProcessGroup | None) -> bool:
    """Whether this rank counts a torch optimizer's parameter in a grid-wide sum: a TP shard (TE attributes)
    on DP rank 0, a DTensor's local piece where it is at coordinate 0 of every mesh dim that replicates it
    (and at rank 0 of the TP or DP group when its mesh has no such dim), anything else on TP and DP rank 0."""
    if not is_dtensor(p):
        return comm.group_rank(dp_group) == 0 and (comm.group_rank(tp_group) == 0 or is_sharded(p))
    mesh, coordinate = p.device_mesh, p.device_mesh.get_coordinate() or []
    spans = {tuple(dist.get_process_group_ranks(mesh.get_group(i))) for i in range(mesh.ndim)}
    for group in (tp_group, dp_group):
        if comm.group_size(group) > 1 and tuple(dist.get_process_group_ranks(group)) not in spans and comm.group_rank(group):
            return False
    return all(c == 0 for c, placement in zip(coordinate, p.placements) if placement.is_replicate())
