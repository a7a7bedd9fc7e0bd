"""Muon (Jordan et al., 2024) and MuonHyperball: Newton-Schulz of the momentum, scaled by the global shape.

    U = scale(out, in) * extra_scale_factor * NS(D)

MuonHyperball keeps every weight on the sphere ||W||_F = R (R = the weight's initial norm, or
``hyperball_radius``): U <- R U / (||U||_F + eps) before the update, W <- R W / (||W||_F + eps) after.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.optimizer import ParamsT

from dist_ortho import comm
from dist_ortho.coalesce import Program
from dist_ortho.optim.base import MatmulPrecision, OrthogonalizedOptimizer, WeightDecayMethod
from dist_ortho.optim.context import MatrixContext
from dist_ortho.optim.options import check_number
from dist_ortho.optim.scale import ScaleMode, check_scale_mode
from dist_ortho.layout import REPLICATED_HELD, Held, Layout


class Muon(OrthogonalizedOptimizer):
    """Muon: momentum, Newton-Schulz, shape scale. Arguments as emerging_optimizers' Muon, plus TP ones."""

    uses_newton_schulz = True
    batched = True

    def __init__(
        self,
        params: ParamsT,
        lr: float = 3e-4,
        momentum: float = 0.95,
        weight_decay: float = 0.01,
        *,
        nesterov: bool = False,
        weight_decay_method: WeightDecayMethod = "decoupled",
        fp32_matmul_prec: MatmulPrecision = "medium",
        coefficient_type: str = "quintic",
        num_ns_steps: int = 5,
        scale_mode: ScaleMode = "spectral",
        extra_scale_factor: float = 1.0,
        use_syrk: bool = False,
        tp_group: comm.ProcessGroup | None = None,
        tp_mode: str = "duplicated",
        **kwargs: Any,
    ) -> None:
        super().__init__(
            params,
            lr,
            momentum,
            weight_decay,
            nesterov=nesterov,
            weight_decay_method=weight_decay_method,
            fp32_matmul_prec=fp32_matmul_prec,
            coefficient_type=coefficient_type,
            num_ns_steps=num_ns_steps,
            scale_mode=scale_mode,
            extra_scale_factor=extra_scale_factor,
            use_syrk=use_syrk,
            tp_group=tp_group,
            tp_mode=tp_mode,
            **kwargs,
        )

    def check_group(self, group: dict[str, Any]) -> None:
        super().check_group(group)
        check_scale_mode(group["scale_mode"])

    def update(self, ctx: MatrixContext) -> Program[torch.Tensor]:
        yield from ()
        return ctx.orthogonalized.mul_(ctx.shape_scale())  # the step's own tensor: scaled in place


class MuonHyperball(Muon):
    """Muon on the Frobenius sphere of each weight. Arguments as Muon, plus hyperball_eps, hyperball_radius.

    The radius is fixed at a parameter's first step (its norm then, or ``hyperball_radius``, to which the
    parameter is rescaled) and kept in the optimizer state, so a restored optimizer keeps it.
    """

    def __init__(self, *args: Any, hyperball_eps: float = 1e-8, hyperball_radius: float | None = None, **kwargs: Any):
        self.hyperball_eps = check_number("hyperball_eps", hyperball_eps)
        if hyperball_radius is not None:
            check_number("hyperball_radius", hyperball_radius)
            if hyperball_radius == 0:
                raise ValueError("hyperball_radius must be > 0 (or None for each weight's initial norm), got 0")
        self.hyperball_radius = hyperball_radius
        super().__init__(*args, **kwargs)

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

    def _to_sphere(self, ctx: MatrixContext, x: torch.Tensor) -> Program[None]:
        radius = ctx.state["hyperball_radius"].double()
        norm = yield from ctx.norm(x)
        x.mul_((radius / (norm + self.hyperball_eps)).to(x.dtype)[..., None, None])

    def pre_weight_update(self, ctx: MatrixContext, update: torch.Tensor) -> Program[None]:
        yield from self._to_sphere(ctx, update)

    def post_weight_update(self, ctx: MatrixContext) -> Program[None]:
        yield from self._to_sphere(ctx, ctx.param)
