"""The one layer through which dist_ortho talks to torch.distributed.

Every collective the library issues passes through here, so that it can be counted (calls and
bytes sent per rank, see :func:`count_collectives`) and, later, coalesced. Bytes are those a rank
sends under the usual ring algorithms: all-reduce ``2 (t-1)/t * nbytes``, all-gather
``(t-1) * nbytes`` of the local input, all-to-all the chunks sent to other ranks.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch
import torch.distributed as dist

ProcessGroup = dist.ProcessGroup
T = TypeVar("T")
# all_gather_single is the newer name (torch >= 2.10) of all_gather_into_tensor.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass
class CommStats:
    """Collectives seen while a :func:`count_collectives` block was open, on this rank: calls and bytes sent by
    kind, and the time this rank spent blocked waiting for them (``wait_s``: from the wait's start to the
    collective's completion, not the time a collective ran while the rank did other work)."""

    calls: Counter = field(default_factory=Counter)
    bytes_sent: int = 0
    bytes_by_call: Counter = field(default_factory=Counter)
    wait_s: float = 0.0
    wait_by_call: Counter = field(default_factory=Counter)

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())

    @property
    def wait_ms(self) -> float:
        return 1e3 * self.wait_s


_active_stats: list[CommStats] = []


@contextlib.contextmanager
def count_collectives(stats: CommStats | None = None) -> Iterator[CommStats]:
    """Count the collectives issued (and the waits made) on this rank inside the block, nesting allowed; into
    ``stats`` when given (e.g. the waits for a step's collectives made after the step returned)."""
    stats = stats if stats is not None else CommStats()
    if any(active is stats for active in _active_stats):  # already counting (a wait inside the step that issued it)
        yield stats
        return
    _active_stats.append(stats)
    try:
        yield stats
    finally:
        _active_stats[:] = [active for active in _active_stats if active is not stats]


def _record(op: str, nbytes: float) -> None:
    for stats in _active_stats:
        stats.calls[op] += 1
        stats.bytes_sent += int(nbytes)
        stats.bytes_by_call[op] += int(nbytes)


TIMEOUT_ENV = "DIST_ORTHO_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600.0
"""How long one of the library's collectives may wait for the other ranks (10 minutes, Megatron-LM's
default distributed timeout) before it raises :class:`CollectiveError`; set_timeout() or the environment
variable DIST_ORTHO_TIMEOUT_S change it (0: no limit beyond the process group's own)."""
_timeout_s: float | None = None


class CollectiveError(RuntimeError):
    """A collective of the library failed or timed out (a rank raised, died, or disagrees)."""


def set_timeout(seconds: float | None) -> None:
    """Bound every collective of the library to ``seconds`` (None: back to the environment / default)."""
    if seconds is not None and (not isinstance(seconds, (int, float)) or seconds < 0):
        raise ValueError(f"timeout must be a number of seconds >= 0 (0: unbounded), got {seconds!r}")
    global _timeout_s
    _timeout_s = seconds


def timeout_s() -> float:
    if _timeout_s is not None:
        return float(_timeout_s)
    value = os.environ.get(TIMEOUT_ENV)
    if value:
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds, got {value!r}") from None
    return DEFAULT_TIMEOUT_S


def _wait(op: str, work: Any, nbytes: int) -> None:
    seconds = timeout_s()
    began = time.perf_counter()
    try:
        if seconds > 0:
            work.wait(datetime.timedelta(seconds=seconds))
        else:
            work.wait()
        blocked = time.perf_counter() - began
        for stats in _active_stats:
            stats.wait_s += blocked
            stats.wait_by_call[op] += blocked
    except Exception as e:  # noqa: BLE001 - every backend failure becomes one error type naming the call
        raise CollectiveError(
            f"{op} of {nbytes} bytes did not complete (timeout {seconds:g} s): another rank raised, died, or "
            f"issued a different collective ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from e


class Handle(Generic[T]):
    """A collective in flight (``async_op=True``): :meth:`wait` blocks until it completes, at most the library's
    timeout (then CollectiveError naming the call), counts the blocked time in the open :func:`count_collectives`
    blocks, and returns the result; later calls return it again. A group of one is complete at once."""

    def __init__(self, op: str, work: Any, nbytes: int, result: Callable[[], T]) -> None:
        self.op, self._work, self._nbytes, self._result = op, work, nbytes, result
        self._value: list[T] = []  # the result, once made

    def wait(self) -> T:
        if not self._value:
            if self._work is not None:
                _wait(self.op, self._work, self._nbytes)
            self._value.append(self._result())
        return self._value[0]


def _finish(handle: Handle[T], async_op: bool) -> Handle[T] | T:
    return handle if async_op else handle.wait()


def group_size(group: ProcessGroup | None) -> int:
    """Size of ``group``; 1 when there is no group or torch.distributed is not initialized."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def group_rank(group: ProcessGroup | None) -> int:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 0
    return dist.get_rank(group)


def all_reduce(tensor: torch.Tensor, group: ProcessGroup | None, op: str = "sum", async_op: bool = False) -> Any:
    """In-place all-reduce (``op`` is "sum" or "max"); a no-op on a group of one. With ``async_op`` a
    :class:`Handle` whose wait() returns the tensor."""
    size = group_size(group)
    if size == 1:
        return _finish(Handle("all_reduce", None, 0, lambda: tensor), async_op)
    _record("all_reduce", 2 * (size - 1) / size * tensor.numel() * tensor.element_size())
    reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
    work = dist.all_reduce(tensor, op=reduce_op, group=group, async_op=True)
    return _finish(Handle("all_reduce", work, tensor.nbytes, lambda: tensor), async_op)


def all_gather(tensor: torch.Tensor, group: ProcessGroup | None, async_op: bool = False) -> Any:
    """Stack of every rank's ``tensor`` (same shape on all ranks): shape ``(size, *tensor.shape)`` (with
    ``async_op`` a :class:`Handle` of it)."""
    size = group_size(group)
    tensor = tensor.contiguous()
    if size == 1:
        return _finish(Handle("all_gather", None, 0, lambda: tensor.unsqueeze(0)), async_op)
    _record("all_gather", (size - 1) * tensor.numel() * tensor.element_size())
    out = torch.empty(size * tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    work = _all_gather_single(out, tensor.reshape(-1), group=group, async_op=True)
    return _finish(Handle("all_gather", work, tensor.nbytes, lambda: out.view(size, *tensor.shape)), async_op)


def reduce_scatter(send: torch.Tensor, group: ProcessGroup | None, async_op: bool = False) -> Any:
    """Sum over the group of every rank's ``send`` (flat: one equal chunk per rank, rank 0's first), chunk r
    delivered to rank r: this rank's sum (with ``async_op`` a :class:`Handle` of it). Callers pack ``send``
    once, from their tensors."""
    size = group_size(group)
    if size == 1:
        return _finish(Handle("reduce_scatter", None, 0, lambda: send), async_op)
    out = send.new_empty(send.numel() // size)
    _record("reduce_scatter", (size - 1) * out.numel() * out.element_size())
    work = dist.reduce_scatter_tensor(out, send, group=group, async_op=True)
    return _finish(Handle("reduce_scatter", work, send.nbytes, lambda: out), async_op)


def all_to_all(
    send: torch.Tensor, send_numels: list[int], recv_numels: list[int], group: ProcessGroup | None, async_op: bool = False
) -> Any:
    """Send rank j its chunk of the flat ``send`` (``send_numels[j]`` elements, rank 0's first; callers pack it
    once, from their tensors); receive ``recv_numels[j]`` elements from rank j (flat tensors; with ``async_op`` a
    :class:`Handle` of them)."""
    size = group_size(group)
    if size == 1:
        return _finish(Handle("all_to_all", None, 0, lambda: [send]), async_op)
    rank = group_rank(group)
    recv = torch.empty(sum(recv_numels), dtype=send.dtype, device=send.device)
    _record("all_to_all", (send.numel() - send_numels[rank]) * send.element_size())
    work = dist.all_to_all_single(
        recv, send, output_split_sizes=list(recv_numels), input_split_sizes=list(send_numels), group=group, async_op=True,
    )
    return _finish(Handle("all_to_all", work, send.nbytes, lambda: list(torch.split(recv, list(recv_numels)))), async_op)


def collective_device(group: ProcessGroup | None, device: torch.device | str = "cpu") -> torch.device:
    """Where a small host-made tensor must live for a collective over ``group``: CUDA under NCCL."""
    if group is not None and dist.get_backend(group) == "nccl":
        return torch.device("cuda")
    return torch.device(device)


def digest_of(entries: list[tuple]) -> int:
    """The 7-byte digest of ``entries`` that :func:`agree` exchanges."""
    return int.from_bytes(hashlib.blake2b(repr(entries).encode(), digest_size=7).digest(), "little")


def agree(entries: list[tuple], labels: list[str], group: ProcessGroup | None, what: str,
          digest: int | None = None, failed: bool = False) -> None:
    """Raise the same ValueError on every rank of ``group`` unless all ranks hold equal ``entries``.

    One all-gather of a 16-byte digest and a flag when they agree (``digest``: :func:`digest_of` the entries,
    when the caller keeps it); when they do not, every rank's entries and labels are exchanged
    (all_gather_object) so that the error names the first differing entry, what each rank has there, and is the
    same text on every rank. ``failed``: this rank already found a disagreement in another of its groups (or an
    error in its own input): every rank of this group then raises too (so that a disagreement reaches every rank
    of a DP x TP grid, checked group by group, and none is left waiting in the step for ranks that raised).
    """
    size = group_size(group)
    if size == 1:
        return
    digest = digest_of(entries) if digest is None else digest
    mine = torch.tensor([len(entries), digest, int(failed)], dtype=torch.int64, device=collective_device(group))
    table = all_gather(mine, group).cpu().tolist()
    if all(row[:2] == table[0][:2] for row in table):
        flagged = [r for r, row in enumerate(table) if row[2]]
        if flagged:
            raise ValueError(f"ranks disagree on {what}: found by this group's rank(s) {flagged} (in their input or "
                             "another of their groups), whose error names it")
        return
    views: list[Any] = [None] * size
    dist.all_gather_object(views, (entries, labels), group=group)
    count = max(len(e) for e, _ in views)
    for i in range(count):
        seen = [(e[i] if i < len(e) else None, names[i] if i < len(names) else None) for e, names in views]
        if any(entry != seen[0][0] for entry, _ in seen):
            per_rank = "; ".join(f"rank {r}: {name or '-'} {entry}" for r, (entry, name) in enumerate(seen))
            raise ValueError(f"ranks disagree on {what} at entry {i}: {per_rank}")
    raise ValueError(f"ranks disagree on {what}: {[len(e) for e, _ in views]} entries by rank")


def agree_over(entries: list[tuple], labels: list[str], groups: Sequence[ProcessGroup | None], what: str,
               digest: int | None = None, error: str | None = None) -> None:
    """:func:`agree` over each of ``groups`` in turn, the first disagreement carried into the later groups' checks
    (``failed``), then raised: on a DP x TP grid (groups: TP, then DP) every rank raises a ValueError, and the
    ranks of the group where it was found the one naming the entry. ``error``: what this rank found wrong on its
    own (its input), carried and raised the same way, so that its peers raise too instead of waiting."""
    groups = [g for g in groups if group_size(g) > 1]
    if groups and digest is None:
        digest = digest_of(entries)
    message = error
    for group in groups:
        try:
            agree(entries, labels, group, what, digest, failed=message is not None)
        except ValueError as disagreement:
            message = message or str(disagreement)
    if message is not None:
        raise ValueError(message)
