"""Faults a careful user hits: ranks that disagree, shards without gradients, NaN in one rank's shard,
zero gradients in every member. Every multi-process body runs under the harness's hard timeout; a
disagreement must raise the same error on every rank, never hang."""

from __future__ import annotations

import pytest
import torch

from dist_ortho import get_optimizer
from tests import optim_reference
from tests.test_optim_tp import MEMBER_KINDS, block, sharded

MODES = ("duplicated", "distributed", "gram", "home", "auto")


def _named_params(ctx, order=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    fulls = {"a.weight": torch.randn(24, 16, generator=gen), "b.weight": torch.randn(24, 16, generator=gen),
             "c.weight": torch.randn(16, 40, generator=gen)}
    params = {}
    for name, full in fulls.items():
        pd = 0 if name != "c.weight" else 1
        params[name] = sharded(block(full, pd, ctx.rank, ctx.world_size), pd)
    names = order or list(params)
    return [params[n] for n in names], fulls


def _disagreement(ctx, case: str) -> str:
    order = None
    mode = "duplicated"
    if case == "reversed" and ctx.rank == 1:
        order = ["b.weight", "a.weight", "c.weight"]
    params, _ = _named_params(ctx, order)
    if case == "mode" and ctx.rank == 1:
        mode = "home"
    # gram mode's collectives in bf16 on one rank, float32 on the others: another byte count
    ns = {"tp_mode": "gram", "ns_dtype": "bf16" if ctx.rank == 1 else "fp32"} if case == "ns_dtype" else {"tp_mode": mode}
    if case in ("hook", "hook_radius"):  # Hyperball's norms over TP on one rank, none (or another radius) on the others
        from dist_ortho.optim import HyperballHook

        radius = 2.0 if ctx.rank == 1 else 1.0
        ns["weight_update_hook"] = HyperballHook(radius) if case == "hook_radius" or ctx.rank == 1 else None
    names = dict(zip(order or ["a.weight", "b.weight", "c.weight"], params))
    opt = get_optimizer("muon")(params, tp_group=ctx.group, param_names=names, **ns)
    try:
        for step in range(2):
            for p in params:
                p.grad = torch.ones_like(p)
            if case == "later" and step == 1:  # every rank changes its plan at step 2, differently
                extra = sharded(torch.randn(8, 8), 0)
                extra.grad = torch.ones(8, 8)
                opt.add_param_group({"params": [extra], "tp_mode": "gram" if ctx.rank else "distributed"})
            opt.step()
    except ValueError as e:
        return str(e)
    return "no error"


@pytest.mark.parametrize("case", ["reversed", "mode", "later", "ns_dtype", "hook", "hook_radius"])
def test_ranks_that_disagree_all_raise_the_same_error(world, case):
    if world.size == 1:
        pytest.skip("needs two ranks to disagree")
    messages = world.run(_disagreement, case)
    assert len(set(messages)) == 1 and messages[0] != "no error", messages
    assert "disagree" in messages[0]
    if case == "reversed":
        assert "a.weight" in messages[0] and "b.weight" in messages[0]


def _changed_alone(ctx, case: str) -> tuple[str, int]:
    """verify_plan="every_step": the last rank alone changes its plan at step 3 (the others keep theirs)."""
    from dist_ortho import count_collectives

    params, _ = _named_params(ctx)
    norm = torch.nn.Parameter(torch.randn(4, 4, generator=torch.Generator().manual_seed(1)))  # replicated: no TP attributes
    names = dict(zip(["a.weight", "b.weight", "c.weight", "norm.weight"], [*params, norm]))
    opt = get_optimizer("muon")([*params, norm], tp_group=ctx.group, tp_mode="duplicated", param_names=names,
                                verify_plan="every_step")
    calls = 0
    try:
        for step in range(3):
            for p in [*params, norm]:
                p.grad = torch.ones_like(p)
            if step == 2 and ctx.rank == ctx.world_size - 1:
                if case == "mode":
                    opt.param_groups[0]["tp_mode"] = "home"
                elif case == "added":
                    extra = sharded(torch.randn(8, 8), 0)
                    extra.grad = torch.ones(8, 8)
                    opt.add_param_group({"params": [extra]})
                else:  # a replicated weight unused on this rank this step
                    norm.grad = None
            with count_collectives() as counted:
                opt.step()
            if step == 1:
                calls = counted.total_calls
    except ValueError as e:
        return str(e), calls
    return "no error", calls


@pytest.mark.parametrize("case", ["mode", "added", "unused"])
def test_a_rank_that_changes_its_plan_alone_gets_the_named_error_with_verify_plan(world, case):
    """With verify_plan="every_step" the changed rank's agreement and the others' per-step check are the same
    16-byte all-gather, so every rank raises the same ValueError (by default the collective timeout ends it:
    docs/reliability.md); the check costs one call per step (duplicated's all-gather, plus it)."""
    if world.size == 1:
        pytest.skip("needs two ranks to disagree")
    results = world.run(_changed_alone, case)
    messages = {m for m, _ in results}
    assert len(messages) == 1, messages
    message = messages.pop()
    assert "ranks disagree on the Muon step's plan" in message, message
    assert {"mode": "a.weight", "added": "parameters new to this rank", "unused": "norm.weight"}[case] in message, message
    assert {calls for _, calls in results} == {2}


def test_verify_plan_is_checked():
    p = torch.nn.Parameter(torch.randn(4, 4))
    for kind in ("muon", "muon_adamw"):
        with pytest.raises(ValueError, match=r"verify_plan must be one of \('on_change', 'every_step'\), got 'always'"):
            get_optimizer(kind)([("w", p)], verify_plan="always")


def _missing_grad(ctx, mode: str) -> float:
    """Rank 1 has no gradient for a.weight at step 2: it steps with a zero shard there, like the reference."""
    params, fulls = _named_params(ctx)
    ref = [torch.nn.Parameter(f.clone()) for f in fulls.values()]
    opt = get_optimizer("muon")(params, tp_group=ctx.group, tp_mode=mode, fp32_matmul_prec="highest")
    ref_opt = get_optimizer("muon")(ref, fp32_matmul_prec="highest")
    gen = torch.Generator().manual_seed(3)
    for step in range(3):
        for p, q, (name, full) in zip(params, ref, fulls.items()):
            g = torch.randn(full.shape, generator=gen)
            pd = 0 if name != "c.weight" else 1
            if step == 1 and name == "a.weight" and ctx.world_size > 1:
                rows = torch.tensor_split(torch.arange(full.size(0)), ctx.world_size)[1]
                g[rows] = 0  # rank 1's shard of the gradient is missing: zero in the reference
                p.grad = None if ctx.rank == 1 else block(g, pd, ctx.rank, ctx.world_size)
            else:
                p.grad = block(g, pd, ctx.rank, ctx.world_size)
            q.grad = g
        opt.step()
        ref_opt.step()
    errors = []
    for p, q, (name, full) in zip(params, ref, fulls.items()):
        pd = 0 if name != "c.weight" else 1
        moved = (q.detach() - full).abs().max().item()
        err = (p.detach() - block(q.detach(), pd, ctx.rank, ctx.world_size)).abs().max().item()
        assert optim_reference.weights_agree(err, moved), (name, err, moved)
        errors.append(err)
    return max(errors)


@pytest.mark.parametrize("mode", MODES)
def test_a_missing_gradient_on_one_rank_counts_as_zero(world, mode):
    world.run(_missing_grad, mode)


def _nan_in_one_shard(ctx, mode: str, policy: str) -> tuple:
    params, _ = _named_params(ctx)
    opt = get_optimizer("muon")(params, tp_group=ctx.group, tp_mode=mode, nonfinite=policy,
                                param_names=dict(zip(["a.weight", "b.weight", "c.weight"], params)))
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    weights = [p.detach().clone() for p in params]
    momenta = [opt.state[p]["momentum_buffer"].clone() for p in params]
    for p in params:
        p.grad = torch.ones_like(p)
    if ctx.rank == ctx.world_size - 1:
        params[0].grad[0, 0] = float("nan")
    try:
        opt.step()
        outcome = "stepped"
    except FloatingPointError as e:
        outcome = str(e)
    untouched = all(torch.equal(w, p.detach()) for w, p in zip(weights, params)) and all(
        torch.equal(m, opt.state[p]["momentum_buffer"]) for m, p in zip(momenta, params))
    finite = all(bool(torch.isfinite(p).all()) for p in params)
    for p in params:  # the next step runs normally
        p.grad = torch.ones_like(p)
    opt.step()
    return outcome, untouched, finite, opt.skipped_steps


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("policy", ["raise", "skip", "ignore"])
def test_nan_in_one_ranks_shard(world, mode, policy):
    """raise: the same error on every rank, nothing written; skip: every rank skips, weights and momentum
    untouched, counted; ignore: written (NaN on every rank of the matrix)."""
    results = world.run(_nan_in_one_shard, mode, policy)
    outcomes = {r[0] for r in results}
    assert len(outcomes) == 1, outcomes
    outcome = outcomes.pop()
    if policy == "raise":
        assert "not finite" in outcome and "a.weight" in outcome and "step 2" in outcome
        assert all(r[1] for r in results)
    elif policy == "skip":
        assert outcome == "stepped" and all(r[1] and r[2] and r[3] == 1 for r in results)
    else:
        assert outcome == "stepped" and not any(r[2] for r in results)


def _zero_grads(ctx, kind: str, mode: str) -> list[float]:
    params, fulls = _named_params(ctx)
    decay = {} if kind == "scion" else {"weight_decay": 0.0}  # Scion's decay is fixed (Frank-Wolfe)
    opt = get_optimizer(kind)(params, tp_group=ctx.group, tp_mode=mode, **decay)
    before = [p.detach().clone() for p in params]
    for _ in range(2):
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
    return [(p.detach() - b).abs().max().item() if torch.isfinite(p).all() else float("inf")
            for p, b in zip(params, before)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", [k for k in MEMBER_KINDS if k not in ("muon_hyperball", "scion")])
def test_zero_gradients_leave_weights_unchanged_in_every_member(world, kind, mode):
    """Zero gradients (unused experts, frozen parts): every member's update is exactly zero, no NaN.
    (Scion always decays by lr, MuonHyperball renormalizes: both are checked for finiteness below.)"""
    assert max(max(r) for r in world.run(_zero_grads, kind, mode)) == 0.0


@pytest.mark.parametrize("kind", ["scion", "muon_hyperball"])
def test_zero_gradients_stay_finite(world, kind):
    assert all(v != float("inf") for r in world.run(_zero_grads, kind, "gram") for v in r)


def test_a_sharded_parameter_without_its_group_is_an_error():
    p = sharded(torch.randn(8, 6), 0)
    with pytest.raises(ValueError, match="fc1.weight.*no tp_group was given.*blockwise"):
        get_optimizer("muon")([("fc1.weight", p)]).tp_plan()
    with pytest.raises(ValueError, match="no tp_group"):
        get_optimizer("muon_adamw")([("fc1.weight", p)])
    expert = sharded(torch.randn(8, 6), 1)
    expert.expert_tp = True
    with pytest.raises(ValueError, match="no expert_tp_group"):
        get_optimizer("muon")([expert]).tp_plan()
    # the explicit opt-in: each shard alone (not exact)
    p.grad = torch.randn(8, 6)
    get_optimizer("muon")([p], tp_mode="blockwise").step()
    get_optimizer("muon_adamw")([("fc1.weight", p)], tp_mode="blockwise").step()


def _one_rank_stops(ctx) -> tuple:
    import time

    from dist_ortho import comm

    comm.set_timeout(3)
    try:
        params, _ = _named_params(ctx)
        opt = get_optimizer("muon")(params, tp_group=ctx.group)
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        if ctx.rank == 1:  # this rank raises elsewhere and never reaches step 2
            return ("stopped", 0.0)
        began = time.perf_counter()
        try:
            opt.step()
        except comm.CollectiveError as e:
            return (str(e), time.perf_counter() - began)
        return ("no error", 0.0)
    finally:
        comm.set_timeout(None)


def test_a_rank_that_stops_makes_the_others_fail_naming_the_step():
    """With a 3 s collective timeout, the rank left alone in step 2 raises CollectiveError naming the
    optimizer, the step and the collective within the timeout (not the process group's 30 minutes)."""
    from tests.harness import started_world

    with started_world(2) as world:
        (message, waited), stopped = world.run(_one_rank_stops)
    assert stopped[0] == "stopped"
    assert message.startswith("Muon step 2: all_gather") and "timeout 3 s" in message, message
    assert waited < 30, waited


def test_timeout_is_validated():
    from dist_ortho import comm

    with pytest.raises(ValueError, match="seconds"):
        comm.set_timeout(-1)


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), -1.0])
def test_hyper_parameters_must_be_finite(bad):
    p = torch.nn.Parameter(torch.randn(8, 6))
    for key in ("lr", "momentum", "weight_decay", "extra_scale_factor"):
        with pytest.raises(ValueError, match=key):
            get_optimizer("muon")([p], **{key: bad})
