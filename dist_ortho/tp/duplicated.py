"""``duplicated``: all-gather the shards, run the whole iteration on every rank, keep this rank's block.

One all-gather per matrix (coalesced: one per step); every rank does the full Newton-Schulz, t-fold
redundant compute.
"""

from __future__ import annotations

import torch

from dist_ortho import comm
from dist_ortho.coalesce import Program
from dist_ortho.tp.jobs import MatrixJob, gather_program, local_newton_schulz, own_block, tensor_dim


def program(job: MatrixJob) -> Program[torch.Tensor]:
    sizes = job.shard_sizes
    full = yield from gather_program(job.x, tensor_dim(job.x, job.partition_dim), job.group, sizes)
    return own_block(local_newton_schulz(full, job.ns), job.partition_dim, comm.group_rank(job.group), sizes)
