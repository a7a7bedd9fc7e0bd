"""Cross-rank agreement on a step's plan: every rank of every group the step talks over must run the same plan
(parameters in order, global shapes, dims, dtypes, modes, Newton-Schulz options; names where known), or the
coalesced collectives would not match. :class:`PlanAgreement` checks it with one 16-byte all-gather per group
when the plan is new to this rank (none while it is unchanged); a disagreement raises a ValueError on every
rank, naming the first differing entry on the ranks of the group where it was found (dist_ortho.comm.agree_over:
the others, told by the flag their next group's check carries, say where). What a rank finds wrong with its own
parameters (a DTensor's local tensor that is not its piece) rides the same check as a flag, so that its peers
raise too instead of meeting it in collectives of another size. :func:`agree_batching` makes ranks that
compute the same whole matrices batch them alike.

``verify_plan`` (dist_ortho.optim.settings.VerifyPlan): "on_change" (the default) checks a plan when it is new to this rank. A rank
that changes its plan alone after the first step then meets the others in different collectives, which the
collective timeout ends (a CollectiveError, not the named ValueError): a changed plan changes the size of the
step's collectives, so no fingerprint can ride in them. "every_step" makes the check the first call of every step
on every rank (:meth:`PlanAgreement.verify`: the layout of every parameter, its options and whether it takes part;
one 16-byte all-gather per group, the digest of an unchanged plan kept), so the rank that changed and the ones that
did not meet in the same all-gather and all raise the ValueError naming the first entry they differ on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from dist_ortho import comm
from dist_ortho.optim.settings import NEWTON_SCHULZ_OPTIONS
from dist_ortho.parameters.layout import Layout
from dist_ortho.tp import batching

ENTRY = (f"name, global shape, partition_dim, group, dtype, tp_mode, ({', '.join(NEWTON_SCHULZ_OPTIONS)}), "
         "coalesce, fp32_matmul_prec, local_gram, batch_matrices, nonfinite, QKV or head parts, weight_update_hook")


def plan_entry(name: str | None, layout: Layout, kind: str | None, dtype: Any, group: dict[str, Any],
               parts: int, dp_local: bool = False, hook: tuple = ()) -> tuple:
    """What every rank must agree on about one parameter of the step (it decides the collectives). ``kind``:
    "dense" or "expert" (its TP group), None when not sharded; ``dp_local``: experts split over DP ranks,
    whose count (the layout's leading dim) each DP rank has of its own; ``hook``: the optimizer's weight-update hook
    (dist_ortho.optim.hooks.hook_entry)."""
    ns = tuple(group.get(key) for key in NEWTON_SCHULZ_OPTIONS)
    shape = layout.shape[1:] if dp_local else layout.shape
    return (
        name, tuple(shape), layout.partition_dim, kind, str(dtype), group["tp_mode"], ns, group["coalesce"],
        group["fp32_matmul_prec"], group["local_gram"], group["batch_matrices"], group["nonfinite"], parts, hook,
    )


class PlanAgreement:
    """Remembers the last few plans every rank agreed on (a plan that comes back costs nothing)."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._agreed: list[tuple] = []
        self._verified: tuple[Any, list[tuple], list[str], int] | None = None

    def check(self, entries: Sequence[tuple], labels: Sequence[str], groups: Sequence[comm.ProcessGroup | None],
              error: str | None = None) -> None:
        """``error``: what this rank found wrong with its own parameters, raised on every rank (no plan with
        one is ever agreed)."""
        key = tuple(entries)
        if key in self._agreed and error is None:
            return
        comm.agree_over(self._stamped(entries), list(labels), groups, self._what(ENTRY), error=error)
        self._agreed = [*self._agreed[-3:], key]

    def verify(self, key: Any, entries: Callable[[], tuple[list[tuple], list[str]]],
               groups: Sequence[comm.ProcessGroup | None], error: str | None = None) -> None:
        """``verify_plan="every_step"``: the same check every step, this rank's plan ``entries()`` (made, and its
        digest computed, only when ``key`` changed) against every rank's, over each of ``groups``."""
        if self._verified is None or self._verified[0] != key:
            made, labels = entries()
            stamped = self._stamped(made)
            self._verified = (key, stamped, labels, comm.digest_of(stamped))
        _, stamped, labels, digest = self._verified
        comm.agree_over(stamped, labels, groups, self._what(f"{ENTRY}, taking part"), digest, error)

    def _stamped(self, entries: Sequence[tuple]) -> list[tuple]:
        """Entries as exchanged, each led by the optimizer's class name (ranks stepping different members
        differ there)."""
        return [(self.owner, *e) for e in entries]

    def _what(self, entry: str) -> str:
        return f"the {self.owner} step's plan (entry: {entry})"


def agree_batching(keys: Sequence[batching.Key], groups: Sequence[comm.ProcessGroup | None]) -> None:
    """Whether whole-matrix Newton-Schulz of these shapes pays batched on this device (dist_ortho.tp.batching),
    measured where this process has no choice recorded, and agreed with every rank that computes the same matrices
    (the majority over each of ``groups``: one small all-reduce each, when a plan is new). Every key of the plan
    votes, recorded ones with their choice: the plan is agreed, so every rank of a group has the same keys, but not
    the same record (a rank may have measured a shape for matrices it owned under another optimizer or grid), and
    ranks that orthogonalize the same matrices must round alike."""
    keys = list(dict.fromkeys(keys))
    shared = [g for g in groups if comm.group_size(g) > 1]
    if batching.overridden() or not keys or not (shared or batching.needs_measuring(keys)):
        return
    choices = [batching.recorded(k) for k in keys]
    flags = torch.tensor([batching.measure(k) if c is None else c for k, c in zip(keys, choices)], dtype=torch.int64)
    for group in shared:
        votes = comm.all_reduce(flags.to(comm.collective_device(group)), group).cpu()
        flags = (2 * votes >= comm.group_size(group)).to(torch.int64)
    batching.record({k: bool(f) for k, f in zip(keys, flags.tolist())})
