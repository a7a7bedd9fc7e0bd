"""Scion (Pethick et al., 2025), the Frank-Wolfe form: with a spectral-norm ball of radius rho,

    W <- (1 - lr) W - lr * rho * sqrt(out / in) * NS(M)

i.e. decoupled weight decay fixed at 1 and no Nesterov.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.optimizer import ParamsT

from dist_ortho import comm
from dist_ortho.coalesce import Program
from dist_ortho.optim.base import MatmulPrecision, OrthogonalizedOptimizer
from dist_ortho.optim.context import MatrixContext
from dist_ortho.optim.options import check_number
from dist_ortho.optim.scale import muon_scale


class Scion(OrthogonalizedOptimizer):
    uses_newton_schulz = True
    batched = True

    def __init__(
        self,
        params: ParamsT,
        lr: float = 3e-4,
        momentum: float = 0.95,
        *,
        fp32_matmul_prec: MatmulPrecision = "medium",
        coefficient_type: str = "quintic",
        num_ns_steps: int = 5,
        spectral_radius: float = 1.0,
        tp_group: comm.ProcessGroup | None = None,
        tp_mode: str = "duplicated",
        **kwargs: Any,
    ) -> None:
        super().__init__(
            params,
            lr,
            momentum,
            1.0,
            nesterov=False,
            weight_decay_method="decoupled",
            fp32_matmul_prec=fp32_matmul_prec,
            coefficient_type=coefficient_type,
            num_ns_steps=num_ns_steps,
            spectral_radius=spectral_radius,
            tp_group=tp_group,
            tp_mode=tp_mode,
            **kwargs,
        )

    def check_group(self, group: dict[str, Any]) -> None:
        super().check_group(group)
        check_number("spectral_radius", group["spectral_radius"])

    def update(self, ctx: MatrixContext) -> Program[torch.Tensor]:
        yield from ()
        layout = ctx.layout
        return ctx.orthogonalized * (ctx.options["spectral_radius"] * muon_scale("unit_rms_norm", layout.rows, layout.cols))
