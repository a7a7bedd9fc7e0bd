"""What a step does when an update is not finite, decided by one check over the whole step.

Policies (``nonfinite``): "raise" a FloatingPointError naming the matrix and the step, "skip" the step (weights
and state untouched on every rank alike), "ignore" (write it). The check is one reduction over every update
and every new state tensor of the step, so it costs one host sync ("raise", "skip") or none ("ignore"; and
"skip" of a capturable step, which commits through ``torch.where`` on the device instead).
Updates and momenta are results that every rank of a matrix's TP group shares (a NaN in any rank's shard
reaches every rank through Newton-Schulz's collectives), so every rank decides alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import torch

Nonfinite = Literal["raise", "skip", "ignore"]
NONFINITE: tuple[str, ...] = get_args(Nonfinite)


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
