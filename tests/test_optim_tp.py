"""Every optimizer of the family at TP = 1, 2, 4: the sharded run takes the steps of the TP = 1 run on
the gathered weights, in every tp_mode, for partition_dim 0 and 1, over 3 steps (so state carries).

Tolerance as in test_optim: max |W_tp - W_1| <= 1e-5 + 1e-4 * max |W_1 - W_0| (float32, "highest"):
the modes' Newton-Schulz results differ from one device's by float32 rounding (<= ~6e-5 relative for
gram, see test_tp), and the weights move by lr * scale * that.
"""

from __future__ import annotations

import copy

import pytest
import torch

from dist_ortho import get_optimizer
from tests import optim_reference
from tests.test_optim import IDS, VARIANTS

MODES = ("duplicated", "distributed", "gram", "home", "auto")
SHAPES = ((48, 20), (20, 36))  # one tall and one wide matrix, both sharded; a replicated one beside them


def block(full: torch.Tensor, partition_dim: int, rank: int, size: int) -> torch.Tensor:
    return torch.tensor_split(full, size, dim=partition_dim)[rank].clone()


def sharded(t: torch.Tensor, partition_dim: int) -> torch.nn.Parameter:
    p = torch.nn.Parameter(t)
    p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, partition_dim, 1
    return p


def _run_pair(ctx, kind, hp, mode, partition_dim, steps=3, round_trip=False):
    gen = torch.Generator().manual_seed(11)
    fulls = [torch.randn(s, generator=gen) for s in SHAPES] + [torch.randn(16, 16, generator=gen)]
    grads = [[torch.randn(f.shape, generator=gen) for f in fulls] for _ in range(steps)]
    one = [torch.nn.Parameter(f.clone()) for f in fulls]
    tp = [sharded(block(f, partition_dim, ctx.rank, ctx.world_size), partition_dim) for f in fulls[:2]]
    tp.append(torch.nn.Parameter(fulls[2].clone()))  # replicated
    opt_one = get_optimizer(kind)(one, **hp)
    opt_tp = get_optimizer(kind)(tp, tp_group=ctx.group, tp_mode=mode, **hp)
    for i, step_grads in enumerate(grads):
        for p, q, g in zip(one, tp, step_grads):
            p.grad = g.clone()
            q.grad = block(g, partition_dim, ctx.rank, ctx.world_size) if q is not tp[2] else g.clone()
        opt_one.step()
        opt_tp.step()
        if round_trip and i == 0:
            state = copy.deepcopy(opt_tp.state_dict())
            opt_tp = get_optimizer(kind)(tp, tp_group=ctx.group, tp_mode=mode, **hp)
            opt_tp.load_state_dict(state)
    errors = []
    for p, q, f in zip(one, tp, fulls):
        expected = block(p.detach(), partition_dim, ctx.rank, ctx.world_size) if q is not tp[2] else p.detach()
        moved = (p.detach() - f).abs().max().item()
        errors.append(((q.detach() - expected).abs().max().item(), moved))
    return errors


def _family_exact(ctx, kind, hp, round_trip=False):
    hp = {"lr": 0.02, **hp, "fp32_matmul_prec": "highest"}
    bad = {}
    for mode in MODES:
        for partition_dim in (0, 1):
            for i, (err, moved) in enumerate(_run_pair(ctx, kind, hp, mode, partition_dim, round_trip=round_trip)):
                if not optim_reference.weights_agree(err, moved):
                    bad[mode, partition_dim, i] = (err, moved)
    assert not bad, f"{kind} {hp}: (err, moved) beyond tolerance: {bad}"


@pytest.mark.parametrize("kind,hp", VARIANTS, ids=IDS)
def test_family_is_exact_across_tp(world, kind, hp):
    world.run(_family_exact, kind, hp)


@pytest.mark.parametrize("kind", ["muon", "normuon", "muon_hyperball", "adamuon"])
def test_state_dict_round_trip_under_tp(world, kind):
    """A TP optimizer rebuilt from its state dict after step 1 continues exactly like the TP=1 run."""
    world.run(_family_exact, kind, {}, round_trip=True)


def _error_on_every_rank(ctx, case):
    W = sharded(torch.randn(8, 6), 0)
    kwargs = {"tp_group": ctx.group}
    if case == "expert_without_group":
        W.expert_tp = True
    elif case == "stride":  # a fused QKV weight cannot be split by rows that are strided over the shards
        W.partition_stride, W.is_qkv, W.qkv_split_shapes = 2, True, [2, 1, 1]
    elif case == "shapes_disagree":
        W = sharded(torch.randn(8, 6 if ctx.rank == 0 else 5), 0)
    elif case == "modes_disagree":
        W = sharded(torch.randn(8, 6), 0 if ctx.rank == 0 else 1)
    opt = get_optimizer("muon")([W], **kwargs)
    W.grad = torch.randn_like(W)
    try:
        opt.step()
    except ValueError as e:
        return str(e)
    return "no error"


@pytest.mark.parametrize("case", ["expert_without_group", "stride", "shapes_disagree", "modes_disagree"])
def test_bad_layouts_raise_the_same_error_on_every_rank(world, case):
    if world.size == 1 and case.endswith("disagree"):
        pytest.skip("needs two ranks to disagree")
    messages = world.run(_error_on_every_rank, case)
    assert len(set(messages)) == 1 and messages[0] != "no error", messages
    needle = {"expert_without_group": "expert_tp_group", "stride": "partition_stride"}.get(case, "disagree")
    assert needle in messages[0]


def _step_counts(ctx, mode: str, coalesce: bool) -> int:
    from dist_ortho import count_collectives

    gen = torch.Generator().manual_seed(0)
    params = [sharded(block(torch.randn(s, generator=gen), pd, ctx.rank, ctx.world_size), pd)
              for s, pd in (((48, 20), 0), ((20, 36), 1), ((32, 32), 0), ((64, 16), 1))]
    opt = get_optimizer("muon")(params, tp_group=ctx.group, tp_mode=mode, coalesce=coalesce, fp32_matmul_prec="highest")
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()  # the first step also checks the layouts (one all-gather)
    with count_collectives() as stats:
        opt.step()
    return stats.total_calls


@pytest.mark.parametrize("mode,coalesced,per_matrix", [
    ("duplicated", 1, 1), ("distributed", 6, 6), ("gram", 3, 3), ("home", 2, 2),
])
def test_collectives_per_step(world, mode, coalesced, per_matrix):
    """4 sharded matrices, 5 steps (float32: gram's norm, R and one restart): coalesced calls per step do not grow
    with the number of matrices; uncoalesced ones are per matrix."""
    together = world.run(_step_counts, mode, True)
    alone = world.run(_step_counts, mode, False)
    if world.size == 1:
        assert together == alone == [0]
        return
    assert together == [coalesced] * world.size
    assert alone == [4 * per_matrix] * world.size


def _bucketed_counts(ctx, bucket_bytes: int) -> int:
    from dist_ortho import count_collectives

    gen = torch.Generator().manual_seed(0)
    params = [sharded(block(torch.randn(32, 16, generator=gen), 0, ctx.rank, ctx.world_size), 0) for _ in range(3)]
    opt = get_optimizer("muon")(params, tp_group=ctx.group, bucket_bytes=bucket_bytes)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    with count_collectives() as stats:
        opt.step()
    return stats.total_calls


def test_bucket_size_limit_splits_the_flat_buffers(world):
    if world.size == 1:
        pytest.skip("a group of one has no collectives")
    assert world.run(_bucketed_counts, 256 * 2**20) == [1] * world.size
    assert world.run(_bucketed_counts, 1) == [3] * world.size  # every shard alone over the limit


def _plan(ctx) -> str:
    from dist_ortho.parameters.qkv import qkv_split_shapes

    qkv = sharded(block(torch.randn(2 * 192, 256), 0, ctx.rank, ctx.world_size), 0)
    qkv.is_qkv, qkv.qkv_split_shapes = True, qkv_split_shapes(8, 2, 32)
    fc1 = sharded(block(torch.randn(1024, 256), 0, ctx.rank, ctx.world_size), 0)
    named = [("linear_qkv.weight", qkv), ("fc1.weight", fc1)]
    return get_optimizer("muon")(named, tp_group=ctx.group, tp_mode="auto").tp_plan()


def test_auto_plan_is_printable_and_avoids_singular_gram(world):
    if world.size == 1:
        pytest.skip("nothing is sharded on one rank")
    plan = world.run(_plan)[0]
    lines = {line.split()[0] + (" " + line.split()[1] if line.split()[1].startswith("[") else ""): line
             for line in plan.splitlines()[1:]}
    assert set(lines) == {"linear_qkv.weight [q]", "linear_qkv.weight [k]", "linear_qkv.weight [v]", "fc1.weight"}
    for name in ("linear_qkv.weight [k]", "linear_qkv.weight [v]"):  # 64 x 256, rows sharded: k = 256 > n = 64
        assert " gram " not in lines[name] and lines[name].rstrip().endswith("ms") and " - " in lines[name]


# Collectives of one step (after the first), per member: Newton-Schulz's (per mode, shared by all
# matrices) plus the member's own rounds of global quantities, each one flat all-reduce for all matrices.
NS_CALLS = {"duplicated": 1, "distributed": 6, "gram": 3, "home": 2}  # 5 steps, float32: gram's norm, R, one restart
MEMBER_CALLS = {
    "muon": 0, "scion": 0, "adamuon": 0,
    "polargrad": 1,  # <O, M>
    "muon_hyperball": 2,  # ||U|| before, ||W|| after the update
    "normuon": 3,  # the row/column mean along a sharded dim, ||O||, ||U||
    "namo": 2,  # ||G||^2, ||M||
}
MEMBER_KINDS = (*MEMBER_CALLS, "mop")
MATRICES = (((48, 20), 1), ((20, 36), 0), ((32, 32), 0), ((64, 16), 1), ((24, 40), 1))


def _member_counts(ctx, kind: str, mode: str, count: int) -> int:
    from dist_ortho import count_collectives

    gen = torch.Generator().manual_seed(0)
    params = [sharded(block(torch.randn(s, generator=gen), pd, ctx.rank, ctx.world_size), pd)
              for s, pd in MATRICES[:count]]
    params.append(torch.nn.Parameter(torch.randn(12, 12, generator=gen)))  # replicated
    opt = get_optimizer(kind)(params, tp_group=ctx.group, tp_mode=mode, fp32_matmul_prec="highest")
    calls = []
    for _ in range(2):  # the first step also finds the layouts and initializes state
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        with count_collectives() as stats:
            opt.step()
        calls.append(stats.total_calls)
    return calls[1]


@pytest.mark.parametrize("mode", [*NS_CALLS, "auto"])
@pytest.mark.parametrize("kind", MEMBER_KINDS)
def test_every_member_issues_a_constant_number_of_collectives(world, kind, mode):
    """Every member in every mode: the same number of calls for 2 sharded matrices as for 5, pinned."""
    few = world.run(_member_counts, kind, mode, 2)
    many = world.run(_member_counts, kind, mode, 5)
    assert len(set(few + many)) == 1, (few, many)
    if world.size == 1:
        assert few[0] == 0
    elif kind == "mop":
        assert few[0] == 1  # one all-gather of every direction for the SVD, whatever the mode
    elif mode != "auto":
        assert few[0] == NS_CALLS[mode] + MEMBER_CALLS[kind], few


def _plan_logs(ctx) -> list[str]:
    import logging

    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger("dist_ortho.optim.planner")
    handler, level = Keep(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        gen = torch.Generator().manual_seed(0)
        params = [sharded(block(torch.randn(s, generator=gen), pd, ctx.rank, ctx.world_size), pd) for s, pd in MATRICES]
        opt = get_optimizer("muon")(params, tp_group=ctx.group, tp_mode="auto")
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        plan = opt.tp_plan()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return [m for m in records if "plan" in m] + [plan]


def test_auto_plan_is_logged_once_and_matches_tp_plan(world):
    """The plan is logged at INFO when it is new (once over 3 steps), and tp_plan() reports the modes the
    step ran, evaluated under the group's precision (the default "medium", as in the step)."""
    logs = world.run(_plan_logs)[0]
    *plans, reported = logs
    assert len(plans) == 1, plans
    assert reported in plans[0]


def _custom_fn_under_tp(ctx, partition_dim: int) -> float:
    from dist_ortho import OrthogonalizedOptimizer

    def fn(x: torch.Tensor) -> torch.Tensor:  # depends on the whole matrix: exact only on the gathered one
        return x / x.norm() + x.sum(dim=0, keepdim=True)

    gen = torch.Generator().manual_seed(3)
    full, grad = torch.randn(20, 12, generator=gen), torch.randn(20, 12, generator=gen)
    hp = dict(lr=0.1, momentum=0.0, weight_decay=0.0, nesterov=False, weight_decay_method="decoupled",
              fp32_matmul_prec="highest", scaled_orthogonalize_fn=fn)
    p = sharded(block(full, partition_dim, ctx.rank, ctx.world_size), partition_dim)
    p.grad = block(grad, partition_dim, ctx.rank, ctx.world_size)
    OrthogonalizedOptimizer([p], tp_group=ctx.group, **hp).step()
    expected = block(full - 0.1 * fn(grad), partition_dim, ctx.rank, ctx.world_size)
    return (p.detach() - expected).abs().max().item()


@pytest.mark.parametrize("partition_dim", [0, 1])
def test_scaled_orthogonalize_fn_sees_the_gathered_matrix(world, partition_dim):
    assert max(world.run(_custom_fn_under_tp, partition_dim)) < 1e-6


def _home_vs_duplicated(ctx, batch: bool) -> float:
    gen = torch.Generator().manual_seed(5)
    fulls = [torch.randn(32, 16, generator=gen) for _ in range(4)] + [torch.randn(16, 48, generator=gen)]
    grads = [torch.randn(f.shape, generator=gen) for f in fulls]
    results = []
    for mode in ("home", "duplicated"):
        params = [sharded(block(f, 0, ctx.rank, ctx.world_size), 0) for f in fulls]
        for p, g in zip(params, grads):
            p.grad = block(g, 0, ctx.rank, ctx.world_size)
        get_optimizer("muon")(params, tp_group=ctx.group, tp_mode=mode, batch_matrices=batch,
                              fp32_matmul_prec="highest").step()
        results.append(torch.cat([p.detach().flatten() for p in params]))
    return (results[0] - results[1]).abs().max().item()


def test_home_equals_duplicated_bitwise_unbatched_and_to_rounding_batched(world):
    """batch_matrices=False keeps home bit-identical to duplicated; batched (the default) they agree to
    float32 rounding (a home batches only the matrices it owns)."""
    assert world.run(_home_vs_duplicated, False) == [0.0] * world.size
    assert max(world.run(_home_vs_duplicated, True)) <= 1e-6


def _strided(ctx, kind: str) -> tuple[float, float]:
    """Megatron's gated fc1 (partition_stride=2): shard r holds rows [gate_r; up_r] of W = [gate; up]."""
    gen = torch.Generator().manual_seed(3)
    W = torch.randn(16, 6, generator=gen)
    grads = [torch.randn(16, 6, generator=gen) for _ in range(3)]

    def shard(t: torch.Tensor) -> torch.Tensor:
        halves = t.chunk(2)
        return torch.cat([h.chunk(ctx.world_size)[ctx.rank] for h in halves])

    p = sharded(shard(W).clone(), 0)
    p.partition_stride = 2
    hp = {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01, "nesterov": True}
    opt = get_optimizer(kind)([p], tp_group=ctx.group, fp32_matmul_prec="highest", **hp)
    for g in grads:
        p.grad = shard(g).clone()
        opt.step()
    expected = optim_reference.run(kind, W, grads, hp)
    return (p.detach().double() - shard(expected)).abs().max().item(), (expected - W.double()).abs().max().item()


@pytest.mark.parametrize("kind", ["muon", "normuon", "adamuon"])
def test_strided_shards_are_exact(world, kind):
    for err, moved in world.run(_strided, kind):
        assert optim_reference.weights_agree(err, moved), (err, moved)
