"""Newton-Schulz on one device: plain loops over whole matrices, no communication (torch.compile-able).

For G (m x n) the update direction is the orthogonal polar factor U V^T of G = U S V^T. Newton-Schulz
approximates it with an odd matrix polynomial (Jordan et al., "Muon", 2024):

    X_0     = G / (||G||_F + eps)
    A_k     = X_k X_k^T
    X_{k+1} = a_k X_k + (b_k A_k + c_k A_k^2) X_k

When m > n the iteration runs on G^T so that A is the smaller (n x n) Gram matrix. A 3D input is a
batch of matrices, each normalized on its own. The tensor-parallel modes (dist_ortho.tp) reuse these
pieces on shards.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dist_ortho.math.coefficients import Triple
from dist_ortho.math.kernels import gram, symmetric_polynomial
from dist_ortho.math.precision import NsDtype, compute_dtype

DEFAULT_EPS = 1e-300
"""Guards the normalization against a zero matrix only. The norm is a float64 sum and the scale 1 / (norm +
eps) a float64 number (clamped to the largest finite value of the compute dtype), so a matrix of entries
~1e-30 is still scaled to unit norm and zero stays zero. (eps = 1e-7, the usual value, maps inputs of norm
below ~1e-7 to ~0 instead of orthogonalizing them; 1e-30, this library's earlier default, halved the
scale of a matrix of norm 1e-30.)"""


def check_matrix(x: object, name: str = "x") -> torch.Tensor:
    """Raise TypeError / ValueError unless ``x`` is a floating tensor with 2 or 3 dims."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype (float32, bfloat16, float16, float64), got {x.dtype}")
    if x.ndim not in (2, 3):
        raise ValueError(f"{name} must be a matrix (2D) or a batch of matrices (3D), got shape {tuple(x.shape)}")
    return x


def sum_of_squares(x: torch.Tensor, dims: tuple[int, ...] = (-2, -1)) -> torch.Tensor:
    """sum(x**2) over ``dims`` of this block, in float64 (so tiny and huge entries neither under- nor overflow)."""
    return torch.linalg.vector_norm(x, dim=dims, dtype=torch.float64).square()


def scale_to_unit(x: torch.Tensor, sum_sq: torch.Tensor, eps: float) -> torch.Tensor:
    """x / (sqrt(sum_sq) + eps) per matrix, in float32 or wider (sum_sq: float64, one per matrix)."""
    work = x if x.dtype == torch.float64 else x.float()
    scale = (1.0 / (sum_sq.sqrt() + eps)).clamp(max=torch.finfo(work.dtype).max)
    return work * scale.to(work.dtype)[..., None, None]


def add_product(C: torch.Tensor, A: torch.Tensor, B: torch.Tensor, beta: float) -> torch.Tensor:
    """beta C + A B as one fused matmul (addmm, or baddbmm for a batch)."""
    if C.ndim == 2:
        return torch.addmm(C, A, B, beta=beta)
    return torch.baddbmm(C, A, B, beta=beta)


def polynomial_step(X: torch.Tensor, A: torch.Tensor, a: float, b: float, c: float, use_syrk: bool = False) -> torch.Tensor:
    """a X + (b A + c A^2) X for the Gram matrix A of X (b A + c A^2 with the symmetric kernel where it runs)."""
    return add_product(X, symmetric_polynomial(A, b, c, use_syrk), X, a)


def orthogonalize(
    x: torch.Tensor,
    coefficients: Sequence[Triple],
    eps: float = DEFAULT_EPS,
    transpose: bool | None = None,
    use_syrk: bool = False,
    ns_dtype: NsDtype | None = None,
) -> torch.Tensor:
    """Newton-Schulz of the whole matrix (or batch) ``x`` on this device, returned contiguous in x's dtype.

    ``transpose=None`` runs on the side with the smaller Gram matrix (rows > cols transposes). The compute
    dtype: :func:`dist_ortho.math.precision.compute_dtype` of x's dtype and ``ns_dtype``.
    """
    if transpose is None:
        transpose = x.size(-2) > x.size(-1)
    X = x.mT if transpose else x
    X = scale_to_unit(X, sum_of_squares(X), eps).to(compute_dtype(x.dtype, x.device, ns_dtype))
    for a, b, c in coefficients:
        X = polynomial_step(X, gram(X, use_syrk), a, b, c, use_syrk)
    if transpose:
        X = X.mT
    return X.to(x.dtype).contiguous()
