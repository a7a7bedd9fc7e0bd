"""MuonAdamW: a Muon-family optimizer for the matrices and AdamW for everything else, as one Optimizer.

Parameters are routed by :func:`dist_ortho.optim.routing.route` (group flags ``use_muon`` /
``use_fallback`` override the rules). Both inner optimizers share the param-group dicts of this one,
so ``param_groups``, ``zero_grad`` and torch LR schedulers work across both; the AdamW groups carry
``use_muon=False`` and their own ``lr`` (``adamw_lr``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.optim.optimizer import Optimizer

from dist_ortho import comm
from dist_ortho.optim.base import OrthogonalizedOptimizer, call_closure
from dist_ortho.optim.routing import log_routing, route

_ROUTING_KEYS = ("use_muon", "use_fallback")
_ADAMW_KEYS = {"adamw_lr": "lr", "adamw_betas": "betas", "adamw_eps": "eps", "adamw_weight_decay": "weight_decay"}


def _named(params: Any) -> list[tuple[str, torch.Tensor]]:
    out = []
    for i, item in enumerate(params):
        name, p = item if isinstance(item, tuple) else (getattr(item, "_dist_ortho_name", f"param{i}"), item)
        out.append((name, p))
    return out


class MuonAdamW(Optimizer):
    """One optimizer: ``optimizer`` (a registry name or an OrthogonalizedOptimizer class) for matrices, AdamW for the rest.

    Args:
        params: tensors, (name, tensor) pairs (e.g. ``model.named_parameters()``), or groups of either.
        optimizer: the matrix optimizer, by registry name ("muon", "scion", ...) or class.
        adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay: the AdamW side (per group: same keys).
        conv_mode: how the matrix optimizer treats 3D+ weights ("flatten" or "batched").
        verbose: log every routing decision at INFO.
        min_dim, max_aspect_ratio: routing thresholds.
        **kwargs: the matrix optimizer's arguments (lr, momentum, tp_group, tp_mode, ...).
    """

    def __init__(
        self,
        params: Any,
        optimizer: str | type[OrthogonalizedOptimizer] = "muon",
        *,
        adamw_lr: float = 3e-4,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float = 0.0,
        conv_mode: str = "flatten",
        verbose: bool = False,
        min_dim: int = 4,
        max_aspect_ratio: float = 128.0,
        **kwargs: Any,
    ) -> None:
        from dist_ortho.optim.registry import get_optimizer

        matrix_cls = get_optimizer(optimizer) if isinstance(optimizer, str) else optimizer
        tp_size = comm.group_size(kwargs.get("tp_group"))
        params = list(params)
        groups = params if params and isinstance(params[0], dict) else [{"params": params}]
        matrix_groups: list[dict[str, Any]] = []
        fallback_groups: list[dict[str, Any]] = []
        for group in groups:
            options = {k: v for k, v in group.items() if k != "params" and k not in _ROUTING_KEYS and k not in _ADAMW_KEYS}
            flags = {k: group.get(k) for k in _ROUTING_KEYS}
            matrices, others = [], []
            for name, p in _named(group["params"]):
                decision = route(p, **flags, tp_size=tp_size, min_dim=min_dim, max_aspect_ratio=max_aspect_ratio)
                log_routing(name, p, decision, verbose)
                (matrices if decision.use_muon else others).append(p)
            if matrices:
                matrix_groups.append({"params": matrices, "use_muon": True, **options})
            if others:
                adamw = {"lr": adamw_lr, "betas": adamw_betas, "eps": adamw_eps, "weight_decay": adamw_weight_decay}
                adamw.update({_ADAMW_KEYS[k]: v for k, v in group.items() if k in _ADAMW_KEYS})
                fallback_groups.append({"params": others, "use_muon": False, **adamw})
        self._assemble(
            matrix_cls(matrix_groups, conv_mode=conv_mode, **kwargs) if matrix_groups else None,
            torch.optim.AdamW(fallback_groups) if fallback_groups else None,
        )

    @classmethod
    def combine(cls, matrix_optimizer: Optimizer | None, fallback_optimizer: Optimizer | None) -> MuonAdamW:
        """One MuonAdamW over two optimizers built elsewhere (their groups are shared, not copied)."""
        self = cls.__new__(cls)
        self._assemble(matrix_optimizer, fallback_optimizer)
        return self

    def _assemble(self, matrix_optimizer: Optimizer | None, fallback_optimizer: Optimizer | None) -> None:
        self.matrix_optimizer, self.fallback_optimizer = matrix_optimizer, fallback_optimizer
        for group in matrix_optimizer.param_groups if matrix_optimizer else []:
            group.setdefault("use_muon", True)
        for group in fallback_optimizer.param_groups if fallback_optimizer else []:
            group.setdefault("use_muon", False)
        Optimizer.__init__(self, [g for _, o in self._inner() for g in o.param_groups], {})

    def _inner(self) -> list[tuple[str, Optimizer]]:
        return [(k, o) for k, o in (("matrix", self.matrix_optimizer), ("fallback", self.fallback_optimizer)) if o]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = call_closure(closure)
        for _, optimizer in self._inner():
            optimizer.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {key: optimizer.state_dict() for key, optimizer in self._inner()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        inner = dict(self._inner())
        if set(state_dict) != set(inner):
            raise ValueError(f"state_dict holds {sorted(state_dict)}, this MuonAdamW has {sorted(inner)}")
        for key, optimizer in inner.items():
            optimizer.load_state_dict(state_dict[key])
        # torch's load_state_dict gives the inner optimizers new group dicts: share them again.
        self.param_groups = [g for _, optimizer in self._inner() for g in optimizer.param_groups]
