"""PolarGrad: Newton-Schulz of the momentum, scaled by <NS(M), M>_F = sum(NS(M) * M), which
approximates the nuclear norm of M (exactly so for the true polar factor). Under TP the inner product
is summed over the shards.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.optimizer import ParamsT

from dist_ortho import comm
from dist_ortho.coalesce import Program
from dist_ortho.optim.base import MatmulPrecision, OrthogonalizedOptimizer, WeightDecayMethod
from dist_ortho.optim.context import MatrixContext


class PolarGrad(OrthogonalizedOptimizer):
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
        fp32_matmul_prec: MatmulPrecision = "highest",
        coefficient_type: str = "quintic",
        num_ns_steps: int = 5,
        extra_scale_factor: float = 1.0,
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
            extra_scale_factor=extra_scale_factor,
            tp_group=tp_group,
            tp_mode=tp_mode,
            **kwargs,
        )

    def update(self, ctx: MatrixContext) -> Program[torch.Tensor]:
        O = ctx.orthogonalized
        inner = yield from ctx.inner(O, ctx.direction)
        return O * (inner[..., None, None] * ctx.options["extra_scale_factor"]).to(O.dtype)
