"""Whole matrices on one rank (duplicated, home's owner, unsharded, TP = 1): the Gram-space recursion
against float64, the rule that picks it, its FLOPs, and same-shape batching.

Tolerances: float32 at "highest", max abs error against the float64 iteration <= 2e-5 for every set but
cans (4e-4; its first polynomial has slope ~25), the exact modes' tolerances (test_newton_schulz). Where the
rule may pick it (aspect >= 2) the recursion, with its default restarts, is also held to issue 30's bound,
max(2 x the plain float32 iteration's own error, 2e-5), as on the battery of tests/test_gram_accuracy.py
(measured worst here 4.05x the plain error, 6.0e-6, on cans 32 x 64, inside the floor: restarts leave random
inputs' errors about where they were, median 1.4x the plain error, and cut ill-conditioned and low-rank ones'
from up to 770x to at most 6.5x, docs/benchmarks.md). bf16 ("always", forced): relative Frobenius error
against the float64 iteration <= 0.05, bf16's own rounding over 5 steps (the plain bf16 iteration is held to
the same).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dist_ortho.tp import NsSpec
from dist_ortho.tp.local import gram_flops, local_many, local_newton_schulz, plain_flops, use_gram
from tests.reference import NAMED_TYPES, fp32_tolerance, newton_schulz_ref

pytestmark = pytest.mark.usefixtures("highest_precision")


def _steps(name: str) -> int:
    return 10 if name == "deepseekv4" else 5


@pytest.mark.parametrize("aspect", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("name", NAMED_TYPES)
def test_gram_on_one_device_matches_float64(name, aspect):
    gen = torch.Generator().manual_seed(aspect)
    steps = _steps(name)
    for shape in ((32, 32 * aspect), (32 * aspect, 32)):  # wide and tall
        x = torch.randn(shape, generator=gen)
        ref = newton_schulz_ref(x, name, steps)
        gram = local_newton_schulz(x, NsSpec(steps, name, local_gram="always"))
        plain = local_newton_schulz(x, NsSpec(steps, name, local_gram="never"))
        err, plain_err = (gram.double() - ref).abs().max().item(), (plain.double() - ref).abs().max().item()
        if aspect >= 2:  # where the rule may pick it: as accurate as the plain iteration
            assert err <= fp32_tolerance(name) and err <= max(2 * plain_err, 2e-5), (shape, err, plain_err)
        else:  # square: never picked (no cheaper); within 2e-4 (measured <= 1e-5 with restarts, 4e-5 without)
            assert err <= 2e-4, (shape, err)


@pytest.mark.parametrize("aspect", [1, 2, 4, 8])
@pytest.mark.parametrize("name", ["quintic", "polar_express", "cubic5"])
def test_gram_on_one_device_in_bf16(name, aspect):
    x = torch.randn(24, 24 * aspect, generator=torch.Generator().manual_seed(0)).bfloat16()
    ref = newton_schulz_ref(x.double(), name, 5)
    for local_gram in ("always", "never"):
        out = local_newton_schulz(x, NsSpec(5, name, local_gram=local_gram))
        assert out.dtype == torch.bfloat16
        assert ((out.double() - ref).norm() / ref.norm()).item() <= 0.05, local_gram


def test_the_rule_picks_gram_where_it_is_cheaper():
    ns = NsSpec(5, "quintic")
    assert use_gram((64, 128), ns, torch.float32) and use_gram((512, 64), ns, torch.float32)
    assert not use_gram((64, 64), ns, torch.float32)  # square: the plain iteration is cheaper
    assert not use_gram((64, 100), ns, torch.float32)  # aspect < 2
    assert not use_gram((64, 256), ns, torch.bfloat16)  # bf16 keeps the plain iteration
    assert use_gram((64, 256), ns, torch.float64)
    for shape in ((64, 128), (64, 256), (32, 256)):
        assert gram_flops(shape, ns) < plain_flops(shape, ns)
    assert not use_gram((64, 256), NsSpec(5, "quintic", local_gram="never"), torch.float32)
    assert use_gram((64, 64), NsSpec(5, "quintic", local_gram="always"), torch.float32)


@pytest.mark.parametrize("name", ["quintic", "cubic5"])
@pytest.mark.parametrize("shape", [(64, 256), (3, 32, 96)], ids=str)
def test_flops_of_both_paths_are_counted_exactly(name, shape):
    """The FLOP formulas the cost model and the planner use are the FLOPs torch counts (matmuls only)."""
    x = torch.randn(shape)
    for local_gram, formula in (("never", plain_flops), ("always", gram_flops)):
        ns = NsSpec(5, name, local_gram=local_gram)
        with FlopCounterMode(display=False) as counter:
            local_newton_schulz(x, ns)
        assert counter.get_total_flops() == formula(shape, ns)


def test_same_shape_matrices_batch_within_rounding():
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(48, 16, generator=gen) for _ in range(3)] + [torch.randn(16, 40, generator=gen)]
    batched = local_many(xs, [NsSpec(5, "quintic")] * 4)
    alone = local_many(xs, [NsSpec(5, "quintic", batch=False)] * 4)
    for a, b in zip(batched, alone):
        assert (a - b).abs().max().item() <= 1e-5


def test_the_batching_override_forces_either_choice_and_rejects_others(monkeypatch):
    from dist_ortho.tp import batching

    shape = (4, 8, 8)
    try:
        batching.set_batching("never")
        assert batching.batched(shape, torch.float32, "cpu") is False
        assert batching.batched(shape, torch.float32, "cpu", True) is True  # an explicit choice wins
        batching.set_batching("always")
        assert batching.batched(shape, torch.float32, "cpu") is True
    finally:
        batching.set_batching(None)
    monkeypatch.setenv(batching.BATCH_ENV, "never")
    assert batching.batched(shape, torch.float32, "cpu") is False
    monkeypatch.setenv(batching.BATCH_ENV, "sometimes")
    with pytest.raises(ValueError, match="DIST_ORTHO_BATCH"):
        batching.batched(shape, torch.float32, "cpu")
    with pytest.raises(ValueError, match="set_batching"):
        batching.set_batching("maybe")
