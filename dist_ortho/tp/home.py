"""``home``: each sharded matrix is orthogonalized once, on one rank of its TP group.

Matrices are assigned to home ranks by longest-processing-time-first on the cost
max(m, n) * min(m, n)^2 (per matrix of a batch). One all-to-all brings every shard to its matrix's
home, the home runs the one-device Newton-Schulz on the whole matrix, and a second all-to-all returns
each rank its block. Per-rank compute is about total / t (not t-fold redundant as in duplicated mode),
communication is two all-to-alls for all the matrices of a step, and the result is bit-identical to
duplicated mode when same-shape matrices are not batched (``NsSpec.batch=False``: the same one-device
iteration on the same gathered matrix); batched, the two agree to rounding (a batched matmul may round
differently from single ones, and the batches differ: a home batches only the matrices it owns). Extra memory on a home: its matrices, whole.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence

import torch

from dist_ortho import comm
from dist_ortho.coalesce import AllToAll, Program
from dist_ortho.tp.jobs import MatrixJob, own_block, tensor_dim
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


def _shard_shape(x: torch.Tensor, dim: int, size_along: int) -> list[int]:
    shape = list(x.shape)
    shape[dim] = size_along
    return shape


def _flat(parts: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return torch.cat([p.reshape(-1) for p in parts]) if parts else like.new_empty(0)


def program(jobs: Sequence[MatrixJob]) -> Program[list[torch.Tensor]]:
    """Program orthogonalizing the jobs of one group and dtype at their home ranks; their blocks, in order."""
    group = jobs[0].group
    size, rank = comm.group_size(group), comm.group_rank(group)
    dims = [tensor_dim(job.x, job.partition_dim) for job in jobs]
    sizes = [job.shard_sizes for job in jobs]
    shapes = [_shard_shape(job.x, d, sum(s)) for job, d, s in zip(jobs, dims, sizes)]
    homes = assign_homes([ns_cost(s) for s in shapes], size)
    mine = [i for i, h in enumerate(homes) if h == rank]
    like = jobs[0].x

    send = [_flat([job.x for job, h in zip(jobs, homes) if h == j], like) for j in range(size)]
    recv = [sum(math.prod(_shard_shape(jobs[i].x, dims[i], sizes[i][j])) for i in mine) for j in range(size)]
    received = yield AllToAll(send, recv, group)

    fulls = []
    offsets = [0] * size
    for i in mine:
        pieces = []
        for j in range(size):
            shape = _shard_shape(jobs[i].x, dims[i], sizes[i][j])
            n = math.prod(shape)
            pieces.append(received[j][offsets[j] : offsets[j] + n].view(shape))
            offsets[j] += n
        fulls.append(torch.cat(pieces, dim=dims[i]))
    outs = dict(zip(mine, local_many(fulls, [jobs[i].ns for i in mine])))

    back = [_flat([own_block(outs[i], jobs[i].partition_dim, j, sizes[i]) for i in mine], like) for j in range(size)]
    back_recv = [sum(job.x.numel() for job, h in zip(jobs, homes) if h == j) for j in range(size)]
    received = yield AllToAll(back, back_recv, group)

    results = []
    offsets = [0] * size
    for job, h in zip(jobs, homes):
        n = job.x.numel()
        results.append(received[h][offsets[h] : offsets[h] + n].view(job.x.shape).clone())
        offsets[h] += n
    return results


def home_extra_bytes(shapes: Sequence[Sequence[int]], size: int, element_size: int) -> list[int]:
    """Per rank, the bytes of the whole matrices it holds as their home (the mode's extra memory)."""
    homes = assign_homes([ns_cost(s) for s in shapes], size)
    extra = [0] * size
    for shape, home in zip(shapes, homes):
        extra[home] += math.prod(shape) * element_size
    return extra
