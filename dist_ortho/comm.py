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
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

ProcessGroup = dist.ProcessGroup
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
def count_collectives() -> Iterator[CommStats]:
    """Count the collectives issued on this rank inside the block (nesting allowed)."""
    stats = CommStats()
    _active_stats.append(stats)
    try:
        yield stats
    finally:
        _active_stats.remove(stats)


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
        for stats in _active_stats:
            blocked = time.perf_counter() - began
            stats.wait_s += blocked
            stats.wait_by_call[op] += blocked
    except Exception as e:  # noqa: BLE001 - every backend failure becomes one error type naming the call
        raise CollectiveError(
            f"{op} of {nbytes} bytes did not complete (timeout {seconds:g} s): another rank raised, died, or "
            f"issued a different collective ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from e


def group_size(group: ProcessGroup | None) -> int:
    """Size of ``group``; 1 when there is no group or torch.distributed is not initialized."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def group_rank(group: ProcessGroup | None) -> int:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 0
    return dist.get_rank(group)


def all_reduce(tensor: torch.Tensor, group: ProcessGroup | None, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (``op`` is "sum" or "max"); a no-op on a group of one."""
    size = group_size(group)
    if size == 1:
        return tensor
    _record("all_reduce", 2 * (size - 1) / size * tensor.numel() * tensor.element_size())
    reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
    _wait("all_reduce", dist.all_reduce(tensor, op=reduce_op, group=group, async_op=True), tensor.nbytes)
    return tensor


def all_gather(tensor: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Stack of every rank's ``tensor`` (same shape on all ranks): shape ``(size, *tensor.shape)``."""
    size = group_size(group)
    tensor = tensor.contiguous()
    if size == 1:
        return tensor.unsqueeze(0)
    _record("all_gather", (size - 1) * tensor.numel() * tensor.element_size())
    out = torch.empty(size * tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    _wait("all_gather", _all_gather_single(out, tensor.reshape(-1), group=group, async_op=True), tensor.nbytes)
    return out.view(size, *tensor.shape)


def reduce_scatter(chunks: list[torch.Tensor], group: ProcessGroup | None) -> torch.Tensor:
    """Sum over the group of every rank's ``chunks[r]`` (equal sizes), delivered to rank r: this rank's sum."""
    size = group_size(group)
    if size == 1:
        return chunks[0].clone()
    send = torch.cat([c.reshape(-1) for c in chunks])
    out = torch.empty_like(chunks[0].reshape(-1))
    _record("reduce_scatter", (size - 1) * out.numel() * out.element_size())
    _wait("reduce_scatter", dist.reduce_scatter_tensor(out, send, group=group, async_op=True), send.nbytes)
    return out


def all_to_all(
    chunks: list[torch.Tensor], recv_numels: list[int], group: ProcessGroup | None
) -> list[torch.Tensor]:
    """Send ``chunks[j]`` to rank j; receive ``recv_numels[j]`` elements from rank j (flat tensors)."""
    size = group_size(group)
    if size == 1:
        return [chunks[0].reshape(-1)]
    rank = group_rank(group)
    send = torch.cat([c.reshape(-1) for c in chunks])
    recv = torch.empty(sum(recv_numels), dtype=send.dtype, device=send.device)
    sent_to_others = sum(c.numel() for j, c in enumerate(chunks) if j != rank)
    _record("all_to_all", sent_to_others * send.element_size())
    work = dist.all_to_all_single(
        recv, send, output_split_sizes=list(recv_numels), input_split_sizes=[c.numel() for c in chunks], group=group,
        async_op=True,
    )
    _wait("all_to_all", work, send.nbytes)
    return list(torch.split(recv, list(recv_numels)))


def collective_device(group: ProcessGroup | None, device: torch.device | str = "cpu") -> torch.device:
    """Where a small host-made tensor must live for a collective over ``group``: CUDA under NCCL."""
    if group is not None and dist.get_backend(group) == "nccl":
        return torch.device("cuda")
    return torch.device(device)


def agree(entries: list[tuple], labels: list[str], group: ProcessGroup | None, what: str) -> None:
    """Raise the same ValueError on every rank of ``group`` unless all ranks hold equal ``entries``.

    One all-gather of a 16-byte digest when they agree; when they do not, every rank's entries and
    labels are exchanged (all_gather_object) so that the error names the first differing entry, what each
    rank has there, and is the same text on every rank.
    """
    size = group_size(group)
    if size == 1:
        return
    digest = int.from_bytes(hashlib.blake2b(repr(entries).encode(), digest_size=7).digest(), "little")
    mine = torch.tensor([len(entries), digest], dtype=torch.int64, device=collective_device(group))
    table = all_gather(mine, group).cpu().tolist()
    if all(row == table[0] for row in table):
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
