"""The explicit object a member's update reads: no hidden state decides what it sees.

A :class:`MatrixContext` is one batch of same-shape matrices of a step (``batched``: a leading batch dim, one
matrix per member of a group, see dist_ortho.optim.groups), or a single matrix for members written for one
(``batched`` False: no batch dim; a convolution weight's matrices per spatial position count as one
member). It carries the matrices' global layout, their state, this rank's blocks of the gradient and the
momentum direction and, for members that use it, the Newton-Schulz result of the direction, computed for
all matrices of the step together. Global quantities are programs (dist_ortho.comm.coalesce) that the step runs
for all batches in lockstep, one flat collective per round: a member writes ``norm = yield from
ctx.norm(x)``, and gets one value per member (shape: the batch dims; index with ``[..., None, None]``).

A member changes its state with :meth:`MatrixContext.set_state`: the new values are committed after the
step's finite check, with the momentum and the weights (nothing is written for a skipped step).
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any

import torch

from dist_ortho import comm
from dist_ortho.comm import reductions
from dist_ortho.comm.coalesce import Program
from dist_ortho.optim.scale import muon_scale
from dist_ortho.parameters.layout import Layout
from dist_ortho.tp.jobs import gather_program, own_block, tensor_dim


@dataclass
class MatrixContext:
    param: torch.Tensor  # this rank's weights: the members' whole weights, stacked (batched) or one weight
    options: dict[str, Any]  # the members' param group: lr, momentum, scale_mode, ...
    layout: Layout  # the global layout of ONE matrix (of the whole weight in the weight-update phase)
    state: MutableMapping[str, Any]  # the matrices' state: stacked tensors (batched) or one state dict
    grad: torch.Tensor | None = None  # this rank's block of the gradient (weight decay applied)
    direction: torch.Tensor | None = None  # this rank's block of the momentum direction
    orthogonalized: torch.Tensor | None = None  # Newton-Schulz of ``direction``: the step's own, update() may change it
    names: list[str] = field(default_factory=list)  # the members' names, in batch order
    batched: bool = True  # tensors carry a leading batch dim (one matrix per member)
    staged: dict[str, torch.Tensor] = field(default_factory=dict)  # state set this step, committed after the check

    @property
    def name(self) -> str:
        """The member's name (the first member's, with the count, for a batch)."""
        if len(self.names) <= 1:
            return self.names[0] if self.names else "a matrix"
        return f"{self.names[0]} (and {len(self.names) - 1} more of the same shape)"

    def set_state(self, key: str, value: torch.Tensor) -> None:
        """Set state ``key`` to ``value`` (same shape as ``state[key]``) when the step is committed."""
        self.staged[key] = value

    def shape_scale(self) -> float:
        """Muon's scale factor of the global shape (``scale_mode``) times ``extra_scale_factor``."""
        scale = muon_scale(self.options["scale_mode"], self.layout.rows, self.layout.cols)
        return scale * self.options.get("extra_scale_factor", 1.0)

    def _dims(self, x: torch.Tensor) -> tuple[int, ...]:
        """The dims of one member: a matrix's two, or (one member, not batched) all of x."""
        return (-2, -1) if self.batched else tuple(range(x.ndim))

    # -- global quantities, as programs (one value per member) --
    def norm(self, x: torch.Tensor) -> Program[torch.Tensor]:
        """||x||_F of each member's global tensor (of which x holds this rank's blocks), float64."""
        return reductions.frobenius_norm(x, self.layout.group, dims=self._dims(x))

    def sum_of_squares(self, x: torch.Tensor) -> Program[torch.Tensor]:
        """sum(x**2) of each global matrix, float64."""
        return reductions.sum_of_squares(x, self.layout.group)

    def inner(self, a: torch.Tensor, b: torch.Tensor) -> Program[torch.Tensor]:
        """<a, b>_F per global matrix, float64 (shape: the batch dims)."""
        return reductions.inner_product(a, b, self.layout.group)

    def mean_over(self, x: torch.Tensor, dim: int) -> Program[torch.Tensor]:
        """Mean over matrix dim ``dim`` (-1 cols, -2 rows) of each global matrix, kept as size 1."""
        along = 1 if dim in (-1, 1) else 0
        group = self.layout.group if self.layout.partition_dim == along else None
        return reductions.mean_over(x, dim, group, self.layout.shape[dim])

    def gather(self, x: torch.Tensor) -> Program[torch.Tensor]:
        """The global matrices of which x holds this rank's blocks (one all-gather when sharded)."""
        if self.layout.group is None:
            yield from ()
            return x
        pd = self.layout.partition_dim
        return (yield from gather_program(x, tensor_dim(x, pd), self.layout.group, self.layout.sizes))

    def own_block(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's block of global matrices."""
        if self.layout.group is None:
            return full
        return own_block(full, self.layout.partition_dim, comm.group_rank(self.layout.group), self.layout.sizes)
