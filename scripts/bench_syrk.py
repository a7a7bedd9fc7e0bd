"""The Triton symmetric Gram kernel (dist_ortho.math.kernels.syrk) against torch on CUDA: correctness and speed.

    python scripts/bench_syrk.py [--json out.json]

For each shape and dtype: C = X X^T and the polynomial b A + c A^2 (A symmetric) by the kernel and by torch
(``x @ x.mT``, ``torch.addmm``), the max relative error of each against float64, whether the kernel's C is
exactly symmetric, and the median time of 20 calls (CUDA events, after 5 warm-ups). Needs CUDA and triton.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

SHAPES = [(1024, 1024), (1024, 4096), (2048, 8192), (4096, 4096), (8, 768, 2048)]
DTYPES = [torch.bfloat16, torch.float32]


def _median_ms(fn, repeats: int = 20) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_syrk.py needs CUDA (torch.cuda.is_available() is False)")
    from dist_ortho.math.kernels.syrk import symmetric_polynomial, syrk

    torch.manual_seed(0)
    rows = []
    for shape in SHAPES:
        for dtype in DTYPES:
            x = (torch.randn(shape, device="cuda") / shape[-1] ** 0.5).to(dtype)
            ref = x.double() @ x.double().mT
            c = syrk(x)
            a = (ref / ref.abs().amax(dim=(-2, -1), keepdim=True)).to(dtype)
            poly_ref = -4.775 * a.double() + 2.0315 * a.double() @ a.double()
            p = symmetric_polynomial(a, -4.775, 2.0315)
            torch_poly = (lambda: torch.addmm(a, a, a, beta=-4.775, alpha=2.0315)) if a.ndim == 2 else \
                (lambda: torch.baddbmm(a, a, a, beta=-4.775, alpha=2.0315))
            rows.append({
                "shape": "x".join(map(str, shape)), "dtype": str(dtype).removeprefix("torch."),
                "gram_err": ((c.double() - ref).abs().max() / ref.abs().max()).item(),
                "gram_torch_err": (((x @ x.mT).double() - ref).abs().max() / ref.abs().max()).item(),
                "symmetric": bool(torch.equal(c, c.mT)),
                "gram_ms": _median_ms(lambda: syrk(x)), "gram_torch_ms": _median_ms(lambda: x @ x.mT),
                "poly_err": ((p.double() - poly_ref).abs().max() / poly_ref.abs().max()).item(),
                "poly_ms": _median_ms(lambda: symmetric_polynomial(a, -4.775, 2.0315)), "poly_torch_ms": _median_ms(torch_poly),
            })
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| shape | dtype | X X^T err (kernel / torch) | symmetric | X X^T ms kernel | torch | speed-up | "
          "bA+cA^2 err | bA+cA^2 ms kernel | torch | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['dtype']} | {r['gram_err']:.1e} / {r['gram_torch_err']:.1e} | {r['symmetric']} | "
              f"{r['gram_ms']:.3f} | {r['gram_torch_ms']:.3f} | {r['gram_torch_ms'] / r['gram_ms']:.2f}x | "
              f"{r['poly_err']:.1e} | {r['poly_ms']:.3f} | {r['poly_torch_ms']:.3f} | {r['poly_torch_ms'] / r['poly_ms']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
