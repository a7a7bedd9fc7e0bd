"""Optimizers by name, for config strings and command lines: ``get_optimizer("muon")``."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.optim.optimizer import Optimizer

from dist_ortho.optim.adaptive import AdaptiveMuon
from dist_ortho.optim.hybrid import MuonAdamW
from dist_ortho.optim.mop import MOP
from dist_ortho.optim.muon import Muon, MuonHyperball
from dist_ortho.optim.polargrad import PolarGrad
from dist_ortho.optim.scion import Scion

OPTIMIZERS: dict[str, Callable[..., Optimizer]] = {
    "muon": Muon,
    "scion": Scion,
    "mop": MOP,
    "polargrad": PolarGrad,
    "muon_hyperball": MuonHyperball,
    "adaptive_muon": AdaptiveMuon,
    "adamuon": functools.partial(AdaptiveMuon, moment2_method="adamuon"),
    "normuon": functools.partial(AdaptiveMuon, moment2_method="normuon"),
    "namo": functools.partial(AdaptiveMuon, moment2_method="namo"),
    "muon_adamw": MuonAdamW,
    "adamw": torch.optim.AdamW,
}


def register_optimizer(name: str, factory: Callable[..., Optimizer]) -> None:
    """Make ``factory`` available as ``name`` (refuses to replace an existing name)."""
    if name in OPTIMIZERS:
        raise ValueError(f"an optimizer named {name!r} is already registered")
    OPTIMIZERS[name] = factory


def get_optimizer(name: str) -> Callable[..., Optimizer]:
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; registered: {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[name]
