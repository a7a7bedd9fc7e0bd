"""The one layer through which dist_ortho talks to torch.distributed.

Every collective the library issues passes through here, so that it can be counted (calls and
bytes sent per rank, see :func:`count_collectives`) and, later, coalesced. Bytes are those a rank
sends under the usual ring algorithms: all-reduce ``2 (t-1)/t * nbytes``, all-gather
``(t-1) * nbytes`` of the local input, all-to-all the chunks sent to other ranks.

Every wait is bounded by the library's timeout (:func:`timeout_s`), on every backend: where a backend's
``wait(timeout)`` does not bound an operation (gloo's reduce-scatter runs inside ``wait()``, on the calling
thread, under the process group's own timeout only), the operation is made of one that it does bound (there:
an all-to-all of the chunks, summed on arrival; the same bytes sent). What is issued in flight and not waited for
when the interpreter exits (an overlapped step's share after a script's last step) is completed by an exit hook
(:func:`complete_in_flight`). :data:`SITES` lists every place of the library that issues collectives
(tests/test_faults.py checks it against the code and injects faults at each).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import hashlib
import logging
import os
import pickle
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch
import torch.distributed as dist

ProcessGroup = dist.ProcessGroup
T = TypeVar("T")
logger = logging.getLogger(__name__)
# all_gather_single / reduce_scatter_single are the newer names (torch >= 2.10) of all_gather_into_tensor /
# reduce_scatter_tensor.
# Looked up at each call, so that a wrapper of torch.distributed's functions (a benchmark's count) sees ours too.


def _all_gather_single(*args: Any, **kwargs: Any) -> Any:
    return (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(*args, **kwargs)


def _reduce_scatter_single(*args: Any, **kwargs: Any) -> Any:
    return (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(*args, **kwargs)


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
                try:
                    _wait(self.op, self._work, self._nbytes)
                finally:
                    _in_flight.pop(id(self._work), None)
            self._value.append(self._result())
        return self._value[0]


_in_flight: dict[int, tuple[str, Any]] = {}
"""The backend works of the :class:`Handle` objects returned in flight and not waited for yet, by id: held here (not
only by their handles) so that a work is never released by the backend's own thread (see :func:`complete_in_flight`)."""
_PRUNE_AT = 256


def _finish(handle: Handle[T], async_op: bool) -> Handle[T] | T:
    if not async_op:
        return handle.wait()
    if handle._work is not None:
        if not _in_flight:
            _register_exit_hook()
        elif len(_in_flight) >= _PRUNE_AT:  # handles dropped without a wait (a caller that raised): keep the pending
            for key, (_, work) in list(_in_flight.items()):
                if work.is_completed():
                    del _in_flight[key]
        _in_flight[id(handle._work)] = (handle.op, handle._work)
    return handle


def in_flight() -> int:
    """How many of the library's collectives were issued in flight and are not known complete (waited for)."""
    return len(_in_flight)


def complete_in_flight() -> int:
    """Wait (each at most the library's timeout) for every collective the library left in flight, then release
    them; returns how many there were. Run at interpreter exit (registered at the first collective issued in
    flight): an overlapped step's share, or a backward's reductions, may still be in flight when a script
    returns after its last step, and a backend thread that completes one during the interpreter's teardown
    releases its tensors there, taking the GIL of an interpreter that is going away: on gloo the process
    aborts at exit ("terminate called without an active exception", a non-zero status) after all its work
    was done. Failures here (a peer gone, the group destroyed) are logged, not raised: the process is ending."""
    pending = list(_in_flight.values())
    seconds = timeout_s()
    for op, work in pending:
        try:
            work.wait(datetime.timedelta(seconds=seconds)) if seconds > 0 else work.wait()
        except Exception as e:  # noqa: BLE001 - at exit: nothing to raise to
            logger.warning("dist_ortho: %s still in flight at exit did not complete (%s: %s)", op, type(e).__name__,
                           str(e).splitlines()[0] if str(e) else "")
    _in_flight.clear()
    return len(pending)


_exit_hook_registered = False


def _register_exit_hook() -> None:
    global _exit_hook_registered
    if not _exit_hook_registered:
        _exit_hook_registered = True
        atexit.register(complete_in_flight)


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
    once, from their tensors. On gloo, an all-to-all of the chunks summed here in rank order (see the module
    doc: gloo's own reduce-scatter is neither in flight before its wait nor bounded by the timeout)."""
    size = group_size(group)
    if size == 1:
        return _finish(Handle("reduce_scatter", None, 0, lambda: send), async_op)
    numel = send.numel() // size
    _record("reduce_scatter", (size - 1) * numel * send.element_size())
    if _on_gloo(group, send):
        chunks = torch.empty_like(send)  # chunk j: rank j's chunk for this rank
        work = dist.all_to_all_single(chunks, send, group=group, async_op=True)
        return _finish(Handle("reduce_scatter", work, send.nbytes, lambda: chunks.view(size, numel).sum(0)), async_op)
    out = send.new_empty(numel)
    work = _reduce_scatter_single(out, send, group=group, async_op=True)
    return _finish(Handle("reduce_scatter", work, send.nbytes, lambda: out), async_op)


def _on_gloo(group: ProcessGroup | None, tensor: torch.Tensor) -> bool:
    """Whether gloo serves collectives of ``tensor`` over ``group`` ("gloo", or "cpu:gloo,..." for a CPU tensor)."""
    backend = str(dist.get_backend(group))
    return backend == "gloo" or (tensor.device.type == "cpu" and "cpu:gloo" in backend)


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


def all_gather_object(obj: Any, group: ProcessGroup | None) -> list[Any]:
    """Every rank's picklable ``obj``, by rank: torch's ``all_gather_object`` made of two :func:`all_gather`\\ s
    (the pickled sizes, then the padded bytes), so that its waits are bounded and counted."""
    size = group_size(group)
    if size == 1:
        return [obj]
    device = collective_device(group)
    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
    sizes = all_gather(torch.tensor([data.numel()], dtype=torch.int64, device=device), group).flatten().tolist()
    padded = torch.zeros(max(sizes), dtype=torch.uint8, device=device)
    padded[: data.numel()] = data
    table = all_gather(padded, group).cpu()
    return [pickle.loads(bytes(table[r, :n].tolist())) for r, n in enumerate(sizes)]


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
    views = all_gather_object((entries, labels), group)
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


COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "all_gather_object", "agree", "agree_over")
"""The functions of this module that communicate (the others only read a group's size or rank)."""


@dataclass(frozen=True)
class Site:
    """A function of the library that issues collectives, through one of :data:`COLLECTIVES` or as a request of
    a coalesced program (dist_ortho.comm.coalesce): ``where`` is its module and qualified name (nested functions,
    lambdas and comprehensions count as the function around them), ``what`` what it exchanges. ``step``: reached
    by an optimizer's step or by what it waits for (backward's hooks, the layers' forward and state-dict
    pre-hooks, ``zero_grad``, ``state_dict``, ``clip_grad_norm_``); the others are the main job's, the planner's
    and the demo's. ``bounded``: every wait under the library's timeout; False where it calls torch.distributed
    itself, bounded by the process group's timeout only."""

    where: str
    what: str
    step: bool = True
    bounded: bool = True


SITES: tuple[Site, ...] = (
    Site("dist_ortho.optim.agreement.PlanAgreement.check", "the plan's agreement when it is new to a rank (a 16-byte "
         "all-gather per group; on a disagreement every rank's entries)"),
    Site("dist_ortho.optim.agreement.PlanAgreement.verify", "the plan's agreement every step (verify_plan='every_step')"),
    Site("dist_ortho.optim.agreement.agree_batching", "batched or one at a time, agreed per new shape (an all-reduce "
         "of votes per group)"),
    Site("dist_ortho.tp.jobs.exchange_shard_sizes", "each shard's and each DTensor piece's extents, and the call's "
         "arguments (all-gathers over a split's group, per level: dist_ortho.parameters.layout.exchange_extents, when layouts "
         "are found; newton_schulz_tp(validate=True))"),
    Site("dist_ortho.parameters.grid.check_grid", "the DP x TP grid's groups (an object all-gather over TP, a flag all-reduce "
         "over DP, at the first step)"),
    Site("dist_ortho.parameters.grid.start_reduce_to_owners", "gradients averaged into their owners (a reduce-scatter per "
         "dtype: in the step, in reduce_gradients / clipping, or one per bucket during backward)"),
    Site("dist_ortho.parameters.grid.grid_sum", "a scalar summed over the grid (the gradient norm of clip_grad_norm_)"),
    Site("dist_ortho.parameters.pieces.gather_blocks", "pieces (DTensor, FSDP2) to their owners (an all-to-all per dtype)"),
    Site("dist_ortho.tp.duplicated.program", "duplicated: the shards all-gathered"),
    Site("dist_ortho.tp.distributed.column_sharded_newton_schulz", "distributed: the partial Gram all-reduced every "
         "iteration"),
    Site("dist_ortho.tp.gram.gram_newton_schulz", "gram: R all-reduced (once, and at each restart)"),
    Site("dist_ortho.tp.home.program", "home: the shards to their home rank and the results back (two all-to-alls)"),
    Site("dist_ortho.tp.jobs.gather_program", "a member's gather of a whole matrix (ctx.gather: MOP, "
         "scaled_orthogonalize_fn)"),
    Site("dist_ortho.comm.reductions.sum_of_squares", "a member's global norms (ctx.norm)"),
    Site("dist_ortho.comm.reductions.inner_product", "a member's global inner products (ctx.inner)"),
    Site("dist_ortho.comm.reductions.mean_over", "a member's means along a sharded dim (ctx.mean_over: NorMuon)"),
    Site("dist_ortho.parameters.grid.share_program", "the share over DP: the owners' new weights to every replica, every "
         "replica's finite verdict in the first bucket (an all-gather per dtype and bucket)"),
    Site("dist_ortho.parameters.pieces.scatter_program", "the share of pieces: updates or values back from their owners, with "
         "every rank's finite verdict (an all-to-all per dtype and bucket)"),
    Site("dist_ortho.parameters.grid.verdict_program", "an owner group's finite verdict alone (one all-gather of a flag), where "
         "its share has nothing else in the first bucket"),
    Site("dist_ortho.tp.newton_schulz.newton_schulz_step", "newton_schulz_step(tp_group=): one iteration's Gram "
         "all-reduce (a public function; the step runs the modes' programs)", step=False),
    Site("dist_ortho.train.model._CopyToTP.backward", "the main job's model: the TP input gradient all-reduced",
         step=False),
    Site("dist_ortho.train.model._ReduceFromTP.forward", "the main job's model: row-parallel outputs all-reduced",
         step=False),
    Site("dist_ortho.train.cli.start_average", "the main job: AdamW-side gradients averaged over DP", step=False),
    Site("dist_ortho.train.cli.train_one", "the main job: the loss averaged over DP for its log", step=False),
    Site("dist_ortho.train.checkpoint.save", "the main job's checkpoint: torch.distributed.checkpoint's save between "
         "barriers", step=False, bounded=False),
    Site("dist_ortho.train.checkpoint.load", "the main job's resume: torch.distributed.checkpoint's load", step=False,
         bounded=False),
    Site("dist_ortho.parameters.dtensor._held_extents", "a DTensor's pieces' extents from the ranks' local shapes (an object "
         "all-gather per sharded mesh dim: the main job's checkpoint)", step=False),
    Site("dist_ortho.train.model.tensor_parallel_native", "the main job's torch-native model: parallelize_module "
         "distributes the weights", step=False, bounded=False),
    Site("dist_ortho.parameters.grid.grid_group", "HSDP: the replicas x shards group of a TP rank, made by its members at the "
         "first step's layout reading, before the step's collectives (new_group with use_local_synchronization: a "
         "store barrier, once per world, under the library's timeout)", step=False, bounded=False),
    Site("dist_ortho.optim.qk_clip._max_over", "QK-clip: the max logits agreed (all-reduce MAX over the groups that "
         "replicate the batch's heads)", step=False),
    Site("dist_ortho.train.moe._exchange", "the main job's MoE: tokens to their experts' EP ranks and back "
         "(all-to-all, forward and backward)", step=False),
    Site("dist_ortho.train.moe.MoE._run_experts", "the main job's MoE: the per-expert token counts exchanged over EP",
         step=False),
    Site("dist_ortho.train.titan.parallelize_titan", "the main job laid out as torchtitan does: init_device_mesh, "
         "parallelize_module and fully_shard (torch's own calls)", step=False, bounded=False),
    Site("dist_ortho.plan.calibrate._probe", "the planner's calibration: timed all-reduces", step=False, bounded=False),
    Site("dist_ortho.demo.main", "the demo's agreement check", step=False, bounded=False),
)
"""Every place of the library that issues collectives (tests/test_faults.py compares it with the code's call sites
and injects a fault at each site the step reaches)."""
