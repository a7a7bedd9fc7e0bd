"""MOP: the exact polar factor U V^T of the momentum from an SVD, scaled by its nuclear norm sum(S)
(``scale_mode="nuclear_norm"``) or by a Muon shape scale. Under TP the SVD runs on the gathered matrix
(one all-gather), so both the polar factor and the nuclear norm are those of the global matrix.
"""

from __future__ import annotations

import torch

from dist_ortho.comm.coalesce import Program
from dist_ortho.optim.base import OrthogonalizedOptimizer
from dist_ortho.optim.context import MatrixContext
from dist_ortho.optim.scale import SCALE_MODES, check_scale_mode, muon_scale
from dist_ortho.optim.settings import CommonSettings, OptimizerSettings, ScaleSettings, option, settings

MOP_SCALE_MODES = ("nuclear_norm", *SCALE_MODES)


@settings(lr=3e-4, momentum=0.95, weight_decay=0.01, nesterov=False, weight_decay_method="decoupled",
          fp32_matmul_prec="highest")
class MOPSettings(CommonSettings, ScaleSettings, OptimizerSettings):
    """MOP's options: no Newton-Schulz; the nuclear norm as a scale besides Muon's."""

    scale_mode: str = option("nuclear_norm", doc="nuclear_norm (sum of the singular values) or a Muon shape scale",
                             check=lambda name, value: check_scale_mode(value, MOP_SCALE_MODES))


class MOP(OrthogonalizedOptimizer):
    batched = True
    syncs_host = True  # torch.linalg.svd checks for convergence on the host

    settings = MOPSettings

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
