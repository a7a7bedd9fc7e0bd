"""The DP x TP grid (dist_ortho.parameters.grid, ``dp_group=``): every matrix updated by one owner replica.

World 4 as DP 2 x TP 2 (TP groups {0, 1}, {2, 3}; DP groups {0, 2}, {1, 3}); gradients as DDP leaves them
(averaged over DP: the same on every replica). After 3 steps every rank's shards equal a single-process
run on the gathered weights (tolerance of test_optim: max |W - W_ref| <= 1e-5 + 1e-4 max |W_ref - W_0|),
for Muon, NorMuon and PolarGrad in home and gram modes. Newton-Schulz FLOPs per rank <= 1.15 x total /
world and optimizer state per rank <= 0.6 x the unsharded state on a GPT-like set; collectives per step
constant (pinned).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard
from torch.utils.flop_counter import FlopCounterMode

from dist_ortho import count_collectives, get_optimizer
from dist_ortho.parameters.qkv import qkv_split_shapes
from tests import optim_reference
from tests.harness import started_world
from tests.test_optim_tp import block, sharded


@pytest.fixture(scope="module")
def world():
    with started_world(4) as w:
        yield w


def step_pair(opt, ref_opt, feed, steps: int = 3):
    """``steps`` steps of a distributed optimizer and its one-process reference, ``feed(step)`` setting their
    gradients before each; the collectives of the distributed optimizer's last step."""
    for step in range(steps):
        feed(step)
        with count_collectives() as calls:
            opt.step()
        ref_opt.step()
    return calls


def _grid(ctx, tp: int):
    tp_groups = [dist.new_group(list(range(s, s + tp))) for s in range(0, ctx.world_size, tp)]
    dp_groups = [dist.new_group(list(range(t, ctx.world_size, tp))) for t in range(tp)]
    return tp_groups[ctx.rank // tp], dp_groups[ctx.rank % tp], ctx.rank % tp


def _gpt_like(seed: int = 0, layers: int = 2, hidden: int = 64):
    """Global (name, shape, partition_dim, qkv split) of a small GPT: fused GQA QKV, proj, fc1, fc2."""
    split = qkv_split_shapes(8, 2, hidden // 8)
    out = []
    for i in range(layers):
        out += [(f"l{i}.qkv", (2 * sum(split), hidden), 0, split), (f"l{i}.proj", (hidden, hidden), 1, None),
                (f"l{i}.fc1", (4 * hidden, hidden), 0, None), (f"l{i}.fc2", (hidden, 4 * hidden), 1, None)]
    return out


def _params(spec, tp_rank: int, tp: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    fulls, params = [], []
    for name, shape, pd, split in spec:
        full = torch.randn(shape, generator=gen)
        p = sharded(block(full, pd, tp_rank, tp), pd)
        if split:
            p.is_qkv, p.qkv_split_shapes = True, split
        fulls.append(full)
        params.append(p)
    return fulls, params


def _exact(ctx, kind: str, mode: str, tp: int):
    tp_group, dp_group, tp_rank = _grid(ctx, tp)
    spec = _gpt_like()
    fulls, params = _params(spec, tp_rank, tp)
    ref = [torch.nn.Parameter(f.clone()) for f in fulls]
    hp = {"lr": 0.02, "fp32_matmul_prec": "highest"}
    opt = get_optimizer(kind)(params, tp_group=tp_group, dp_group=dp_group, tp_mode=mode, **hp)
    for p, (_, _, _, split) in zip(ref, spec):
        if split:
            p.is_qkv, p.qkv_split_shapes = True, split
    ref_opt = get_optimizer(kind)(ref, **hp)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        for p, q, (_, shape, pd, _) in zip(params, ref, spec):
            g = torch.randn(shape, generator=gen)  # the DP-averaged gradient: the same on every replica
            p.grad, q.grad = block(g, pd, tp_rank, tp), g
        opt.step()
        ref_opt.step()
    bad = {}
    for p, q, f, (name, _, pd, _) in zip(params, ref, fulls, spec):
        moved = (q.detach() - f).abs().max().item()
        err = (p.detach() - block(q.detach(), pd, tp_rank, tp)).abs().max().item()
        if not optim_reference.weights_agree(err, moved):
            bad[name] = (err, moved)
    assert not bad, bad
    owned = sum(1 for p in params if opt.owner(p) == comm_rank(dp_group))
    return owned


def comm_rank(group) -> int:
    return dist.get_rank(group)


@pytest.mark.parametrize("mode", ["home", "gram", "duplicated"])
@pytest.mark.parametrize("kind", ["muon", "normuon", "polargrad"])
def test_dp2_tp2_equals_one_process(world, kind, mode):
    owned = world.run(_exact, kind, mode, 2)
    assert sum(owned) == 2 * len(_gpt_like()) and min(owned) > 0  # each parameter owned by one replica


def test_dp4_tp1_equals_one_process(world):
    owned = world.run(_exact, "muon", "duplicated", 1)
    assert sum(owned) == len(_gpt_like()) and min(owned) > 0


def _costs(ctx, dp_group_on: bool):
    tp_group, dp_group, tp_rank = _grid(ctx, 2)
    spec = _gpt_like(layers=4, hidden=128)
    _, params = _params(spec, tp_rank, 2)
    opt = get_optimizer("muon")(params, tp_group=tp_group, dp_group=dp_group if dp_group_on else None,
                                tp_mode="home", fp32_matmul_prec="highest", local_gram="never", batch_matrices=False)
    gen = torch.Generator().manual_seed(1)
    for step in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        if step == 1:
            with FlopCounterMode(display=False) as flops, count_collectives() as calls:
                opt.step()
        else:
            opt.step()
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    return flops.get_total_flops(), state, calls.total_calls


def test_flops_state_and_collectives_per_rank(world):
    """DP 2 x TP 2, home mode, plain iteration: NS FLOPs per rank <= 1.15 x total / world (measured total:
    the no-DP run's FLOPs summed over one TP group), state <= 0.6 x unsharded, 3 calls per step (home's two
    all-to-alls and one all-gather of the updated shards)."""
    grid = world.run(_costs, True)
    plain = world.run(_costs, False)
    total = sum(f for f, _, _ in plain[:2])  # one TP group's ranks hold every matrix's work once
    assert max(f for f, _, _ in grid) <= 1.15 * total / 4, ([f for f, _, _ in grid], total)
    assert max(s for _, s, _ in grid) <= 0.6 * max(s for _, s, _ in plain)
    assert [c for _, _, c in grid] == [3] * 4


@pytest.mark.slow  # world 8 on 2 cores (37 s); DP x TP exactness runs at world 4 in CI
def test_dp2_tp4_at_world8_equals_one_process():
    """World 8 as DP 2 x TP 4 (about 20 s on 2 cores)."""
    with started_world(8) as world8:
        owned = world8.run(_exact, "muon", "home", 4)
    assert sum(owned) == 4 * len(_gpt_like()) and min(owned) > 0


def _reduced(ctx, kind: str):
    """Each replica has its own (un-averaged) gradient; reduce_grads=True averages it into the owners with
    one reduce-scatter: the weights equal a single process stepping with the DP-averaged gradient."""
    tp_group, dp_group, tp_rank = _grid(ctx, 2)
    dp_rank = dist.get_rank(dp_group)
    spec = _gpt_like()
    fulls, params = _params(spec, tp_rank, 2)
    ref = [torch.nn.Parameter(f.clone()) for f in fulls]
    for p, (_, _, _, split) in zip(ref, spec):
        if split:
            p.is_qkv, p.qkv_split_shapes = True, split
    hp = {"lr": 0.02, "fp32_matmul_prec": "highest"}
    opt = get_optimizer(kind)(params, tp_group=tp_group, dp_group=dp_group, reduce_grads=True, tp_mode="home", **hp)
    ref_opt = get_optimizer(kind)(ref, **hp)
    gen = torch.Generator().manual_seed(1)

    def feed(step: int) -> None:
        for p, q, (_, shape, pd, _) in zip(params, ref, spec):
            per_replica = [torch.randn(shape, generator=gen) for _ in range(2)]
            p.grad, q.grad = block(per_replica[dp_rank], pd, tp_rank, 2), (per_replica[0] + per_replica[1]) / 2

    calls = step_pair(opt, ref_opt, feed)
    for p, q, f, (name, _, pd, _) in zip(params, ref, fulls, spec):
        moved = (q.detach() - f).abs().max().item()
        err = (p.detach() - block(q.detach(), pd, tp_rank, 2)).abs().max().item()
        assert optim_reference.weights_agree(err, moved), (name, err, moved)
    grad_bytes = sum(p.numel() * p.element_size() for p in params)
    return dict(calls.calls), calls.bytes_by_call["reduce_scatter"], grad_bytes


@pytest.mark.parametrize("kind", ["muon", "normuon"])
def test_reduce_grads_averages_into_the_owners_with_half_the_bytes(world, kind):
    """One reduce-scatter, no gradient all-reduce; at DP 2 it sends at most 0.6 x the gradient bytes, where DDP's
    all-reduce sends 2 (DP-1)/DP = 1.0 x (its buffer is padded to the larger owner's share: measured 0.5x)."""
    own_rounds = {"muon": 0, "normuon": 3}[kind]  # NorMuon's mean and norms over TP (pinned in test_optim_tp)
    for calls, scattered, grad_bytes in world.run(_reduced, kind):
        assert calls.get("reduce_scatter") == 1 and calls.get("all_reduce", 0) == own_rounds, calls
        assert calls["all_gather"] == 1 and calls["all_to_all"] == 2, calls
        assert scattered <= 0.6 * grad_bytes, (scattered, grad_bytes)


def _unused_on_one_replica(ctx, verify_plan: str):
    """reduce_grads=True, DP 4: a replicated weight (no TP attributes) has no gradient at step 2 on a DP rank that
    does not own it (its micro-batch did not use it): every replica still steps it (a missing gradient counts as zeros in the average,
    as for a TP shard), so the plans match (with verify_plan="every_step" too) and the weights equal one process
    stepping with the average."""
    from dist_ortho import comm

    comm.set_timeout(20)  # a mismatch would otherwise wait the default 600 s
    try:
        gen = torch.Generator().manual_seed(0)
        fulls = [torch.randn(32, 16, generator=gen), torch.randn(16, 16, generator=gen)]
        params = [torch.nn.Parameter(f.clone()) for f in fulls]
        ref = [torch.nn.Parameter(f.clone()) for f in fulls]
        hp = {"lr": 0.02, "fp32_matmul_prec": "highest"}
        opt = get_optimizer("muon")(params, dp_group=ctx.group, reduce_grads=True, verify_plan=verify_plan, **hp)
        ref_opt = get_optimizer("muon")(ref, **hp)

        def feed(step: int) -> None:
            missing = (opt.owner(params[1]) + 1) % ctx.world_size if step else None
            for i, (p, q) in enumerate(zip(params, ref)):
                per_replica = [torch.randn(p.shape, generator=gen) for _ in range(ctx.world_size)]
                if step == 1 and i == 1:
                    per_replica[missing].zero_()
                p.grad = None if (step == 1 and i == 1 and ctx.rank == missing) else per_replica[ctx.rank]
                q.grad = sum(per_replica) / ctx.world_size

        step_pair(opt, ref_opt, feed)
    finally:
        comm.set_timeout(None)
    return [((p.detach() - q.detach()).abs().max().item(), (q.detach() - f).abs().max().item())
            for p, q, f in zip(params, ref, fulls)]


@pytest.mark.parametrize("verify_plan", ["on_change", "every_step"])
def test_a_weight_unused_on_one_replica_steps_on_every_replica(world, verify_plan):
    for errors in world.run(_unused_on_one_replica, verify_plan):
        assert all(optim_reference.weights_agree(*e) for e in errors), errors


def _changed_alone_on_the_grid(ctx, verify_plan: str, case: str) -> str:
    """DP 2 x TP 2: rank 0 changes its plan alone at step 3 ("alone", seen by its TP group first, then carried to
    every DP group), or both ranks of TP group {0, 1} change it alike at step 3 ("tp group", seen by the DP groups
    only; the plan is new to every rank then, so the default checks it too)."""
    from dist_ortho import comm

    tp_group, dp_group, tp_rank = _grid(ctx, 2)
    _, params = _params(_gpt_like(layers=1), tp_rank, 2)
    opt = get_optimizer("muon")(params, tp_group=tp_group, dp_group=dp_group, tp_mode="home", verify_plan=verify_plan)
    comm.set_timeout(20)
    try:
        for step in range(3):
            for p in params:
                p.grad = torch.ones_like(p)
            changes = ctx.rank == 0 if case == "alone" else ctx.rank in (0, 1)
            if step == 2 and changes:
                opt.param_groups[0]["tp_mode"] = "duplicated"
            if step == 2 and case == "tp group":  # every rank's plan is new: the same options, other param groups
                opt.param_groups[0]["num_ns_steps"] = 6
            opt.step()
    except ValueError as e:
        return str(e)
    finally:
        comm.set_timeout(None)
    return "no error"


@pytest.mark.parametrize("verify_plan,case", [("every_step", "alone"), ("on_change", "tp group")])
def test_a_disagreement_reaches_every_rank_of_the_grid(world, verify_plan, case):
    """Every rank raises a ValueError, none is left waiting in the step: the ranks of the group where the
    plans differ name the entry, the others (told through their other group's check) say where it was found."""
    messages = world.run(_changed_alone_on_the_grid, verify_plan, case)
    assert all(m.startswith("ranks disagree on the Muon step's plan") for m in messages), messages
    named = [m for m in messages if "at entry" in m]
    assert named and all("'duplicated'" in m and "'home'" in m for m in named), messages
    # alone: rank 0's TP group and its DP group {0, 2} see its entries; rank 3 is told by rank 1's flag
    assert len(named) == {"alone": 3, "tp group": 4}[case], messages


def _not_a_grid(ctx, how: str):
    tp_group, dp_group, _ = _grid(ctx, 2)
    if how == "same group":
        dp_group = tp_group
    else:  # TP {0, 3}, {1, 2} with DP {0, 2}, {1, 3}: they meet once, but rank 0 is DP rank 0 and its TP peer 3 DP rank 1
        tp_group = [dist.new_group([0, 3]), dist.new_group([1, 2])][0 if ctx.rank in (0, 3) else 1]
        dp_group = [dist.new_group([0, 2]), dist.new_group([1, 3])][ctx.rank % 2]
    p = torch.nn.Parameter(torch.randn(4, 4))
    p.grad = torch.randn(4, 4)
    try:
        get_optimizer("muon")([p], tp_group=tp_group, dp_group=dp_group, lr=0.02).step()
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.parametrize("how", ["same group", "crossed"])
def test_groups_that_do_not_form_a_grid_are_an_error_on_every_rank(world, how):
    errors = world.run(_not_a_grid, how)
    assert all(e and "do not form a DP x TP grid" in e for e in errors), errors


def _clipped(ctx, reduce_grads: bool):
    """MuonAdamW at DP 2 x TP 2 over TP-sharded matrices, a TP-replicated matrix, a sharded and a replicated
    bias: clip_grad_norm_ returns the one-process norm (torch.nn.utils.clip_grad_norm_), and the clipped
    steps give the one-process weights; with reduce_grads each replica holds only its own gradients."""
    from dist_ortho import MuonAdamW
    from tests.test_optim_tp import sharded as tp_sharded

    tp_group, dp_group, tp_rank = _grid(ctx, 2)
    dp_rank = dist.get_rank(dp_group)
    spec = [("a", (12, 8), 0), ("b", (8, 12), 1), ("c", (9, 7), None), ("bias_a", (12,), 0), ("bias", (5,), None)]
    gen = torch.Generator().manual_seed(0)
    fulls = [torch.randn(shape, generator=gen) for _, shape, _ in spec]
    params = []
    for (name, _, pd), f in zip(spec, fulls):
        p = tp_sharded(block(f, pd, tp_rank, 2), pd) if pd is not None else torch.nn.Parameter(f.clone())
        params.append((name, p))
    ref = [(name, torch.nn.Parameter(f.clone())) for (name, _, _), f in zip(spec, fulls)]
    hp = {"lr": 0.02, "fp32_matmul_prec": "highest", "adamw_lr": 0.01}
    opt = MuonAdamW(params, tp_group=tp_group, dp_group=dp_group, reduce_grads=reduce_grads, **hp)
    ref_opt = MuonAdamW(ref, **hp)
    norms = []
    for _ in range(3):
        for (_, p), (_, q), (_, shape, pd) in zip(params, ref, spec):
            per_replica = [torch.randn(shape, generator=gen) for _ in range(2)]
            g = per_replica[dp_rank] if reduce_grads else (per_replica[0] + per_replica[1]) / 2
            if reduce_grads and p.ndim == 1:  # the AdamW side is not reduced by the optimizer: average it here
                g = (per_replica[0] + per_replica[1]) / 2
            p.grad, q.grad = (block(g, pd, tp_rank, 2) if pd is not None else g.clone()), (per_replica[0] + per_replica[1]) / 2
        norms.append((opt.clip_grad_norm_(1.0).item(), torch.nn.utils.clip_grad_norm_([q for _, q in ref], 1.0).item()))
        opt.step()
        ref_opt.step()
    for (name, p), (_, q), (_, _, pd) in zip(params, ref, spec):
        want = block(q.detach(), pd, tp_rank, 2) if pd is not None else q.detach()
        assert (p.detach() - want).abs().max().item() <= 1e-5, name
    return norms


@pytest.mark.parametrize("reduce_grads", [False, True])
def test_clip_grad_norm_is_the_one_process_norm(world, reduce_grads):
    for norms in world.run(_clipped, reduce_grads):
        assert all(abs(mine - ref) <= 1e-6 * ref and ref > 1.0 for mine, ref in norms), norms


def _nan_on_one_owner(ctx, policy: str, tp: int, dtensors: bool):
    """A NaN in one matrix's gradient (on every replica, as DDP's average spreads it; or, FSDP2, in one DP rank's
    piece): only its owner computes that update, yet every replica decides alike before anything is written."""
    names = ["a", "b", "c", "d"]
    gen = torch.Generator().manual_seed(1)
    fulls = [torch.randn(12, 8, generator=gen) for _ in names]
    if dtensors:
        from tests.test_dtensor import _dtensor, _mesh, _placements

        mesh = _mesh(ctx.world_size // tp, tp)
        placements = _placements(mesh, Shard(0), True)
        params = [torch.nn.Parameter(_dtensor(f, mesh, placements)) for f in fulls]
        groups = {"device_mesh": mesh}
    else:
        tp_group, dp_group, tp_rank = _grid(ctx, tp)
        params = [sharded(block(f, 0, tp_rank, tp), 0) for f in fulls]
        groups = {"tp_group": tp_group, "dp_group": dp_group}
    opt = get_optimizer("muon")(list(zip(names, params)), lr=0.02, nonfinite=policy, tp_mode="home", **groups)

    def feed(nan: bool) -> None:
        for p, f in zip(params, fulls):
            g = torch.ones_like(f)
            if nan and p is params[1]:
                g[0, 0] = float("nan")
            p.grad = _dtensor(g, mesh, placements) if dtensors else block(g, 0, ctx.rank % tp, tp)

    def local(t):
        return t.to_local() if isinstance(t, DTensor) else t

    feed(False)
    opt.step()
    before = [local(p.detach()).clone() for p in params]
    momenta = {i: local(opt.state[p]["momentum_buffer"]).clone() for i, p in enumerate(params) if opt.state[p]}
    feed(True)
    try:
        opt.step()
        outcome = "stepped"
    except FloatingPointError as e:
        outcome = str(e)
    untouched = all(torch.equal(local(p.detach()), b) for p, b in zip(params, before)) and all(
        torch.equal(local(opt.state[params[i]]["momentum_buffer"]), m) for i, m in momenta.items())
    return outcome, untouched, opt.skipped_steps, opt.owner(params[1]) == comm_rank(opt.dp_group)


@pytest.mark.parametrize("dtensors,tp", [(False, 2), (False, 1), (True, 1)], ids=["dp2xtp2", "dp4", "fsdp2-dp4"])
@pytest.mark.parametrize("policy", ["raise", "skip", "ignore"])
def test_the_nonfinite_decision_is_shared_by_every_replica(world, policy, dtensors, tp):
    """Before: "raise" raised on the owner only (the other replicas then timed out in the share) and "skip"
    skipped the owner's matrices while the others applied theirs. Now the verdict travels in the step's first DP
    collective: every replica raises the same error or skips, and nothing is written anywhere."""
    results = world.run(_nan_on_one_owner, policy, tp, dtensors)
    outcomes = {r[0] for r in results}
    assert len(outcomes) == 1, outcomes
    outcome = outcomes.pop()
    assert sum(r[3] for r in results) == tp  # one replica (its TP group) owns the matrix
    if policy == "raise":
        assert "not finite" in outcome and "DP rank(s)" in outcome and "Nothing was written" in outcome
        assert all(r[1] for r in results)
    elif policy == "skip":
        assert outcome == "stepped" and all(r[1] and r[2] == 1 for r in results)
    else:
        assert outcome == "stepped" and not any(r[1] for r in results)
