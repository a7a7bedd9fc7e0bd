"""The Gram-space recursion in bfloat16 and float16 (issue 30 items 1-2): the battery of tests/gram_battery.py on
float32 inputs with ``ns_dtype`` "bf16" / "fp16", one device and gram mode, against the plain iteration in the
same dtype; zero stays zero; FLOPs as counted; the TP-size invariance of every mode in bf16 (world 1, 2, 4 in one
gloo world); ``ns_dtype`` validation.

Yardstick: E_plain, max |O - O_float64| of the plain iteration in the same dtype on the same float32 input (the
float64 reference is the plain iteration in float64). The recursion runs with its default 16-bit restarts
(tp.gram.default_gram_restarts: (1, 3), or (1, 2, 3) for the sets with a steep first step; deepseekv4 1, 3, 5, 7,
9). Issue 30 asks for <= 1.5 E_plain; measured (scripts/bench_local_gram.py --half --search, k = 16 .. 128)
the worst is 1.2-3.3x by set in bf16 and up to ~2.2x in fp16 (on random inputs as much as on ill-conditioned
ones), so that bar is NOT met, and the ``auto`` rules keep the plain iteration in 16-bit compute (tested
below). What is held here is the measured behaviour, so that it can only get better: error <= HALF_BOUND x
E_plain on every input, HALF_BOUND = 4 (about 1.2x the worst measured ratio); without restarts it fails
(rank-deficient inputs diverge).

TP-size invariance (bf16, "medium"-like compute through ns_dtype): at world 1, 2 and 4 every exact mode's
gathered result is within bf16 rounding of the same mode at world 1: duplicated and home bit-identical (the
iteration runs on the gathered matrix), distributed and gram (partial Gram matrices summed in another order)
max |O_t - O_1| <= 2 E_mode,1 + 2^-8 (E_mode,1: that mode's own error against float64 at world 1), and each
within 2x its own world-1 error against float64.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dist_ortho.comm.coalesce import run
from dist_ortho.math.precision import NS_DTYPES, check_ns_dtype, compute_dtype
from dist_ortho.tp import MatrixJob, NsSpec
from dist_ortho.tp import gram as gram_mode
from dist_ortho.tp.local import gram_flops, local_newton_schulz, plain_flops, use_gram
from tests import gram_battery as battery
from tests.reference import NAMED_TYPES

pytestmark = pytest.mark.usefixtures("highest_precision")

HALF_BOUND = 4.0
SETS = [(name, 10 if name == "deepseekv4" else 5) for name in NAMED_TYPES]
KINDS = ("random", "rank1", "rank2", "cond1e2", "cond1e6", "lowrank_noise", "tiny", "zero")
CASES = [*battery.cases(KINDS, (16,), (2, 4, 8)), battery.Case("cond1e6", 8, 4, tall=True)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _gram_mode(x: torch.Tensor, ns: NsSpec) -> torch.Tensor:
    partition_dim = 0 if x.size(0) > x.size(1) else 1
    return run(gram_mode.program(MatrixJob(x, partition_dim, None, [x.size(partition_dim)], "gram", ns)))


@pytest.mark.parametrize("ns_dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("name,steps", SETS, ids=str)
def test_half_gram_on_the_battery(name, steps, ns_dtype):
    bad = []
    for case in CASES:
        x = battery.make(case, torch.float32)
        ref = battery.reference(x, name, steps)
        plain = local_newton_schulz(x, NsSpec(steps, name, local_gram="never", ns_dtype=ns_dtype))
        ns = NsSpec(steps, name, local_gram="always", ns_dtype=ns_dtype)
        for path, out in (("one device", local_newton_schulz(x, ns)), ("gram mode", _gram_mode(x, ns))):
            assert out.dtype == torch.float32
            if case.kind == "zero":
                if not (torch.equal(out, torch.zeros_like(out)) and torch.equal(plain, torch.zeros_like(plain))):
                    bad.append(f"{path} {case}: not exactly zero")
                continue
            error, e_plain = battery.max_error(out, ref), battery.max_error(plain, ref)
            if not error <= HALF_BOUND * e_plain:
                bad.append(f"{path} {case}: {error:.2e} = {error / e_plain:.2f} x plain {e_plain:.2e}")
    assert not bad, bad


def test_half_recursion_is_the_compute_dtype_and_needs_its_restarts():
    """The recursion runs in 16-bit (results differ from the float32 recursion's by 16-bit rounding, not 0), and
    without restarts it fails the bound (measured 1e7-1e15 x E_plain on rank-deficient inputs)."""
    x = battery.make(battery.Case("rank2", 16, 4), torch.float32)
    ref = battery.reference(x, "quintic", 5)
    e_plain = battery.max_error(local_newton_schulz(x, NsSpec(local_gram="never", ns_dtype="bf16")), ref)
    bare = local_newton_schulz(x, NsSpec(local_gram="always", ns_dtype="bf16", gram_restarts=()))
    assert not battery.max_error(bare, ref) <= HALF_BOUND * e_plain
    x = battery.make(battery.Case("random", 16, 4), torch.float32)
    as_f32 = local_newton_schulz(x, NsSpec(local_gram="always", ns_dtype="fp32"))
    as_bf16 = local_newton_schulz(x, NsSpec(local_gram="always", ns_dtype="bf16"))
    assert 1e-4 < (as_bf16 - as_f32).abs().max().item() < 0.1


def test_fp16_keeps_tiny_and_large_inputs_in_range():
    """float16's range is 6e-8 .. 65504: the float64 norm first scales entries of 1e-30 (and of 1e30) to a unit
    matrix, so both give the normalized input's result, finite, for the plain iteration and the recursion."""
    x = battery.make(battery.Case("random", 16, 4), torch.float32)
    for local_gram in ("never", "always"):
        ns = NsSpec(local_gram=local_gram, ns_dtype="fp16")
        unit = local_newton_schulz(x, ns)
        for scale in (1e-30, 1e30):
            out = local_newton_schulz(x * scale, ns)
            assert bool(out.isfinite().all()) and torch.equal(out, unit), (local_gram, scale)


@pytest.mark.parametrize("name,steps", [("quintic", 5), ("polar_express", 5), ("cubic5", 5), ("deepseekv4", 10)], ids=str)
def test_half_flops_as_counted_and_auto_keeps_the_plain_iteration(name, steps):
    """FLOPs torch counts equal gram_flops with the 16-bit restarts; at aspect 4 they are below the plain
    iteration's (0.78x with two restarts, 0.89x with three for the steep sets: issue 30's 0.65x is not met, one
    restart alone would be 0.67x); ``auto`` picks the plain iteration in 16-bit compute all the same."""
    for ns_dtype in ("bf16", "fp16"):
        ns = NsSpec(steps, name, local_gram="always", ns_dtype=ns_dtype)
        shape = (16, 64)
        with FlopCounterMode(display=False) as counter:
            local_newton_schulz(torch.randn(shape), ns)
        assert counter.get_total_flops() == gram_flops(shape, ns)
        assert gram_flops(shape, ns) < plain_flops(shape, ns)
        assert not use_gram(shape, NsSpec(steps, name, ns_dtype=ns_dtype), torch.float32)
    assert use_gram(shape, NsSpec(steps, name, ns_dtype="fp32"), torch.float32)
    assert use_gram(shape, NsSpec(steps, name), torch.float32)


def test_ns_dtype_sets_the_compute_dtype():
    assert [compute_dtype(torch.float32, None, d) for d in NS_DTYPES] == [torch.bfloat16, torch.float16, torch.float32]
    assert compute_dtype(torch.bfloat16, None, "fp32") == torch.float32
    assert compute_dtype(torch.float64, None, "bf16") == torch.float64
    x = torch.randn(8, 24, generator=torch.Generator().manual_seed(0))
    ns = NsSpec(local_gram="never", ns_dtype="bf16")
    from tests.reference import triples

    X = (x / x.double().norm()).bfloat16()  # written out: normalized in float32 or wider, then every step in bf16
    for a, b, c in triples("quintic", 5):
        A = X @ X.T
        X = a * X + (b * A + c * (A @ A)) @ X
    got = local_newton_schulz(x, ns)
    # fused (addmm) against unfused bf16 ops: bf16 rounding over 5 steps, relative Frobenius <= 0.03 as in test_tp
    assert got.dtype == torch.float32 and ((got - X.float()).norm() / X.float().norm()).item() <= 0.03
    assert not torch.equal(got, local_newton_schulz(x, NsSpec(local_gram="never")))


@pytest.mark.parametrize("bad", ["bfloat16", "fp8", 16, torch.bfloat16])
def test_bad_ns_dtype_is_a_value_error_naming_it(bad):
    from dist_ortho.optim import Muon

    with pytest.raises(ValueError, match="ns_dtype"):
        check_ns_dtype(bad)
    with pytest.raises(ValueError, match="ns_dtype"):
        Muon([torch.nn.Parameter(torch.randn(4, 8))], lr=0.1, ns_dtype=bad)
    with pytest.raises(ValueError, match="ns_dtype"):
        Muon([{"params": [torch.nn.Parameter(torch.randn(4, 8))], "ns_dtype": bad}], lr=0.1)


def test_ns_dtype_per_param_group():
    """A group with ns_dtype="bf16" steps with the bf16 iteration, the other group with float32 ("highest")."""
    from dist_ortho.optim import Muon

    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(8, 16)), torch.nn.Parameter(torch.randn(8, 16))
    a0, b0 = a.detach().clone(), b.detach().clone()
    g = torch.randn(8, 16)
    opt = Muon([{"params": [a], "ns_dtype": "bf16"}, {"params": [b]}], lr=1.0, momentum=0.0, weight_decay=0.0,
               nesterov=False, fp32_matmul_prec="highest")
    a.grad, b.grad = g.clone(), g.clone()
    opt.step()
    assert opt.ns_spec(opt.param_groups[0]).ns_dtype == "bf16" and opt.ns_spec(opt.param_groups[1]).ns_dtype is None
    step_a, step_b = (a0 - a.detach()), (b0 - b.detach())
    assert not torch.equal(step_a, step_b)
    scale = step_b.abs().max() / local_newton_schulz(g, NsSpec(local_gram="never")).abs().max()
    bf16 = local_newton_schulz(g, NsSpec(local_gram="never", ns_dtype="bf16"))
    assert torch.allclose(step_a, scale * bf16, rtol=0, atol=1e-5 * scale.item())


# -- TP-size invariance in bf16: one world of 4, groups of 1, 2 and 4 ranks --

MODES = ("duplicated", "distributed", "gram", "home")
WORLD_CASES = [battery.Case("random", 16, 4), battery.Case("cond1e6", 16, 4), battery.Case("rank2", 8, 8, tall=True),
               battery.Case("zero", 8, 2)]


def _invariance(ctx) -> dict:
    import torch.distributed as dist

    from dist_ortho.tp import orthogonalize_many
    from dist_ortho.tp.jobs import even_sizes, shard

    out = {}
    for size in (1, 2, 4):
        group, _ = ctx.new_groups(size)
        for case in WORLD_CASES:
            x = battery.make(case, torch.float32)
            partition_dim = 0 if case.tall else 1
            local = shard(x, partition_dim, ctx.rank % size, size)
            sizes = even_sizes(x.size(partition_dim), size)
            for mode in MODES:
                ns = NsSpec(5, "quintic", ns_dtype="bf16")
                got = orthogonalize_many([MatrixJob(local, partition_dim, group, sizes, mode, ns)])[0]
                parts = [None] * size
                dist.all_gather_object(parts, got, group=group)
                out[size, str(case), mode] = torch.cat(parts, dim=partition_dim)
    return out


@pytest.fixture(scope="module")
def world4():
    from tests.harness import started_world

    with started_world(4) as w:
        yield w


def test_bf16_tp_size_invariance(world4):
    results = world4.run(_under_highest, _invariance)[0]
    bad = []
    for case in WORLD_CASES:
        x = battery.make(case, torch.float32)
        ref = battery.reference(x, "quintic", 5)
        for mode in MODES:
            one = results[1, str(case), mode]
            e_one = battery.max_error(one, ref)
            for size in (2, 4):
                got = results[size, str(case), mode]
                if case.kind == "zero":
                    if not torch.equal(got, torch.zeros_like(got)):
                        bad.append(f"{mode} {case} t={size}: not exactly zero")
                elif mode in ("duplicated", "home"):
                    if not torch.equal(got, one):
                        bad.append(f"{mode} {case} t={size}: not bit-identical to t=1")
                else:
                    diff, error = battery.max_error(got, one), battery.max_error(got, ref)
                    if not (diff <= 2 * e_one + 2**-8 and error <= 2 * e_one):
                        bad.append(f"{mode} {case} t={size}: |O_t - O_1| {diff:.2e}, error {error:.2e} (t=1 {e_one:.2e})")
    assert not bad, bad


def _under_highest(ctx, fn, *args):
    from dist_ortho.math.precision import matmul_precision

    with matmul_precision("highest"):
        return fn(ctx, *args)
