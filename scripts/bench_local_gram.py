"""Gram Newton-Schulz on one device against the plain iteration: max error against float64 and FLOPs,
per coefficient set and aspect ratio (k = 64 rows, n = 64 a columns), float32 at "highest".

    python scripts/bench_local_gram.py

The rule of dist_ortho.tp.local.use_gram (float32/64, aspect >= 2, fewer FLOPs) is read off this table.
"""

from __future__ import annotations

import torch

from dist_ortho.coefficients import get_coefficients
from dist_ortho.precision import matmul_precision
from dist_ortho.tp import NsSpec
from dist_ortho.tp.local import gram_flops, local_newton_schulz, plain_flops, use_gram

SETS = ["quintic", "simple", "polar_express", "polar_express_safer", "cans", "aol", "deepseekv4", "cubic5"]
ASPECTS = [1, 2, 4, 8]


def reference(x: torch.Tensor, name: str, steps: int) -> torch.Tensor:
    X = x.double() / x.double().norm()
    for a, b, c in get_coefficients(name, steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}; float32 at 'highest'; k = 64; error = max |O - O_float64|")
    print("| coefficients | aspect n/k | plain error | gram error | gram / plain error | gram / plain FLOPs | rule picks |")
    print("|---|---|---|---|---|---|---|")
    with matmul_precision("highest"):
        for name in SETS:
            steps = 10 if name == "deepseekv4" else 5
            for aspect in ASPECTS:
                x = torch.randn(64, 64 * aspect, generator=gen)
                ref = reference(x, name, steps)
                errors = {}
                for mode in ("never", "always"):
                    out = local_newton_schulz(x, NsSpec(steps, name, local_gram=mode))
                    errors[mode] = (out.double() - ref).abs().max().item()
                ns = NsSpec(steps, name)
                picks = "gram" if use_gram(x.shape, ns, x.dtype) else "plain"
                print(f"| {name} | {aspect} | {errors['never']:.1e} | {errors['always']:.1e} | "
                      f"{errors['always'] / errors['never']:.2f} | {gram_flops(x.shape, ns) / plain_flops(x.shape, ns):.2f} | {picks} |")


if __name__ == "__main__":
    main()
