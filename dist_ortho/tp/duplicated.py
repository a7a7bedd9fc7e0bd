"""``duplicated``: all-gather the shards, run the whole iteration on every rank, keep this rank's block.

One all-gather for all the matrices of a group and dtype; every rank does the full Newton-Schulz of every
matrix (t-fold redundant compute), same-shape matrices batched (dist_ortho.tp.local).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dist_ortho import comm
from dist_ortho.coalesce import AllGather, Program
from dist_ortho.tp.jobs import MatrixJob, own_block, tensor_dim
from dist_ortho.tp.local import local_many


def _padded(x: torch.Tensor, dim: int, largest: int) -> torch.Tensor:
    if x.size(dim) == largest:
        return x
    pad_shape = list(x.shape)
    pad_shape[dim] = largest - x.size(dim)
    return torch.cat([x, x.new_zeros(pad_shape)], dim=dim)


def program(jobs: Sequence[MatrixJob]) -> Program[list[torch.Tensor]]:
    """Program orthogonalizing jobs of one group and dtype; their blocks, in order."""
    group = jobs[0].group
    rank = comm.group_rank(group)
    dims = [tensor_dim(job.x, job.partition_dim) for job in jobs]
    padded = [_padded(job.x, d, max(job.shard_sizes)) for job, d in zip(jobs, dims)]
    stacked = yield [AllGather(p.contiguous(), group) for p in padded]  # bucketed like any requests
    fulls = [
        torch.cat([pieces[r].narrow(d, 0, n) for r, n in enumerate(job.shard_sizes)], dim=d)
        for job, d, pieces in zip(jobs, dims, stacked)
    ]
    outs = local_many(fulls, [job.ns for job in jobs])
    return [own_block(out, job.partition_dim, rank, job.shard_sizes) for out, job in zip(outs, jobs)]
