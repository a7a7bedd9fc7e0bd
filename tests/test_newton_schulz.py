"""One-device Newton-Schulz against the float64 reference written from the formulas, at "highest"
precision, with the tolerances of ``tests.reference.fp32_tolerance`` (2e-5; 4e-4 for cans)."""

import logging
import os
import subprocess
import sys

import pytest
import torch

from dist_ortho import newton_schulz, newton_schulz_step
from dist_ortho.math.precision import MEDIUM_DTYPE_ENV, compute_dtype, medium_dtype, set_medium_dtype
from tests.reference import CUSTOM, NAMED_TYPES, fp32_tolerance, newton_schulz_ref, polar_factor

SHAPES = [(96, 40), (40, 96), (64, 64), (7, 13), (13, 7), (4, 24, 16), (2, 16, 24)]


pytestmark = pytest.mark.usefixtures("highest_precision")


@pytest.mark.parametrize("coefficient_type", NAMED_TYPES + ("custom",))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(coefficient_type, shape):
    custom = CUSTOM if coefficient_type == "custom" else None
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    out = newton_schulz(g, 5, coefficient_type, custom)
    assert out.shape == g.shape and out.dtype == torch.float32
    err = (out.double() - newton_schulz_ref(g, coefficient_type, 5, custom)).abs().max().item()
    assert err <= fp32_tolerance(coefficient_type)


@pytest.mark.parametrize("coefficient_type", NAMED_TYPES)
def test_rank_one(coefficient_type):
    """A 1 x n matrix normalizes to sigma = 1 exactly, where cans' first polynomial has slope ~25: float32
    rounding grows to ~3e-3 there (measured), the other sets stay within their usual tolerance."""
    g = torch.randn(1, 9, generator=torch.Generator().manual_seed(0))
    err = (newton_schulz(g, 5, coefficient_type).double() - newton_schulz_ref(g, coefficient_type, 5)).abs().max()
    assert err <= (5e-3 if coefficient_type == "cans" else fp32_tolerance(coefficient_type))


def test_batch_slices_are_independent():
    g = torch.randn(3, 20, 12)
    g[1] *= 1e4
    out = newton_schulz(g, 5)
    for i in range(3):
        torch.testing.assert_close(out[i], newton_schulz(g[i], 5), atol=1e-6, rtol=0)


def test_converges_to_the_polar_factor():
    # A well-conditioned matrix (singular values in [0.5, 1]): 10 steps of polar_express reach U V^T.
    U, _ = torch.linalg.qr(torch.randn(48, 32, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(32, 32, dtype=torch.float64))
    g = (U @ torch.diag(torch.linspace(0.5, 1.0, 32, dtype=torch.float64)) @ V.T).float()
    out = newton_schulz(g, 10, "polar_express")
    # polar_express's safety factor leaves sigma within ~1% of 1; the direction is U V^T.
    assert (out.double() - polar_factor(g)).abs().max().item() < 2e-2
    s = torch.linalg.svdvals(out.double())
    assert (s - 1).abs().max().item() < 2e-2


@pytest.mark.parametrize("transpose", [True, False])
def test_explicit_transpose_gives_the_same_polar_factor(transpose):
    g = torch.randn(30, 20)
    torch.testing.assert_close(newton_schulz(g, 5, transpose=transpose), newton_schulz(g, 5), atol=2e-5, rtol=0)


def test_zero_gives_zero():
    out = newton_schulz(torch.zeros(3, 8, 5), 5)
    assert torch.equal(out, torch.zeros(3, 8, 5))


@pytest.mark.parametrize("scale", [1e-20, 1e-26, 1e15])
def test_tiny_and_huge_inputs_are_orthogonalized(scale):
    g = torch.randn(40, 24, generator=torch.Generator().manual_seed(3))
    expected = newton_schulz(g, 5)
    out = newton_schulz(g * scale, 5)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_default_eps_beats_the_usual_1e7():
    g = torch.randn(40, 24) * 1e-20
    assert newton_schulz(g, 5, eps=1e-7).abs().max() < 1e-6  # the reported failure mode
    assert newton_schulz(g, 5).abs().max() > 0.1


def test_medium_precision_runs_bf16_and_returns_float32():
    g = torch.randn(64, 32)
    torch.set_float32_matmul_precision("medium")
    set_medium_dtype(torch.bfloat16)  # the bf16 numerics on any CPU (see the precision policy tests)
    try:
        out = newton_schulz(g, 5)
    finally:
        set_medium_dtype(None)
    assert out.dtype == torch.float32
    ref = newton_schulz_ref(g, "quintic", 5, dtype=torch.bfloat16).float()
    assert ((out - ref).norm() / ref.norm()).item() < 0.05  # bf16 rounding in a different op order
    torch.set_float32_matmul_precision("high")
    float32 = newton_schulz(g, 5)
    assert (float32.double() - newton_schulz_ref(g, "quintic", 5)).abs().max() < 2e-5
    # The "medium" result carries bf16 rounding (~4e-3 relative), so it did run in bf16.
    assert ((out - float32).norm() / float32.norm()).item() > 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_dtypes_compute_and_return_in_their_own_dtype(dtype):
    g = torch.randn(48, 32)
    out = newton_schulz(g.to(dtype), 5)
    assert out.dtype == dtype
    ref = newton_schulz_ref(g, "quintic", 5).float()
    tol = 1e-10 if dtype == torch.float64 else 0.05
    assert ((out.float() - ref).norm() / ref.norm()).item() < max(tol, 1e-6)


def test_step_matches_formula():
    X = torch.randn(6, 9, dtype=torch.float64)
    A = X @ X.T
    expected = 2.0 * X + (-1.5 * A + 0.5 * A @ A) @ X
    torch.testing.assert_close(newton_schulz_step(X, 2.0, -1.5, 0.5), expected)
    torch.testing.assert_close(newton_schulz_step(X, 2.0, -1.5, 0.0), 2.0 * X - 1.5 * A @ X)


def test_use_syrk_without_cuda_logs_once_and_matches(caplog):
    from dist_ortho.math.kernels import _log_syrk_fallback

    _log_syrk_fallback.cache_clear()  # an earlier test may have logged it already
    g = torch.randn(24, 16)
    with caplog.at_level(logging.INFO, logger="dist_ortho.math.kernels"):
        out = newton_schulz(g, 5, use_syrk=True)
        newton_schulz(g, 5, use_syrk=True)
    assert torch.equal(out, newton_schulz(g, 5))
    assert sum("not used" in r.message for r in caplog.records) == 1


@pytest.mark.parametrize(
    "x,kwargs,error,needle",
    [
        (torch.ones(4, 4, dtype=torch.int64), {}, TypeError, "floating"),
        ([[1.0]], {}, TypeError, "torch.Tensor"),
        (torch.ones(4), {}, ValueError, "2D"),
        (torch.ones(2, 2, 2, 2), {}, ValueError, "2D"),
        (torch.ones(4, 4), {"steps": 0}, ValueError, "steps"),
        (torch.ones(4, 4), {"coefficient_type": "x"}, ValueError, "coefficient_type"),
        (torch.ones(4, 4), {"transpose": True, "tp_group": object()}, ValueError, "transpose"),
    ],
)
def test_bad_input(x, kwargs, error, needle):
    kwargs = {"steps": 5, **kwargs}
    with pytest.raises(error, match=needle):
        newton_schulz(x, **kwargs)


def test_medium_dtype_follows_the_device_and_its_overrides(monkeypatch):
    """"medium" is bf16 where the device has a native bf16 matmul, else float32 (forced both ways here)."""
    monkeypatch.delenv(MEDIUM_DTYPE_ENV, raising=False)
    native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert medium_dtype("cpu") == (torch.bfloat16 if native else torch.float32)
    assert medium_dtype("cuda") == torch.bfloat16
    g = torch.randn(40, 24)
    torch.set_float32_matmul_precision("medium")
    try:
        set_medium_dtype(torch.float32)  # a CPU without bf16: medium runs float32, the same as "high"
        assert compute_dtype(torch.float32, "cuda") == torch.float32
        no_bf16 = newton_schulz(g, 5)
        set_medium_dtype(torch.bfloat16)
        bf16 = newton_schulz(g, 5)
        set_medium_dtype(None)
        monkeypatch.setenv(MEDIUM_DTYPE_ENV, "float32")
        assert compute_dtype(torch.float32) == torch.float32
        monkeypatch.setenv(MEDIUM_DTYPE_ENV, "fp8")
        with pytest.raises(ValueError, match=MEDIUM_DTYPE_ENV):
            compute_dtype(torch.float32)
    finally:
        set_medium_dtype(None)
        torch.set_float32_matmul_precision("highest")
    assert no_bf16.dtype == torch.float32
    assert (bf16 - no_bf16).abs().max() > 1e-3  # bf16 rounding shows
    with pytest.raises(ValueError, match="set_medium_dtype"):
        set_medium_dtype(torch.float16)


def test_medium_dtype_is_logged_once():
    code = (
        "import logging, torch; logging.basicConfig(level=logging.INFO);"
        "torch.set_float32_matmul_precision('medium');"
        "from dist_ortho import newton_schulz; [newton_schulz(torch.randn(8, 4), 5) for _ in range(3)]"
    )
    env = {k: v for k, v in os.environ.items() if k != MEDIUM_DTYPE_ENV}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("fp32_matmul_prec='medium' runs Newton-Schulz in") == 1, out.stderr
