"""Symmetric products with an optional Triton SYRK kernel: the Gram matrix ``X X^T`` and Newton-Schulz's
polynomial ``b A + c A^2`` of a symmetric A.

With ``use_syrk=True`` they run the Triton kernel where it can (a CUDA tensor and Triton importable);
anywhere else one log line says why not and torch computes them.
"""

from __future__ import annotations

import functools
import logging

import torch

logger = logging.getLogger(__name__)


@functools.cache
def _log_syrk_fallback(reason: str) -> None:
    logger.info("use_syrk=True: the Triton SYRK kernel is not used (%s); running torch matmul instead.", reason)


def syrk_unavailable_reason(x: torch.Tensor) -> str | None:
    """Why the Triton kernel cannot run on ``x``, or None when it can."""
    if x.device.type != "cuda":
        return f"tensor is on {x.device.type}, the kernel needs CUDA"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install 'dist_ortho[kernels]')"
    return None


def _kernel_runs(x: torch.Tensor, use_syrk: bool) -> bool:
    if not use_syrk:
        return False
    reason = syrk_unavailable_reason(x)
    if reason is not None:
        _log_syrk_fallback(reason)
    return reason is None


def gram(x: torch.Tensor, use_syrk: bool = False) -> torch.Tensor:
    """``x @ x.mT`` for a matrix or a batch of matrices."""
    if _kernel_runs(x, use_syrk):
        from dist_ortho.math.kernels.syrk import syrk

        return syrk(x)
    return x @ x.mT


def symmetric_polynomial(a: torch.Tensor, b: float, c: float, use_syrk: bool = False) -> torch.Tensor:
    """``b A + c A @ A`` for a symmetric matrix (or batch) A."""
    if c == 0:  # cubic steps; also avoids baddbmm(alpha=0), which is wrong for bf16 on CPU
        return b * a
    if _kernel_runs(a, use_syrk):
        from dist_ortho.math.kernels.syrk import symmetric_polynomial as fused

        return fused(a, b, c)
    if a.ndim == 2:
        return torch.addmm(a, a, a, beta=b, alpha=c)
    return torch.baddbmm(a, a, a, beta=b, alpha=c)
