"""The explicit per-matrix object a member's update reads: no hidden state decides what it sees.

A :class:`MatrixContext` is one matrix of a step: a whole parameter's matrix view, or one component of
a split fused QKV weight. It carries the matrix's global layout, its own optimizer state, this rank's
blocks of the gradient and the momentum direction, and (for members that use it) the Newton-Schulz
result of the direction, computed for all matrices of the step together. Global quantities are
programs (dist_ortho.coalesce) that the step runs for all matrices in lockstep, one flat collective per
round: a member writes ``norm = yield from ctx.norm(x)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dist_ortho import comm, reductions
from dist_ortho.coalesce import Program
from dist_ortho.params import MatrixLayout
from dist_ortho.tp.jobs import gather_program, own_block, tensor_dim
from dist_ortho.optim.scale import muon_scale


@dataclass
class MatrixContext:
    param: torch.Tensor  # the parameter (the whole fused weight for a QKV component)
    options: dict[str, Any]  # the parameter's group: lr, momentum, scale_mode, ...
    layout: MatrixLayout  # this matrix's global shape and how ranks hold it
    param_state: dict[str, Any]  # the parameter's optimizer state
    grad: torch.Tensor | None = None  # this rank's block of the gradient (matrix view, weight decay applied)
    direction: torch.Tensor | None = None  # this rank's block of the momentum direction (matrix view)
    orthogonalized: torch.Tensor | None = None  # Newton-Schulz of ``direction`` (members that ask for it)
    part: int | None = None  # the component of a split fused weight (None: the whole parameter)
    source: torch.Tensor | None = None  # the optimizer's parameter, when ``param`` is its TP block (DTensor)

    @property
    def key(self) -> torch.Tensor:
        """The optimizer's parameter (what its state, layouts and owners are keyed by)."""
        return self.source if self.source is not None else self.param

    @property
    def state(self) -> dict[str, Any]:
        """This matrix's own state: the parameter's, or its component's (key ``part<i>``)."""
        if self.part is None:
            return self.param_state
        return self.param_state.setdefault(f"part{self.part}", {})

    @property
    def name(self) -> str:
        name = getattr(self.key, "_dist_ortho_name", None) or f"parameter of shape {tuple(self.key.shape)}"
        return name if self.part is None else f"{name} [part {self.part}]"

    def shape_scale(self) -> float:
        """Muon's scale factor of the global shape (``scale_mode``) times ``extra_scale_factor``."""
        scale = muon_scale(self.options["scale_mode"], self.layout.rows, self.layout.cols)
        return scale * self.options.get("extra_scale_factor", 1.0)

    # -- global quantities, as programs --
    def norm(self, x: torch.Tensor) -> Program[torch.Tensor]:
        """||x||_F over every dim of the global tensor of which x is this rank's block, float64 scalar."""
        return reductions.frobenius_norm(x, self.layout.group, dims=tuple(range(x.ndim)))

    def sum_of_squares(self, x: torch.Tensor) -> Program[torch.Tensor]:
        """sum(x**2) of the global matrix (per matrix of a batch), float64."""
        return reductions.sum_of_squares(x, self.layout.group)

    def inner(self, a: torch.Tensor, b: torch.Tensor) -> Program[torch.Tensor]:
        """<a, b>_F per global matrix, float64 (shape: the batch dims)."""
        return reductions.inner_product(a, b, self.layout.group)

    def mean_over(self, x: torch.Tensor, dim: int) -> Program[torch.Tensor]:
        """Mean over matrix dim ``dim`` (-1 cols, -2 rows) of the global matrix, kept as size 1."""
        along = 1 if dim in (-1, 1) else 0
        group = self.layout.group if self.layout.partition_dim == along else None
        return reductions.mean_over(x, dim, group, self.layout.shape[dim])

    def gather(self, x: torch.Tensor) -> Program[torch.Tensor]:
        """The global matrix of which x is this rank's block (one all-gather when sharded)."""
        if self.layout.group is None:
            yield from ()
            return x
        pd = self.layout.partition_dim
        return (yield from gather_program(x, tensor_dim(x, pd), self.layout.group, self.layout.sizes))

    def own_block(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's block of a global matrix."""
        if self.layout.group is None:
            return full
        return own_block(full, self.layout.partition_dim, comm.group_rank(self.layout.group), self.layout.sizes)
