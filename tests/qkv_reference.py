"""Fused-QKV reference helpers written from the layout (rows = [ng, q | (gate) | k | v]), independent of dist_ortho.qkv."""

from __future__ import annotations

import torch

from tests import optim_reference


def split_components(W: torch.Tensor, split_shapes: list[int]) -> list[torch.Tensor]:
    ng = W.size(0) // sum(split_shapes)
    parts = torch.split(W.reshape(ng, sum(split_shapes), W.size(1)), split_shapes, dim=1)
    return [p.reshape(-1, W.size(1)) for p in parts]


def join_components(parts: list[torch.Tensor], split_shapes: list[int]) -> torch.Tensor:
    ng = parts[0].size(0) // split_shapes[0]
    return torch.cat([p.reshape(ng, s, -1) for p, s in zip(parts, split_shapes)], dim=1).reshape(-1, parts[0].size(1))


def muon_on_components(W0: torch.Tensor, grads: list[torch.Tensor], split_shapes: list[int], hp: dict) -> torch.Tensor:
    """Muon (float64 reference) on Q, K, V (and gate) of a fused weight as separate matrices."""
    comps = split_components(W0, split_shapes)
    comp_grads = [split_components(g, split_shapes) for g in grads]
    out = [optim_reference.run("muon", c, [cg[i] for cg in comp_grads], hp) for i, c in enumerate(comps)]
    return join_components(out, split_shapes)
