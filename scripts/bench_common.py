"""What the benchmark scripts share: start one gloo process group per world size and collect rank 0's output."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_worlds(measure: Callable[..., None], worlds: list[int], args: Any) -> dict[int, dict]:
    """Spawn ``measure(rank, world, port, args, out)`` on each world size; rank 0 fills ``out``."""
    manager = mp.Manager()
    results = {}
    for world in worlds:
        out = manager.dict()
        mp.spawn(measure, args=(world, free_port(), args, out), nprocs=world, join=True)
        results[world] = dict(out)
    return results


def time_interleaved(steps: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each configuration's step, ``repeats`` times, the configurations interleaved in every
    repeat and fenced by barriers (so every rank times the same collective work)."""
    times: dict[str, list[float]] = {label: [] for label in steps}
    for _ in range(repeats):
        for label, step in steps.items():
            dist.barrier()
            began = time.perf_counter()
            step()
            dist.barrier()
            times[label].append(time.perf_counter() - began)
    return times
