"""AdaptiveMuon: a second-moment normalization of the orthogonalized update, then Muon's scale.

After O = NS(M) (no scale yet), with beta2 and eps:
- adamuon (AdaMuon): V <- beta2 V + (1 - beta2) O^2 (elementwise); U = O / (sqrt(V) + eps).
- normuon (NorMuon): v <- beta2 v + (1 - beta2) mean(O^2) over the longer dim of the GLOBAL matrix
  (the last dim when rows >= cols, else the rows); U = O * rsqrt(clamp_min(v, eps)), rescaled so that
  ||U||_F = ||O||_F.
- namo (NAMO): v <- beta2 v + (1 - beta2) ||G||_F^2 of the raw gradient; U = O * ||M||_F / (sqrt(v) + eps),
  M the pre-orthogonalization momentum.
Then U *= scale(out, in) * extra_scale_factor. Means and norms that span shards are reduced over TP;
the elementwise AdaMuon moment stays local.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import torch
from torch.optim.optimizer import ParamsT

from dist_ortho import reductions
from dist_ortho.optim.base import check_choice, check_number
from dist_ortho.optim.muon import Muon

Moment2Method = Literal["adamuon", "normuon", "namo"]
MOMENT2_METHODS: tuple[str, ...] = get_args(Moment2Method)


class AdaptiveMuon(Muon):
    def __init__(
        self,
        params: ParamsT,
        lr: float = 3e-4,
        momentum: float = 0.95,
        weight_decay: float = 0.01,
        *,
        moment2_method: Moment2Method = "adamuon",
        beta2: float = 0.95,
        eps: float = 1e-8,
        **kwargs: Any,
    ) -> None:
        super().__init__(params, lr, momentum, weight_decay, moment2_method=moment2_method, beta2=beta2, eps=eps, **kwargs)

    def check_group(self, group: dict[str, Any]) -> None:
        super().check_group(group)
        check_choice("moment2_method", group["moment2_method"], MOMENT2_METHODS)
        check_number("beta2", group["beta2"], 0.0, 1.0, high_open=True)
        check_number("eps", group["eps"])
        if group["moment2_method"] == "namo" and group["weight_decay_method"] == "l2" and group["weight_decay"] != 0:
            raise ValueError(
                'moment2_method="namo" needs the raw gradient, which weight_decay_method="l2" changes: '
                'use "decoupled" or "independent" weight decay with namo'
            )

    def check_param(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        if p.ndim != 2:
            raise ValueError(f"AdaptiveMuon supports 2D parameters only; got shape {tuple(p.shape)}: route it to AdamW")

    def update_direction(
        self, p: torch.Tensor, grad: torch.Tensor, direction: torch.Tensor, group: dict[str, Any]
    ) -> torch.Tensor:
        O = self.newton_schulz(p, direction, group)
        state = self.matrix_state(p)
        method, beta2, eps = group["moment2_method"], group["beta2"], group["eps"]
        if method == "adamuon":
            v = state.setdefault("moment2", torch.zeros_like(O))
            v.lerp_(O.square(), 1 - beta2)
            update = O / (v.sqrt() + eps)
        elif method == "normuon":
            layout = self.layout(p)
            dim, along = (-1, 1) if layout.rows >= layout.cols else (-2, 0)
            group_along = layout.group if layout.spec.partition_dim == along else None
            mean = reductions.mean_over(O.square(), dim, group_along, layout.shape[dim]).to(O.dtype)
            v = state.setdefault("moment2", torch.zeros_like(mean))
            v.lerp_(mean, 1 - beta2)
            update = O * v.clamp_min(eps).rsqrt()
            update = update * (self.global_norm(p, O) / self.global_norm(p, update).clamp_min(1e-30)).to(O.dtype)
        else:
            v = state.setdefault("moment2", torch.zeros((), dtype=p.dtype, device=p.device))
            v.lerp_(reductions.sum_of_squares(grad, self.layout(p).group).to(v.dtype), 1 - beta2)
            update = O * (self.global_norm(p, direction) / (v.double().sqrt() + eps)).to(O.dtype)
        return update * self.shape_scale(p, group)
