"""Checks that need CUDA (marker ``gpu``; skipped with the reason printed elsewhere; scripts/gpu_check.sh runs them).

- The grouped step on CUDA equals the per-matrix path (the member with ``batched = False``): bit for bit with
  ``batch_matrices=False`` in float32, within bf16 rounding batched in "medium" (bf16 Newton-Schulz).
- The Triton SYRK kernel and its fused polynomial on CUDA against float64, ragged and batched.
"""

from __future__ import annotations

import pytest
import torch

from dist_ortho import Muon, get_optimizer
from tests.test_groups import per_matrix

pytestmark = pytest.mark.gpu


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(256, 128)] * 6 + [(128, 512)] * 3 + [(96, 96)]
    return [torch.nn.Parameter(torch.randn(s, generator=gen).cuda()) for s in shapes]


def _run(opt, params, steps: int = 3) -> None:
    for step in range(steps):
        gen = torch.Generator().manual_seed(100 + step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).cuda()
        opt.step()


@pytest.mark.parametrize("kind", ["muon", "normuon", "muon_hyperball"])
def test_grouped_step_on_cuda_equals_the_per_matrix_path(kind):
    factory = get_optimizer(kind)
    cls = factory.func if hasattr(factory, "func") else factory
    extra = dict(factory.keywords) if hasattr(factory, "keywords") else {}
    grouped, single = _params(), _params()
    _run(cls(grouped, lr=0.02, fp32_matmul_prec="highest", batch_matrices=False, **extra), grouped)
    _run(per_matrix(cls)(single, lr=0.02, fp32_matmul_prec="highest", batch_matrices=False, **extra), single)
    for a, b in zip(grouped, single):
        assert torch.equal(a, b), (a - b).abs().max().item()


def test_batched_bf16_newton_schulz_agrees_with_one_matrix_at_a_time():
    grouped, single = _params(), _params()
    _run(Muon(grouped, lr=0.02), grouped)  # "medium": bf16 Newton-Schulz, batched
    _run(Muon(single, lr=0.02, batch_matrices=False), single)
    start = _params()
    for a, b, w in zip(grouped, single, start):
        moved = (b - w).abs().max().item()
        assert (a - b).abs().max().item() <= 0.02 * moved  # bf16: ~3 significant digits per product


def test_syrk_kernel_on_cuda():
    pytest.importorskip("triton", reason="triton is not installed")
    from dist_ortho.math.kernels.syrk import symmetric_polynomial, syrk

    gen = torch.Generator().manual_seed(0)
    for shape in [(40, 24), (300, 1000), (3, 33, 70), (1024, 256)]:
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
            x = torch.randn(shape, generator=gen).cuda().to(dtype)
            c = syrk(x)
            ref = x.double() @ x.double().mT
            assert torch.equal(c, c.mT)
            assert ((c.double() - ref).abs().max() / ref.abs().max()).item() < tol, (shape, dtype)
            a = (ref / ref.abs().amax(dim=(-2, -1), keepdim=True)).to(dtype)
            p = symmetric_polynomial(a, -4.775, 2.0315)
            poly = -4.775 * a.double() + 2.0315 * a.double() @ a.double()
            assert ((p.double() - poly).abs().max() / poly.abs().max()).item() < tol, (shape, dtype)
