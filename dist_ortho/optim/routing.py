"""Which parameters a Muon-family optimizer should take, and which go to the AdamW fallback.

A tensor goes to the fallback when it is flagged as an embedding or output layer
(``is_embedding_or_output_parameter``, as Megatron sets it), has fewer than 2 dims of size > 1, a unit
dim in its first two positions, a smallest matrix dim below ``min_dim`` (4), or an aspect ratio above
``max_aspect_ratio`` (128) of its (global) matrix. Group flags ``use_muon=True/False`` and
``use_fallback=True`` override the rules. Every decision is logged at INFO (DEBUG for the rule-based ones
when ``verbose=False``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Routing:
    use_muon: bool
    reason: str


def _by_flags_and_form(p: torch.Tensor, use_muon: bool | None, use_fallback: bool | None) -> Routing | None:
    """The decision that needs no matrix dims, or None."""
    if use_fallback:
        return Routing(False, "use_fallback=True")
    if use_muon is not None:
        return Routing(bool(use_muon), f"use_muon={use_muon}")
    if getattr(p, "is_embedding_or_output_parameter", False):
        return Routing(False, "embedding or output layer")
    if sum(d > 1 for d in p.shape) < 2:
        return Routing(False, f"fewer than 2 non-unit dims {tuple(p.shape)}")
    if 1 in p.shape[:2]:
        return Routing(False, f"unit dim in the first two of {tuple(p.shape)}")
    return None


def needs_shape(p: torch.Tensor, *, use_muon: bool | None = None, use_fallback: bool | None = None) -> bool:
    """Whether routing p depends on its (global) matrix dims."""
    return _by_flags_and_form(p, use_muon, use_fallback) is None


def route(
    p: torch.Tensor,
    *,
    use_muon: bool | None = None,
    use_fallback: bool | None = None,
    dims: tuple[int, int] | None = None,
    min_dim: int = 4,
    max_aspect_ratio: float = 128.0,
) -> Routing:
    """Where p goes; ``dims`` are the rows and columns (in * prod(spatial)) of its GLOBAL matrix
    (dist_ortho.parameters.protocol.find_layouts), this rank's shape when None."""
    decided = _by_flags_and_form(p, use_muon, use_fallback)
    if decided is not None:
        return decided
    rows, cols = dims if dims is not None else (p.size(0), p[0].numel())
    if min(rows, cols) < min_dim:
        return Routing(False, f"smallest dim {min(rows, cols)} < {min_dim}")
    if max(rows, cols) / min(rows, cols) > max_aspect_ratio:
        return Routing(False, f"aspect ratio {max(rows, cols) / min(rows, cols):.0f} > {max_aspect_ratio:g}")
    return Routing(True, f"matrix {rows} x {cols}")


def log_routing(name: str, p: torch.Tensor, routing: Routing, verbose: bool) -> None:
    level = logging.INFO if verbose else logging.DEBUG
    target = "muon" if routing.use_muon else "adamw"
    logger.log(level, "%s %s -> %s (%s)", name, tuple(p.shape), target, routing.reason)
