"""Fused-QKV reference helpers written from the layout (rows = [ng, q | (gate) | k | v]), independent of dist_ortho.parameters.qkv."""

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


def on_heads(kind: str, W0: torch.Tensor, grads: list[torch.Tensor], head_dim: int, hp: dict) -> torch.Tensor:
    """Optimizer ``kind`` (float64 reference) on every head_dim-row block of a separate q/k/v weight as a matrix
    of its own (its own momentum, state and scale), the blocks joined back in order."""
    heads = [optim_reference.run(kind, W0[r : r + head_dim], [g[r : r + head_dim] for g in grads], hp)
             for r in range(0, W0.size(0), head_dim)]
    return torch.cat(heads)
