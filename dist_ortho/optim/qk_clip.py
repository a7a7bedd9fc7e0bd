"""QK-clip (MuonClip, Kimi K2): after a step, every attention head whose largest pre-softmax logit exceeds ``tau`` has
its query and key weights scaled down so that the logits it saw would be at most ``tau``.

    S_h      head h's largest pre-softmax logit of the step, agreed as the MAX over every rank that saw data
             (the optimizer's TP and DP groups, and ``groups``: context parallel); a rank's own maxima are never used
    gamma_h  = min(1, tau / S_h)
    a head with its own key (MHA):    q_h <- sqrt(gamma_h) q_h,   k_h <- sqrt(gamma_h) k_h        (MuonClip's split)
    a query group g sharing one key (GQA):  k_g <- sqrt(gamma_g) k_g,  gamma_g = min over h in g of gamma_h,
                                      q_h <- min(1, gamma_h / sqrt(gamma_g)) q_h
    MLA (Kimi K2's rule per head):    q_C <- sqrt(gamma_h) q_C,  k_C <- sqrt(gamma_h) k_C,  q_R <- gamma_h q_R,
                                      the shared rotary key k_R untouched

Logits are bilinear in q and k, so head h's logits scale by s_h = (its q factor) (its k factor) = min(gamma_h,
sqrt(gamma_g)) <= gamma_h: at most tau afterwards on the data they were measured on, exactly gamma_h with a key of
its own and for MLA, and no weight ever grows (Megatron-LM clips a GQA group by its smallest gamma on every head).

Heads are found through how the optimizer holds each weight (dist_ortho.optim.layouts): a weight's rows are its query
groups one after another, each group's rows given as a list of (role, rows) (:class:`QkWeight`); fused QKV weights
read theirs from ``qkv_split_shapes`` ([q, k, v] or gated [q, gate, k, v], dist_ortho.parameters.qkv), separate q/k weights and
MLA's from :class:`QkLayer`. A rank scales the global rows it holds (its TP block, a piece of it, padding left), so any
TP size works, TP > query groups (a rank holding part of a group) included.

Where: on the weights the next forward reads. ``overlap=True`` leaves the owners' share in flight after a step; the
clip first completes it (``finish()``), then every replica scales its own copy with the agreed factors. On the DP x TP
grid every replica holds the owner's values (or its piece of them) once the share lands, and the clip is one
multiplication per row by a factor every rank computes alike from the agreed maxima, so each replica's result is the
owner's clipped weight bit for bit: the same weights as clipping on the owner before its share, without moving a byte
(the share carries the same number of bytes either way) and without needing the maxima before the step. Momentum is
not touched (MuonClip clips weights only).

Bad input (a key that is no attention layer, maxima of the wrong shape or non-finite, tau <= 0 or unlike on some rank)
raises the same ValueError on every rank, before anything is written: each rank's verdict goes in one small MAX
all-reduce ahead of the maxima.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
import torch.distributed as dist

from dist_ortho import comm
from dist_ortho.parameters.dtensor import local

Role = Literal["q", "k", "q_rope", "other"]
ROLES: tuple[str, ...] = get_args(Role)


@dataclass(frozen=True, eq=False)
class QkWeight:
    """A weight whose rows are the layer's query groups one after another; ``group_rows``: one group's rows in order,
    as (role, rows). "q" and "q_rope" rows are the group's heads' own, split evenly between them; "k" rows are the
    group's (shared) key; "other" rows (values, a gate, MLA's shared rotary key) are left alone."""

    weight: torch.Tensor
    group_rows: tuple[tuple[Role, int], ...]


@dataclass(frozen=True, eq=False)
class QkLayer:
    """One attention layer: the weights its logits are made of, its heads and query groups (heads in group order)."""

    weights: tuple[QkWeight, ...]
    num_heads: int
    num_groups: int

    @classmethod
    def separate(cls, q: torch.Tensor, k: torch.Tensor, num_heads: int, num_groups: int, head_dim: int) -> QkLayer:
        """Separate query (num_heads x head_dim rows) and key (num_groups x head_dim rows) weights."""
        return cls((QkWeight(q, (("q", num_heads // num_groups * head_dim),)), QkWeight(k, (("k", head_dim),))),
                   num_heads, num_groups)

    @classmethod
    def mla(cls, q_proj: torch.Tensor, kv_up_proj: torch.Tensor, num_heads: int, qk_head_dim: int,
            qk_pos_emb_head_dim: int, v_head_dim: int) -> QkLayer:
        """Multi-latent attention (Megatron's ``linear_q_proj`` or ``linear_q_up_proj``, and ``linear_kv_up_proj``):
        per head [q_C (qk_head_dim), q_R (qk_pos_emb_head_dim)] and [k_C (qk_head_dim), v (v_head_dim)]; the shared
        rotary key (in the down projection) is not clipped."""
        return cls((QkWeight(q_proj, (("q", qk_head_dim), ("q_rope", qk_pos_emb_head_dim))),
                    QkWeight(kv_up_proj, (("k", qk_head_dim), ("other", v_head_dim)))), num_heads, num_heads)


@dataclass(frozen=True)
class QkClipResult:
    """Per layer (in the order given): the agreed per-head maxima S_h and the factors s_h their logits were scaled
    by (1 where not clipped); ``clipped``: heads with s_h < 1."""

    max_logits: list[torch.Tensor]
    scales: list[torch.Tensor]

    @property
    def clipped(self) -> int:
        return int(sum(int((s < 1).sum()) for s in self.scales))

    @property
    def max_logit(self) -> float:
        """The largest agreed maximum (what the step's forward saw)."""
        return max((float(m.max()) for m in self.max_logits), default=-math.inf)

    @property
    def max_logit_after(self) -> float:
        """The largest max_logits x scales: what the clipped weights give on the data the maxima came from."""
        return max((float((m.clamp_min(0) * s).max()) for m, s in zip(self.max_logits, self.scales)), default=-math.inf)


def fused_qkv_layer(optimizer: Any, p: torch.Tensor) -> QkLayer:
    """The layer of a fused QKV weight of ``optimizer``, from its ``qkv_split_shapes`` (attribute, else the group's)."""
    split = getattr(p, "qkv_split_shapes", None) or optimizer.group_of(p).get("qkv_split_shapes")
    if not split or len(split) not in (3, 4):
        raise ValueError(f"qk_clip: {optimizer.name_of(p)} is a fused QKV weight without qkv_split_shapes "
                         f"([q, k, v] or gated [q, gate, k, v] rows per query group), got {split!r}")
    split = [int(s) for s in split]
    head = split[-1]
    rows = optimizer.layouts.held[p].shape[-2]
    if split[0] % head or rows % sum(split):
        raise ValueError(f"qk_clip: {optimizer.name_of(p)} has {rows} rows, which qkv_split_shapes {split} (head size "
                         f"{head}) does not cut into query groups")
    groups = rows // sum(split)
    roles: tuple[Role, ...] = ("q", "k", "other") if len(split) == 3 else ("q", "other", "k", "other")
    return QkLayer((QkWeight(p, tuple(zip(roles, split))),), groups * split[0] // head, groups)


def head_factors(max_logits: torch.Tensor, tau: float, num_groups: int) -> tuple[torch.Tensor, ...]:
    """(gamma_h, q factor per head, k factor per group, logit scale s_h), float64, from the agreed maxima."""
    m = max_logits.to(torch.float64)
    gamma = torch.where(m > tau, tau / m, torch.ones_like(m))
    per_group = gamma.view(num_groups, -1)
    k = per_group.amin(dim=1).sqrt()
    q = (per_group / k[:, None]).clamp(max=1.0).reshape(-1)
    return gamma, q, k, q * k.repeat_interleave(per_group.size(1))


def row_factors(w: QkWeight, layer: QkLayer, gamma: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The factor of every global row of ``w.weight`` (float64)."""
    g, per = layer.num_groups, layer.num_heads // layer.num_groups
    parts = []
    for role, rows in w.group_rows:
        if role in ("q", "q_rope"):
            parts.append((q if role == "q" else gamma).view(g, per).repeat_interleave(rows // per, dim=1))
        elif role == "k":
            parts.append(k[:, None].expand(g, rows))
        else:
            parts.append(torch.ones(g, rows, dtype=torch.float64))
    return torch.cat(parts, dim=1).reshape(-1)


def _problem(optimizer: Any, layer: Any, logits: Any) -> str | None:
    """What is wrong with one (layer, maxima) pair on this rank, or None."""
    if not isinstance(layer, QkLayer):
        what = optimizer.name_of(layer) if isinstance(layer, torch.Tensor) else repr(layer)
        return f"qk_clip: {what} is not an attention layer (a QkLayer, or a fused QKV weight of the optimizer)"
    if layer.num_heads < 1 or layer.num_groups < 1 or layer.num_heads % layer.num_groups:
        return f"num_heads={layer.num_heads} must be a positive multiple of num_groups={layer.num_groups}"
    per = layer.num_heads // layer.num_groups
    for w in layer.weights:
        name = optimizer.name_of(w.weight)
        if w.weight not in optimizer.layouts.held:
            return f"qk_clip: {name} is not a parameter of the optimizer"
        held = optimizer.layouts.held[w.weight]
        unit = sum(rows for _, rows in w.group_rows)
        if len(held.shape) != 2:
            return f"qk_clip: {name} is not a matrix (shape {tuple(held.shape)})"
        if any(role not in ROLES or rows < 1 or (role in ("q", "q_rope") and rows % per) for role, rows in w.group_rows):
            return f"qk_clip: {name}: group_rows {w.group_rows} must be (role in {ROLES}, rows >= 1), q rows a multiple of {per} heads"
        if held.shape[0] != unit * layer.num_groups:
            return (f"qk_clip: {name} has {held.shape[0]} rows, not {layer.num_groups} query groups of {unit} "
                    f"({list(w.group_rows)})")
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (layer.num_heads,):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        return (f"qk_clip: max_logits of {optimizer.name_of(layer.weights[0].weight)} must be a tensor of shape "
                f"({layer.num_heads},), one per head of the layer (heads this rank did not compute: -inf), got {shape}")
    if torch.isnan(logits).any() or torch.isposinf(logits).any():
        return f"qk_clip: max_logits of {optimizer.name_of(layer.weights[0].weight)} are not finite: {logits.tolist()}"
    return None


def _groups(optimizer: Any, extra: Sequence[Any]) -> list[Any]:
    """The groups to agree over: TP, DP and ``extra``, each once, those of more than one rank."""
    seen, out = set(), []
    for g in (optimizer.tp_group, optimizer.dp_group, *extra):
        if comm.group_size(g) > 1:
            ranks = tuple(dist.get_process_group_ranks(g))
            if ranks not in seen:
                seen.add(ranks)
                out.append(g)
    return out


def _max_over(values: torch.Tensor, groups: Sequence[Any]) -> torch.Tensor:
    for g in groups:
        values = comm.all_reduce(values.to(comm.collective_device(g, values.device)), g, "max").cpu()
    return values


def _rows_held(held: Any) -> tuple[int, int]:
    """(first global row, real rows) of this rank's tensor: the row splits applied in order."""
    start, count = 0, held.shape[0]
    for split in held.splits:
        if split.dim == 0 and split.size > 1:
            start += split.start(split.rank)
            count = split.extents[split.rank]
    return start, count


@torch.no_grad()
def qk_clip(optimizer: Any, max_logits: Mapping[Any, torch.Tensor], tau: float,
            groups: Sequence[Any] = ()) -> QkClipResult:
    """Clip the query and key weights of every layer in ``max_logits`` (see the module doc); call after the step.

    Args:
        optimizer: an OrthogonalizedOptimizer (or a MuonAdamW: its matrix optimizer) that steps the weights.
        max_logits: per layer (a :class:`QkLayer`, or a fused QKV weight of the optimizer), a tensor of shape
            (num_heads,): the largest pre-softmax logit of each of the layer's heads this rank saw in the step (-inf
            for heads it did not compute, e.g. those of other TP ranks). Every rank passes the same layers in the
            same order.
        tau: the threshold, > 0.
        groups: further groups whose ranks saw other data (context parallel); TP and DP are always included.
    Returns the agreed maxima and the logit scales per layer (:class:`QkClipResult`).
    """
    opt = getattr(optimizer, "matrix_optimizer", None) or optimizer
    opt.finish()  # an overlapped share lands first: the clip scales the weights the next forward reads
    every = [q for g in opt.param_groups for q in g["params"]]
    if every:
        opt.layout(every[0])  # layouts of every parameter known (collectives only the first time, on every rank)
    pairs = list(max_logits.items()) if isinstance(max_logits, Mapping) else None
    layers, problem = _read_layers(opt, pairs)
    if pairs is None:
        problem = f"max_logits must be a mapping of layer -> tensor, got {type(max_logits).__name__}"
    good_tau = isinstance(tau, (int, float)) and not isinstance(tau, bool) and math.isfinite(tau) and tau > 0
    if not good_tau:
        problem = problem or f"qk_clip: tau must be a finite number > 0, got {tau!r}"
    heads = sum(layer.num_heads for layer in layers) if problem is None else 0
    t = float(tau) if good_tau else 0.0
    over = _groups(opt, groups)
    header = _max_over(torch.tensor([float(problem is not None), heads, -heads, t, -t], dtype=torch.float64), over)
    if header[0] > 0 or problem is not None:
        raise ValueError(problem if problem is not None else "qk_clip: bad input on another rank (nothing written)")
    if header[1] != -header[2] or header[3] != -header[4]:
        raise ValueError(f"qk_clip: the ranks passed different layers or tau (heads {int(-header[2])}..{int(header[1])}, "
                         f"tau {-float(header[4])}..{float(header[3])}); nothing written")
    agreed = _max_over(torch.cat([logits.detach().reshape(-1).to("cpu", torch.float64)
                                  for _, logits in pairs]) if pairs else torch.zeros(0, dtype=torch.float64), over)
    result = QkClipResult([], [])
    for layer, m in zip(layers, agreed.split([layer.num_heads for layer in layers])):
        gamma, q, k, scale = head_factors(m, t, layer.num_groups)
        result.max_logits.append(m)
        result.scales.append(scale)
        if bool((scale < 1).any()):
            for w in layer.weights:
                _scale_rows(opt, w.weight, row_factors(w, layer, gamma, q, k))
    return result


def _read_layers(opt: Any, pairs: list[tuple[Any, torch.Tensor]] | None) -> tuple[list[QkLayer], str | None]:
    """max_logits' layers (a fused QKV weight read as its layer) and the first problem found in them, if any."""
    layers: list[QkLayer] = []
    problem = None
    for key, logits in pairs or []:
        layer = key
        if isinstance(key, torch.Tensor) and key in opt.layouts.held and opt.is_qkv(key):
            try:
                layer = fused_qkv_layer(opt, key)
            except ValueError as e:
                problem = problem or str(e)
        problem = problem or _problem(opt, layer, logits)
        layers.append(layer)
    return layers, problem


def _scale_rows(opt: Any, p: torch.Tensor, factors: torch.Tensor) -> None:
    """This rank's rows of ``p`` times their global rows' ``factors`` (padding rows left alone)."""
    start, count = _rows_held(opt.layouts.held[p])
    mine = local(p)
    mine[:count].mul_(factors[start : start + count, None].to(mine.device, mine.dtype))
