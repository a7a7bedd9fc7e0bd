"""Symmetric Gram product ``X X^T`` with an optional Triton SYRK kernel.

``gram(X, use_syrk=True)`` runs the Triton kernel where it can (a CUDA tensor and Triton importable);
anywhere else it logs once why not and computes ``X @ X.mT`` with torch.
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


def gram(x: torch.Tensor, use_syrk: bool = False) -> torch.Tensor:
    """``x @ x.mT`` for a matrix or a batch of matrices."""
    if use_syrk:
        reason = syrk_unavailable_reason(x)
        if reason is None:
            from dist_ortho.kernels.syrk import syrk

            return syrk(x)
        _log_syrk_fallback(reason)
    return x @ x.mT
