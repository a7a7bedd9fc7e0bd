"""Gradient reductions overlapped with backward: each bucket's collective is issued as soon as its last
gradient is final, while backward goes on with earlier layers.

The parameters are cut into buckets (the caller's, e.g. one per layer in backward order); a post-accumulate-grad
hook (``Tensor.register_post_accumulate_grad_hook``) marks a parameter ready, and bucket k is issued once it and
every bucket before it are ready, so that every rank issues the same collectives in the same order whatever
order its hooks fire in. :meth:`BackwardReducer.finish` issues what is left (parameters without a gradient count
as zeros, as in the blocking reductions) and waits for everything. What a bucket's reduction is (an all-reduce
average, a reduce-scatter into owners) is the caller's ``start``: it reads the gradients when called and returns
a function that waits and writes the result. With gradient accumulation, every micro-batch but the last runs
inside :meth:`no_sync` (as with torch's DistributedDataParallel); a gradient accumulated again after its bucket
was issued is a RuntimeError, never a silently partial reduction. A backward whose gradients are dropped (a step
skipped: the optimizer's ``zero_grad``) ends with :meth:`drain`, which issues what that backward left (so that
every rank has issued the same buckets) and waits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch

DEFAULT_GRAD_BUCKET_BYTES = 25 * 2**20
"""The default bucket (torch DistributedDataParallel's bucket_cap_mb: 25 MB)."""
Start = Callable[[list[torch.Tensor]], Callable[[], None]]


def cut_by_bytes(params: Sequence[torch.Tensor], bucket_bytes: int) -> list[list[torch.Tensor]]:
    """``params`` in order, cut into buckets of about ``bucket_bytes`` (a bucket closes once it reaches it)."""
    buckets: list[list[torch.Tensor]] = [[]]
    size = 0
    for p in params:
        if buckets[-1] and size >= bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(p)
        size += p.numel() * p.element_size()
    return [b for b in buckets if b]


class BackwardReducer:
    """Issue ``start(bucket)`` for each of ``buckets`` as backward makes its gradients final (see the module doc)."""

    def __init__(self, buckets: Sequence[Sequence[torch.Tensor]], start: Start, label: Callable[[torch.Tensor], str] = str) -> None:
        self._buckets = [list(b) for b in buckets if b]
        self._bucket_of = {p: k for k, bucket in enumerate(self._buckets) for p in bucket}
        self._start, self._label = start, label
        self._ready: set[torch.Tensor] = set()
        self._next = 0
        self._finishers: list[Callable[[], None]] = []
        self._syncing = True
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self._bucket_of]

    @property
    def issued(self) -> int:
        """How many buckets this backward has issued so far."""
        return self._next

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients without reducing them (every micro-batch but the last)."""
        before, self._syncing = self._syncing, False
        try:
            yield
        finally:
            self._syncing = before

    def _on_grad(self, p: torch.Tensor) -> None:
        if not self._syncing:
            return
        k = self._bucket_of[p]
        if k < self._next:
            raise RuntimeError(
                f"the gradient of {self._label(p)} was accumulated again after its reduction was issued: run every "
                "micro-batch but the last inside optimizer.no_sync() (and after a backward whose step is skipped, "
                "call optimizer.zero_grad())")
        self._ready.add(p)
        while self._next < len(self._buckets) and all(q in self._ready for q in self._buckets[self._next]):
            self._issue()

    def _issue(self) -> None:
        self._finishers.append(self._start(self._buckets[self._next]))
        self._next += 1

    def finish(self) -> None:
        """Issue the buckets not issued yet, in order, and wait for every reduction (its results written)."""
        self._issue_rest()
        self._wait()

    def drain(self) -> None:
        """End a backward whose step is skipped (the optimizer's ``zero_grad``): when one is in progress (a bucket
        issued or a gradient marked ready since the last :meth:`finish`), issue the rest, as :meth:`finish` would,
        and wait for everything; the next backward starts afresh. Every rank then has issued every bucket, also
        where a replica's backward reached fewer weights (an unused layer) and so issued fewer buckets than the
        others. With no backward in progress (zero_grad after a step, before the next backward) it issues
        nothing. A replica whose backward reached none of these weights issues nothing either: run backward on
        every replica (as with DistributedDataParallel)."""
        if self._next or self._ready:
            self._issue_rest()
        self._wait()

    def _issue_rest(self) -> None:
        while self._next < len(self._buckets):
            self._issue()

    def _wait(self) -> None:
        """Wait for the reductions issued so far (their results written) and start afresh."""
        finishers, self._finishers = self._finishers, []
        self._ready.clear()
        self._next = 0
        for finished in finishers:
            finished()

    def remove(self) -> None:
        """Remove the hooks (the reducer does nothing from now on)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
