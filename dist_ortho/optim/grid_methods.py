"""GridMethods: the optimizer's public methods that read across the DP x TP replica grid.

Each one asks the grid (dist_ortho.optim.replicas.ReplicaGrid, composed into the optimizer as ``self.grid``): who
owns a parameter, the gradients' reduction into the owners, the share of the new weights and its overlap, and the
steps the shared finite decision skipped. A base of :class:`~dist_ortho.optim.base.OrthogonalizedOptimizer`, before
torch's Optimizer (its zero_grad, state_dict and load_state_dict first complete what is in flight).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from dist_ortho import comm
from dist_ortho.optim.gradients import decoupled_grads, sum_of_squares
from dist_ortho.parameters.grid import grid_sum_problem

if TYPE_CHECKING:
    from dist_ortho.optim.layouts import ParamLayouts
    from dist_ortho.optim.replicas import ReplicaGrid


class GridMethods:
    """The replica grid's public face on the optimizer (see the module doc)."""

    grid: ReplicaGrid
    layouts: ParamLayouts
    param_groups: list[dict[str, Any]]
    tp_group: comm.ProcessGroup | None
    dp_group: comm.ProcessGroup | None
    _last_comm: comm.CommStats
    _skipped: int
    _skipped_on_device: torch.Tensor | None
    name_of: Callable[[torch.Tensor], str]
    layout: Callable[[torch.Tensor], Any]

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for a non-finite update (``nonfinite="skip"``; reading it syncs a capturable step's count)."""
        on_device = int(self._skipped_on_device) if self._skipped_on_device is not None else 0
        return self._skipped + on_device

    def count_skip(self, ok: torch.Tensor | None = None) -> None:
        """One more skipped step, or (capturable) one where the device bool ``ok`` is False."""
        if ok is None:
            self._skipped += 1
            return
        if self._skipped_on_device is None:
            self._skipped_on_device = torch.zeros((), dtype=torch.int64, device=ok.device)
        self._skipped_on_device.add_((~ok).to(torch.int64))

    def finish(self) -> None:
        """Complete the last step's share (``overlap=True``): every replica's weights and the owners' state are
        then the step's (or it raises, as the step would have, on every rank alike). A no-op otherwise."""
        self.grid.finish()

    def wait_for(self, module: torch.nn.Module) -> None:
        """Complete the share of ``module``'s parameters (and of those shared before them)."""
        self.grid.wait_for(module)

    def overlap_by_layer(self, layers: Sequence[torch.nn.Module]) -> list[Any]:
        """The model's layers, in forward order, as the units of overlap. With ``overlap=True`` the share is cut
        into one bucket per layer, waited for where the layer's weights are next read: a forward pre-hook (before
        any other, FSDP2's all-gather included), and state-dict and load-state-dict pre-hooks. On the DP x TP grid
        every parameter the share brings must be in one of the layers (a ValueError names those in none). With
        ``overlap_with_backward`` the gradients are reduced per layer, in backward order. Returns the handles."""
        return self.grid.overlap_by_layer(layers)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch.optim's, after forgetting that these gradients were reduced and completing the reductions a
        backward issued for them (``overlap_with_backward``: none is left in flight)."""
        self.grid.forget_reduction()
        super().zero_grad(set_to_none)

    def no_sync(self) -> contextlib.AbstractContextManager[None]:
        """Gradient accumulation with ``overlap_with_backward``: a backward inside this block reduces nothing (its
        gradients are not final); the last micro-batch's backward, outside it, starts the reductions."""
        return self.grid.no_sync()

    def state_dict(self) -> dict[str, Any]:
        self.finish()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.finish()
        super().load_state_dict(state_dict)

    def comm_stats(self) -> comm.CommStats:
        """The last step's collectives on this rank: calls and bytes by kind, and ``wait_ms``, the time it spent
        blocked on them (dist_ortho.comm.CommStats; with ``overlap`` the share's later waits are added)."""
        return self._last_comm

    def owner(self, p: torch.Tensor) -> int:
        """The rank of the grid group (dist_ortho.optim.layouts) that updates ``p`` and keeps its state (0 without one)."""
        return self.grid.owner(p)

    def owns(self, p: torch.Tensor) -> bool:
        """Whether this rank updates ``p`` and keeps its state (the checkpoint contract's owner): its owner
        replica's ranks; held in pieces its owner rank only, under HSDP one rank of the replicas x shards grid."""
        return self.grid.owns(p)

    def reduce_gradients(self) -> None:
        """With ``reduce_grads``: average the gradients into their owners now (the step does it otherwise;
        call it before reading gradients across the grid, e.g. :meth:`grad_sum_of_squares`)."""
        self.grid.reduce_gradients()

    def grad_sum_of_squares(self) -> torch.Tensor:
        """This rank's share of sum(g^2) over every gradient, float64, each element counted on one rank of the
        DP x TP grid (dist_ortho.optim.gradients): the sum over the grid is the single-process value."""
        params = [p for group in self.param_groups for p in group["params"]]
        problem = grid_sum_problem([(self.name_of(p), p) for p in params], self.tp_group, self.dp_group)
        if problem is not None:  # before any collective, alike on every rank
            raise ValueError(f"{type(self).__name__}.grad_sum_of_squares: {problem}")
        self.reduce_gradients()
        for p in params:
            self.layout(p)
        with decoupled_grads(params):
            return sum_of_squares(params, self.layouts, self.owns, self.tp_group)

    def qk_clip(self, max_logits: Any, tau: float, groups: Sequence[Any] = ()) -> Any:
        """QK-clip (MuonClip) after the step, with maxima agreed over TP, DP and ``groups`` (dist_ortho.optim.qk_clip)."""
        from dist_ortho.optim.qk_clip import qk_clip
        return qk_clip(self, max_logits, tau, groups)
