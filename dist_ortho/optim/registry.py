"""Optimizers by name, for config strings and command lines: ``get_optimizer("muon")``.

``muon_adamw`` (MuonAdamW, which looks its matrix optimizer up here) is registered by the package's
``__init__``, so this module does not import it back."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.optim.optimizer import Optimizer

from dist_ortho.optim.members.adaptive import AdaptiveMuon
from dist_ortho.optim.members.mop import MOP
from dist_ortho.optim.members.muon import Muon, MuonHyperball
from dist_ortho.optim.members.polargrad import PolarGrad
from dist_ortho.optim.members.scion import Scion

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
    "adamw": torch.optim.AdamW,
}


def register_optimizer(name: str, factory: Callable[..., Optimizer]) -> None:
    """Make ``factory`` available as ``name`` (refuses to replace an existing name)."""
    if name in OPTIMIZERS:
        raise ValueError(f"an optimizer named {name!r} is already registered")
    OPTIMIZERS[name] = factory


def get_optimizer(name: str) -> Callable[..., Optimizer]:
    """The optimizer class (or factory) registered as ``name``; it rejects keyword arguments it does not take."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; registered: {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[name]
