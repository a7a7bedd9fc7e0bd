"""Scion (Pethick et al., 2025), the Frank-Wolfe form: with a spectral-norm ball of radius rho,

    W <- (1 - lr) W - lr * rho * sqrt(out / in) * NS(M)

i.e. decoupled weight decay fixed at 1 and no Nesterov.
"""

from __future__ import annotations

import torch

from dist_ortho.comm.coalesce import Program
from dist_ortho.optim.base import OrthogonalizedOptimizer
from dist_ortho.optim.context import MatrixContext
from dist_ortho.optim.scale import muon_scale
from dist_ortho.optim.settings import CommonSettings, NewtonSchulzSettings, OptimizerSettings, number, option, settings


@settings(lr=3e-4, momentum=0.95, fp32_matmul_prec="medium",
          fixed=dict(weight_decay=1.0, nesterov=False, weight_decay_method="decoupled"))
class ScionSettings(CommonSettings, NewtonSchulzSettings, OptimizerSettings):
    """Scion's options: the Frank-Wolfe form fixes weight decay at 1 (decoupled) and no Nesterov."""

    spectral_radius: float = option(1.0, doc="rho, the radius of the spectral-norm ball", check=number())


class Scion(OrthogonalizedOptimizer):
    uses_newton_schulz = True
    batched = True

    settings = ScionSettings
    positional = ("lr", "momentum")

    def update(self, ctx: MatrixContext) -> Program[torch.Tensor]:
        yield from ()
        layout = ctx.layout
        return ctx.orthogonalized * (ctx.options["spectral_radius"] * muon_scale("unit_rms_norm", layout.rows, layout.cols))
