"""Whole-model counts and predicted optimizer-step time per rank, per TP mode and DP arrangement.

Built on the table of modes that ``tp_mode="auto"`` reads (:func:`dist_ortho.tp.cost.mode_rounds`: each mode's
collectives round by round; :func:`~dist_ortho.tp.cost.rank_flops`: exactly the modes' matmuls), the real home assignment of tp_mode="home"
(:func:`dist_ortho.tp.home.assign_homes`), the real owner assignment of the DP x TP grid
(:func:`dist_ortho.parameters.grid.assign_owners`) and the real QKV split (:func:`dist_ortho.parameters.qkv.qkv_parts`). What it
adds is the step's shape: which collectives run in the same coalesced round (one call per round and kind,
more past ``bucket_bytes``), which matrices share a batched iteration, and a time per rank:

    seconds = FLOPs / (peak x efficiency [/ ranks sharing a CPU host]) + per collective (latency + bytes /
              bandwidth of the link its group spans) + kernels x launch + elementwise bytes / memory bandwidth

and the step's time is the slowest rank's (its communication part reported apart; with ``overlap`` the grid's
share is taken as hidden under the next forward, and the pipelined Newton-Schulz as hiding (B - 1) / B of the TP
collectives under compute, B the buckets of shapes, up to PIPELINE_BUCKETS). Arrangements: "replicated" (every DP replica runs the TP mode
on every matrix, as without ``dp_group``) and "grid" (``dp_group=``: each weight orthogonalized by its
owner replica, then one all-gather over DP; "grid" with "duplicated" is Megatron's layer-wise optimizer).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from dist_ortho.comm.coalesce import DEFAULT_BUCKET_BYTES
from dist_ortho.parameters.grid import assign_owners
from dist_ortho.parameters.qkv import qkv_parts
from dist_ortho.plan.devices import DeviceProfile
from dist_ortho.plan.models import ModelSpec, Weight
from dist_ortho.tp import PIPELINE_BUCKETS
from dist_ortho.tp.cost import (
    AUTO_CANDIDATES,
    cheapest,
    gram_offered,
    matrix_counts,
    mode_costs,
    mode_rounds,
    rank_flops,
)
from dist_ortho.tp.gram import restarts_for
from dist_ortho.tp.home import assign_homes, ns_cost
from dist_ortho.tp.jobs import NsSpec, even_sizes
from dist_ortho.tp.local import local_flops, plain_flops

Arrangement = Literal["replicated", "grid"]
Precision = Literal["highest", "high", "medium"]
MODES = (*AUTO_CANDIDATES, "auto")  # the table of modes in tp.cost, and auto's choice among them
ANCHORS = ("duplicated/per-matrix", "distributed/per-matrix")  # upstream's way: one set of collectives per matrix
NS_KERNELS_PER_STEP = 5  # X X^T, A A, the polynomial's sums, B X: eager kernels of one iteration of one (batched) call
UPDATE_KERNELS = 8  # momentum, Nesterov, scale, weight decay and the update of one weight
UPDATE_BYTES = 24  # per element: gradient read, momentum read + write, weight read + write, NS in/out (float32)


@dataclass(frozen=True)
class Layout:
    """tp x dp x pp ranks; the experts of an MoE over ep ranks, each sharded over etp (default tp). Megatron GTP
    weight remat: each dense TP block held in ``gtp`` pieces over a group of DP ranks (its owner gathers it, steps
    it and sends the pieces back; each of the dp / gtp replicas of that group does so), the experts' in ``egtp``."""

    tp: int
    dp: int
    ep: int = 1
    etp: int | None = None
    pp: int = 1
    gtp: int = 1
    egtp: int = 1

    def __post_init__(self) -> None:
        for name in ("tp", "dp", "ep", "pp", "gtp", "egtp"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"layout: {name} must be a positive integer, got {value!r}")
        if (self.tp * self.dp) % (self.ep * self.expert_tp):
            raise ValueError(f"layout: ep x expert tp = {self.ep * self.expert_tp} must divide tp x dp = {self.tp * self.dp}")
        if self.dp % self.gtp:
            raise ValueError(f"layout: gtp = {self.gtp} must divide dp = {self.dp} (its pieces live on DP ranks)")
        if self.expert_dp % self.egtp:
            raise ValueError(f"layout: egtp = {self.egtp} must divide the experts' DP = {self.expert_dp}")

    @property
    def expert_tp(self) -> int:
        return self.etp or self.tp

    @property
    def world(self) -> int:
        return self.tp * self.dp * self.pp

    @property
    def expert_dp(self) -> int:
        return self.tp * self.dp // (self.ep * self.expert_tp)


@dataclass(frozen=True)
class Settings:
    """Newton-Schulz and the optimizer's options that change the counts."""

    steps: int = 5
    coefficient_type: str = "quintic"
    precision: Precision = "medium"  # fp32_matmul_prec (Megatron's default): the device's medium_compute
    ns_dtype: str | None = None  # the optimizer's ns_dtype ("bf16" | "fp16" | "fp32"): overrides precision's dtype
    param_bytes: int = 4  # the master weights / gradients Muon reads (float32)
    state_bytes: int = 4  # momentum per element
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    capture: bool = False  # the step captured in a CUDA graph (capturable=True): host time one replay
    grouped: bool = True  # dist_ortho's grouped step; False: a step per weight (upstream's, and ours before groups)
    overlap: bool = False  # overlap=True: the grid's share hidden under the next forward, the TP collectives pipelined

    @property
    def ns(self) -> NsSpec:
        return NsSpec(self.steps, self.coefficient_type, ns_dtype=self.ns_dtype)


@dataclass
class RankLoad:
    """One rank's share of a step."""

    flops: float = 0.0
    bytes: float = 0.0
    calls: int = 0
    seconds: float = 0.0
    state_bytes: float = 0.0
    comm_seconds: float = 0.0  # of seconds: the time in collectives the step waits for


@dataclass(frozen=True)
class Estimate:
    """The slowest rank's figures (each maximum over ranks) for one arrangement and mode."""

    arrangement: str
    mode: str
    flops: float
    bytes: float
    calls: int
    state_bytes: float
    seconds: float
    chosen: dict[str, int] = field(default_factory=dict)  # auto: matrices per mode
    comm_seconds: float = 0.0  # the slowest rank's exposed communication (in seconds)


@dataclass(frozen=True)
class _Matrix:
    weight: int
    shape: tuple[int, int]
    sizes: tuple[int, ...] | None  # per TP rank along partition_dim; None: whole on every rank
    partition_dim: int | None


def _matrices(weights: Sequence[Weight], t: int) -> list[_Matrix]:
    out = []
    for i, w in enumerate(weights):
        if w.qkv_split:  # Q, K and V (and a gate) are orthogonalized apart, each row-sharded
            rows = even_sizes(w.shape[0], t)
            out += [_Matrix(i, (part.rows, w.shape[1]), tuple(part.sizes) if t > 1 else None, 0 if t > 1 else None)
                    for part in qkv_parts(rows, 0, w.qkv_split)]
        elif w.partition_dim is None or t == 1:
            out.append(_Matrix(i, w.shape, None, None))
        else:
            out.append(_Matrix(i, w.shape, tuple(even_sizes(w.shape[w.partition_dim], t)), w.partition_dim))
    return out


def _local_numel(w: Weight, t: int, r: int) -> int:
    if w.partition_dim is None or t == 1:
        return w.shape[0] * w.shape[1]
    return even_sizes(w.shape[w.partition_dim], t)[r] * w.shape[1 - w.partition_dim]


class _Rounds:
    """Coalesced requests per (round, kind): bytes of the flat buffers, for the number of calls."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[int, str], float] = {}

    def add(self, first_round: int, kind: str, rounds: int, nbytes: float) -> None:
        for i in range(first_round, first_round + rounds):
            self.buffers[(i, kind)] = self.buffers.get((i, kind), 0.0) + nbytes

    def calls(self, bucket_bytes: int) -> int:
        return sum(max(1, math.ceil(b / bucket_bytes)) for b in self.buffers.values())


def _tp_step(
    mats: Sequence[_Matrix], t: int, mode: str, s: Settings, profile: DeviceProfile, ranks_on_node: int,
) -> tuple[list[RankLoad], dict[str, int], list[int]]:
    """Per TP rank: Newton-Schulz FLOPs, bytes, collectives and kernel launches of one group's matrices
    in ``mode`` (or an anchor); the matrices per mode auto chose."""
    base, per_matrix = mode.split("/")[0], mode.endswith("/per-matrix")
    ns = NsSpec(s.steps, s.coefficient_type, local_gram="never", batch=False, ns_dtype=s.ns_dtype) if per_matrix else s.ns
    compute_name, compute = profile.compute(s.precision, s.ns_dtype)
    dtype = torch.float32 if s.param_bytes == 4 else torch.bfloat16
    restarts = restarts_for(ns, compute)
    ranks = [RankLoad() for _ in range(t)]
    launches = [0] * t
    rounds = _Rounds()
    per_matrix_calls = 0
    by_mode: dict[str, list[_Matrix]] = {}
    whole = {}
    sharing = max(1, sum(1 for m in mats if m.sizes is not None))
    auto_profile = profile.cost_profile(compute_name, t, ranks_on_node)
    for m in mats:
        whole[m] = local_flops(m.shape, ns, compute) if ns.local_gram == "auto" else plain_flops(m.shape, ns)
        if m.sizes is None:
            by_mode.setdefault("local", []).append(m)
            continue
        chosen = base
        if base == "auto":
            counts = matrix_counts(m.shape, m.partition_dim, m.sizes, ns, dtype, compute, restarts, whole[m])
            chosen = cheapest(mode_costs(counts, auto_profile, gram_offered(m.shape, m.partition_dim, compute), sharing))
        by_mode.setdefault(chosen, []).append(m)
    e = s.param_bytes

    def batched(group: Sequence[_Matrix]) -> int:  # batched iterations: one per shape (per matrix: emerging_optimizers' and Megatron's loop)
        return len({m.shape for m in group}) if ns.batch is not False else len(group)

    for chosen, group in by_mode.items():
        if chosen == "local":
            for r in range(t):
                ranks[r].flops += sum(whole[m] for m in group)
                launches[r] += batched(group) * NS_KERNELS_PER_STEP * s.steps
            continue
        for m in group:  # the table of modes (tp.cost): the collectives each matrix adds, coalesced per round
            for r in mode_rounds(chosen, m.shape, m.partition_dim, m.sizes, ns, dtype, compute, restarts):
                if per_matrix:
                    per_matrix_calls += r.count
                else:
                    rounds.add(r.first, r.kind, r.count, r.nbytes)
        if chosen == "home":  # the real home assignment: each home's matrices, each rank's bytes
            homes = assign_homes([ns_cost(m.shape) for m in group], t)
            for r in range(t):
                mine = [m for m, h in zip(group, homes) if h == r]
                ranks[r].flops += sum(whole[m] for m in mine)
                launches[r] += batched(mine) * NS_KERNELS_PER_STEP * s.steps
                for m, h in zip(group, homes):
                    u = m.shape[1 - m.partition_dim]
                    shard = m.sizes[r] * u
                    ranks[r].bytes += e * ((m.shape[0] * m.shape[1] - shard) if h == r else shard)
            continue
        for r in range(t):  # one batched program per group of a shape (per matrix: emerging_optimizers' and Megatron's loop)
            launches[r] += (batched(group) if s.grouped or chosen == "duplicated" else len(group)) * NS_KERNELS_PER_STEP * s.steps
        for m in group:
            counts = matrix_counts(m.shape, m.partition_dim, m.sizes, ns, dtype, compute, restarts, whole[m])[chosen]
            for r in range(t):  # counts hold the largest shard's; uneven shards differ by rank
                ranks[r].flops += rank_flops(chosen, m.shape, m.partition_dim, m.sizes[r], t, ns, restarts, whole[m])
                ranks[r].bytes += counts.bytes
    calls = per_matrix_calls + rounds.calls(s.bucket_bytes)
    for load in ranks:
        load.calls = calls
    chosen_counts = {k: len(v) for k, v in by_mode.items() if k != "local"}
    return ranks, chosen_counts, launches


def _domain(
    weights: Sequence[Weight], t: int, dp: int, dp_span: int, mode: str, arrangement: Arrangement, s: Settings,
    profile: DeviceProfile, ranks_on_node: int, pieces: int = 1,
) -> tuple[RankLoad, dict[str, int]]:
    """The slowest rank of one domain (dense TP x DP, or expert TP x expert DP). With ``pieces`` > 1 (GTP) the
    owners are the ranks of a pieces group in either arrangement: the gradients' pieces go to them and the new
    weights' pieces come back (an all-to-all each way, dist_ortho.parameters.pieces), no share over DP."""
    if not weights:
        return RankLoad(), {}
    mats = _matrices(weights, t)
    compute_name, _ = profile.compute(s.precision, s.ns_dtype)
    rate = profile.matmul_rate(compute_name, ranks_on_node)
    tp_bw, tp_lat = profile.link(t)
    dp_bw, dp_lat = profile.link(dp_span if pieces == 1 else t * pieces)
    if pieces > 1 or (arrangement == "grid" and dp > 1):
        dp = pieces if pieces > 1 else dp
        shapes = [[m.shape for m in mats if m.weight == i] for i in range(len(weights))]
        owners = assign_owners(shapes, dp)
    else:
        owners = [0] * len(weights)
        dp = 1
    worst, chosen_all, slowest = RankLoad(), {}, RankLoad()
    held = [[sum(_local_numel(w, t, r) for w, o in zip(weights, owners) if o == d) for r in range(t)] for d in range(dp)]
    for d in range(dp):
        mine = [m for m in mats if owners[m.weight] == d]
        loads, chosen, launches = _tp_step(mine, t, mode, s, profile, ranks_on_node)
        for k, v in chosen.items():
            chosen_all[k] = chosen_all.get(k, 0) + v
        owned = [w for w, o in zip(weights, owners) if o == d]
        per_weight = mode.endswith("/per-matrix") or not s.grouped  # a kernel of each kind per weight
        groups = len(owned) if per_weight else len({(w.shape, w.partition_dim, w.qkv_split) for w in owned})
        host = _host_seconds(profile, s, groups, len(mine), per_weight)
        # overlap=True pipelines Newton-Schulz over up to PIPELINE_BUCKETS buckets of shapes (tp.orthogonalize_many):
        # taken as hiding all but one bucket's share of the TP collectives under the other buckets' compute
        pipeline = min(PIPELINE_BUCKETS, len({m.shape for m in mine if m.sizes is not None})) if s.overlap and not per_weight else 1
        for r, load in enumerate(loads):
            kernels = 0.0 if s.capture and not per_weight else (launches[r] + groups * UPDATE_KERNELS) * profile.launch_s
            comm = load.calls * tp_lat + load.bytes / tp_bw
            comm -= min(comm, load.flops / rate) * (pipeline - 1) / pipeline
            seconds = (load.flops / rate + comm + kernels + host
                       + held[d][r] * UPDATE_BYTES / profile.memory_bytes_per_s)
            load.state_bytes = held[d][r] * s.state_bytes
            if pieces > 1:  # this rank's gradient pieces of the others' blocks in, its own blocks' pieces back out
                others = sum(held[o][r] for o in range(dp)) - held[d][r]
                moved = (others / pieces + held[d][r] * (pieces - 1) / pieces) * s.param_bytes
                calls = 2 * max(1, math.ceil(max(held[o][r] for o in range(dp)) * s.param_bytes / s.bucket_bytes))
                load.bytes += moved
                load.calls += calls
                seconds += calls * dp_lat + moved / dp_bw
                comm += calls * dp_lat + moved / dp_bw
            elif dp > 1:  # the owners' updated weights to every replica: one all-gather over DP
                # the owners' weights, and each replica's finite verdict in the same buffer (one element)
                longest = (max(held[o][r] for o in range(dp)) + 1) * s.param_bytes
                share_calls = max(1, math.ceil(longest / s.bucket_bytes))
                load.bytes += (dp - 1) * longest
                load.calls += share_calls
                share = share_calls * dp_lat + (dp - 1) * longest / dp_bw
                if not s.overlap:  # with overlap it runs under the next forward (taken as covering it)
                    seconds += share
                    comm += share
            load.seconds, load.comm_seconds = seconds, comm
            if load.seconds >= worst.seconds:
                slowest = load
            worst = RankLoad(max(worst.flops, load.flops), max(worst.bytes, load.bytes), max(worst.calls, load.calls),
                             max(worst.seconds, load.seconds), max(worst.state_bytes, load.state_bytes))
    worst.comm_seconds = slowest.comm_seconds
    return worst, chosen_all


def _host_seconds(profile: DeviceProfile, s: Settings, groups: int, matrices: int, per_weight: bool) -> float:
    """dist_ortho's host time for a rank's groups and matrices (none modelled for a step per weight, upstream's,
    whose host cost is its own); one graph replay when captured."""
    if per_weight:
        return 0.0
    if s.capture:
        return profile.replay_s
    return profile.host_step_s + groups * profile.host_group_s + matrices * profile.host_matrix_s


def estimate(
    model: ModelSpec, layout: Layout, profile: DeviceProfile, settings: Settings | None = None,
    modes: Sequence[str] = MODES + ANCHORS, arrangements: Sequence[Arrangement] = ("replicated", "grid"),
) -> list[Estimate]:
    """Per arrangement and mode, the slowest rank's Newton-Schulz FLOPs, bytes sent, collectives, Muon state
    bytes and predicted seconds of one optimizer step (dense and expert domains added: a rank runs both)."""
    s = settings or Settings()
    model.check_layout(layout.tp, layout.ep, layout.expert_tp, layout.pp)
    unknown = sorted(set(modes) - set(MODES + ANCHORS))
    if unknown:
        raise ValueError(f"modes: unknown {unknown}; choose from {list(MODES + ANCHORS)}")
    weights = model.weights(layout.ep, layout.pp)
    dense = [w for w in weights if not w.expert]
    experts = [w for w in weights if w.expert]
    ranks_on_node = min(layout.world, profile.devices_per_node)
    profile = profile.on_node(ranks_on_node)
    out = []
    for arrangement in arrangements:
        if arrangement == "grid" and layout.dp == 1 and layout.expert_dp == 1:
            continue
        for mode in modes:
            if arrangement == "grid" and mode in ANCHORS:
                continue
            a, chosen = _domain(dense, layout.tp, layout.dp, layout.tp * layout.dp, mode, arrangement, s, profile,
                                ranks_on_node, layout.gtp)
            b, chosen_e = _domain(experts, layout.expert_tp, layout.expert_dp, layout.tp * layout.dp, mode, arrangement, s,
                                  profile, ranks_on_node, layout.egtp)
            for k, v in chosen_e.items():
                chosen[k] = chosen.get(k, 0) + v
            out.append(Estimate(arrangement, mode, a.flops + b.flops, a.bytes + b.bytes, a.calls + b.calls,
                                a.state_bytes + b.state_bytes, a.seconds + b.seconds, chosen if mode == "auto" else {},
                                a.comm_seconds + b.comm_seconds))
    return out
