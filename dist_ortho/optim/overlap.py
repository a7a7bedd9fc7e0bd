"""The grid's share of a step in flight, waited for where the weights are next read (``overlap=True``).

On the DP x TP grid the owners' new weights reach the other replicas through the step's DP collectives
(the all-gather of TE-attribute weights, the all-to-all back of DTensor pieces), which also carry every
replica's finite verdict (dist_ortho.optim.step). With ``overlap=True`` the step issues them without waiting:
the parameters are cut into *buckets* (one per layer given to ``overlap_by_layer``, in that order, which must
hold every shared weight; without layers one bucket), each bucket's collectives are issued asynchronously in
bucket order, and :class:`ShareInFlight` waits for a bucket only where its weights are read or written: its
module's forward, ``state_dict()`` and ``load_state_dict()`` pre-hooks, ``finish()`` (the next step, the
optimizer's ``state_dict()``, a checkpoint, anything else that reads weights). At the first wait of any bucket the first
bucket (the verdicts) is completed and the step is decided as without overlap: the owners' weights and state are
committed, or every rank raises (after draining every bucket, so that no collective is left in flight), or all
skip. The arithmetic is the same as without overlap, so the weights are bit-identical.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from dist_ortho import comm
from dist_ortho.comm.coalesce import InFlight


class ShareInFlight:
    """One step's share, bucket by bucket in flight.

    ``buckets[k]`` is (the parameters it brings, the started programs, whose values are pairs (flags or None,
    write)). ``decide(flags)`` turns every owner group's verdict flags (from the first bucket, by rank, one
    tensor per group) into what the writers take (None: write; False: write nothing; a device bool: write where
    true) and commits the owners' own step;
    it may raise, which every rank then does alike. ``stats`` collects the time blocked in waits."""

    def __init__(self, buckets: Sequence[tuple[set[torch.Tensor], InFlight]], decide: Callable[[torch.Tensor], Any],
                 stats: comm.CommStats, describe: str) -> None:
        self._buckets = list(buckets)
        self._decide, self._stats, self._describe = decide, stats, describe
        self._ok: Any = None
        self._decided = False
        self._written = [False] * len(self._buckets)

    def done(self) -> bool:
        return all(self._written)

    @torch.no_grad()
    def wait_for(self, params: set[torch.Tensor] | None = None, where: str = "") -> None:
        """Complete every bucket up to the last one that holds any of ``params`` (None: all of them)."""
        last = -1
        for k, (members, _) in enumerate(self._buckets):
            if params is None or params & members:
                last = k
        if last < 0 or all(self._written[: last + 1]):
            return
        try:
            with comm.count_collectives(self._stats):
                if not self._decided:
                    self._decided = True  # before deciding: a raise leaves it decided, every bucket drained
                    flags = self._buckets[0][1].wait()
                    found = [f for f, _ in flags if f is not None]  # each owner group's flags, in share order
                    try:
                        self._ok = self._decide(found)
                    except BaseException:
                        for _, started in self._buckets:
                            started.wait()
                        self._written = [True] * len(self._buckets)
                        raise
                for k in range(last + 1):
                    if not self._written[k]:
                        writes = self._buckets[k][1].wait()
                        self._written[k] = True
                        if self._ok is not False:
                            for _, write in writes:
                                write(self._ok)
        except comm.CollectiveError as e:
            raise comm.CollectiveError(f"{self._describe} (waited for{where}): {e}") from e


def layer_buckets(params: Sequence[torch.Tensor], layers: Sequence[set[torch.Tensor]]) -> tuple[list[list[int]], list[int]]:
    """Indices of ``params`` by layer (a parameter in its first layer only; a layer may get none), and those in no
    layer."""
    position = {p: i for i, p in enumerate(params)}
    taken: set[int] = set()
    per_layer = []
    for members in layers:
        bucket = sorted(position[p] for p in members if p in position and position[p] not in taken)
        taken.update(bucket)
        per_layer.append(bucket)
    return per_layer, [i for i in range(len(params)) if i not in taken]
