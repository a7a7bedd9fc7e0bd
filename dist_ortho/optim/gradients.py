"""Gradients on the DP x TP grid (dist_ortho.parameters.grid): averaged into their owners (``reduce_grads=True``), and each
element counted once in a grid-wide sum of squares (clipping), whatever the layout.

A parameter's DP ranks either replicate it (one owner replica updates it; its gradient is averaged into the
owner) or hold pieces of their own (FSDP2's DP-sharded DTensors, experts split over DP: their gradients are
already each rank's own, and left as they are).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch

from dist_ortho import comm
from dist_ortho.optim.layouts import ParamLayouts
from dist_ortho.parameters.dtensor import local
from dist_ortho.parameters.grid import start_reduce_to_owners


def dp_own(layouts: ParamLayouts, p: torch.Tensor) -> bool:
    """p's grid ranks each hold a piece of their own (in pieces, or experts split over DP): never shared."""
    return layouts.in_pieces(p) or layouts.dp_local(p)


def reduce_into_owners(params: Sequence[torch.Tensor], owners: Sequence[int], dp_group: comm.ProcessGroup | None) -> None:
    """Average every parameter's gradient over ``dp_group`` into its owner's (one reduce-scatter per dtype),
    in place: a DTensor's gradient keeps its placements; a missing gradient counts as zeros."""
    start_reduce_into_owners(params, owners, dp_group)()


def start_reduce_into_owners(
    params: Sequence[torch.Tensor], owners: Sequence[int], dp_group: comm.ProcessGroup | None
) -> Callable[[], None]:
    """:func:`reduce_into_owners` issued now (the gradients read now); the returned function waits and writes."""
    grads = [local(p.grad) if p.grad is not None else None for p in params]
    averages = start_reduce_to_owners(grads, [local(p) for p in params], owners, dp_group)

    def write() -> None:
        for p, grad in zip(params, averages()):
            if grad is None:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            local(p.grad).copy_(grad)

    return write


def sum_of_squares(params: Sequence[torch.Tensor], layouts: ParamLayouts, owns: Callable[[torch.Tensor], bool],
                   tp_group: comm.ProcessGroup | None) -> torch.Tensor:
    """This rank's share of sum(g^2) over ``params``' gradients, float64: each element of the global gradients
    counted on exactly one rank of the grid (a shard by its TP rank on the owner replica, a TP-replicated matrix
    by TP rank 0 of it, a piece of its own by its DP rank)."""
    total = torch.zeros((), dtype=torch.float64)
    tp_rank = comm.group_rank(tp_group)
    for p in params:
        grad = local(p.grad) if p.grad is not None else None
        if grad is None or (layouts.layouts[p].group is None and tp_rank != 0):
            continue
        if dp_own(layouts, p) or owns(p):
            total += grad.double().square().sum().cpu()
    return total


@contextlib.contextmanager
def decoupled_grads(params: Sequence[torch.Tensor]) -> Iterator[None]:
    """Within: a parameter whose gradient is in ``decoupled_grad`` (Megatron-FSDP's ``use_decoupled_grad=True``,
    for precision-aware optimizers; ``.grad`` then stays None) has it as ``.grad``, in the parameter's dtype; after,
    what was done to it in place (clipping's scale, a reduction into owners) is in ``decoupled_grad`` and ``.grad``
    is None again. Every method that reads gradients runs inside (the step, reduce_gradients, the grid's sum of
    squares, clipping): without it they read no gradient, silently."""
    lent = []
    for p in params:
        grad = getattr(p, "decoupled_grad", None)
        if p.grad is None and grad is not None:
            p.grad = grad if grad.dtype == p.dtype else grad.to(p.dtype)
            lent.append((p, grad))
    try:
        yield
    finally:
        for p, grad in lent:
            if p.grad is not None and p.grad is not grad:
                grad.copy_(p.grad)
            p.grad = None
