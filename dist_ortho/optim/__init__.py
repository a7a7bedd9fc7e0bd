"""The orthogonalized optimizer family, exact under tensor parallelism."""

from dist_ortho.optim.base import OrthogonalizedOptimizer
from dist_ortho.optim.hooks import HyperballHook, NoOpWeightUpdateHook, RadialBrakeHook, RelativeUpdateHook
from dist_ortho.optim.hybrid import MuonAdamW
from dist_ortho.optim.members.adaptive import MOMENT2_METHODS, AdaptiveMuon
from dist_ortho.optim.members.mop import MOP
from dist_ortho.optim.members.muon import Muon, MuonHyperball
from dist_ortho.optim.members.polargrad import PolarGrad
from dist_ortho.optim.members.scion import Scion
from dist_ortho.optim.qk_clip import QkLayer, QkWeight, qk_clip
from dist_ortho.optim.registry import OPTIMIZERS, get_optimizer, register_optimizer
from dist_ortho.optim.routing import route
from dist_ortho.optim.scale import SCALE_MODES, muon_scale

OPTIMIZERS.setdefault("muon_adamw", MuonAdamW)

__all__ = [
    "MOMENT2_METHODS", "MOP", "OPTIMIZERS", "SCALE_MODES", "AdaptiveMuon", "Muon", "MuonAdamW", "MuonHyperball",
    "OrthogonalizedOptimizer", "PolarGrad", "QkLayer", "QkWeight", "Scion", "get_optimizer", "muon_scale",
    "qk_clip", "register_optimizer", "route",
    "HyperballHook", "NoOpWeightUpdateHook", "RadialBrakeHook", "RelativeUpdateHook",
]
