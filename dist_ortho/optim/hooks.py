"""Weight-update hooks as objects: Emerging-Optimizers' protocol (EO >= 0.5), exact on sharded matrices.

A hook runs around the step's final update of each matrix W with its update U (weight decay already applied):

    state = hook.pre_weight_update_inplace(W, U);   W <- W - lr U;   hook.post_weight_update_inplace(W, state)

EO calls these on whole tensors. Here a matrix may be held in TP shards (on the DP x TP grid: by its owner
replica's TP group), so each hook of this module writes its math once, as programs (dist_ortho.comm.coalesce) over a
:class:`HookView`: ``view.norm(x)`` is ||x||_F of each whole matrix, float64 (the step's
:class:`~dist_ortho.optim.context.MatrixContext`: one coalesced all-reduce per round over the TP group for every
matrix of the step, dist_ortho.comm.reductions), ``view.state`` the matrices' optimizer state. EO's two methods run
the same programs on one whole tensor, so these hooks also work in EO's own optimizers.

With N(x) = ||x||_F, a norm below eps a numerical zero, and every scale a ``torch.where`` (no host sync):

- :class:`NoOpWeightUpdateHook`: nothing.
- :class:`HyperballHook` (radius, eps): U <- s(U) U before, W <- s(W) W after; s(x) = radius / N(x), 0 if N(x) < eps.
- :class:`RadialBrakeHook` (outward_scale, inward_scale, eps): n0 = N(W) before, n1 = N(W) after (each 0 below
  eps), d = n1 - n0, k = outward_scale if d >= eps, inward_scale if d <= -eps, else 0;
  W <- W (n0 + k d) / n1, or 0 if n1 < eps (the norm keeps the fraction k of its change).
- :class:`RelativeUpdateHook` (eps): U <- U N(W) / N(U), or 0 if N(W) < eps or N(U) < eps (lr is then the
  relative update size); W is not projected.

EO's four hook classes, given as ``weight_update_hook``, are read as this module's (same arguments, same math:
tests/test_eo_hooks.py), so they are exact under TP too. A hook of any other class (anything with the two
methods) is called on each whole matrix, which it can only see where the matrix is whole on this rank (one
process, duplicated, the owner on a grid without TP); on a TP-sharded matrix it would see a shard and compute its
norms from it, and is refused by name (:func:`check_whole`) before the step's collectives, on every rank alike.
"""

from __future__ import annotations

import math
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch

from dist_ortho import comm
from dist_ortho.comm import reductions
from dist_ortho.comm.coalesce import Program, run
from dist_ortho.parameters.layout import Layout

StateT = TypeVar("StateT")
__all__ = [
    "HookView", "HyperballHook", "NoOpWeightUpdateHook", "ProgramHook", "RadialBrakeHook", "RelativeUpdateHook",
    "WeightUpdateHook", "as_program_hook", "check_whole",
]


class WeightUpdateHook(Protocol[StateT]):
    """EO's contract: called on a whole parameter and its update around ``p.add_(update, alpha=-lr)``."""

    def pre_weight_update_inplace(self, p: torch.Tensor, update: torch.Tensor) -> StateT: ...

    def post_weight_update_inplace(self, p: torch.Tensor, pre_update_state: StateT) -> None: ...


class HookView(Protocol):
    """What a hook program reads about the matrices it is given (a MatrixContext, or :class:`WholeTensor`)."""

    state: MutableMapping[str, Any]
    batched: bool  # tensors carry leading batch dims, one matrix per trailing (rows, cols)

    def norm(self, x: torch.Tensor) -> Program[torch.Tensor]: ...


@dataclass
class WholeTensor:
    """The view of one whole tensor (EO's per-parameter calls): its norm over all dims, no collective."""

    state: MutableMapping[str, Any] = field(default_factory=dict)
    batched: bool = False

    def norm(self, x: torch.Tensor) -> Program[torch.Tensor]:
        return reductions.frobenius_norm(x, None, dims=tuple(range(x.ndim)))


def per_matrix(scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``scale`` (one value per matrix of x: its batch dims) shaped to multiply x, in x's dtype."""
    return scale.reshape(*scale.shape, *(1,) * (x.ndim - scale.ndim)).to(x.dtype)


def _check_eps(eps: float) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    return float(eps)


def _check_fraction(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


class ProgramHook:
    """Base of this module's hooks: :meth:`pre_update` / :meth:`post_update` programs over a :class:`HookView`
    (subclasses override these); EO's two methods run them on one whole tensor."""

    def pre_update(self, view: HookView, p: torch.Tensor, update: torch.Tensor) -> Program[Any]:
        """Before W <- W - lr U: may change ``update`` in place; returns the state :meth:`post_update` gets."""
        yield from ()
        return None

    def post_update(self, view: HookView, p: torch.Tensor, state: Any) -> Program[None]:
        """After the update: may change ``p`` in place."""
        yield from ()

    def pre_weight_update_inplace(self, p: torch.Tensor, update: torch.Tensor) -> Any:
        return run(self.pre_update(WholeTensor(), p, update))

    def post_weight_update_inplace(self, p: torch.Tensor, pre_update_state: Any) -> None:
        run(self.post_update(WholeTensor(), p, pre_update_state))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


class NoOpWeightUpdateHook(ProgramHook):
    """Leaves the update and the weights as the optimizer makes them (the default)."""


class HyperballHook(ProgramHook):
    """U and then W scaled to Frobenius norm ``radius`` (see the module doc)."""

    def __init__(self, radius: float, eps: float = 1e-15) -> None:
        self.eps = _check_eps(eps)
        if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not math.isfinite(radius) or radius < eps:
            raise ValueError(f"radius must be a finite number >= eps={eps}, got {radius!r}")
        self.radius = float(radius)

    def _to_radius(self, view: HookView, x: torch.Tensor) -> Program[None]:
        norm = yield from view.norm(x)
        scale = torch.where(norm < self.eps, torch.zeros_like(norm), self.radius / norm.clamp_min(self.eps))
        x.mul_(per_matrix(scale, x))

    def pre_update(self, view: HookView, p: torch.Tensor, update: torch.Tensor) -> Program[None]:
        yield from self._to_radius(view, update)

    def post_update(self, view: HookView, p: torch.Tensor, state: Any) -> Program[None]:
        yield from self._to_radius(view, p)


class RadialBrakeHook(ProgramHook):
    """W's norm keeps the fraction ``outward_scale`` of a growth, ``inward_scale`` of a shrink (see the module doc)."""

    def __init__(self, outward_scale: float = 0.5, inward_scale: float = 1.0, eps: float = 1e-15) -> None:
        self.outward_scale = _check_fraction("outward_scale", outward_scale)
        self.inward_scale = _check_fraction("inward_scale", inward_scale)
        self.eps = _check_eps(eps)

    def _norm_or_zero(self, view: HookView, x: torch.Tensor) -> Program[torch.Tensor]:
        norm = yield from view.norm(x)
        return torch.where(norm < self.eps, torch.zeros_like(norm), norm)

    def pre_update(self, view: HookView, p: torch.Tensor, update: torch.Tensor) -> Program[torch.Tensor]:
        return (yield from self._norm_or_zero(view, p))

    def post_update(self, view: HookView, p: torch.Tensor, state: torch.Tensor) -> Program[None]:
        before, after = state, (yield from self._norm_or_zero(view, p))
        delta = after - before
        kept = torch.where(delta >= self.eps, self.outward_scale,
                           torch.where(delta <= -self.eps, self.inward_scale, torch.zeros_like(delta)))
        target = before + kept * delta
        p.mul_(per_matrix(torch.where(after < self.eps, torch.zeros_like(after), target / after.clamp_min(self.eps)), p))


class RelativeUpdateHook(ProgramHook):
    """U scaled to W's Frobenius norm (see the module doc)."""

    def __init__(self, eps: float = 1e-15) -> None:
        self.eps = _check_eps(eps)

    def pre_update(self, view: HookView, p: torch.Tensor, update: torch.Tensor) -> Program[None]:
        weight = yield from view.norm(p)
        norm = yield from view.norm(update)
        zero = (weight < self.eps) | (norm < self.eps)
        update.mul_(per_matrix(torch.where(zero, torch.zeros_like(norm), weight / norm.clamp_min(self.eps)), update))


def matrices(x: torch.Tensor, batched: bool) -> list[torch.Tensor]:
    """Views of each matrix of ``x`` (its trailing two dims) when batched, else [x]."""
    if not batched or x.ndim <= 2:
        return [x]
    return [m for sub in x.unbind(0) for m in matrices(sub, True)]


class ForeignHook:
    """A hook of another class, called on each whole matrix (see :func:`check_whole` for where it may run)."""

    def __init__(self, hook: Any) -> None:
        self.hook = hook

    def pre_update(self, view: HookView, p: torch.Tensor, update: torch.Tensor) -> Program[list[Any]]:
        yield from ()
        return [self.hook.pre_weight_update_inplace(w, u)
                for w, u in zip(matrices(p, view.batched), matrices(update, view.batched))]

    def post_update(self, view: HookView, p: torch.Tensor, state: list[Any]) -> Program[None]:
        yield from ()
        for w, s in zip(matrices(p, view.batched), state):
            self.hook.post_weight_update_inplace(w, s)

    def __repr__(self) -> str:
        return repr(self.hook)


_EO_MODULE = "emerging_optimizers.weight_update_hooks"
_EO_HOOKS: dict[str, Any] = {
    "NoOpWeightUpdateHook": lambda h: NoOpWeightUpdateHook(),
    "HyperballHook": lambda h: HyperballHook(h.radius, h.eps),
    "RadialBrakeHook": lambda h: RadialBrakeHook(h.outward_scale, h.inward_scale, h.eps),
    "RelativeUpdateHook": lambda h: RelativeUpdateHook(h.eps),
}


def as_program_hook(hook: Any) -> ProgramHook | ForeignHook:
    """The step's form of a ``weight_update_hook=`` argument: None -> NoOp; this module's hooks as they are;
    EO's four by their arguments (read now: set them before constructing the optimizer); any other object with
    EO's two methods called per whole matrix."""
    if hook is None:
        return NoOpWeightUpdateHook()
    if isinstance(hook, ProgramHook):
        return hook
    methods = ("pre_weight_update_inplace", "post_weight_update_inplace")
    if not all(callable(getattr(hook, m, None)) for m in methods):
        raise TypeError(
            "weight_update_hook must have pre_weight_update_inplace(p, update) and post_weight_update_inplace(p, "
            f"state) (Emerging-Optimizers' WeightUpdateHook), got {type(hook).__name__}")
    kind = type(hook)
    if kind.__module__.startswith(_EO_MODULE) and kind.__name__ in _EO_HOOKS:
        return _EO_HOOKS[kind.__name__](hook)
    return ForeignHook(hook)


def hook_entry(hook: ProgramHook | ForeignHook) -> tuple:
    """What every rank must agree on about the optimizer's hook (its class and, for this module's, its arguments):
    hooks take part in the step's collectives (a norm over TP shards), so ranks with different hooks would meet in
    collectives of other sizes, or step replicas apart. A foreign hook by its class only (its repr may hold an
    address)."""
    if isinstance(hook, ForeignHook):
        return ("foreign", f"{type(hook.hook).__module__}.{type(hook.hook).__qualname__}")
    return (type(hook).__name__, tuple(sorted((k, repr(v)) for k, v in vars(hook).items())))


def check_whole(hook: ProgramHook | ForeignHook, params: Sequence[tuple[str, Layout]]) -> None:
    """A ValueError naming ``weight_update_hook`` and the first TP-sharded matrix of ``params`` (name, layout) when
    ``hook`` is another class's, which would see that rank's shard. Layouts are agreed: alike on every rank."""
    if not isinstance(hook, ForeignHook):
        return
    for name, layout in params:
        if layout.group is not None and comm.group_size(layout.group) > 1:
            raise ValueError(
                f"weight_update_hook (a {type(hook.hook).__name__}): {name} (global shape {tuple(layout.shape)}) is held in "
                f"{comm.group_size(layout.group)} tensor-parallel shards along matrix dim {layout.partition_dim}; "
                "the hook's per-tensor methods would see this rank's shard, and its norms would be the shard's. "
                "Use a hook of dist_ortho.optim.hooks (NoOpWeightUpdateHook, HyperballHook, RadialBrakeHook, "
                "RelativeUpdateHook: exact on shards), a ProgramHook subclass, or the hook without TP")
