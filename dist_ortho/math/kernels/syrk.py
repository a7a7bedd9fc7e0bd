"""Triton symmetric Gram product C = alpha X X^T + beta Y (Y symmetric) that computes the lower triangle of
tiles and mirrors it. With X = Y = A (A symmetric, so A A^T = A A) it is Newton-Schulz's polynomial
b A + c A^2 in one pass over half the tiles.

For X of shape (m, k) (or a batch (b, m, k)), program (i, j) with j <= i computes the tile
C[i-block, j-block] = X[i-block] X[j-block]^T in float32 and also stores its transpose at
C[j-block, i-block]; programs with j > i do nothing, so about half the tile products of a plain
matmul are computed. Of a diagonal tile only the lower triangle is stored and mirrored, so C is exactly
symmetric whatever the dot product's rounding. Ragged edges are masked. Runs on CUDA, and on CPU tensors under
``TRITON_INTERPRET=1`` (how the tests check it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _syrk_kernel(
    x_ptr, y_ptr, c_ptr, M, K, alpha, beta,
    stride_xb, stride_xm, stride_xk, stride_yb, stride_ym, stride_yn, stride_cb, stride_cm, stride_cn,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr, HAS_Y: tl.constexpr,
):
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    batch = tl.program_id(2)
    if pid_j <= pid_i:
        rows_i = pid_i * BLOCK_M + tl.arange(0, BLOCK_M)
        rows_j = pid_j * BLOCK_M + tl.arange(0, BLOCK_M)
        x = x_ptr + batch * stride_xb
        acc = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(x + rows_i[:, None] * stride_xm + ks[None, :] * stride_xk,
                        mask=(rows_i[:, None] < M) & (ks[None, :] < K), other=0.0)
            bt = tl.load(x + rows_j[None, :] * stride_xm + ks[:, None] * stride_xk,
                         mask=(rows_j[None, :] < M) & (ks[:, None] < K), other=0.0)
            if IEEE:
                acc += tl.dot(a, bt, input_precision="ieee")
            else:
                acc += tl.dot(a, bt)
        inside = (rows_i[:, None] < M) & (rows_j[None, :] < M)
        acc = acc * alpha
        if HAS_Y:
            y = tl.load(y_ptr + batch * stride_yb + rows_i[:, None] * stride_ym + rows_j[None, :] * stride_yn,
                        mask=inside, other=0.0)
            acc += beta * y.to(tl.float32)
        out = acc.to(c_ptr.dtype.element_ty)
        c = c_ptr + batch * stride_cb
        # A diagonal tile's product is not exactly symmetric on every BLAS: keep its lower triangle
        # (global row >= col) and mirror it, so C is symmetric by construction.
        lower = rows_i[:, None] >= rows_j[None, :]
        strictly_lower = rows_i[:, None] > rows_j[None, :]
        tl.store(c + rows_i[:, None] * stride_cm + rows_j[None, :] * stride_cn, out, mask=inside & lower)
        tl.store(c + rows_j[None, :] * stride_cm + rows_i[:, None] * stride_cn, out, mask=inside & strictly_lower)


def syrk(
    x: torch.Tensor, block_m: int = 32, block_k: int = 32, alpha: float = 1.0, beta: float = 0.0,
    y: torch.Tensor | None = None,
) -> torch.Tensor:
    """alpha x @ x.mT (+ beta y, y symmetric and shaped like the result) for a matrix or a batch of
    matrices, one triangle of tiles computed; exactly symmetric."""
    batched = x.reshape(-1, x.size(-2), x.size(-1))
    b, m, k = batched.shape
    c = torch.empty((b, m, m), dtype=x.dtype, device=x.device)
    ys = y.reshape(-1, m, m) if y is not None else c
    tiles = triton.cdiv(m, block_m)
    ieee = x.dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"
    _syrk_kernel[(tiles, tiles, b)](
        batched, ys, c, m, k, float(alpha), float(beta),
        batched.stride(0), batched.stride(1), batched.stride(2), ys.stride(0), ys.stride(1), ys.stride(2),
        c.stride(0), c.stride(1), c.stride(2),
        BLOCK_M=block_m, BLOCK_K=block_k, IEEE=ieee, HAS_Y=y is not None,
    )
    return c.reshape(*x.shape[:-1], m)


def symmetric_polynomial(a: torch.Tensor, b: float, c: float, block_m: int = 32, block_k: int = 32) -> torch.Tensor:
    """b A + c A A for a symmetric A (or a batch), as c A A^T + b A with one triangle of tiles."""
    return syrk(a, block_m, block_k, alpha=c, beta=b, y=a)
