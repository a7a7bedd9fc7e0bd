"""QK-clip (dist_ortho.optim.qk_clip) against one process applying MuonClip to the gathered weights.

Three attention layers stepped by Muon on TE-attribute row-sharded weights: a fused GQA QKV (8 heads, 2 query groups,
head size 4: [q 16 | k 4 | v 4] rows per group), separate q / k weights (4 heads, 2 groups) and MLA (4 heads,
q [q_C 4 | q_R 2], kv_up [k_C 4 | v 3] per head). World 4 as DP 2 x TP 2, and as TP 4 (more TP ranks than query
groups: a rank holds part of a group). Each rank passes maxima of its own (seeded by rank; heads it did not "compute"
-inf); the reference takes the MAX over all ranks' maxima and clips the gathered weights in float64 with the rules
written out per head below (MuonClip: sqrt(gamma) on q and k; the GQA group's key by sqrt of its smallest gamma;
MLA: q_C, k_C by sqrt(gamma), q_R by gamma, k_R untouched). Tolerance 1e-6 (fp32 weights of size ~1 scaled once by an
fp32-rounded factor: ~1e-7). With overlap=True the weights are bit-identical to overlap=False.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from tests.harness import started_world

TAU = 1.0
FUSED = dict(heads=8, groups=2, head=4, hidden=12)
SEPARATE = dict(heads=4, groups=2, head=4, hidden=12)
MLA = dict(heads=4, qk=4, rope=2, v=3, hidden=12)


@pytest.fixture(scope="module")
def world():
    with started_world(4) as w:
        yield w


def _full_weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    f, s, m = FUSED, SEPARATE, MLA
    shapes = {
        "qkv": (f["groups"] * (f["heads"] // f["groups"] + 2) * f["head"], f["hidden"]),
        "q": (s["heads"] * s["head"], s["hidden"]), "k": (s["groups"] * s["head"], s["hidden"]),
        "q_proj": (m["heads"] * (m["qk"] + m["rope"]), m["hidden"]), "kv_up": (m["heads"] * (m["qk"] + m["v"]), m["hidden"]),
    }
    return {name: torch.randn(*shape, generator=g) for name, shape in shapes.items()}


def _groups(ctx, tp: int):
    tps = [dist.new_group(list(range(s, s + tp))) for s in range(0, ctx.world_size, tp)]
    dps = [dist.new_group(list(range(t, ctx.world_size, tp))) for t in range(tp)]
    return tps[ctx.rank // tp], (dps[ctx.rank % tp] if ctx.world_size > tp else None)


def _build(ctx, tp: int, overlap: bool = False):
    from dist_ortho import Muon
    from dist_ortho.optim.qk_clip import QkLayer
    from dist_ortho.tp import shard

    tp_group, dp_group = _groups(ctx, tp)
    rank = dist.get_rank(tp_group)
    params = {}
    for name, full in _full_weights().items():
        p = torch.nn.Parameter(shard(full, 0, rank, tp).clone())
        p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, 0, 1
        params[name] = p
    f = FUSED
    params["qkv"].is_qkv = True
    params["qkv"].qkv_split_shapes = [f["heads"] // f["groups"] * f["head"], f["head"], f["head"]]
    opt = Muon(list(params.items()), lr=0.05, tp_group=tp_group, dp_group=dp_group, overlap=overlap,
               fp32_matmul_prec="highest")
    layers = {"qkv": params["qkv"],
              "separate": QkLayer.separate(params["q"], params["k"], SEPARATE["heads"], SEPARATE["groups"], SEPARATE["head"]),
              "mla": QkLayer.mla(params["q_proj"], params["kv_up"], MLA["heads"], MLA["qk"], MLA["rope"], MLA["v"])}
    return opt, params, layers, tp_group


def _grads(params, tp: int, rank: int) -> None:
    from dist_ortho.tp import shard

    g = torch.Generator().manual_seed(1)
    for name, full in _full_weights().items():
        params[name].grad = shard(torch.randn(full.shape, generator=g), 0, rank, tp).clone()


def _maxima(world_rank: int, hot: int | None = None) -> dict[str, torch.Tensor]:
    """This rank's maxima per layer: around TAU, some above; ``hot``: only that rank has maxima above TAU."""
    g = torch.Generator().manual_seed(100 + world_rank)
    out = {}
    for name, heads in (("qkv", FUSED["heads"]), ("separate", SEPARATE["heads"]), ("mla", MLA["heads"])):
        m = 0.5 + 2.5 * torch.rand(heads, generator=g)
        if hot is not None:
            m = m.clamp(max=0.9 * TAU) if world_rank != hot else m + TAU
        m[torch.rand(heads, generator=g) < 0.25] = -math.inf  # heads this rank did not compute
        out[name] = m
    return out


def _gathered(p: torch.Tensor, tp_group) -> torch.Tensor:
    parts = [torch.empty_like(p.data) for _ in range(dist.get_world_size(tp_group))]
    dist.all_gather(parts, p.data.contiguous(), group=tp_group)
    return torch.cat(parts).double()


def _reference(weights: dict[str, torch.Tensor], maxima: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MuonClip on whole float64 weights, head by head."""
    out = {k: v.clone() for k, v in weights.items()}

    def gamma(s: float) -> float:
        return min(1.0, TAU / s) if s > 0 else 1.0

    for layer, (qn, kn, per, hn, q_stride, q_base, k_base) in {
        "qkv": ("qkv", "qkv", FUSED["heads"] // FUSED["groups"], FUSED["head"],
                (FUSED["heads"] // FUSED["groups"] + 2) * FUSED["head"], 0, FUSED["heads"] // FUSED["groups"] * FUSED["head"]),
        "separate": ("q", "k", SEPARATE["heads"] // SEPARATE["groups"], SEPARATE["head"], None, 0, 0),
    }.items():
        s = maxima[layer]
        groups = len(s) // per
        for g in range(groups):
            gam = [gamma(float(s[g * per + j])) for j in range(per)]
            kf = math.sqrt(min(gam))
            q0 = g * q_stride if q_stride else g * per * hn
            k0 = g * q_stride + k_base if q_stride else g * hn
            for j in range(per):
                out[qn][q0 + j * hn : q0 + (j + 1) * hn] *= min(1.0, gam[j] / kf)
            out[kn][k0 : k0 + hn] *= kf
    a, b, c = MLA["qk"], MLA["rope"], MLA["v"]
    for h, s in enumerate(maxima["mla"].tolist()):
        gm = gamma(s)
        out["q_proj"][h * (a + b) : h * (a + b) + a] *= math.sqrt(gm)
        out["q_proj"][h * (a + b) + a : (h + 1) * (a + b)] *= gm
        out["kv_up"][h * (a + c) : h * (a + c) + a] *= math.sqrt(gm)
    return out


def _clip_vs_reference(ctx, tp: int, overlap: bool, hot: int | None):
    torch.manual_seed(0)
    opt, params, layers, tp_group = _build(ctx, tp, overlap)
    _grads(params, tp, dist.get_rank(tp_group))
    opt.step()
    opt.finish()
    stepped = {n: _gathered(p, tp_group) for n, p in params.items()}
    mine = _maxima(ctx.rank, hot)
    result = opt.qk_clip({layers[n]: m for n, m in mine.items()}, TAU)
    every = [_maxima(r, hot) for r in range(ctx.world_size)]
    agreed = {n: torch.stack([e[n] for e in every]).amax(0).double() for n in mine}
    want = _reference(stepped, agreed)
    got = {n: _gathered(p, tp_group) for n, p in params.items()}
    errors = {n: float((got[n] - want[n]).abs().max()) for n in got}
    changed = {n: bool((got[n] != stepped[n]).any()) for n in got}
    return errors, changed, {n: p.data.clone() for n, p in params.items()}, result.clipped, result.max_logit_after


@pytest.mark.parametrize("tp", [2, 4], ids=["dp2xtp2", "tp4_over_2_groups"])
def test_clip_equals_one_process_muonclip_on_the_gathered_weights_and_overlap_is_bit_identical(world, tp):
    plain = world.run(_clip_vs_reference, tp, False, None)
    # at TP 4 alone overlap pipelines the Newton-Schulz collectives (bucketed by shape): the QKV parts of partial
    # query groups have different local sizes per rank, which once cut the buckets differently (a collective mismatch)
    overlapped = world.run(_clip_vs_reference, tp, True, None)
    for errors, changed, _, clipped, after in plain:
        assert max(errors.values()) <= 1e-6, errors
        assert all(changed.values()) and clipped > 0, (changed, clipped)
        assert after <= TAU * (1 + 1e-12), after
    for (_, _, a, _, _), (_, _, b, _, _) in zip(plain, overlapped):
        assert all(torch.equal(a[n], b[n]) for n in a)  # bit for bit


def test_one_replica_with_a_larger_max_logit_changes_every_replica_alike(world):
    for hot in (1, 2):  # a rank of the first, then the second DP replica
        results = world.run(_clip_vs_reference, 2, False, hot)
        for errors, changed, _, clipped, _ in results:
            assert max(errors.values()) <= 1e-6 and all(changed.values()) and clipped > 0, (hot, errors, changed)
        for tp_rank in (0, 1):  # the DP replicas of each TP rank hold the same weights, bit for bit
            a, b = results[tp_rank][2], results[2 + tp_rank][2]
            assert all(torch.equal(a[n], b[n]) for n in a)


def _bad_input(ctx, case: str):
    opt, params, layers, tp_group = _build(ctx, 2)
    _grads(params, 2, dist.get_rank(tp_group))
    opt.step()
    before = {n: p.data.clone() for n, p in params.items()}
    mine = {layers[n]: m for n, m in _maxima(ctx.rank).items()}
    tau = TAU
    if case == "shape_on_rank_3" and ctx.rank == 3:
        mine[layers["qkv"]] = torch.ones(FUSED["heads"], 1)
    elif case == "head_count":
        mine[layers["mla"]] = torch.ones(MLA["heads"] + 1)
    elif case == "nan_on_rank_1" and ctx.rank == 1:
        mine[layers["separate"]] = torch.tensor([1.0, float("nan"), 1.0, 1.0])
    elif case == "inf":
        mine[layers["separate"]] = torch.tensor([1.0, float("inf"), 1.0, 1.0])
    elif case == "tau":
        tau = 0.0
    elif case == "tau_on_rank_2" and ctx.rank == 2:
        tau = 2.0
    elif case == "not_a_layer":
        mine[params["q"]] = torch.ones(4)
    try:
        opt.qk_clip(mine, tau)
        message = None
    except ValueError as e:
        message = str(e)
    return message, all(torch.equal(before[n], p.data) for n, p in params.items())


@pytest.mark.parametrize("case", ["shape_on_rank_3", "head_count", "nan_on_rank_1", "inf", "tau", "tau_on_rank_2",
                                  "not_a_layer"])
def test_bad_input_is_a_clear_error_on_every_rank_and_nothing_is_written(world, case):
    for message, untouched in world.run(_bad_input, case):
        assert message is not None and "qk_clip" in message and untouched, (case, message)


def test_clipped_weights_give_logits_of_at_most_tau_on_the_same_input():
    """One process: the largest logit of each head measured on an input, clipped, measured again: at most tau, equal
    to tau for heads whose gamma is the group's smallest (a GQA group) and for every MLA head."""
    from dist_ortho import Muon
    from dist_ortho.optim.qk_clip import QkLayer

    w = {n: torch.nn.Parameter(t * 3) for n, t in _full_weights().items()}
    f = FUSED
    w["qkv"].is_qkv, w["qkv"].qkv_split_shapes = True, [f["heads"] // f["groups"] * f["head"], f["head"], f["head"]]
    opt = Muon(list(w.items()), lr=0.0)
    x = torch.randn(10, f["hidden"], generator=torch.Generator().manual_seed(3))
    per = f["heads"] // f["groups"]

    def fused_logits() -> torch.Tensor:
        rows = w["qkv"].detach().view(f["groups"], per + 2, f["head"], -1)
        q, k = torch.einsum("tc,gjdc->gjtd", x, rows[:, :per]), torch.einsum("tc,gdc->gtd", x, rows[:, per])
        return torch.einsum("gjtd,gsd->gjts", q, k).amax((2, 3)).reshape(-1) / math.sqrt(f["head"])

    a, b, c = MLA["qk"], MLA["rope"], MLA["v"]
    k_rope = torch.randn(10, b, generator=torch.Generator().manual_seed(4))  # the shared rotary key (not clipped)

    def mla_logits() -> torch.Tensor:
        q = torch.einsum("tc,hdc->htd", x, w["q_proj"].detach().view(MLA["heads"], a + b, -1))
        k = torch.einsum("tc,hdc->htd", x, w["kv_up"].detach().view(MLA["heads"], a + c, -1)[:, :a])
        s = torch.einsum("htd,hsd->hts", q[..., :a], k) + torch.einsum("htd,sd->hts", q[..., a:], k_rope)
        return s.amax((1, 2)) / math.sqrt(a + b)

    before_f, before_m = fused_logits(), mla_logits()
    tau = float(torch.cat([before_f, before_m]).median())
    opt.qk_clip({w["qkv"]: before_f, QkLayer.mla(w["q_proj"], w["kv_up"], MLA["heads"], a, b, c): before_m}, tau)
    after_f, after_m = fused_logits(), mla_logits()
    assert (after_f <= tau * (1 + 1e-5)).all() and (after_m <= tau * (1 + 1e-5)).all()
    hot = before_m > tau
    assert hot.any() and torch.allclose(after_m[hot], torch.full_like(after_m[hot], tau), rtol=1e-5)
    for g in range(f["groups"]):
        s = before_f[g * per : (g + 1) * per]
        if s.max() > tau:  # the group's hottest head lands on tau exactly
            assert math.isclose(float(after_f[g * per + int(s.argmax())]), tau, rel_tol=1e-5)


def _main_job(ctx, out: str, tau: float):
    """The main job at DP 2 x TP 2 with --qk-clip: a whole run, and one stopped after 2 steps and resumed."""
    from dist_ortho.train.cli import parallel_groups, parser, run

    small = ["--layers", "1", "--hidden", "32", "--heads", "4", "--groups", "2", "--ffn", "64", "--seq-len", "16",
             "--batch-size", "4", "--steps", "4", "--eval-interval", "0", "--eval-batches", "1", "--no-progress",
             "--muon-fp32-matmul-prec", "highest", "--warmup", "1", "--lr", "0.05", "--qk-clip", str(tau)]
    group, dp_group = parallel_groups(2)
    losses = [run(parser().parse_args(small + ["--out", f"{out}/{name}", *extra]), group, torch.device("cpu"), dp_group)
              [0]["losses"] for name, extra in (("whole", []), ("parts", ["--stop-after", "2"]), ("parts", ["--resume"]))]
    return losses


def test_main_job_clips_at_dp2_x_tp2_logs_max_logits_under_tau_and_resumes(world, tmp_path):
    import json

    tau = 0.3  # logits grow from 0.06 to 1.6 in 4 steps unclipped (lr 0.05): clipped from step 2 on
    whole, first, second = world.run(_main_job, str(tmp_path), tau)[0]
    assert {**first, **second} == whole  # resumed bit for bit (the clip keeps no state)
    for run in ("whole", "parts"):
        log = [json.loads(line) for line in (tmp_path / run / "muon" / "log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in log] == [1, 2, 3, 4]
        assert all(r["max_logit_clipped"] <= tau * (1 + 1e-9) for r in log), log
        assert all(r["qk_clipped_heads"] > 0 and r["max_logit"] > tau for r in log[1:]), log
