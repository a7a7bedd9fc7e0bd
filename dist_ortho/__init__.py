"""dist_ortho: Muon-family optimizers, exact and fast under tensor parallelism."""

from dist_ortho.comm import count_collectives
from dist_ortho.math.coefficients import COEFFICIENT_SETS, COEFFICIENT_TYPES, get_coefficients
from dist_ortho.optim import (
    MOP,
    OPTIMIZERS,
    AdaptiveMuon,
    Muon,
    MuonAdamW,
    MuonHyperball,
    OrthogonalizedOptimizer,
    PolarGrad,
    Scion,
    get_optimizer,
    register_optimizer,
)
from dist_ortho.tp import TP_MODES, newton_schulz_tp
from dist_ortho.tp.newton_schulz import newton_schulz, newton_schulz_step

__all__ = [
    "MOP",
    "OPTIMIZERS",
    "AdaptiveMuon",
    "Muon",
    "MuonAdamW",
    "MuonHyperball",
    "OrthogonalizedOptimizer",
    "PolarGrad",
    "Scion",
    "get_optimizer",
    "register_optimizer",
    "COEFFICIENT_SETS",
    "COEFFICIENT_TYPES",
    "TP_MODES",
    "count_collectives",
    "get_coefficients",
    "newton_schulz",
    "newton_schulz_step",
    "newton_schulz_tp",
]
__version__ = "0.1.0"
