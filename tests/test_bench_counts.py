"""The benchmarks' collective counts see dist_ortho's own calls: scripts/bench_common.counting_collectives wraps
torch.distributed's functions, and dist_ortho.comm looks them up at each call (it bound torch >= 2.10's
``all_gather_single`` / ``reduce_scatter_single`` at import, so no wrapper saw its all-gathers and reduce-scatters and
the tables' "collectives" and "bytes" columns missed them). World 2: one all-gather of 6 float32 (24 bytes sent to
the other rank) and one reduce-scatter of 8 float32 (half of 32 bytes sent), each counted once."""

from __future__ import annotations

import pathlib
import sys

import pytest
import torch

from dist_ortho import comm
from tests.harness import started_world

SCRIPTS = str(pathlib.Path(__file__).resolve().parent.parent / "scripts")


@pytest.fixture(scope="module")
def world():
    with started_world(2) as w:
        yield w


def _counted(ctx) -> dict:
    if SCRIPTS not in sys.path:
        sys.path.insert(0, SCRIPTS)
    from bench_common import counting_collectives

    out = {}
    with counting_collectives() as counts:
        comm.all_gather(torch.ones(6), ctx.group)
    out["all_gather"] = dict(counts)
    with counting_collectives() as counts:
        comm.reduce_scatter(torch.ones(8), ctx.group)
    out["reduce_scatter"] = dict(counts)
    return out


def test_benchmark_counts_see_dist_ortho_collectives(world):
    for r in world.run(_counted):
        assert r["all_gather"] == {"calls": 1, "bytes": 24}, r
        assert r["reduce_scatter"] == {"calls": 1, "bytes": 16}, r
