"""What a step does when an update is not finite, decided by one check over the whole step.

Policies (``nonfinite``): "raise" a FloatingPointError naming the matrix and the step, "skip" the step (weights
and state untouched on every rank alike), "ignore" (write it). The check is one reduction over every update
and every new state tensor of the step, so it costs one host sync ("raise", "skip") or none ("ignore"; and
"skip" of a capturable step, which commits through ``torch.where`` on the device instead).
Updates and momenta are results that every rank of a matrix's TP group shares (a NaN in any rank's shard
reaches every rank through Newton-Schulz's collectives), so every rank decides alike.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch

Nonfinite = Literal["raise", "skip", "ignore"]
NONFINITE: tuple[str, ...] = get_args(Nonfinite)
logger = logging.getLogger(__name__)


def _finite(t: torch.Tensor) -> torch.Tensor:
    """t's elements all finite, as a device bool: its min and max in one pass (both propagate NaN and +-Inf),
    without a boolean temporary as large as t."""
    if t.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=t.device)
    low, high = torch.aminmax(t)
    return torch.isfinite(low) & torch.isfinite(high)


def all_finite(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """A device bool: every element of every tensor is finite (one reduction per tensor, one stack)."""
    if not tensors:
        return torch.ones((), dtype=torch.bool)
    return torch.stack([_finite(t) for t in tensors]).all()


def first_nonfinite(batch: torch.Tensor) -> int | None:
    """The first matrix of a batch (leading dim) that is not finite, or None (a host sync: for messages)."""
    if batch.ndim == 0:
        return None if bool(torch.isfinite(batch)) else 0
    bad = ~torch.isfinite(batch.reshape(batch.size(0), -1)).all(dim=1)
    return int(bad.nonzero()[0, 0]) if bool(bad.any()) else None


def commit(target: torch.Tensor, value: torch.Tensor, ok: torch.Tensor | None) -> None:
    """target <- value, or (``ok`` a device bool, capturable "skip") only where the step is finite."""
    target.copy_(value if ok is None else torch.where(ok, value, target))


@dataclass
class Verdict:
    """A step's finite check here: ``ok`` True / False (host), a device bool (capturable), None (not checked);
    the first non-finite matrix's name and policy; whether a group skips (capturable)."""

    ok: torch.Tensor | bool | None
    name: str | None = None
    policy: str | None = None
    skips: bool = False

    def flag(self, device: torch.device) -> torch.Tensor:
        """What replicas exchange: 1 finite (or unchecked), 0 not ("skip"), -1 not ("raise"); capturable: the
        device bool as 1 / 0."""
        if isinstance(self.ok, torch.Tensor):
            return self.ok.to(torch.float32)
        return torch.tensor(1.0 if self.ok is not False else -1.0 if self.policy == "raise" else 0.0, device=device)


def shared_verdict(mine: Verdict, flags: Sequence[float], owner: str) -> Verdict:
    """The replicas' common verdict from every DP rank's flag (:meth:`Verdict.flag`): the same on every rank,
    naming the DP ranks that found a non-finite update (each logs its own matrix's name)."""
    failing = [r for r, f in enumerate(flags) if f < 1]
    if not failing:
        return Verdict(True)
    if mine.ok is False:
        logger.error("%s: the update of %s is not finite on this rank", owner, mine.name)
    return Verdict(False, f"a parameter owned by DP rank(s) {failing}", "raise" if min(flags) < 0 else "skip")
