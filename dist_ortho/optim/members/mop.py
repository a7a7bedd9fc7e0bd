"""MOP: the exact polar factor U V^T of the momentum from an SVD, scaled by its nuclear norm sum(S)
(``scale_mode="nuclear_norm"``) or by a Muon shape scale. Under TP the SVD runs on the gathered matrix
(one all-gather), so both the polar factor and the nuclear norm are those of the global matrix.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.optimizer import ParamsT

from dist_ortho import comm
from dist_ortho.coalesce import Program
from dist_ortho.optim.base import MatmulPrecision, OrthogonalizedOptimizer, WeightDecayMethod
from dist_ortho.optim.context import MatrixContext
from dist_ortho.optim.scale import SCALE_MODES, check_scale_mode, muon_scale

MOP_SCALE_MODES = ("nuclear_norm", *SCALE_MODES)


class MOP(OrthogonalizedOptimizer):
    batched = True
    syncs_host = True  # torch.linalg.svd checks for convergence on the host

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
        scale_mode: str = "nuclear_norm",
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
            scale_mode=scale_mode,
            extra_scale_factor=extra_scale_factor,
            tp_group=tp_group,
            tp_mode=tp_mode,
            **kwargs,
        )

    def check_group(self, group: dict[str, Any]) -> None:
        super().check_group(group)
        check_scale_mode(group["scale_mode"], MOP_SCALE_MODES)

    def update(self, ctx: MatrixContext) -> Program[torch.Tensor]:
        full = (yield from ctx.gather(ctx.direction)).float()
        U, S, Vh = torch.linalg.svd(full, full_matrices=False)
        options = ctx.options
        if options["scale_mode"] == "nuclear_norm":
            scale = S.sum(dim=-1)[..., None, None]
        else:
            scale = muon_scale(options["scale_mode"], full.size(-2), full.size(-1))
        nonzero = (S.amax(dim=-1) > 0).to(full.dtype)[..., None, None]  # a zero momentum has no polar factor
        return ctx.own_block(U @ Vh * nonzero) * (scale * options["extra_scale_factor"])
