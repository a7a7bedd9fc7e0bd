"""How each parameter of an optimizer is held, found once for all of them at its first step.

For every parameter: its global layout (dist_ortho.params: TE/Megatron attributes, or DTensor placements through
dist_ortho.dtensor), its fused-QKV components (dist_ortho.qkv), and its owner replica on the DP x TP grid
(dist_ortho.grid). Finding them takes one shape exchange per process group (and one all-gather over DP for
DP-sharded DTensors); every rank then holds the same layouts, so an error found after it is raised alike on
every rank.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from dist_ortho import comm
from dist_ortho.dtensor import DTensorParams
from dist_ortho.grid import assign_owners, check_grid
from dist_ortho.params import MatrixLayout, find_layouts, is_expert_stack, unreadable
from dist_ortho.qkv import split_layout

_SHARDING = ("tensor_model_parallel", "partition_dim", "partition_stride", "expert_tp")


def matrix_view(t: torch.Tensor, conv_mode: str | None) -> torch.Tensor:
    """t as a matrix (2D) or, for ``conv_mode="batched"``, a batch of (out, in) matrices per spatial position."""
    if t.ndim == 2:
        return t
    if conv_mode == "flatten":
        return t.reshape(t.size(0), -1)
    return t.flatten(2).permute(2, 0, 1)


class ParamLayouts:
    """Layouts, fused-QKV parts, DP owners and DTensor holdings of an optimizer's parameters."""

    def __init__(self, tp_group: comm.ProcessGroup | None, expert_tp_group: comm.ProcessGroup | None,
                 dp_group: comm.ProcessGroup | None, is_qkv: Callable[[torch.Tensor], bool]) -> None:
        self.tp_group, self.expert_tp_group, self.dp_group = tp_group, expert_tp_group, dp_group
        self.is_qkv = is_qkv
        self.layouts: dict[torch.Tensor, MatrixLayout] = {}
        self.parts: dict[torch.Tensor, list[tuple[torch.Tensor, MatrixLayout]]] = {}
        self.owners: dict[torch.Tensor, int] = {}
        self.experts: set[torch.Tensor] = set()  # 3D weights [E, out, in]: E matrices each
        self.dtensors = DTensorParams()

    def __contains__(self, p: object) -> bool:
        return p in self.layouts

    def find(self, new: Sequence[tuple[torch.Tensor, dict[str, Any]]], names: Callable[[torch.Tensor], str | None]) -> None:
        """Layouts, parts and owners of the ``new`` (parameter, group) pairs (collectives: see the module doc)."""
        for p, _ in new:  # before any collective (a wrapper may have put new tensors into the groups)
            problem = unreadable(p, names(p))
            if problem is not None:
                raise ValueError(problem)
        if not self.layouts:
            check_grid(self.tp_group, self.dp_group)
        self.experts.update(p for p, _ in new if is_expert_stack(p, names(p)) or self.dtensors.is_expert_stack(p))
        self.dtensors.add([p for p, _ in new], self.tp_group, self.dp_group, [names(p) for p, _ in new],
                          self.expert_tp_group, [p in self.experts for p, _ in new])
        sources = [self._expert_source(p) if p in self.experts else self.dtensors.source(p) for p, _ in new]
        views = [(q, q if p in self.experts else matrix_view(q.detach(), group["conv_mode"]))
                 for q, (p, group) in zip(sources, new)]
        blockwise = [group["tp_mode"] == "blockwise" for _, group in new]
        found = find_layouts(views, self.tp_group, self.expert_tp_group, blockwise, [names(p) for p, _ in new])
        for (p, _), layout in zip(new, found):
            whole = tuple(p.shape[1:]) if p in self.experts else tuple(p.shape)  # experts: split over EP / DP
            if p in self.dtensors and layout.shape[-len(whole):] != whole:
                raise ValueError(f"{names(p)}: its TP blocks make a {layout.shape} matrix, not its global shape "
                                 f"{tuple(p.shape)}: placements that dist_ortho cannot reassemble")
            self.layouts[p] = layout
        for (p, group), source in zip(new, sources):  # every rank has the same layouts now: errors are alike
            if group["split_qkv"] and self.is_qkv(p):
                self._split(p, group, source, names(p) or f"fused QKV weight of shape {tuple(p.shape)}")

        def shapes(p: torch.Tensor) -> list[tuple[int, ...]]:
            return [layout.shape for _, layout in self.parts.get(p, [])] or [self.layouts[p].shape]

        shared = [p for p, _ in new if not self.dtensors.dp_local(p)]  # dp-local experts: every DP rank its own
        taken = [(shapes(p), owner) for p, owner in self.owners.items() if not self.dtensors.dp_local(p)]
        owners = assign_owners([shapes(p) for p in shared], comm.group_size(self.dp_group), taken)
        self.owners.update(zip(shared, owners))
        self.owners.update((p, comm.group_rank(self.dp_group)) for p, _ in new if self.dtensors.dp_local(p))

    def _expert_source(self, p: torch.Tensor) -> torch.Tensor:
        """What an expert weight's layout is read from: its local shape as a batch of matrices, with the TE
        attributes of one matrix (partition_dim a matrix dim)."""
        held = self.dtensors.source(p)
        source = torch.zeros((), dtype=p.dtype, device=held.device).expand(held.shape)
        source.matrix_batch = True
        for attribute in _SHARDING:
            if hasattr(held, attribute):
                setattr(source, attribute, getattr(held, attribute))
        if p not in self.dtensors and getattr(p, "tensor_model_parallel", False) is True:
            if getattr(p, "partition_dim", -1) not in (1, 2):
                raise ValueError(f"an expert weight [E, out, in] of shape {tuple(p.shape)} must be sharded along dim 1 "
                                 f"or 2 (its matrices' rows or columns), got partition_dim={p.partition_dim}")
            source.partition_dim = p.partition_dim - 1
        return source

    def _split(self, p: torch.Tensor, group: dict[str, Any], source: torch.Tensor, name: str) -> None:
        shapes = getattr(p, "qkv_split_shapes", None) or group["qkv_split_shapes"]
        if shapes is None:
            raise ValueError(f"{name} is marked as fused QKV but has no qkv_split_shapes (set it on the parameter or "
                             "pass qkv_split_shapes=)")
        if p.ndim != 2:
            raise ValueError(f"{name}: a fused QKV weight must be 2D, got shape {tuple(p.shape)}")
        device = self.dtensors.value(p).device
        self.parts[p] = [(index.to(device), layout)
                         for index, layout in split_layout(self.layouts[p], source.size(0), shapes, group["qkv_per_head"], name)]
