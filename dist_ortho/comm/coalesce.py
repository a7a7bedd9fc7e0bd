"""Coalesced collectives: run many per-matrix algorithms in lockstep, one flat buffer per call.

An algorithm is written as a generator (a *program*) that yields the collective it needs next,
:class:`AllReduce`, :class:`AllGather` or :class:`AllToAll`, receives the result, and finally returns
its output. :func:`run_many` advances all programs together: in each round it takes every program's
pending request, groups them by (kind, process group, dtype), packs each group into flat buffers of at
most ``bucket_bytes`` and issues one collective per buffer. Every rank runs the same programs in the
same order with the same request shapes, so every rank forms the same buffers and the calls match.
A group of one needs no communication; its requests are answered locally. :func:`start_many` leaves
the first round in flight for the caller to wait on later; :func:`run_pipelined` runs buckets of programs
so that one bucket's collectives are in flight while another computes.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from dist_ortho import comm
from dist_ortho.math.precision import MatmulPrecision, matmul_precision

T = TypeVar("T")
DEFAULT_BUCKET_BYTES = 256 * 2**20


@dataclass
class AllReduce:
    """Sum ``tensor`` over ``group``; the reply is the summed tensor (same shape)."""

    tensor: torch.Tensor
    group: comm.ProcessGroup | None


@dataclass
class AllGather:
    """Every rank's ``tensor`` (same shape everywhere); the reply has shape (group size, *tensor.shape)."""

    tensor: torch.Tensor
    group: comm.ProcessGroup | None


@dataclass
class AllToAll:
    """Send flat ``chunks[j]`` to rank j; the reply lists the flat chunk from each rank (``recv_numels[j]``)."""

    chunks: list[torch.Tensor]
    recv_numels: list[int]
    group: comm.ProcessGroup | None

    @property
    def tensor(self) -> torch.Tensor:  # for the dtype / device of the bucket
        return self.chunks[0]


Request = AllReduce | AllGather | AllToAll
Program = Generator[Request, Any, T]


def run(program: Program[T]) -> T:
    """Run one program (its collectives one call each)."""
    return run_many([program])[0]


def under_precision(program: Program[T], precision: MatmulPrecision) -> Program[T]:
    """``program`` with every stretch of its computation run under the fp32 matmul ``precision``."""
    reply: Any = None
    while True:
        with matmul_precision(precision):
            try:
                request = program.send(reply)
            except StopIteration as done:
                return done.value
        reply = yield request


def run_many(programs: Sequence[Program[Any]], bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> list[Any]:
    """Run ``programs`` in lockstep with coalesced collectives; their return values, in order.

    A program may yield one request or a list of requests (its reply is then the list of replies); every
    request of a round is bucketed with the other programs' requests of the same kind, group and dtype."""
    return start_many(programs, bucket_bytes).wait()


class InFlight:
    """Programs whose first round of collectives is in flight (:func:`start_many`): :meth:`wait` completes
    that round, runs the remaining rounds (blocking) and returns the programs' values; later calls return them
    again."""

    def __init__(self, programs: Sequence[Program[Any]], bucket_bytes: int) -> None:
        self._programs, self._bucket_bytes = programs, bucket_bytes
        self._results: list[Any] = [None] * len(programs)
        self._waiting: dict[int, Request | list[Request]] = {}
        for i in range(len(programs)):
            self._advance(i, None)
        self._round = self._issue_round()

    def _advance(self, i: int, reply: Any) -> None:
        try:
            self._waiting[i] = self._programs[i].send(reply)
        except StopIteration as done:
            self._results[i] = done.value

    def _issue_round(self) -> tuple[dict[int, bool], list[comm.Handle[list[tuple[Any, Any]]]]] | None:
        if not self._waiting:
            return None
        batch = [((i, j), request) for i, pending in sorted(self._waiting.items())
                 for j, request in enumerate(pending if isinstance(pending, list) else [pending])]
        shapes = {i: isinstance(pending, list) for i, pending in self._waiting.items()}
        self._waiting.clear()
        return shapes, _start(batch, self._bucket_bytes)

    def next_round(self) -> bool:
        """Complete the round in flight, run the programs on to their next collectives and issue them; False
        when the programs have returned."""
        if self._round is None:
            return False
        shapes, handles = self._round
        replies: dict[int, dict[int, Any]] = {}
        for handle in handles:
            for (i, j), reply in handle.wait():
                replies.setdefault(i, {})[j] = reply
        for i, is_list in shapes.items():
            by_index = replies.get(i, {})
            self._advance(i, [by_index[j] for j in range(len(by_index))] if is_list else by_index[0])
        self._round = self._issue_round()
        return True

    def wait(self) -> list[Any]:
        while self.next_round():
            pass
        return self._results


def start_many(programs: Sequence[Program[Any]], bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> InFlight:
    """Advance ``programs`` to their first collectives and issue them (coalesced as in :func:`run_many`)
    without waiting: the caller computes meanwhile and calls ``wait()`` on the result for the values."""
    return InFlight(programs, bucket_bytes)


def run_pipelined(buckets: Sequence[Sequence[Program[Any]]], bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> list[list[Any]]:
    """Run buckets of programs as a pipeline: each bucket's rounds are coalesced as :func:`run_many` would
    coalesce that bucket alone, and while one bucket's collectives are in flight the others compute. Every
    bucket issues its first round, then, bucket by bucket in turn, each waits for its round, computes and
    issues its next one (the same order on every rank). The values by bucket."""
    flights = [start_many(programs, bucket_bytes) for programs in buckets]
    running = list(flights)
    while running:
        running = [flight for flight in running if flight.next_round()]
    return [flight.wait() for flight in flights]


def _start(batch: list[tuple[Any, Request]], bucket_bytes: int) -> list[comm.Handle[list[tuple[Any, Any]]]]:
    handles: list[comm.Handle[list[tuple[Any, Any]]]] = []
    local = [(i, _local_reply(request)) for i, request in batch if comm.group_size(request.group) == 1]
    if local:
        handles.append(comm.Handle("local", None, 0, lambda: local))
    keys: dict[tuple, list[tuple[Any, Request]]] = {}
    for i, request in batch:
        if comm.group_size(request.group) > 1:
            key = (type(request).__name__, id(request.group), request.tensor.dtype, request.tensor.device)
            keys.setdefault(key, []).append((i, request))
    for entries in keys.values():
        handles.extend(_issue(bucket) for bucket in _buckets(entries, bucket_bytes))
    return handles


def _local_reply(request: Request) -> Any:
    if isinstance(request, AllReduce):
        return request.tensor
    if isinstance(request, AllGather):
        return request.tensor.unsqueeze(0)
    return [request.chunks[0].reshape(-1)]


def _nbytes(request: Request) -> int:
    if isinstance(request, AllToAll):
        return sum(c.numel() for c in request.chunks) * request.tensor.element_size()
    return request.tensor.numel() * request.tensor.element_size()


def _buckets(entries: list[tuple[Any, Request]], bucket_bytes: int) -> list[list[tuple[Any, Request]]]:
    buckets: list[list[tuple[Any, Request]]] = [[]]
    size = 0
    for entry in entries:
        nbytes = _nbytes(entry[1])
        if buckets[-1] and size + nbytes > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(entry)
        size += nbytes
    return buckets


def _issue(bucket: list[tuple[Any, Request]]) -> comm.Handle[list[tuple[Any, Any]]]:
    first = bucket[0][1]
    group = first.group
    if isinstance(first, AllReduce):
        flat = torch.cat([r.tensor.reshape(-1) for _, r in bucket])
        reduced = comm.all_reduce(flat, group, async_op=True)

        def reduce_replies() -> list[tuple[Any, Any]]:
            parts = torch.split(reduced.wait(), [r.tensor.numel() for _, r in bucket])
            return [(i, part.view(r.tensor.shape)) for (i, r), part in zip(bucket, parts)]

        return comm.Handle(reduced.op, None, 0, reduce_replies)
    if isinstance(first, AllGather):
        gathered = comm.all_gather(torch.cat([r.tensor.reshape(-1) for _, r in bucket]), group, async_op=True)

        def gather_replies() -> list[tuple[Any, Any]]:
            parts = torch.split(gathered.wait(), [r.tensor.numel() for _, r in bucket], dim=1)
            return [(i, part.reshape(-1, *r.tensor.shape)) for (i, r), part in zip(bucket, parts)]

        return comm.Handle(gathered.op, None, 0, gather_replies)
    size = comm.group_size(group)
    send = torch.cat([r.chunks[j].reshape(-1) for j in range(size) for _, r in bucket])  # rank 0's chunks first
    exchanged = comm.all_to_all(send, [sum(r.chunks[j].numel() for _, r in bucket) for j in range(size)],
                                [sum(r.recv_numels[j] for _, r in bucket) for j in range(size)], group, async_op=True)

    def exchange_replies() -> list[tuple[Any, Any]]:
        received = exchanged.wait()
        per_rank = [torch.split(received[j], [r.recv_numels[j] for _, r in bucket]) for j in range(size)]
        return [(i, [per_rank[j][n] for j in range(size)]) for n, (i, _) in enumerate(bucket)]

    return comm.Handle(exchanged.op, None, 0, exchange_replies)
