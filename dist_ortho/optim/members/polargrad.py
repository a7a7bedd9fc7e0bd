"""PolarGrad: Newton-Schulz of the momentum, scaled by <NS(M), M>_F = sum(NS(M) * M), which
approximates the nuclear norm of M (exactly so for the true polar factor). Under TP the inner product
is summed over the shards.
"""

from __future__ import annotations

import torch

from dist_ortho.comm.coalesce import Program
from dist_ortho.optim.base import OrthogonalizedOptimizer
from dist_ortho.optim.context import MatrixContext
from dist_ortho.optim.settings import CommonSettings, NewtonSchulzSettings, OptimizerSettings, number, option, settings


@settings(lr=3e-4, momentum=0.95, weight_decay=0.01, nesterov=False, weight_decay_method="decoupled",
          fp32_matmul_prec="highest")
class PolarGradSettings(CommonSettings, NewtonSchulzSettings, OptimizerSettings):
    """PolarGrad's options: Newton-Schulz, scaled by <NS(M), M> (no shape scale)."""

    extra_scale_factor: float = option(1.0, doc="a further factor of the update", check=number())


class PolarGrad(OrthogonalizedOptimizer):
    uses_newton_schulz = True
    batched = True

    settings = PolarGradSettings

    def update(self, ctx: MatrixContext) -> Program[torch.Tensor]:
        O = ctx.orthogonalized
        inner = yield from ctx.inner(O, ctx.direction)
        return O * (inner[..., None, None] * ctx.options["extra_scale_factor"]).to(O.dtype)
