"""Reference optimizer steps written from the published formulas (Muon: Jordan et al. 2024; Scion: Pethick
et al. 2025; PolarGrad, MOP, AdaMuon, NorMuon, NAMO, MuonHyperball as docs/optimizers.md's table states
them), in float64, on whole matrices. Nothing here calls dist_ortho's optimizers."""

from __future__ import annotations

import math

import torch

from tests.reference import newton_schulz_ref


def scale(mode: str, rows: int, cols: int) -> float:
    return {
        "shape_scaling": math.sqrt(max(1.0, rows / cols)),
        "spectral": math.sqrt(max(rows, cols)),
        "unit_rms_norm": math.sqrt(rows / cols),
        "rms_to_rms": math.sqrt(rows / cols),
        "match_rms_adamw": 0.2 * math.sqrt(max(rows, cols)),
    }[mode]


def weights_agree(err: float, moved: float, min_moved: float = 1e-3) -> bool:
    """The family tests' tolerance: the weights moved (> min_moved) and max |W - W_ref| <= 1e-5 + 1e-4 * moved.

    float32 parameters at "highest" precision against float64: Newton-Schulz agrees to ~1e-6 relative,
    and the weights move by lr * scale * that per step."""
    return moved > min_moved and err <= 1e-5 + 1e-4 * moved


def run(kind: str, W: torch.Tensor, grads: list[torch.Tensor], hp: dict) -> torch.Tensor:
    """W after len(grads) steps of optimizer ``kind`` with hyperparameters ``hp`` (``hp["lr_schedule"]``: the lr
    of each step, as a scheduler set it, instead of ``hp["lr"]``)."""
    W = W.double().clone()
    lr, beta, wd = hp.get("lr", 3e-4), hp.get("momentum", 0.95), hp.get("weight_decay", 0.01)
    method, nesterov = hp.get("weight_decay_method", "decoupled"), hp.get("nesterov", False)
    steps, ctype = hp.get("num_ns_steps", 5), hp.get("coefficient_type", "quintic")
    extra = hp.get("extra_scale_factor", 1.0)
    if kind == "scion":
        wd, method, nesterov = 1.0, "decoupled", False
    rows, cols = W.shape
    M = torch.zeros_like(W)
    V = None
    radius = None
    if kind == "muon_hyperball":
        radius = hp.get("hyperball_radius") or W.norm().item()
        W = W * (radius / W.norm())
    schedule = hp.get("lr_schedule")
    for step, g in enumerate(grads):
        if schedule is not None:
            lr = schedule[step]
        g = g.double()
        if method == "l2":
            g = g + wd * W
        elif method == "decoupled":
            W = W * (1 - lr * wd)
        elif method == "independent":
            W = W * (1 - wd)
        elif method == "palm":
            W = W * (1 - lr * lr * wd)
        M = beta * M + (1 - beta) * g
        D = g + beta * (M - g) if nesterov else M
        if kind == "mop":
            U, S, Vh = torch.linalg.svd(D, full_matrices=False)
            mode = hp.get("scale_mode", "nuclear_norm")
            s = S.sum() if mode == "nuclear_norm" else scale(mode, rows, cols)
            update = (U @ Vh) * s * extra
        else:
            O = newton_schulz_ref(D, ctype, steps)
            if kind in ("muon", "muon_hyperball"):
                update = O * scale(hp.get("scale_mode", "spectral"), rows, cols) * extra
            elif kind == "scion":
                update = O * hp.get("spectral_radius", 1.0) * math.sqrt(rows / cols)
            elif kind == "polargrad":
                update = O * (O * D).sum() * extra
            else:  # adaptive muon
                beta2, eps = hp.get("beta2", 0.95), hp.get("eps", 1e-8)
                if kind == "adamuon":
                    V = (1 - beta2) * O**2 if V is None else beta2 * V + (1 - beta2) * O**2
                    U = O / (V.sqrt() + eps)
                elif kind == "normuon":
                    stat = (O**2).mean(dim=1, keepdim=True) if rows >= cols else (O**2).mean(dim=0, keepdim=True)
                    V = (1 - beta2) * stat if V is None else beta2 * V + (1 - beta2) * stat
                    U = O / V.clamp_min(eps).sqrt()
                    U = U * (O.norm() / U.norm()) if U.norm() > 0 else U  # a zero gradient: no update
                else:  # namo
                    stat = (g**2).sum()
                    V = (1 - beta2) * stat if V is None else beta2 * V + (1 - beta2) * stat
                    U = O * D.norm() / (V.sqrt() + eps)
                update = U * scale(hp.get("scale_mode", "spectral"), rows, cols) * extra
        if kind == "muon_hyperball":
            update = update * (radius / (update.norm() + 1e-8))
        W = W - lr * update
        if kind == "muon_hyperball":
            W = W * (radius / (W.norm() + 1e-8))
    return W
