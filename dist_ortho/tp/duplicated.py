"""``duplicated``: all-gather the shards, run the whole iteration on every rank, keep this rank's block.

One all-gather for all the matrices of a group and dtype; every rank does the full Newton-Schulz of every
matrix (t-fold redundant compute), same-shape matrices batched (dist_ortho.tp.local).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dist_ortho import comm
from dist_ortho.comm.coalesce import AllGather, Program
from dist_ortho.tp.jobs import MatrixJob, joined_blocks, own_block, padded_block, tensor_dim
from dist_ortho.tp.local import local_many


def program(jobs: Sequence[MatrixJob]) -> Program[list[torch.Tensor]]:
    """Program orthogonalizing jobs of one group and dtype; their blocks, in order."""
    group = jobs[0].group
    rank = comm.group_rank(group)
    dims = [tensor_dim(job.x, job.partition_dim) for job in jobs]
    # one request per matrix in one round: the engine buckets them like any requests
    stacked = yield [AllGather(padded_block(job.x, d, job.shard_sizes), group) for job, d in zip(jobs, dims)]
    fulls = [joined_blocks(pieces, d, job.shard_sizes) for job, d, pieces in zip(jobs, dims, stacked)]
    outs = local_many(fulls, [job.ns for job in jobs])
    return [own_block(out, job.partition_dim, rank, job.shard_sizes) for out, job in zip(outs, jobs)]
