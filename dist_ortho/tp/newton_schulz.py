"""``newton_schulz`` and ``newton_schulz_step`` with emerging_optimizers' signatures.

Without ``tp_group`` they are the one-device iteration of :mod:`dist_ortho.math.iteration` (a plain loop);
with it, x is this rank's block of columns of a sharded matrix and every Gram matrix and the norm are
all-reduced over the group (the ``distributed`` mode of :mod:`dist_ortho.tp.distributed`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dist_ortho import comm
from dist_ortho.comm.coalesce import run
from dist_ortho.math.coefficients import get_coefficients
from dist_ortho.math.iteration import DEFAULT_EPS, check_matrix, orthogonalize, polynomial_step
from dist_ortho.math.kernels import gram
from dist_ortho.math.precision import MatmulPrecision, compute_dtype, matmul_precision
from dist_ortho.tp.distributed import column_sharded_newton_schulz

__all__ = ["DEFAULT_EPS", "MatmulPrecision", "compute_dtype", "matmul_precision", "newton_schulz", "newton_schulz_step"]


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
    return polynomial_step(X, comm.all_reduce(gram(X, use_syrk), tp_group), a, b, c, use_syrk)


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
        coefficient_type: a name from :data:`dist_ortho.math.coefficients.COEFFICIENT_TYPES`.
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
    if tp_group is None:
        return orthogonalize(x, coefficients, eps, transpose, use_syrk)
    return run(column_sharded_newton_schulz(x, coefficients, eps, tp_group, use_syrk))
