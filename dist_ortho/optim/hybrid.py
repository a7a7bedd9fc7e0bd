"""MuonAdamW: a Muon-family optimizer for the matrices and AdamW for everything else, as one Optimizer.

Parameters are routed by :func:`dist_ortho.optim.routing.route` (group flags ``use_muon`` /
``use_fallback`` override the rules). Both inner optimizers share the param-group dicts of this one,
so ``param_groups``, ``zero_grad`` and torch LR schedulers work across both; the AdamW groups carry
``use_muon=False`` and their own ``lr`` (``adamw_lr``).
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.optim.optimizer import Optimizer

from dist_ortho import comm
from dist_ortho.optim.base import OrthogonalizedOptimizer, call_closure
from dist_ortho.optim.gradients import decoupled_grads
from dist_ortho.optim.holding import fallback_holding
from dist_ortho.optim.options import accepted_keywords, check_number, reject_unknown
from dist_ortho.optim.registry import get_optimizer
from dist_ortho.optim.routing import log_routing, needs_shape, route
from dist_ortho.parameters.dtensor import is_dtensor, local, mesh_groups
from dist_ortho.parameters.grid import counts_in_grid_sum, grid_sum, grid_sum_problem
from dist_ortho.parameters.layout import Held
from dist_ortho.parameters.protocol import find_layouts, is_expert_stack, is_sharded

_ROUTING_KEYS = ("use_muon", "use_fallback")
_ADAMW_KEYS = {"adamw_lr": "lr", "adamw_betas": "betas", "adamw_eps": "eps", "adamw_weight_decay": "weight_decay"}


def _named(params: Any) -> list[tuple[str | None, torch.Tensor]]:
    """(name, tensor) of each item of ``params`` (None for a tensor given without a name)."""
    return [item if isinstance(item, tuple) else (None, item) for item in params]


class MuonAdamW(Optimizer):
    """One optimizer: ``optimizer`` (a registry name or an OrthogonalizedOptimizer class) for matrices, AdamW for the rest.

    Args:
        params: tensors, (name, tensor) pairs (e.g. ``model.named_parameters()``), or groups of either.
        optimizer: the matrix optimizer, by registry name ("muon", "scion", ...) or class.
        adamw_lr: the AdamW side's learning rate (per group: the same key).
        adamw_betas: its betas.
        adamw_eps: its eps.
        adamw_weight_decay: its (decoupled) weight decay.
        conv_mode: how the matrix optimizer treats 3D+ weights ("flatten" or "batched").
        verbose: log every routing decision at INFO.
        min_dim: a weight with a dim below this goes to AdamW (routing.py).
        max_aspect_ratio: a weight more elongated than this goes to AdamW.
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
        matrix_cls = get_optimizer(optimizer) if isinstance(optimizer, str) else optimizer
        reject_unknown(f"MuonAdamW (matrix optimizer {getattr(matrix_cls, '__name__', matrix_cls)})", kwargs,
                       accepted_keywords(matrix_cls) - {"conv_mode"})
        params = list(params)
        groups = params if params and isinstance(params[0], dict) else [{"params": params}]
        named_groups = [_named(group["params"]) for group in groups]
        tp_group, dp_group = kwargs.get("tp_group"), kwargs.get("dp_group")
        if kwargs.get("device_mesh") is not None:
            tp_group, dp_group = mesh_groups(kwargs["device_mesh"], tp_group, dp_group)
        dims = _global_dims(groups, named_groups, tp_group, kwargs.get("expert_tp_group"), kwargs.get("tp_mode") == "blockwise")
        self._routing = {"min_dim": min_dim, "max_aspect_ratio": max_aspect_ratio, "verbose": verbose}
        self._adamw = {"lr": adamw_lr, "betas": adamw_betas, "eps": adamw_eps, "weight_decay": adamw_weight_decay}
        matrix_groups: list[dict[str, Any]] = []
        fallback_groups: list[dict[str, Any]] = []
        for group, named in zip(groups, named_groups):
            matrices, others = self._route(group, named, dims)
            matrix_groups += [matrices] if matrices["params"] else []
            fallback_groups += [others] if others["params"] else []
        self.tp_group, self.dp_group = tp_group, dp_group
        names = {name: p for named in named_groups for name, p in named if name is not None}
        kwargs.setdefault("param_names", names)
        self._assemble(
            matrix_cls(matrix_groups, conv_mode=conv_mode, **kwargs) if matrix_groups else None,
            torch.optim.AdamW(fallback_groups) if fallback_groups else None,
        )
        if self.matrix_optimizer is not None:  # its groups, read from DTensor meshes when none were given
            self.tp_group, self.dp_group = self.matrix_optimizer.tp_group, self.matrix_optimizer.dp_group

    def _route(self, group: dict[str, Any], named: list[tuple[str | None, torch.Tensor]], dims: dict
               ) -> tuple[dict[str, Any], dict[str, Any]]:
        """``group`` split into its matrix optimizer's group and its AdamW group (route's rules, its flags)."""
        options = {k: v for k, v in group.items() if k != "params" and k not in _ROUTING_KEYS and k not in _ADAMW_KEYS}
        flags = {k: group.get(k) for k in _ROUTING_KEYS}
        matrices, others = [], []
        routing = self._routing
        for i, (name, p) in enumerate(named):
            decision = route(p, **flags, dims=dims.get(p), min_dim=routing["min_dim"],
                             max_aspect_ratio=routing["max_aspect_ratio"])
            log_routing(name or f"param{i}", p, decision, routing["verbose"])
            (matrices if decision.use_muon else others).append(p)
        adamw = dict(self._adamw)
        adamw.update({_ADAMW_KEYS[k]: v for k, v in group.items() if k in _ADAMW_KEYS})
        return {"params": matrices, "use_muon": True, **options}, {"params": others, "use_muon": False, **adamw}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Route ``param_group``'s parameters to the matrix optimizer and to AdamW, as at construction. Where a
        wrapper emptied ``param_groups`` first (Megatron-FSDP's ``fully_shard(module, optimizer)`` puts its DTensor
        parameters in place of the model's: clear, then add), both inner optimizers start afresh with it."""
        if self._assembling:  # Optimizer.__init__ registering the inner groups
            super().add_param_group(param_group)
            return
        if not self.param_groups:
            for _, optimizer in self._inner():
                optimizer.param_groups.clear()
                optimizer.state.clear()
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        named = _named(params)
        dims = _global_dims([param_group], [named], self.tp_group, getattr(self.matrix_optimizer, "expert_tp_group", None),
                            param_group.get("tp_mode", getattr(self.matrix_optimizer, "defaults", {}).get("tp_mode")) == "blockwise")
        matrices, others = self._route(param_group, named, dims)
        for group, optimizer in ((matrices, self.matrix_optimizer), (others, self.fallback_optimizer)):
            if not group["params"]:
                continue
            if optimizer is None:
                raise ValueError(f"MuonAdamW: parameters of shape {tuple(group['params'][0].shape)} route to the "
                                 f"{'matrix optimizer' if group['use_muon'] else 'AdamW'}, which this MuonAdamW was "
                                 "built without: give it such parameters at construction")
            optimizer.add_param_group(group)
        self.param_groups[:] = [g for _, o in self._inner() for g in o.param_groups]

    @classmethod
    def combine(cls, matrix_optimizer: Optimizer | None, fallback_optimizer: Optimizer | None) -> MuonAdamW:
        """One MuonAdamW over two optimizers built elsewhere (their groups are shared, not copied)."""
        self = cls.__new__(cls)
        # groups added later are routed by the defaults of __init__, their AdamW options the fallback's own
        defaults = inspect.signature(cls.__init__).parameters
        self._routing = {key: defaults[key].default for key in ("min_dim", "max_aspect_ratio", "verbose")}
        self._adamw = {}
        self.tp_group = getattr(matrix_optimizer, "tp_group", None)
        self.dp_group = getattr(matrix_optimizer, "dp_group", None)
        self._assemble(matrix_optimizer, fallback_optimizer)
        return self

    def _assemble(self, matrix_optimizer: Optimizer | None, fallback_optimizer: Optimizer | None) -> None:
        self.matrix_optimizer, self.fallback_optimizer = matrix_optimizer, fallback_optimizer
        for group in matrix_optimizer.param_groups if matrix_optimizer else []:
            group.setdefault("use_muon", True)
        for group in fallback_optimizer.param_groups if fallback_optimizer else []:
            group.setdefault("use_muon", False)
        self._assembling = True
        Optimizer.__init__(self, [g for _, o in self._inner() for g in o.param_groups], {})
        self._assembling = False
        self.state = _StateView(self)  # type: ignore[assignment]

    def _inner(self) -> list[tuple[str, Optimizer]]:
        return [(k, o) for k, o in (("matrix", self.matrix_optimizer), ("fallback", self.fallback_optimizer)) if o]

    def optimizer_of(self, p: torch.Tensor) -> Optimizer:
        """The inner optimizer that updates ``p``."""
        for _, optimizer in self._inner():
            if any(q is p for group in optimizer.param_groups for q in group["params"]):
                return optimizer
        raise KeyError(f"parameter of shape {tuple(p.shape)} is not in this MuonAdamW")

    def owns(self, p: torch.Tensor) -> bool:
        """Whether this rank's replica keeps ``p``'s state (the fallback's parameters: every replica)."""
        owner = self.optimizer_of(p)
        return owner.owns(p) if isinstance(owner, OrthogonalizedOptimizer) else True

    def state_holding(self, p: torch.Tensor, path: Sequence[str]) -> Held:
        """How the ranks hold state tensor ``state[p][path...]`` (for checkpoints)."""
        owner = self.optimizer_of(p)
        if isinstance(owner, OrthogonalizedOptimizer):
            return owner.state_holding(p, path)
        return fallback_holding(p, path, self.tp_group)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, eps: float = 1e-6) -> torch.Tensor:
        """Scale every gradient by min(1, max_norm / (norm + eps)), where norm is the 2-norm of all gradients
        of the whole model across the DP x TP grid (Megatron's clip_grad_norm): the single-process value,
        whatever the layout. Returns the norm (float64). Two scalar all-reduces; with reduce_grads the
        gradients are reduced into their owners first."""
        check_number("max_norm", max_norm)
        with decoupled_grads([p for group in self.param_groups for p in group["params"]]):
            return self._clip_grad_norm(max_norm, eps)

    def _clip_grad_norm(self, max_norm: float, eps: float) -> torch.Tensor:
        every = [p for group in self.param_groups for p in group["params"]]
        names = self.matrix_optimizer.name_of if self.matrix_optimizer is not None else (lambda p: f"{tuple(p.shape)}")
        problem = grid_sum_problem([(names(p), p) for p in every], self.tp_group, self.dp_group)
        if problem is not None:  # before any collective, alike on every rank
            raise ValueError(f"MuonAdamW.clip_grad_norm_: {problem}")
        total = torch.zeros((), dtype=torch.float64)
        if self.matrix_optimizer is not None:
            total += self.matrix_optimizer.grad_sum_of_squares()
        for group in self.fallback_optimizer.param_groups if self.fallback_optimizer else []:
            for p in group["params"]:
                if p.grad is not None and counts_in_grid_sum(p, self.tp_group, self.dp_group):
                    total += local(p.grad).double().square().sum().cpu()
        norm = grid_sum(total, self.tp_group, self.dp_group).sqrt()
        coef = min(1.0, max_norm / (norm.item() + eps))
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and coef < 1.0:
                    p.grad.mul_(coef)
        return norm

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Each inner optimizer's (OrthogonalizedOptimizer.zero_grad for the matrices)."""
        for _, optimizer in self._inner():
            optimizer.zero_grad(set_to_none)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = call_closure(closure)
        with decoupled_grads([p for group in self.param_groups for p in group["params"]]):  # AdamW's too
            for _, optimizer in self._inner():
                optimizer.step()
        return loss

    def comm_stats(self) -> comm.CommStats:
        """The last step's collectives of the matrix optimizer (AdamW's step makes none): see
        OrthogonalizedOptimizer.comm_stats."""
        return self.matrix_optimizer.comm_stats() if self.matrix_optimizer is not None else comm.CommStats()

    def finish(self) -> None:
        """Complete the matrix optimizer's share in flight (``overlap=True``): OrthogonalizedOptimizer.finish."""
        if self.matrix_optimizer is not None:
            self.matrix_optimizer.finish()

    def wait_for(self, module: torch.nn.Module) -> None:
        """OrthogonalizedOptimizer.wait_for of the matrix optimizer."""
        if self.matrix_optimizer is not None:
            self.matrix_optimizer.wait_for(module)

    def overlap_by_layer(self, layers: Sequence[torch.nn.Module]) -> list[Any]:
        """OrthogonalizedOptimizer.overlap_by_layer of the matrix optimizer (the AdamW side shares nothing)."""
        return self.matrix_optimizer.overlap_by_layer(layers) if self.matrix_optimizer is not None else []

    def no_sync(self) -> Any:
        """OrthogonalizedOptimizer.no_sync of the matrix optimizer (gradient accumulation with overlap_with_backward)."""
        return self.matrix_optimizer.no_sync() if self.matrix_optimizer is not None else contextlib.nullcontext()

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


class _StateView(Mapping):
    """MuonAdamW.state: each parameter's state in the inner optimizer that holds it (read-through)."""

    def __init__(self, owner: MuonAdamW) -> None:
        self._owner = owner

    def _states(self) -> list[dict]:
        return [optimizer.state for _, optimizer in self._owner._inner()]

    def __getitem__(self, p: torch.Tensor) -> dict:
        for state in self._states():
            if p in state:
                return state[p]
        return self._owner.optimizer_of(p).state[p]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (p for state in self._states() for p in state)

    def __len__(self) -> int:
        return sum(len(state) for state in self._states())

    def clear(self) -> None:
        """Every inner optimizer's state dropped (a wrapper replacing the parameters: MuonAdamW.add_param_group)."""
        for state in self._states():
            state.clear()


def _global_dims(
    groups: list[dict[str, Any]], named_groups: list[list[tuple[str, torch.Tensor]]], tp_group: Any, expert_tp_group: Any,
    blockwise: bool,
) -> dict[torch.Tensor, tuple[int, int]]:
    """(rows, cols) of the global matrix of every parameter whose routing depends on it (one exchange per group)."""
    candidates = [(p, blockwise or group.get("tp_mode") == "blockwise", is_expert_stack(p, name))
                  for group, named in zip(groups, named_groups) for name, p in named
                  if needs_shape(p, **{k: group.get(k) for k in _ROUTING_KEYS})]
    dims = {p: (p.size(-2), p.size(-1)) if expert else (p.size(0), math.prod(p.shape[1:]))
            for p, _, expert in candidates if is_dtensor(p)}  # a DTensor's shape is global
    for p, _, expert in candidates:  # experts: their matrices' dims (TE attributes: equal shards)
        if expert and not is_dtensor(p):
            rows, cols = p.shape[-2:]
            group = expert_tp_group if getattr(p, "expert_tp", False) else tp_group
            scale = comm.group_size(group) if is_sharded(p) else 1
            dims[p] = (rows * scale, cols) if getattr(p, "partition_dim", -1) == 1 else (rows, cols * scale)
    candidates = [(p, local) for p, local, expert in candidates if not is_dtensor(p) and not expert]
    views = [(p, p.detach().reshape(p.size(0), -1)) for p, _ in candidates]
    layouts = find_layouts(views, tp_group, expert_tp_group, [local for _, local in candidates])
    return dims | {p: (layout.rows, layout.cols) for (p, _), layout in zip(candidates, layouts)}
