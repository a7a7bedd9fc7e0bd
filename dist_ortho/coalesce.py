"""Coalesced collectives: run many per-matrix algorithms in lockstep, one flat buffer per call.

An algorithm is written as a generator (a *program*) that yields the collective it needs next,
:class:`AllReduce`, :class:`AllGather` or :class:`AllToAll`, receives the result, and finally returns
its output. :func:`run_many` advances all programs together: in each round it takes every program's
pending request, groups them by (kind, process group, dtype), packs each group into flat buffers of at
most ``bucket_bytes`` and issues one collective per buffer. Every rank runs the same programs in the
same order with the same request shapes, so every rank forms the same buffers and the calls match.
A group of one needs no communication; its requests are answered locally.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from dist_ortho import comm
from dist_ortho.precision import MatmulPrecision, matmul_precision

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
    results: list[Any] = [None] * len(programs)
    waiting: dict[int, Request | list[Request]] = {}

    def advance(i: int, reply: Any) -> None:
        try:
            waiting[i] = programs[i].send(reply)
        except StopIteration as done:
            results[i] = done.value

    for i in range(len(programs)):
        advance(i, None)
    while waiting:
        batch = [((i, j), request) for i, pending in sorted(waiting.items())
                 for j, request in enumerate(pending if isinstance(pending, list) else [pending])]
        shapes = {i: isinstance(pending, list) for i, pending in waiting.items()}
        waiting.clear()
        replies: dict[int, dict[int, Any]] = {}
        for (i, j), reply in _serve(batch, bucket_bytes):
            replies.setdefault(i, {})[j] = reply
        for i, is_list in shapes.items():
            by_index = replies.get(i, {})
            advance(i, [by_index[j] for j in range(len(by_index))] if is_list else by_index[0])
    return results


def _serve(batch: list[tuple[Any, Request]], bucket_bytes: int) -> list[tuple[Any, Any]]:
    replies: list[tuple[Any, Any]] = []
    keys: dict[tuple, list[tuple[Any, Request]]] = {}
    for i, request in batch:
        if comm.group_size(request.group) == 1:
            replies.append((i, _local_reply(request)))
            continue
        key = (type(request).__name__, id(request.group), request.tensor.dtype, request.tensor.device)
        keys.setdefault(key, []).append((i, request))
    for entries in keys.values():
        for bucket in _buckets(entries, bucket_bytes):
            replies.extend(_issue(bucket))
    return replies


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


def _issue(bucket: list[tuple[Any, Request]]) -> list[tuple[Any, Any]]:
    first = bucket[0][1]
    group = first.group
    if isinstance(first, AllReduce):
        flat = torch.cat([r.tensor.reshape(-1) for _, r in bucket])
        comm.all_reduce(flat, group)
        parts = torch.split(flat, [r.tensor.numel() for _, r in bucket])
        return [(i, part.view(r.tensor.shape)) for (i, r), part in zip(bucket, parts)]
    if isinstance(first, AllGather):
        flat = torch.cat([r.tensor.reshape(-1) for _, r in bucket])
        stacked = comm.all_gather(flat, group)
        parts = torch.split(stacked, [r.tensor.numel() for _, r in bucket], dim=1)
        return [(i, part.reshape(-1, *r.tensor.shape)) for (i, r), part in zip(bucket, parts)]
    size = comm.group_size(group)
    send = [torch.cat([r.chunks[j].reshape(-1) for _, r in bucket]) for j in range(size)]
    received = comm.all_to_all(send, [sum(r.recv_numels[j] for _, r in bucket) for j in range(size)], group)
    per_rank = [torch.split(received[j], [r.recv_numels[j] for _, r in bucket]) for j in range(size)]
    return [(i, [per_rank[j][n] for j in range(size)]) for n, (i, _) in enumerate(bucket)]
