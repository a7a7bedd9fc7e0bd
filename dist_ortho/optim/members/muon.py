"""Muon (Jordan et al., 2024) and MuonHyperball: Newton-Schulz of the momentum, scaled by the global shape.

    U = scale(out, in) * extra_scale_factor * NS(D)

Arguments as Emerging-Optimizers' Muon (positional: params, lr, momentum, weight_decay), its read-only structural
properties included (``num_ns_steps``, ``coefficient_type``, ``scale_mode``, ``extra_scale_factor``, ``use_syrk``:
the constructor's values; setting one is an AttributeError) and its ``weight_update_hook=``
(dist_ortho.optim.hooks). torch.optim.Muon's names are accepted as keywords (its positional order, lr,
weight_decay, momentum, is not EO's; its defaults are not taken either: nesterov, weight_decay and lr keep EO's):

- ``ns_steps``: num_ns_steps.  ``ns_coefficients=(a, b, c)``: that triple at every step (coefficient_type "custom").
- ``eps``: Newton-Schulz's X_0 = G / (||G||_F + eps) (torch divides by max(||G||_F, eps): the same but within eps).
- ``adjust_lr_fn``: scale_mode by dist_ortho.optim.scale.TORCH_ADJUST_LR ("original" shape_scaling,
  "match_rms_adamw", "spectral_unclamped" unit_rms_norm).

Where the math differs from torch.optim.Muon: torch runs the iteration in bfloat16 (here: float32 or wider, under
``fp32_matmul_prec``), and its adjust_lr_fn=None is "original" (here None keeps ``scale_mode``).

MuonHyperball keeps every weight on the sphere ||W||_F = R (R = the weight's initial norm, or
``hyperball_radius``): U <- R U / (||U||_F + eps) before the update, W <- R W / (||W||_F + eps) after: Muon with
that hook (:class:`SphereHook`), whose radius is each weight's own, kept in the optimizer state.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from dist_ortho.comm.coalesce import Program
from dist_ortho.optim.base import OrthogonalizedOptimizer
from dist_ortho.optim.context import MatrixContext
from dist_ortho.optim.hooks import HookView, ProgramHook
from dist_ortho.optim.options import check_number
from dist_ortho.optim.scale import TORCH_ADJUST_LR, TorchAdjustLr
from dist_ortho.optim.settings import (
    CommonSettings,
    HookSettings,
    NewtonSchulzSettings,
    OptimizerSettings,
    ScaleSettings,
    SyrkSettings,
    fields_of,
    number,
    option,
    settings,
)
from dist_ortho.parameters.layout import REPLICATED_HELD, Held, Layout
from dist_ortho.tp import NsSpec


@settings(lr=3e-4, momentum=0.95, weight_decay=0.01, nesterov=False, weight_decay_method="decoupled",
          fp32_matmul_prec="medium")
class MuonSettings(CommonSettings, NewtonSchulzSettings, ScaleSettings, SyrkSettings, HookSettings, OptimizerSettings):
    """Muon's options: Emerging-Optimizers' names and defaults, torch.optim.Muon's names as aliases."""

    ns_coefficients: tuple[float, float, float] | None = option(None, scope="alias", doc=(
        "torch.optim.Muon's: that (a, b, c) at every step (coefficient_type 'custom')"))
    ns_steps: int | None = option(None, scope="alias", doc="torch.optim.Muon's name of num_ns_steps")
    eps: float | None = option(None, scope="alias", doc="torch.optim.Muon's: X_0 = G / (||G||_F + eps)")
    adjust_lr_fn: TorchAdjustLr | None = option(None, scope="alias", doc=(
        "torch.optim.Muon's: scale_mode by dist_ortho.optim.scale.TORCH_ADJUST_LR"))


# Emerging-Optimizers' read-only structural properties of its Muon.
STRUCTURAL_PROPERTIES = ("num_ns_steps", "coefficient_type", "scale_mode", "extra_scale_factor", "use_syrk")


def _read_only(name: str) -> property:
    def get(self: OrthogonalizedOptimizer) -> Any:
        return self.defaults[name]

    def refuse(self: OrthogonalizedOptimizer, _value: Any) -> None:
        raise AttributeError(f"Cannot set `{name}` post-initialization (a param group's {name!r} sets it per group)")
    return property(get, refuse, doc=f"The constructor's {name} (read-only, as in Emerging-Optimizers' Muon).")


def torch_names(options: dict[str, Any], eps_is_torch: bool = True) -> dict[str, Any]:
    """``options`` with torch.optim.Muon's names read into EO's (``eps`` too where it is torch's, not a member's own);
    a torch name beside its EO name set away from the default is a ValueError naming both."""
    ns_coefficients, ns_steps = options.pop("ns_coefficients"), options.pop("ns_steps")
    eps, adjust_lr_fn = options.pop("eps") if eps_is_torch else None, options.pop("adjust_lr_fn")
    if ns_coefficients is not None:
        if options["coefficient_type"] != "quintic":
            raise ValueError(f"pass ns_coefficients or coefficient_type, not both (got {options['coefficient_type']!r})")
        triple = tuple(ns_coefficients)
        if len(triple) != 3:
            raise ValueError(f"ns_coefficients must be three numbers (a, b, c), got {ns_coefficients!r}")
        options["coefficient_type"] = "custom"
        options["custom_coefficient_sets"] = [tuple(check_number("ns_coefficients", c, -float("inf")) for c in triple)]
    if ns_steps is not None:
        if options["num_ns_steps"] != 5:
            raise ValueError(f"pass ns_steps or num_ns_steps, not both (got ns_steps={ns_steps}, "
                             f"num_ns_steps={options['num_ns_steps']})")
        options["num_ns_steps"] = ns_steps
    if adjust_lr_fn is not None:
        if options["scale_mode"] != "spectral":
            raise ValueError(f"pass adjust_lr_fn or scale_mode, not both (got scale_mode={options['scale_mode']!r})")
        if adjust_lr_fn not in TORCH_ADJUST_LR:
            raise ValueError(f"adjust_lr_fn must be one of {tuple(TORCH_ADJUST_LR)} or None, got {adjust_lr_fn!r}")
        options["scale_mode"] = TORCH_ADJUST_LR[adjust_lr_fn]
    if eps is not None:
        options["ns_eps"] = check_number("eps", eps)
    return options


class Muon(OrthogonalizedOptimizer):
    """Muon: momentum, Newton-Schulz, shape scale. Arguments as emerging_optimizers' Muon, torch.optim.Muon's names
    as keywords (see the module doc), plus TP ones."""

    settings = MuonSettings
    uses_newton_schulz = True
    batched = True

    @classmethod
    def translate(cls, options: dict[str, Any], given: frozenset[str]) -> dict[str, Any]:
        aliases = {f.name for f in fields_of(cls.settings, "alias")}  # eps is not one where a member has its own
        return super().translate(torch_names(options, "eps" in aliases), given)

    num_ns_steps = _read_only("num_ns_steps")
    coefficient_type = _read_only("coefficient_type")
    scale_mode = _read_only("scale_mode")
    extra_scale_factor = _read_only("extra_scale_factor")
    use_syrk = _read_only("use_syrk")

    def ns_spec(self, group: dict[str, Any]) -> NsSpec | None:
        spec = super().ns_spec(group)
        if spec is None or "ns_eps" not in group:
            return spec
        return dataclasses.replace(spec, eps=group["ns_eps"])

    def update(self, ctx: MatrixContext) -> Program[torch.Tensor]:
        yield from ()
        return ctx.orthogonalized.mul_(ctx.shape_scale())  # the step's own tensor: scaled in place


def _radius(name: str, value: Any) -> None:
    if value is not None:
        check_number(name, value)
        if value == 0:
            raise ValueError("hyperball_radius must be > 0 (or None for each weight's initial norm), got 0")


class SphereHook(ProgramHook):
    """MuonHyperball's hook: x <- R x / (||x||_F + eps) for U before and W after the update, R each matrix's
    radius, ``state["hyperball_radius"]`` (so it runs in MuonHyperball only, which keeps that state)."""

    def __init__(self, eps: float) -> None:
        self.eps = eps

    def _to_sphere(self, view: HookView, x: torch.Tensor) -> Program[None]:
        radius = view.state["hyperball_radius"].double()
        norm = yield from view.norm(x)
        x.mul_((radius / (norm + self.eps)).to(x.dtype)[..., None, None])

    def pre_update(self, view: HookView, p: torch.Tensor, update: torch.Tensor) -> Program[None]:
        yield from self._to_sphere(view, update)

    def post_update(self, view: HookView, p: torch.Tensor, state: Any) -> Program[None]:
        yield from self._to_sphere(view, p)


@settings
class MuonHyperballSettings(MuonSettings):
    """Muon's options and the sphere's (not weight_update_hook: the sphere is the hook)."""

    hyperball_eps: float = option(1e-8, scope="optimizer", check=number(), doc="the sphere's epsilon")
    hyperball_radius: float | None = option(None, scope="optimizer", check=_radius, doc=(
        "R for every weight (None: each weight's initial norm)"))


class MuonHyperball(Muon):
    """Muon on the Frobenius sphere of each weight (Muon with a :class:`SphereHook`). Arguments as Muon, plus
    hyperball_eps, hyperball_radius; not weight_update_hook (it is the sphere's).

    The radius is fixed at a parameter's first step (its norm then, or ``hyperball_radius``, to which the
    parameter is rescaled) and kept in the optimizer state, so a restored optimizer keeps it.
    """

    settings = MuonHyperballSettings

    @classmethod
    def translate(cls, options: dict[str, Any], given: frozenset[str]) -> dict[str, Any]:
        if "weight_update_hook" in given:
            raise TypeError("MuonHyperball does not take weight_update_hook: its hook is the sphere's (pass "
                            "weight_update_hook=HyperballHook(radius) to Muon for Emerging-Optimizers' fixed radius)")
        return super().translate(options, given)

    def make_weight_update_hook(self, settings: Any) -> Any:
        return SphereHook(settings.hyperball_eps)

    def init_state_program(self, ctx: MatrixContext) -> Program[None]:
        yield from super().init_state_program(ctx)
        p = ctx.param
        norm = yield from ctx.norm(p)  # one per matrix (of an expert weight), or the weight's
        if bool((norm == 0).any()):  # the first step only
            raise ValueError(
                f"MuonHyperball: {ctx.name} has zero norm; it has no sphere to stay on "
                "(initialize it, or optimize it with another optimizer)"
            )
        if self.hyperball_radius is not None:
            p.mul_((self.hyperball_radius / norm).to(p.dtype)[..., None, None] if ctx.batched else self.hyperball_radius / norm.item())
        radius = torch.full_like(norm, self.hyperball_radius) if self.hyperball_radius is not None else norm
        ctx.state["hyperball_radius"] = radius.to(dtype=p.dtype, device=p.device)

    def held_state(self, key: str, layout: Layout, group: dict[str, Any]) -> Held | None:
        return REPLICATED_HELD if key == "hyperball_radius" else super().held_state(key, layout, group)
