"""The Gram-space recursion (one device, and gram mode) held to the plain iteration's accuracy on the battery of
tests/gram_battery.py: rank 1, 2, 8, condition 1e2 .. 1e6 (1e8 in float64), rank 4 plus noise 1e-4, entries of
1e-30, zero; aspect 2, 4, 8; every coefficient set with its default restarts (tp.gram.default_gram_restarts).

Yardstick (issue 30): the plain iteration in float64 on the same input (long double for float64 inputs), the
float32 plain iteration's own error E_plain. The Gram result's error must be <= max(2 E_plain, 2e-5) on every
input (float64: the floor scaled by eps64 / eps32, 3.7e-14); zero must give exactly zero. 2e-5 is the exact
modes' float32 tolerance (tests.reference.fp32_tolerance). The factor 2 is about the spread of E_plain itself:
the plain iteration run on the same input with one rounding changed (normalized in float64 first, or its Gram
matrix summed from two halves as at TP = 2) lands up to 2.4-3x away on cans and deepseekv4 inputs whose error is
float32 rounding amplified ~1e3-1e5 times along small singular values. The Gram recursion meets the bound there
because its first steps are the plain iteration's own (restarts at 1 and 2: the rounding every later step
amplifies is then the same). Measured worst Gram error / bound: docs/benchmarks.md (bench_local_gram).

The CI battery runs k = 4, 6, 8, 16, 64 (and 256 at aspect 4); ``slow`` adds k = 256 at every aspect, 1024 and
more seeds.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dist_ortho.comm.coalesce import run
from dist_ortho.tp import MatrixJob, NsSpec
from dist_ortho.tp import gram as gram_mode
from dist_ortho.tp.cost import rank_flops
from dist_ortho.tp.local import gram_flops, gram_recursion_flops, local_newton_schulz, plain_flops, use_gram
from tests import gram_battery as battery
from tests.reference import CUSTOM, NAMED_TYPES, triples

pytestmark = pytest.mark.usefixtures("highest_precision")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The battery's matrices are small (k <= 256 here): one thread runs it in half the time of two, and in a sixth
    when the cores are shared with other jobs (two threads' barriers then wait on each other; measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

FLOOR = {torch.float32: 2e-5, torch.float64: 2e-5 * torch.finfo(torch.float64).eps / torch.finfo(torch.float32).eps}
SETS = [(name, 10 if name == "deepseekv4" else 5) for name in NAMED_TYPES] + [("custom", 5), ("polar_express", 10), ("quintic", 7)]


def _spec(name: str, steps: int, **kwargs) -> NsSpec:
    return NsSpec(steps, name, tuple(CUSTOM) if name == "custom" else None, **kwargs)


def _gram_mode(x: torch.Tensor, ns: NsSpec) -> torch.Tensor:
    """gram mode's program on one process (no group): the columns are the sharded dim, rows for a tall matrix."""
    partition_dim = 0 if x.size(0) > x.size(1) else 1
    return run(gram_mode.program(MatrixJob(x, partition_dim, None, [x.size(partition_dim)], "gram", ns)))


def _failures(name: str, steps: int, dtype: torch.dtype, cases) -> list[str]:
    """Every case of the battery where a Gram path misses the bound (or zero is not exactly zero)."""
    custom = CUSTOM if name == "custom" else None
    reference = battery.reference if dtype == torch.float32 else battery.reference_longdouble
    bad = []
    for case in cases:
        x = battery.make(case, dtype)
        ref = reference(x, name, steps, custom)
        plain = battery.max_error(local_newton_schulz(x, _spec(name, steps, local_gram="never")), ref)
        ns = _spec(name, steps, local_gram="always")
        for path, out in (("one device", local_newton_schulz(x, ns)), ("gram mode", _gram_mode(x, ns))):
            if case.kind == "zero":
                if not torch.equal(out, torch.zeros_like(out)):
                    bad.append(f"{path} {case}: not exactly zero")
                continue
            error = battery.max_error(out, ref)
            if not error <= max(2 * plain, FLOOR[dtype]):
                bad.append(f"{path} {case}: {error:.2e} (plain {plain:.2e})")
    return bad


CI_CASES = [*battery.cases(battery.KINDS_FLOAT32, (4, 6, 8, 16, 64), (2, 4, 8)),
            *battery.cases(("rank1", "cond1e6", "lowrank_noise"), (256,), (4,)),
            battery.Case("cond1e6", 16, 4, tall=True), battery.Case("rank2", 8, 2, tall=True),
            battery.Case("tiny", 8, 4, tall=True)]


@pytest.mark.parametrize("name,steps", SETS, ids=lambda v: str(v))
def test_float32_gram_within_twice_the_plain_iterations_error(name, steps):
    bad = _failures(name, steps, torch.float32, CI_CASES)
    assert not bad, f"{name} {steps} steps, restarts {gram_mode.default_gram_restarts(triples(name, steps, CUSTOM), torch.float32)}: {bad}"


@pytest.mark.slow
@pytest.mark.parametrize("name,steps", SETS, ids=lambda v: str(v))
def test_float32_gram_on_the_whole_battery(name, steps):
    cases = [*battery.cases(battery.KINDS_FLOAT32, (4, 6, 8, 16, 32, 64), (2, 4, 8), seeds=3),
             *battery.cases(battery.KINDS_FLOAT32, (256,), (2, 4, 8)),
             *battery.cases(("rank1", "rank8", "cond1e6", "lowrank_noise", "zero"), (1024,), (2,))]
    bad = _failures(name, steps, torch.float32, cases)
    assert not bad, bad


@pytest.mark.skipif(np.finfo(np.longdouble).eps > 1e-18, reason="numpy's long double is no wider than float64 here")
@pytest.mark.parametrize("name,steps", [("quintic", 5), ("polar_express", 5), ("cans", 5), ("deepseekv4", 10)], ids=str)
def test_float64_gram_within_twice_the_plain_iterations_error(name, steps):
    """float64 restarts as float32 does: without them deepseekv4 misses the long double result by up to 5e-9 on
    condition 1e6 .. 1e8 inputs, where the plain float64 iteration is within 1e-12 (measured)."""
    cases = [*battery.cases(battery.KINDS_FLOAT64, (4, 8), (2, 8)), *battery.cases(("cond1e8", "rank1"), (32,), (4,))]
    bad = _failures(name, steps, torch.float64, cases)
    assert not bad, bad


def test_without_restarts_the_battery_fails():
    """The battery can fail: the recursion without restarts misses the bound (measured 20-100x on condition
    1e6, and non-finite for deepseekv4 on rank-1 inputs)."""
    x = battery.make(battery.Case("cond1e6", 64, 4), torch.float32)
    ref = battery.reference(x, "polar_express", 5)
    plain = battery.max_error(local_newton_schulz(x, NsSpec(5, "polar_express", local_gram="never")), ref)
    bare = battery.max_error(local_newton_schulz(x, NsSpec(5, "polar_express", gram_restarts=(), local_gram="always")), ref)
    assert bare > 10 * max(2 * plain, FLOOR[torch.float32]), (bare, plain)
    rank1 = battery.make(battery.Case("rank1", 64, 8), torch.float32)
    out = local_newton_schulz(rank1, NsSpec(10, "deepseekv4", gram_restarts=(), local_gram="always"))
    assert not bool(out.isfinite().all()) or out.abs().max().item() > 10


@pytest.mark.parametrize("name,steps", SETS, ids=lambda v: str(v))
def test_a_restart_before_every_step_is_the_plain_iteration_bit_for_bit(name, steps):
    x = battery.make(battery.Case("cond1e4", 16, 4), torch.float32)
    every = _spec(name, steps, gram_restarts=tuple(range(1, steps)), local_gram="always")
    plain = local_newton_schulz(x, _spec(name, steps, local_gram="never"))
    assert torch.equal(local_newton_schulz(x, every), plain)
    assert torch.equal(_gram_mode(x, every), plain)


def test_gram_mode_on_one_process_is_the_one_device_recursion():
    """float32: gram mode normalizes with the float64 norm first, as the one-device path does."""
    for case in (battery.Case("rank2", 16, 4), battery.Case("cond1e6", 8, 8, tall=True), battery.Case("tiny", 8, 2)):
        x = battery.make(case, torch.float32)
        ns = NsSpec(5, "cans", local_gram="always")
        assert torch.equal(_gram_mode(x, ns), local_newton_schulz(x, ns)), case


def test_default_restarts_by_growth():
    """Sets whose a_j multiply to <= 700 restart at 2 (and every 3 steps); the others run two plain steps first."""
    def restarts(name: str, steps: int, dtype: torch.dtype = torch.float32) -> tuple[int, ...]:
        return gram_mode.default_gram_restarts(triples(name, steps, CUSTOM), dtype)

    assert [restarts(n, 5) for n in ("quintic", "simple", "aol", "cubic5", "custom")] == [(2,)] * 5
    assert [restarts(n, 5) for n in ("polar_express", "polar_express_safer", "cans")] == [(1, 2)] * 3
    assert restarts("deepseekv4", 10) == (1, 2, 5, 8) and restarts("quintic", 7) == (1, 2, 5)
    assert restarts("quintic", 5, torch.float64) == (2,)
    assert restarts("quintic", 2) == ()
    # 16-bit compute (tests/test_gram_half.py): every two steps from 1, and 2 too after a steep first step
    assert restarts("quintic", 5, torch.bfloat16) == (1, 3) and restarts("cans", 5, torch.float16) == (1, 2, 3)
    assert restarts("deepseekv4", 10, torch.bfloat16) == (1, 3, 5, 7, 9)
    ns = NsSpec(5, "quintic", gram_restarts=(0, 3, 3, 9))
    assert gram_mode.restarts_for(ns, torch.float32) == (3,)  # steps that would do nothing are dropped


@pytest.mark.parametrize("name,steps", SETS, ids=lambda v: str(v))
def test_gram_is_picked_only_where_its_restarts_still_save_flops(name, steps):
    """Each restart costs 4 k^2 n FLOPs and saves 6 k^3: with r restarts over s steps the recursion is cheaper
    exactly when r <= s - 2 (and n > 1.5 k)."""
    ns = _spec(name, steps)
    restarts = gram_mode.restarts_for(ns, torch.float32)
    for shape in ((64, 128), (64, 256), (32, 256)):
        cheaper = gram_flops(shape, ns) < plain_flops(shape, ns)
        assert cheaper == (len(restarts) <= steps - 2) and use_gram(shape, ns, torch.float32) == cheaper
    every = _spec(name, steps, gram_restarts=tuple(range(1, steps)))
    assert gram_flops((64, 256), every) == plain_flops((64, 256), every) and not use_gram((64, 256), every, torch.float32)


@pytest.mark.parametrize("restarts", [None, (), (1,), (2, 4), (1, 2, 3, 4)], ids=str)
@pytest.mark.parametrize("name", ["quintic", "cans", "cubic5"])
def test_restarts_are_counted_exactly(name, restarts):
    """One device and gram mode: the FLOPs torch counts (matmuls) are the formulas' the cost model and the planner use."""
    ns = NsSpec(5, name, gram_restarts=restarts, local_gram="always")
    taken = gram_mode.restarts_for(ns, torch.float32)
    for shape in ((24, 96), (3, 16, 40)):
        x = torch.randn(shape)
        batch = shape[0] if len(shape) == 3 else 1
        with FlopCounterMode(display=False) as counter:
            local_newton_schulz(x, ns)
        assert counter.get_total_flops() == gram_flops(shape, ns) == batch * gram_recursion_flops(*shape[-2:], ns, taken)
        with FlopCounterMode(display=False) as counter:
            run(gram_mode.program(MatrixJob(x, 1, None, [shape[-1]], "gram", ns)))
        assert counter.get_total_flops() == rank_flops("gram", shape, 1, shape[-1], 1, ns, taken, 0.0)


WORLD_KINDS = ("rank1", "cond1e6", "lowrank_noise", "tiny", "zero")
WORLD_CASES = [*battery.cases(WORLD_KINDS, (8,), (2,)), *battery.cases(WORLD_KINDS, (64,), (4,)),
               battery.Case("cond1e4", 16, 4, tall=True)]


def _world_errors(ctx, name: str, steps: int) -> tuple[tuple[int, ...], list[tuple[str, float, float, float]]]:
    """This rank's restart schedule, and (case, gram mode's and distributed mode's errors at this world size, the
    one-device plain iteration's) for WORLD_CASES (-1 for a zero result that is exactly zero)."""
    from dist_ortho import newton_schulz_tp
    from dist_ortho.tp.jobs import shard

    custom = CUSTOM if name == "custom" else None
    out = []
    for case in WORLD_CASES:
        x = battery.make(case, torch.float32)
        ref = battery.reference(x, name, steps, custom)
        plain = battery.max_error(local_newton_schulz(x, _spec(name, steps, local_gram="never")), ref)
        partition_dim = 0 if case.tall else 1  # the larger side sharded: gram's k x k matrix is the smaller
        local = shard(x, partition_dim, ctx.rank, ctx.world_size)
        errors = []
        for mode in ("gram", "distributed"):
            got = newton_schulz_tp(local, steps, name, ctx.group, partition_dim, mode, custom_coefficient_sets=custom)
            parts = [None] * ctx.world_size
            torch.distributed.all_gather_object(parts, got)
            gathered = torch.cat(parts, dim=partition_dim)
            zero = case.kind == "zero" and torch.equal(gathered, torch.zeros_like(gathered))
            errors.append(-1.0 if zero else battery.max_error(gathered, ref))
        out.append((str(case), *errors, plain))
    return gram_mode.restarts_for(_spec(name, steps), torch.float32), out


@pytest.fixture(scope="module")
def world2():
    from tests.harness import started_world

    with started_world(2) as w:
        yield w


@pytest.mark.parametrize("name,steps", SETS, ids=lambda v: str(v))
def test_gram_mode_at_two_ranks(world2, name, steps):
    """Sharded over 2 ranks, gram mode is held to the plain iteration on the same shards (distributed mode, whose
    Gram matrices are the same partial sums): error <= max(2 E_distributed, 2e-5). It also keeps the one-device
    bound max(2 E_plain, 2e-5) wherever distributed mode does: with deepseekv4, polar_express at 10 steps and
    quintic at 7 on condition 1e6 both miss it alike (measured 2.3e-4 / 5.0e-5, gram and distributed equal to
    two digits), so that part of the bound is the float32 rounding of a sharded Gram matrix, not the recursion."""
    floor = FLOOR[torch.float32]
    per_rank = world2.run(_under_highest, _world_errors, name, steps)
    # the schedule is a function of the coefficients and the compute dtype only: the same on every rank, as are
    # the gathered results
    assert all(r == per_rank[0] for r in per_rank[1:]), per_rank
    bad = []
    for case, error, distributed, plain in per_rank[0][1]:
        if "zero" in case:
            if not error == distributed == -1.0:
                bad.append(f"{case}: not exactly zero")
        elif not error <= max(2 * distributed, floor):
            bad.append(f"{case}: {error:.2e} against distributed's {distributed:.2e}")
        elif not (error <= max(2 * plain, floor) or distributed > max(2 * plain, floor)):
            bad.append(f"{case}: {error:.2e} against the one-device plain iteration's {plain:.2e}")
    assert not bad, bad


def _under_highest(ctx, fn, *args):
    from dist_ortho.math.precision import matmul_precision

    with matmul_precision("highest"):
        return fn(ctx, *args)
