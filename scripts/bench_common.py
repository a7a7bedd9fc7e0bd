"""What the benchmark scripts share: start one gloo process group per world size and collect rank 0's output."""

from __future__ import annotations

import contextlib
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
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


def _sent(name: str, args: tuple, kwargs: dict) -> int:
    """Bytes this rank's call sends to other ranks (ring all-reduce: 2 (n - 1) / n of the buffer)."""
    group = kwargs.get("group")
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if name == "all_to_all":  # (outputs, inputs)
        inputs = kwargs.get("input_tensor_list", args[1] if len(args) > 1 else None)
        return sum(t.nbytes for j, t in enumerate(inputs) if j != rank)
    if name == "all_to_all_single":  # (output, input, output_split_sizes, input_split_sizes)
        send = kwargs.get("input", args[1] if len(args) > 1 else None)
        splits = kwargs.get("input_split_sizes", args[3] if len(args) > 3 else None)
        if splits is None:
            return send.nbytes * (size - 1) // size
        return (send.numel() - splits[rank]) * send.element_size() if splits else 0
    tensor = kwargs.get("tensor", kwargs.get("input", args[1] if name != "all_reduce" and len(args) > 1 else args[0]))
    if name in ("all_gather", "all_gather_into_tensor", "all_gather_single"):
        return (size - 1) * tensor.nbytes
    if name in ("reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single"):
        total = sum(t.nbytes for t in tensor) if isinstance(tensor, list) else tensor.nbytes
        return total * (size - 1) // size
    return 2 * tensor.nbytes * (size - 1) // size  # all_reduce


@contextlib.contextmanager
def counting_collectives() -> Iterator[Counter]:
    """Count torch.distributed's collective calls made inside and the bytes they send to other ranks, whoever
    makes them (a peer's code and ours alike): ``counts["calls"]``, ``counts["bytes"]``."""
    names = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter",
             "reduce_scatter_tensor", "reduce_scatter_single", "all_to_all", "all_to_all_single")
    counts: Counter = Counter()
    saved = {name: getattr(dist, name) for name in names if hasattr(dist, name)}
    depth = [0]  # a wrapped call made by another (torch's newer names calling the older ones) is counted once

    def wrap(name: str, call: Callable) -> Callable:
        def counted(*args, **kwargs):
            if depth[0] == 0:
                counts["calls"] += 1
                counts["bytes"] += _sent(name, args, kwargs)
            depth[0] += 1
            try:
                return call(*args, **kwargs)
            finally:
                depth[0] -= 1
        return counted

    for name, call in saved.items():
        setattr(dist, name, wrap(name, call))
    try:
        yield counts
    finally:
        for name, call in saved.items():
            setattr(dist, name, call)


def counted_per_rank(steps: dict[str, Callable[[], Any]], world: int) -> dict[str, dict[str, list]]:
    """Each configuration's step on every rank, its FLOPs (torch.utils.flop_counter), collectives and bytes sent
    counted there (:func:`counting_collectives`), gathered: by label, every rank's ``flops_per_rank``, ``calls`` and
    ``bytes_sent``. The counted step is each configuration's second: the first does one-time work (the plan's
    agreement, the batching measurement of a new shape), which is not the step's cost."""
    from torch.utils.flop_counter import FlopCounterMode

    rows = {}
    for label, step in steps.items():
        step()
        flops = FlopCounterMode(display=False)
        with counting_collectives() as counts, flops:
            step()
        every: list[Any] = [None] * world
        dist.all_gather_object(every, (flops.get_total_flops(), counts["calls"], counts["bytes"]))
        rows[label] = {"flops_per_rank": [f for f, _, _ in every], "calls": [c for _, c, _ in every],
                       "bytes_sent": [b for _, _, b in every]}
    return rows
