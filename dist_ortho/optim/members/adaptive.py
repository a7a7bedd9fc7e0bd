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

from dist_ortho.comm.coalesce import Program
from dist_ortho.optim.context import MatrixContext
from dist_ortho.optim.members.muon import Muon, MuonSettings
from dist_ortho.optim.settings import choice, number, option, settings
from dist_ortho.parameters.layout import REPLICATED_HELD, Held, Layout

Moment2Method = Literal["adamuon", "normuon", "namo"]
MOMENT2_METHODS: tuple[str, ...] = get_args(Moment2Method)


@settings
class AdaptiveMuonSettings(MuonSettings):
    """Muon's options and the second moment's."""

    moment2_method: Moment2Method = option("adamuon", doc="one of MOMENT2_METHODS (see the module doc)",
                                           check=choice(*MOMENT2_METHODS))
    beta2: float = option(0.95, doc="the second moment's decay, in [0, 1)", check=number(0.0, 1.0, high_open=True))
    eps: float = option(1e-8, doc="the second moment's epsilon", check=number())


class AdaptiveMuon(Muon):
    """Muon with a second-moment normalization of the orthogonalized update (see the module doc); 2D only."""

    settings = AdaptiveMuonSettings

    def check_group(self, group: dict[str, Any]) -> None:
        super().check_group(group)
        if group["moment2_method"] == "namo" and group["weight_decay_method"] == "l2" and group["weight_decay"] != 0:
            raise ValueError(
                'moment2_method="namo" needs the raw gradient, which weight_decay_method="l2" changes: '
                'use "decoupled" or "independent" weight decay with namo'
            )

    def check_param(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        if p.ndim != 2 and not self.is_expert_stack(p):
            raise ValueError(f"AdaptiveMuon supports 2D parameters only; got shape {tuple(p.shape)}: route it to AdamW")

    @staticmethod
    def normuon_dim(layout: Layout) -> int:
        """The matrix dim NorMuon averages over: the last when rows >= cols, else the rows (global shape)."""
        return -1 if layout.rows >= layout.cols else -2

    def held_state(self, key: str, layout: Layout, group: dict[str, Any]) -> Held | None:
        if key != "moment2":
            return super().held_state(key, layout, group)
        method = group["moment2_method"]
        if method == "adamuon":
            return layout.held()
        if method == "normuon":
            return layout.held(reduced_dims=(2 + self.normuon_dim(layout),))
        return REPLICATED_HELD

    def update(self, ctx: MatrixContext) -> Program[torch.Tensor]:
        O, state, options = ctx.orthogonalized, ctx.state, ctx.options
        method, beta2, eps = options["moment2_method"], options["beta2"], options["eps"]
        if method == "adamuon":
            v = state.setdefault("moment2", torch.zeros_like(O)).lerp(O.square(), 1 - beta2)
            update = O / (v.sqrt() + eps)
        elif method == "normuon":
            mean = (yield from ctx.mean_over(O.square(), self.normuon_dim(ctx.layout))).to(O.dtype)
            v = state.setdefault("moment2", torch.zeros_like(mean)).lerp(mean, 1 - beta2)
            update = O * v.clamp_min(eps).rsqrt()
            norm_o = yield from ctx.norm(O)
            norm_update = yield from ctx.norm(update)
            update = update * (norm_o / norm_update.clamp_min(1e-30)).to(O.dtype)[..., None, None]
        else:
            grad_sq = yield from ctx.sum_of_squares(ctx.grad)
            v = state.setdefault("moment2", torch.zeros(grad_sq.shape, dtype=ctx.param.dtype, device=O.device))
            v = v.lerp(grad_sq.to(v.dtype), 1 - beta2)
            norm_direction = yield from ctx.norm(ctx.direction)
            update = O * (norm_direction / (v.double().sqrt() + eps)).to(O.dtype)[..., None, None]
        ctx.set_state("moment2", v)
        return update * ctx.shape_scale()
