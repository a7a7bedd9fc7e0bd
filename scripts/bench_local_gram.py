"""Gram Newton-Schulz on one device against the plain iteration, on the battery of tests/gram_battery.py (rank 1,
2, 8, condition 1e2 .. 1e6 (1e8 in float64), low rank + noise 1e-4, tiny norms, zero): max error against the
plain iteration in float64 (long double for float64 inputs), FLOPs, and the restart schedules the default rule
(dist_ortho.tp.gram.default_gram_restarts) was read from. Matmuls at "highest".

    python scripts/bench_local_gram.py                      # the table of docs/benchmarks.md
    python scripts/bench_local_gram.py --ks 4,16,64,256,1024 --seeds 1
    python scripts/bench_local_gram.py --search --seeds 3   # every schedule of the 5-step sets
    python scripts/bench_local_gram.py --dtype float64      # Gram and plain in float64, long double reference
    python scripts/bench_local_gram.py --half --sets quintic,polar_express   # bf16 and fp16: error, FLOPs, time
    python scripts/bench_local_gram.py --half --search --ks 16,64,128        # 16-bit restart schedules
    python scripts/bench_local_gram.py --half --device cuda --half-k 1024    # on a GPU (scripts/gpu_check.sh)
    python scripts/bench_local_gram.py --kspace --ks 16,32,64,128           # 16-bit with k-space restarts (below)

The bound tested (tests/test_gram_accuracy.py): Gram error <= max(2 x the plain iteration's, 2e-5) per input
(float64: 2e-5 x eps64 / eps32 = 3.7e-14 for the floor).
"score" = Gram error / that bound (<= 1 passes).

--kspace (issue 30, measured, not in the library): restarts in k-space. X_t = Q_t X, so R_t = X_t X_t^T =
Q_t R_0 Q_t^T exactly, 4 k^3 FLOPs (as much as R <- P R P) instead of an X-space restart's 4 k^2 n. Variants
(:data:`KSPACE_VARIANTS`), each with R_0 = X X^T of the bf16 X with float32 accumulation kept in float32:
(a) R, Z and/or Q in bf16 or float32, R refreshed as Q R_0 Q^T in float32 every step or at chosen steps, the
final Q X in bf16; (b) the whole k-space part in float32, only X X^T and Q X in bf16 (Q X also as two bf16
products, hi + lo, Q = hi + lo). Per variant and set: worst error / the plain bf16 iteration's over the battery,
FLOPs at aspect 4 (torch's flop counter, every dtype alike), time against the plain bf16 iteration (interleaved,
medians).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.gram_battery, tests.reference

from dist_ortho.math.precision import matmul_precision  # noqa: E402
from dist_ortho.tp import NsSpec  # noqa: E402
from dist_ortho.tp.gram import restarts_for  # noqa: E402
from dist_ortho.tp.local import gram_recursion_flops, local_newton_schulz, plain_flops, use_gram  # noqa: E402
from tests import gram_battery as battery  # noqa: E402

SETS = ["quintic", "simple", "polar_express", "polar_express_safer", "cans", "aol", "deepseekv4", "cubic5"]
FLOOR = {torch.float32: 2e-5, torch.float64: 2e-5 * torch.finfo(torch.float64).eps / torch.finfo(torch.float32).eps}


def steps_of(name: str) -> int:
    return 10 if name == "deepseekv4" else 5


def errors(case: battery.Case, name: str, steps: int, dtype: torch.dtype, schedules: list[tuple[int, ...] | None]):
    """Max error of the plain iteration and of the Gram recursion under each schedule (None: the default)."""
    x = battery.make(case, dtype)
    reference = battery.reference if dtype == torch.float32 else battery.reference_longdouble
    ref = reference(x, name, steps)
    plain = battery.max_error(local_newton_schulz(x, NsSpec(steps, name, local_gram="never")), ref)
    gram = [battery.max_error(local_newton_schulz(x, NsSpec(steps, name, gram_restarts=s, local_gram="always")), ref)
            for s in schedules]
    return plain, gram


def score(plain: float, gram: float, floor: float) -> float:
    return gram / max(2 * plain, floor)


def flop_ratio(name: str, steps: int, aspect: int, restarts: tuple[int, ...], k: int = 64) -> float:
    ns = NsSpec(steps, name)
    return gram_recursion_flops(k, aspect * k, ns, restarts) / plain_flops((k, aspect * k), ns)


def table(args: argparse.Namespace, dtype: torch.dtype) -> None:
    kinds = args.kinds or (battery.KINDS_FLOAT32 if dtype == torch.float32 else battery.KINDS_FLOAT64)
    floor = FLOOR[dtype]
    print(f"torch {torch.__version__}; {str(dtype)[6:]} at 'highest'; k in {args.ks}, aspects {args.aspects}, "
          f"{args.seeds} seed(s); per row the input of the worst score (Gram error / max(2 x plain error, "
          f"{floor:.1e}), <= 1 passes), and the largest Gram / plain error over the row's inputs")
    print("| coefficients (restarts) | input | worst shape | plain error | Gram, no restarts | Gram, default restarts "
          "| score | max Gram / plain |")
    print("|---|---|---|---|---|---|---|---|")
    total = bare_misses = 0
    rows: list[dict[str, object]] = []
    overall = {"score": (0.0, ""), "ratio": (0.0, ""), "ratio_above_floor": (0.0, ""), "bare": (0.0, "")}

    def note(key: str, value: float, where: str) -> None:
        if value > overall[key][0]:
            overall[key] = (value, where)

    for name in args.sets:
        steps = steps_of(name)
        restarts = restarts_for(NsSpec(steps, name), dtype)
        for kind in kinds:
            worst, max_ratio = None, 0.0
            for case in battery.cases((kind,), args.ks, args.aspects, args.seeds):
                plain, (none, default) = errors(case, name, steps, dtype, [(), None])
                value = score(plain, default, floor) if plain or default else 0.0
                bare = score(plain, none, floor) if plain or none else 0.0
                bare = bare if bare == bare else float("inf")  # nan: the recursion broke down
                ratio = default / plain if plain > 0 else 0.0
                where = f"{name} {case}"
                total += 1
                bare_misses += not bare <= 1
                max_ratio = max(max_ratio, ratio)
                note("score", value, where)
                note("ratio", ratio, where)
                note("bare", bare, where)
                if default > floor:
                    note("ratio_above_floor", ratio, where)
                if worst is None or value > worst[0]:
                    worst = (value, case, plain, none, default)
            if worst is None:
                continue
            value, case, plain, none, default = worst
            rows.append({"coefficients": name, "restarts": list(restarts), "input": kind, "shape": list(case.shape),
                         "plain": plain, "gram_no_restarts": none, "gram": default, "score": value,
                         "max_gram_over_plain": max_ratio})
            print(f"| {name} {restarts} | {kind} | {'x'.join(map(str, case.shape))} | {plain:.1e} | {none:.1e} | "
                  f"{default:.1e} | {value:.2f} | {max_ratio:.2f} |", flush=True)
    print()
    print(f"{total} inputs. Default restarts: worst score {overall['score'][0]:.2f} ({overall['score'][1]}); "
          f"largest Gram / plain error {overall['ratio'][0]:.2f} ({overall['ratio'][1]}), "
          f"{overall['ratio_above_floor'][0]:.2f} where the Gram error is above {floor:.1e} "
          f"({overall['ratio_above_floor'][1]}). No restarts: {bare_misses} inputs miss the bound, worst score "
          f"{overall['bare'][0]:.3g} ({overall['bare'][1]}).")
    print()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "floor": floor, "dtype": str(dtype)[6:], "torch": torch.__version__,
                       "ks": list(args.ks), "aspects": list(args.aspects)}, f, indent=1)
    print("| coefficients | restarts | Gram / plain FLOPs at aspect 2 | 4 | 8 | `use_gram` at aspect 2 |")
    print("|---|---|---|---|---|---|")
    for name in args.sets:
        steps = steps_of(name)
        restarts = restarts_for(NsSpec(steps, name), dtype)
        ratios = " | ".join(f"{flop_ratio(name, steps, a, restarts):.2f}" for a in (2, 4, 8))
        picks = "gram" if use_gram((64, 128), NsSpec(steps, name), dtype) else "plain"
        print(f"| {name} | {restarts} | {ratios} | {picks} |")


def seconds(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


HALF_KINDS = ("random", "rank1", "cond1e6", "lowrank_noise", "tiny", "zero")
HALF_SCHEDULES = [(2,), (1, 2), (1, 3), (2, 3), (2, 4), (1, 2, 3), (1, 2, 4), (1, 3, 4)]
HALF_SCHEDULES_10 = [(1, 3, 5, 7, 9), (1, 3, 5, 7), (2, 4, 6, 8), (1, 2, 4, 6, 8), (1, 2, 5, 8), (1, 2, 3, 5, 7)]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def half(args: argparse.Namespace, _dtype: torch.dtype) -> None:
    """bf16 and fp16 (float32 inputs, ``ns_dtype``): the plain iteration against the Gram recursion in the same
    dtype with its default 16-bit restarts (local_gram="always"), both against the plain iteration in float64 on
    the same input; FLOPs counted with those restarts; time (median) where the dtype has a fast matmul here (bf16
    on a CPU with native bf16, both on CUDA; ``--half-time all`` times every dtype)."""
    k, device = args.half_k, torch.device(args.device)
    native = device.type == "cuda" or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    print(f"torch {torch.__version__}; device {device}; {torch.get_num_threads()} threads; native bf16 matmul: {native}; "
          f"k = {k}; error = max |O - O_float64|; time: median of {args.repeats} runs")
    print("| dtype | coefficients (restarts) | aspect | input | plain error | Gram error | Gram / plain error "
          "| Gram / plain FLOPs | plain ms | Gram ms | Gram / plain time |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for ns_dtype in ("bf16", "fp16"):
        timed = args.half_time == "all" or device.type == "cuda" or (ns_dtype == "bf16" and native)
        for name in args.sets:
            steps = steps_of(name)
            plain_ns = NsSpec(steps, name, local_gram="never", ns_dtype=ns_dtype)
            gram_ns = NsSpec(steps, name, local_gram="always", ns_dtype=ns_dtype)
            restarts = restarts_for(gram_ns, torch.float32)
            for aspect in args.aspects:
                timing = None
                for kind in HALF_KINDS:
                    x = battery.make(battery.Case(kind, k, aspect), torch.float32)
                    ref = battery.reference(x, name, steps)
                    x = x.to(device)
                    plain = battery.max_error(local_newton_schulz(x, plain_ns).cpu(), ref)
                    gram = battery.max_error(local_newton_schulz(x, gram_ns).cpu(), ref)
                    cells = "| |"
                    if timing is None and timed:  # once per shape: the time does not depend on the input
                        def timer(ns):
                            def call():
                                local_newton_schulz(x, ns)
                                _synchronize(device)
                            return call
                        timing = (seconds(timer(plain_ns), args.repeats), seconds(timer(gram_ns), args.repeats))
                        cells = f"{timing[0] * 1e3:.2f} | {timing[1] * 1e3:.2f} | {timing[1] / timing[0]:.2f}"
                    ratio = f"{gram / plain:.2f}" if plain > 0 else ("0 = 0" if gram == 0 else "inf")
                    print(f"| {ns_dtype} | {name} {restarts} | {aspect} | {kind} | {plain:.1e} | {gram:.1e} | {ratio} | "
                          f"{flop_ratio(name, steps, aspect, restarts, k):.2f} | {cells} |", flush=True)


def half_search(args: argparse.Namespace, _dtype: torch.dtype) -> None:
    """16-bit restart schedules: worst Gram / plain error (same dtype) over the battery, per set and dtype."""
    kinds = args.kinds or tuple(kind for kind in battery.KINDS_FLOAT32 if kind != "zero")
    for ns_dtype in ("bf16", "fp16"):
        for name in args.sets:
            steps = steps_of(name)
            schedules = HALF_SCHEDULES if steps == 5 else HALF_SCHEDULES_10
            worst = {s: (0.0, "") for s in schedules}
            for case in battery.cases(kinds, args.ks, args.aspects, args.seeds):
                x = battery.make(case, torch.float32)
                ref = battery.reference(x, name, steps)
                plain = battery.max_error(local_newton_schulz(x, NsSpec(steps, name, local_gram="never", ns_dtype=ns_dtype)), ref)
                for s in schedules:
                    ns = NsSpec(steps, name, gram_restarts=s, local_gram="always", ns_dtype=ns_dtype)
                    ratio = battery.max_error(local_newton_schulz(x, ns), ref) / plain
                    ratio = ratio if ratio == ratio else float("inf")
                    if ratio > worst[s][0]:
                        worst[s] = (ratio, str(case))
            default = restarts_for(NsSpec(steps, name, ns_dtype=ns_dtype), torch.float32)
            print(f"{ns_dtype} {name} (default {default}): restarts, worst Gram / plain error, Gram / plain FLOPs at aspect 4")
            for s in sorted(schedules, key=lambda s: worst[s][0]):
                print(f"  {str(s):>16}  {worst[s][0]:8.2f}  at {worst[s][1]:<24} {flop_ratio(name, steps, 4, s):.2f}", flush=True)


def search(args: argparse.Namespace, dtype: torch.dtype) -> None:
    """Worst score over the battery of every restart schedule (5 steps: all 16; deepseekv4: a selection)."""
    floor = FLOOR[dtype]
    for name in args.sets:
        steps = steps_of(name)
        if steps <= 6:
            schedules = [s for r in range(steps) for s in itertools.combinations(range(1, steps), r)]
        else:
            schedules = [(), (2, 5, 8), (3, 6), (3, 6, 9), (2, 4, 6, 8), (1, 4, 7), (1, 3, 5, 7), (1, 2, 4, 7), (1, 2, 5, 8)]
        worst = {s: (0.0, "") for s in schedules}
        kinds = args.kinds or (battery.KINDS_FLOAT32 if dtype == torch.float32 else battery.KINDS_FLOAT64)
        for case in battery.cases(kinds, args.ks, args.aspects, args.seeds):
            plain, gram = errors(case, name, steps, dtype, list(schedules))
            for s, g in zip(schedules, gram):
                value = score(plain, g, floor) if plain or g else 0.0
                if value > worst[s][0]:
                    worst[s] = (value, str(case))
        print(f"{name}: restarts, worst score over the battery (<= 1 passes), Gram / plain FLOPs at aspect 4")
        for s in sorted(schedules, key=lambda s: worst[s][0]):
            print(f"  {str(s):>14}  {worst[s][0]:6.2f}  at {worst[s][1]:<24} {flop_ratio(name, steps, 4, s):.2f}", flush=True)


KspaceVariant = tuple[torch.dtype, torch.dtype, tuple[int, ...] | None, str]
"""(dtype of R and Z, dtype of Q, steps before which R = Q R_0 Q^T in float32 (None: every step; (): never,
R <- P R P in R's dtype), the final Q X: "bf16" (Q rounded to bf16) or "split" (hi X + lo X, both bf16))."""
KSPACE_VARIANTS: dict[str, KspaceVariant] = {
    "a: R,Z f32, Q bf16, refresh every step, QX bf16": (torch.float32, torch.bfloat16, None, "bf16"),
    "a: R,Z,Q f32, refresh every step, QX bf16": (torch.float32, torch.float32, None, "bf16"),
    "a: R,Z,Q bf16, refresh every step, QX bf16": (torch.bfloat16, torch.bfloat16, None, "bf16"),
    "a: R,Z,Q bf16, refresh at 1,3, QX bf16": (torch.bfloat16, torch.bfloat16, (1, 3), "bf16"),
    "b: k-space f32 (P R P), QX bf16": (torch.float32, torch.float32, (), "bf16"),
    "b: k-space f32 (P R P), QX hi+lo": (torch.float32, torch.float32, (), "split"),
    "b: k-space f32 (refresh every step), QX hi+lo": (torch.float32, torch.float32, None, "split"),
    "R,Z bf16, Q f32, refresh every step, QX hi+lo": (torch.bfloat16, torch.float32, None, "split"),
}


def kspace_newton_schulz(x: torch.Tensor, coefficients, variant: KspaceVariant) -> torch.Tensor:
    """Gram Newton-Schulz of x (k x n, k <= n, float32) with k-space restarts, as :data:`KspaceVariant` says."""
    from dist_ortho.math.iteration import scale_to_unit, sum_of_squares

    zdtype, qdtype, refresh, final = variant
    X = scale_to_unit(x, sum_of_squares(x), 1e-300).to(torch.bfloat16)
    wide = X.float()
    R0 = wide @ wide.T  # bf16 products are exact in float32: only the accumulation rounds
    R = R0.to(zdtype)
    Q = None
    steps = len(coefficients)
    for step, (a, b, c) in enumerate(coefficients):
        if step > 0 and (refresh is None or step in refresh):
            Qw = Q.float()
            R = (Qw @ R0 @ Qw.T).to(zdtype)
        Z = torch.addmm(R, R, R, beta=b, alpha=c) if c != 0 else b * R
        if Q is None:
            Q = Z.to(qdtype, copy=True)  # Z is read again below
            Q.diagonal().add_(a)
        else:
            Q = torch.addmm(Q, Z.to(qdtype), Q, beta=a)
        if step + 1 < steps and not (refresh is None or step + 1 in refresh):
            W = torch.addmm(R, Z, R, beta=a)
            R = torch.addmm(W, W, Z, beta=a)
    hi = Q.to(torch.bfloat16)
    if final == "bf16":
        return (hi @ X).float()
    lo = (Q.float() - hi.float()).to(torch.bfloat16)
    return (hi @ X).float() + (lo @ X).float()


def kspace(args: argparse.Namespace, _dtype: torch.dtype) -> None:
    """The k-space restart variants against the plain bf16 iteration (and the library's bf16 Gram)."""
    from torch.utils.flop_counter import FlopCounterMode

    kinds = args.kinds or battery.KINDS_FLOAT32
    labels = [*KSPACE_VARIANTS, "library Gram bf16 (X-space restarts)"]
    print(f"torch {torch.__version__}; {torch.get_num_threads()} threads; bf16; k in {args.ks}, aspects {args.aspects}, "
          f"inputs {kinds}; worst max |O - O_float64| / the plain bf16 iteration's; zero: exactly zero or not")
    worst = {}
    for name in args.sets:
        steps = steps_of(name)
        coefficients = NsSpec(steps, name).coefficients
        plain_ns = NsSpec(steps, name, local_gram="never", ns_dtype="bf16")
        library_ns = NsSpec(steps, name, local_gram="always", ns_dtype="bf16")
        for label in labels:
            worst[name, label] = (0.0, "")
        for case in battery.cases(kinds, args.ks, args.aspects, args.seeds):
            x = battery.make(case, torch.float32)
            ref = battery.reference(x, name, steps)
            e_plain = battery.max_error(local_newton_schulz(x, plain_ns), ref)
            outs = {label: kspace_newton_schulz(x, coefficients, v) for label, v in KSPACE_VARIANTS.items()}
            outs[labels[-1]] = local_newton_schulz(x, library_ns)
            for label, out in outs.items():
                if case.kind == "zero":
                    ratio = 0.0 if torch.equal(out, torch.zeros_like(out)) else float("inf")
                else:
                    ratio = battery.max_error(out, ref) / e_plain
                    ratio = ratio if ratio == ratio else float("inf")
                if ratio > worst[name, label][0]:
                    worst[name, label] = (ratio, f"{case} (plain {e_plain:.1e})")
        print(f"{name}: " + "; ".join(f"{label} {worst[name, label][0]:.3g} at {worst[name, label][1]}" for label in labels),
              flush=True)
    print()
    print("| variant | " + " | ".join(args.sets) + " |")
    print("|---|" + "---|" * len(args.sets))
    for label in labels:
        print(f"| {label} | " + " | ".join(f"{worst[name, label][0]:.3g}" for name in args.sets) + " |")
    k, name = args.half_k, "quintic"
    coefficients = NsSpec(5, name).coefficients
    x = battery.make(battery.Case("random", k, 4), torch.float32)
    calls = {"plain bf16": lambda: local_newton_schulz(x, NsSpec(5, name, local_gram="never", ns_dtype="bf16")),
             labels[-1]: lambda: local_newton_schulz(x, NsSpec(5, name, local_gram="always", ns_dtype="bf16"))}
    calls.update({label: (lambda v=v: kspace_newton_schulz(x, coefficients, v)) for label, v in KSPACE_VARIANTS.items()})
    flops = {}
    for label, call in calls.items():
        call()
        with FlopCounterMode(display=False) as counter:
            call()
        flops[label] = counter.get_total_flops()
    times = {label: [] for label in calls}
    for _ in range(args.repeats):  # interleaved: the machine's load falls on every variant alike
        for label, call in calls.items():
            start = time.perf_counter()
            call()
            times[label].append(time.perf_counter() - start)
    base = statistics.median(times["plain bf16"])
    print()
    print(f"quintic, {k} x {4 * k} (aspect 4), median of {args.repeats} interleaved runs")
    print("| variant | FLOPs / plain bf16 | ms | time / plain bf16 |")
    print("|---|---|---|---|")
    for label in calls:
        median = statistics.median(times[label])
        print(f"| {label} | {flops[label] / flops['plain bf16']:.3f} | {median * 1e3:.2f} | {median / base:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ks", default="4,6,8,16,64,256", help="k values (rows of the k x aspect k inputs)")
    parser.add_argument("--aspects", default="2,4,8")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--kinds", default="", help="battery inputs (tests/gram_battery.py), default all")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--search", action="store_true", help="every restart schedule instead of the default rule")
    parser.add_argument("--half", action="store_true", help="bf16 and fp16 rows: plain against Gram, error and time")
    parser.add_argument("--kspace", action="store_true", help="bf16 with k-space restarts: error, FLOPs, time")
    parser.add_argument("--half-k", type=int, default=256)
    parser.add_argument("--half-time", choices=["native", "all"], default="native",
                        help="time bf16 only where it has a native matmul (CPU), or every dtype")
    parser.add_argument("--device", default="cpu", help="--half: the device (cpu, cuda)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None, help="the default table's rows (worst input per set and kind) here")
    args = parser.parse_args()
    args.ks = tuple(int(v) for v in args.ks.split(","))
    args.aspects = tuple(int(v) for v in args.aspects.split(","))
    args.sets = args.sets.split(",")
    args.kinds = tuple(args.kinds.split(",")) if args.kinds else ()
    dtype = getattr(torch, args.dtype)
    with matmul_precision("highest"):
        if args.kspace:
            kspace(args, dtype)
        elif args.half:
            (half_search if args.search else half)(args, dtype)
        else:
            (search if args.search else table)(args, dtype)


if __name__ == "__main__":
    main()
