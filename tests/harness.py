"""Multi-process test harness: N worker processes started once, test bodies run in all of them.

A test module asks for the ``world`` fixture (see conftest.py); the fixture starts ``size`` workers,
each of which joins a process group (gloo on CPU by default, NCCL with one GPU per rank when
DIST_ORTHO_TEST_BACKEND=nccl) and then waits for work. ``world.run(fn, *args)`` sends the
module-level function ``fn`` to every rank, runs ``fn(ctx, *args)`` there and returns the per-rank
results, re-raising the first rank's failure with its traceback. A body that does not finish within
the timeout (a hang) fails the test and the workers are restarted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing as mp
import os
import queue
import socket
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist

BACKEND_ENV = "DIST_ORTHO_TEST_BACKEND"


def backend() -> str:
    return os.environ.get(BACKEND_ENV, "gloo")


def unavailable_reason(size: int) -> str | None:
    """Why a world of ``size`` ranks cannot run on the chosen backend, or None."""
    if backend() == "nccl":
        if not torch.cuda.is_available():
            return "NCCL tests need CUDA, and torch.cuda.is_available() is False"
        if torch.cuda.device_count() < size:
            return f"NCCL world of {size} needs {size} GPUs, found {torch.cuda.device_count()}"
    return None


@dataclasses.dataclass
class RankContext:
    rank: int
    world_size: int
    device: torch.device

    @property
    def group(self) -> dist.ProcessGroup:
        return dist.group.WORLD

    def new_groups(self, group_size: int) -> tuple[dist.ProcessGroup, int]:
        """Split the world into consecutive groups of ``group_size`` ranks; this rank's group and index."""
        groups = [
            dist.new_group(list(range(start, start + group_size)))
            for start in range(0, self.world_size, group_size)
        ]
        return groups[self.rank // group_size], self.rank // group_size


@contextlib.contextmanager
def started_world(size: int, daemon: bool = True) -> Iterator["World"]:
    """A World of ``size`` ranks for the block (the test is skipped, with the reason, where it cannot run)."""
    reason = unavailable_reason(size)
    if reason:
        pytest.skip(reason)
    world = World(size, daemon=daemon)
    try:
        yield world
    finally:
        world.close()


class RemoteError(AssertionError):
    pass


class WorkerHang(AssertionError):
    pass


_PORTS: Iterator[int] | None = None


def _free_port() -> int:
    """A free port for a world's rendezvous, below Linux's ephemeral range (32768 and up, where bind(0) and every
    outgoing connection take theirs, so a port found free there could be taken before rank 0 binds it), from a
    range of 3,000 of its own for each pytest-xdist worker (make test runs two), each checked free by binding it."""
    global _PORTS
    if _PORTS is None:
        worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
        base = 20000 + 3000 * (int(worker[2:]) % 4 if worker[2:].isdigit() else 0)
        offset = (os.getpid() % 10) * 300  # two test runs at once on one machine start apart
        _PORTS = (base + (offset + k) % 3000 for k in range(3000))
    for port in _PORTS:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port left in this pytest worker's range")


PRELOAD = ("torch", "torch.distributed", "numpy", "dist_ortho", "dist_ortho.optim", "dist_ortho.tp", "dist_ortho.parameters.dtensor",
           "torch.distributed.tensor", "torch.distributed.fsdp", "tests.harness")
"""What a pytest process's forkserver imports once, so that a world's workers start without importing torch and
the library again (each spawned worker took 4-6 s of CPU for it, ~140 of them per suite on 2 cores). Megatron is
not preloaded: tests/megatron_fsdp_cpu.py hides megatron-core while megatron_fsdp is imported."""


def _context() -> Any:
    """gloo: a forkserver with :data:`PRELOAD` (its workers are forks of one clean process that has imported torch
    and nothing else: no threads, no CUDA). NCCL: spawn, as a forked process could not use CUDA."""
    if backend() == "nccl":
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(PRELOAD))
    return ctx


def _worker(rank: int, size: int, port: int, backend_name: str, tasks: mp.Queue, results: mp.Queue,
            environ: dict[str, str]) -> None:
    # A forkserver's children inherit the server's environment, not the test process's of now (spawn did).
    os.environ.clear()
    os.environ.update(environ)
    torch.set_num_threads(1)
    device = torch.device("cpu")
    if backend_name == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    dist.init_process_group(backend_name, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    ctx = RankContext(rank, size, device)
    while True:
        item = tasks.get()
        if item is None:
            break
        fn, args, kwargs = item
        try:
            torch.set_float32_matmul_precision("highest")
            results.put((rank, True, fn(ctx, *args, **kwargs)))
        except BaseException:  # noqa: BLE001 - every failure goes back to the test process
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class World:
    """``size`` worker processes in one process group."""

    def __init__(self, size: int, timeout: float = 120.0, daemon: bool = True) -> None:
        self.size = size
        self.timeout = timeout
        self.daemon = daemon  # False: workers may start processes of their own (Megatron's checkpoint writers)
        self._procs: list[mp.Process] = []
        self._start()

    def _start(self) -> None:
        ctx = _context()
        port = _free_port()
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(self.size)]
        self._procs = [
            ctx.Process(
                target=_worker, args=(r, self.size, port, backend(), self._tasks[r], self._results, dict(os.environ)),
                daemon=self.daemon
            )
            for r in range(self.size)
        ]
        for p in self._procs:
            p.start()

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """Run ``fn(ctx, *args, **kwargs)`` on every rank; the results by rank."""
        if not self._procs:
            self._start()
        for q in self._tasks:
            q.put((fn, args, kwargs))
        outcomes: dict[int, tuple[bool, Any]] = {}
        try:
            while len(outcomes) < self.size:
                rank, ok, value = self._results.get(timeout=self.timeout)
                outcomes[rank] = (ok, value)
        except queue.Empty:
            missing = sorted(set(range(self.size)) - set(outcomes))
            failures = "".join(f"\n--- rank {r} ---\n{v}" for r, (ok, v) in sorted(outcomes.items()) if not ok)
            self.close(kill=True)
            raise WorkerHang(f"ranks {missing} did not finish {fn.__name__} in {self.timeout}s (hang?){failures}")
        failures = [(r, v) for r, (ok, v) in sorted(outcomes.items()) if not ok]
        if failures:
            raise RemoteError("".join(f"\n--- rank {r} ---\n{v}" for r, v in failures))
        return [outcomes[r][1] for r in range(self.size)]

    def close(self, kill: bool = False) -> None:
        for q, p in zip(self._tasks, self._procs):
            if not kill and p.is_alive():
                q.put(None)
        for p in self._procs:
            p.join(timeout=0 if kill else 20)
            if p.is_alive():
                p.kill()
                p.join()
        self._procs = []
