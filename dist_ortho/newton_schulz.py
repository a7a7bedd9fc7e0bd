"""Newton-Schulz orthogonalization on one device (and, with ``tp_group``, on a column-sharded matrix).

For G (m x n) the update direction is the orthogonal polar factor U V^T of G = U S V^T. Newton-Schulz
approximates it with an odd matrix polynomial (Jordan et al., "Muon", 2024):

    X_0     = G / (||G||_F + eps)
    A_k     = X_k X_k^T
    X_{k+1} = a_k X_k + (b_k A_k + c_k A_k^2) X_k

When m > n the iteration runs on G^T so that A is the smaller (n x n) Gram matrix. A 3D input is a
batch of matrices, each normalized on its own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Literal

import torch

from dist_ortho import comm, reductions
from dist_ortho.coalesce import AllReduce, Program, run
from dist_ortho.coefficients import Triple, get_coefficients
from dist_ortho.kernels import gram

DEFAULT_EPS = 1e-30
"""Guards the normalization against a zero matrix only: the norm is a float64 sum, so a matrix whose
entries are ~1e-20 (norm ~1e-18) is still scaled to unit norm. (eps = 1e-7, the usual value, maps such
inputs to ~0 instead of orthogonalizing them.)"""


MatmulPrecision = Literal["highest", "high", "medium"]


@contextlib.contextmanager
def matmul_precision(precision: MatmulPrecision) -> Iterator[None]:
    """Run the block under ``torch.set_float32_matmul_precision(precision)``, then restore the old one."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def check_matrix(x: object, name: str = "x") -> torch.Tensor:
    """Raise TypeError / ValueError unless ``x`` is a floating tensor with 2 or 3 dims."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype (float32, bfloat16, float16, float64), got {x.dtype}")
    if x.ndim not in (2, 3):
        raise ValueError(f"{name} must be a matrix (2D) or a batch of matrices (3D), got shape {tuple(x.shape)}")
    return x


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype the iterations run in.

    float32 runs in bfloat16 when ``torch.get_float32_matmul_precision() == "medium"`` (as
    emerging_optimizers does) and in float32 under "high" / "highest". bfloat16, float16 and float64
    run in their own dtype. The result is always returned in the input's dtype.
    """
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "medium":
        return torch.bfloat16
    return dtype


def normalize(x: torch.Tensor, eps: float, tp_group: comm.ProcessGroup | None = None) -> Program[torch.Tensor]:
    """Program: x / (||x||_F + eps) per matrix, the norm a float64 sum over ``tp_group``; float32 or wider."""
    sum_sq = yield AllReduce(reductions.local_sum_of_squares(x), tp_group)
    scale = 1.0 / (sum_sq.sqrt() + eps)
    work = x if x.dtype == torch.float64 else x.float()
    return work * scale.to(work.dtype)[..., None, None]


def _addmm(bias: torch.Tensor, m1: torch.Tensor, m2: torch.Tensor, beta: float, alpha: float) -> torch.Tensor:
    """beta * bias + alpha * m1 @ m2 for matrices or batches."""
    if m1.ndim == 2:
        return torch.addmm(bias, m1, m2, beta=beta, alpha=alpha)
    return torch.baddbmm(bias, m1, m2, beta=beta, alpha=alpha)


def _polynomial_step(X: torch.Tensor, A: torch.Tensor, a: float, b: float, c: float) -> torch.Tensor:
    """a X + (b A + c A^2) X for the Gram matrix A of X."""
    # Cubic steps (c = 0) skip A @ A; this also avoids baddbmm(alpha=0), which is wrong for bf16 on CPU.
    B = b * A if c == 0 else _addmm(A, A, A, beta=b, alpha=c)
    return _addmm(X, B, X, beta=a, alpha=1.0)


def newton_schulz_step(
    X: torch.Tensor,
    a: float,
    b: float,
    c: float,
    tp_group: comm.ProcessGroup | None = None,
    *,
    use_syrk: bool = False,
) -> torch.Tensor:
    """One step X <- a X + (b A + c A^2) X with A = X X^T.

    With ``tp_group``, X is this rank's block of columns and A is all-reduced over the group (the
    columns are the contraction dim, so the partial Gram matrices add up to the global one).
    """
    return _polynomial_step(X, comm.all_reduce(gram(X, use_syrk), tp_group), a, b, c)


def newton_schulz_program(
    x: torch.Tensor,
    coefficients: Sequence[Triple],
    eps: float,
    transpose: bool,
    tp_group: comm.ProcessGroup | None,
    use_syrk: bool = False,
) -> Program[torch.Tensor]:
    """Program of :func:`newton_schulz` (arguments already checked): steps + 1 all-reduces over tp_group."""
    X = x.mT if transpose else x
    X = (yield from normalize(X, eps, tp_group)).to(compute_dtype(x.dtype))
    for a, b, c in coefficients:
        A = yield AllReduce(gram(X, use_syrk), tp_group)
        X = _polynomial_step(X, A, a, b, c)
    if transpose:
        X = X.mT
    return X.to(x.dtype).contiguous()


def newton_schulz(
    x: torch.Tensor,
    steps: int,
    coefficient_type: str = "quintic",
    custom_coefficient_sets: Sequence[Sequence[float]] | None = None,
    eps: float = DEFAULT_EPS,
    transpose: bool | None = None,
    tp_group: comm.ProcessGroup | None = None,
    use_syrk: bool = False,
) -> torch.Tensor:
    """Orthogonalize ``x`` (2D, or 3D as a batch) with ``steps`` Newton-Schulz iterations.

    Args:
        x: the matrix. Its dtype decides the compute dtype (see :func:`compute_dtype`); the result has x's dtype.
        steps: number of iterations, >= 1.
        coefficient_type: a name from :data:`dist_ortho.coefficients.COEFFICIENT_TYPES`.
        custom_coefficient_sets: the (a, b, c) triples when ``coefficient_type == "custom"``.
        eps: added to the Frobenius norm; only guards a zero input (which gives a zero output).
        transpose: run on x^T. None picks the side with the smaller Gram matrix (rows > cols
            transposes); with ``tp_group`` it must be None or False.
        tp_group: x is this rank's block of columns of a matrix sharded over the group ("distributed"
            mode: the Frobenius norm and every Gram matrix are all-reduced).
        use_syrk: compute X X^T with the Triton symmetric kernel where it can run.
    """
    check_matrix(x, "x")
    coefficients = get_coefficients(coefficient_type, steps, custom_coefficient_sets)
    if tp_group is not None and transpose:
        raise ValueError("transpose=True cannot be combined with tp_group: x must be sharded along its last dim")
    if transpose is None:
        transpose = tp_group is None and x.size(-2) > x.size(-1)
    return run(newton_schulz_program(x, coefficients, eps, transpose, tp_group, use_syrk))
