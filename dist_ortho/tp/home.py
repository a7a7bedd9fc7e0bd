"""``home``: each sharded matrix is orthogonalized once, on one rank of its TP group.

Matrices are assigned to home ranks by longest-processing-time-first on the cost
max(m, n) * min(m, n)^2 (per matrix of a batch). One all-to-all brings every shard to its matrix's
home, the home runs the one-device Newton-Schulz on the whole matrix, and a second all-to-all returns
each rank its block. Per-rank compute is about total / t (not t-fold redundant as in duplicated mode),
communication is two all-to-alls for all the matrices of a step, and the result is bit-identical to
duplicated mode when same-shape matrices are not batched (``NsSpec.batch=False``: the same one-device
iteration on the same gathered matrix); batched, the two agree to rounding (a batched matmul may round
differently from single ones, and the batches differ: a home batches only the matrices it owns). A batch of
matrices (a 3D job: a group of same-shape weights, or experts) is spread over the homes matrix by matrix.
Extra memory on a home: its matrices, whole.
"""

from __future__ import annotations

import functools
import heapq
import math
from collections.abc import Sequence

import torch

from dist_ortho import comm
from dist_ortho.comm.coalesce import AllToAll, Program
from dist_ortho.tp.jobs import MatrixJob, own_block
from dist_ortho.tp.local import local_many


def ns_cost(shape: Sequence[int]) -> int:
    """max(m, n) * min(m, n)^2 per matrix, times the batch."""
    m, n = shape[-2], shape[-1]
    return math.prod(shape[:-2]) * max(m, n) * min(m, n) ** 2


def assign_homes(costs: Sequence[float], size: int, loads: Sequence[float] | None = None) -> list[int]:
    """Longest-processing-time-first: the costliest matrix first, each to the least-loaded rank (ties: lowest),
    starting from ``loads`` (zero by default). A heap of (load, rank): O(n log size), for planning at scale."""
    heap = [(float(load), r) for r, load in enumerate(loads if loads is not None else [0.0] * size)]
    heapq.heapify(heap)
    homes = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, home = heapq.heappop(heap)
        homes[i] = home
        heapq.heappush(heap, (load + costs[i], home))
    return homes


@functools.lru_cache(maxsize=64)
def _homes(matrices: tuple[tuple[int, int, int], ...], size: int) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """Per job (global rows, cols, batch count), per rank: the job's matrices whose home it is (balanced over all
    matrices of all jobs by :func:`assign_homes`; cached, since a step's jobs repeat)."""
    costs = [float(max(m, n) * min(m, n) ** 2) for m, n, count in matrices for _ in range(count)]
    flat = assign_homes(costs, size)
    out, start = [], 0
    for _, _, count in matrices:
        mine = flat[start : start + count]
        out.append(tuple(tuple(b for b, h in enumerate(mine) if h == r) for r in range(size)))
        start += count
    return tuple(out)


@functools.lru_cache(maxsize=4096)
def _index(which: tuple[int, ...], device: torch.device) -> slice | torch.Tensor:
    """Batch positions ``which`` as a slice where they are evenly spaced (a view), else an index tensor (made
    once: a step then copies nothing from the host)."""
    step = which[1] - which[0] if len(which) > 1 else 1
    if step > 0 and all(b - a == step for a, b in zip(which, which[1:])):
        return slice(which[0], which[-1] + 1, step)
    return torch.tensor(which, device=device)


def _flat(parts: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return torch.cat([p.reshape(-1) for p in parts]) if parts else like.new_empty(0)


def job_homes(jobs: Sequence[MatrixJob]) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """Per job, per rank of the jobs' group: the batch positions of the job's matrices whose home that rank is."""
    size = comm.group_size(jobs[0].group)
    shapes = []
    for job in jobs:
        shape = list(job.x.shape if job.x.ndim == 3 else (1, *job.x.shape))
        shape[1 + job.partition_dim] = sum(job.shard_sizes)
        shapes.append((shape[1], shape[2], shape[0]))
    return _homes(tuple(shapes), size)


def program(jobs: Sequence[MatrixJob], homes: Sequence[tuple[tuple[int, ...], ...]] | None = None) -> Program[list[torch.Tensor]]:
    """Program orthogonalizing the jobs of one group and dtype at their home ranks; their blocks, in order.

    A job may be a batch (3D): each of its matrices has a home of its own (``homes``, as :func:`job_homes`
    gives them; by default balanced over these jobs)."""
    group = jobs[0].group
    size, rank = comm.group_size(group), comm.group_rank(group)
    xs = [job.x if job.x.ndim == 3 else job.x.unsqueeze(0) for job in jobs]
    dims = [1 + job.partition_dim for job in jobs]  # the sharded tensor dim of each 3D x
    sizes = [job.shard_sizes for job in jobs]
    shapes = [list(x.shape) for x in xs]
    for shape, d, s in zip(shapes, dims, sizes):
        shape[d] = sum(s)
    homes = homes if homes is not None else job_homes(jobs)
    like = xs[0]

    def shard_numel(i: int, r: int) -> int:  # elements of one matrix of job i held by rank r
        return math.prod(shapes[i][1:]) // shapes[i][dims[i]] * sizes[i][r]

    send = [_flat([x[_index(homes[i][j], x.device)] for i, x in enumerate(xs) if homes[i][j]], like) for j in range(size)]
    recv = [sum(len(homes[i][rank]) * shard_numel(i, j) for i in range(len(jobs))) for j in range(size)]
    received = yield AllToAll(send, recv, group)

    mine = [i for i in range(len(jobs)) if homes[i][rank]]
    fulls, offsets = [], [0] * size
    for i in mine:
        count, pieces = len(homes[i][rank]), []
        for j in range(size):
            shape = list(shapes[i])
            shape[0], shape[dims[i]] = count, sizes[i][j]
            n = math.prod(shape)
            pieces.append(received[j][offsets[j] : offsets[j] + n].view(shape))
            offsets[j] += n
        fulls.append(torch.cat(pieces, dim=dims[i]))
    outs = dict(zip(mine, local_many(fulls, [jobs[i].ns for i in mine])))

    back = [_flat([own_block(outs[i], jobs[i].partition_dim, j, sizes[i]) for i in mine], like) for j in range(size)]
    back_recv = [sum(len(homes[i][h]) * shard_numel(i, rank) for i in range(len(jobs))) for h in range(size)]
    received = yield AllToAll(back, back_recv, group)

    results, offsets = [], [0] * size
    for i, x in enumerate(xs):
        out = torch.empty_like(x)
        for h in range(size):
            which = homes[i][h]
            if not which:
                continue
            n = len(which) * x[0].numel()
            piece = received[h][offsets[h] : offsets[h] + n].view(len(which), *x.shape[1:])
            offsets[h] += n
            out[_index(which, x.device)] = piece
        results.append(out if jobs[i].x.ndim == 3 else out[0])
    return results


def home_extra_bytes(shapes: Sequence[Sequence[int]], size: int, element_size: int) -> list[int]:
    """Per rank, the bytes of the whole matrices it holds as their home (the mode's extra memory)."""
    homes = assign_homes([ns_cost(s) for s in shapes], size)
    extra = [0] * size
    for shape, home in zip(shapes, homes):
        extra[home] += math.prod(shape) * element_size
    return extra
