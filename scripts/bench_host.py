"""The optimizer step's host cost per matrix: many small matrices, one process and TP 2.

    python scripts/bench_host.py [--repeats 7] [--sections single tp2 host experts] [--device cpu|cuda] [--json out.json]

Run it in .venv-next to include emerging_optimizers' Muon (it needs Python >= 3.12); elsewhere that column is
"-". Every optimizer runs Newton-Schulz in float32 at "highest" (5 quintic steps), one thread per process,
and the optimizers are timed interleaved, median over ``--repeats`` steps (after 2 warm-up steps).

Sections:
- single: one process, 2,048 matrices of 8 x 8, 2,048 of 32 x 32, 256 of 128 x 128: dist_ortho's Muon,
  emerging_optimizers' Muon, torch.optim.Muon (its own coefficients: the same work), and the floor: the
  momentum and one stacked Newton-Schulz of all matrices, nothing else.
- tp2: TP 2 on gloo, 1,024 matrices of 16 x 16 sharded by rows: dist_ortho's Muon in every exact mode, the
  anchors' way (momentum and newton_schulz_tp per matrix, duplicated: one all-gather each), and the floor:
  momentum, one all-gather of all shards, one batched Newton-Schulz.
- host: the step's host time alone: 4 x 4 matrices (no work to speak of) in 1, 8 and 64 shapes of 64 to
  4,096 matrices, and the planner's host model (dist_ortho.plan) fitted to it: per matrix, the slope over the
  matrix count of one group; per group, the slope over the group count at 64 matrices; per step, what is left.
- experts: Qwen3-30B-A3B's expert weights at TP 1 (48 layers x 128 experts x gate, up, down = 18,432
  matrices), as 2D weights (Megatron's SequentialMLP / TE GroupedLinear) and as 3D weights [128, out, in]
  (torchtitan's GroupedExperts): the real shapes (768 x 2048, 2048 x 768) for as many layers as fit
  ``--memory-gib`` (CUDA only), and all 18,432 at 1/16 of each dim (the host time at the full count).
On CUDA (``--device cuda``) every dist_ortho step is also timed captured in a CUDA graph (capturable=True,
replayed): the host time that capture removes.
Times are microseconds per matrix per step (per rank at TP 2).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from bench_common import run_worlds, time_interleaved

from dist_ortho import Muon, newton_schulz_tp
from dist_ortho.math.coefficients import get_coefficients
from dist_ortho.math.iteration import orthogonalize
from dist_ortho.tp.jobs import gather_shards

try:
    from emerging_optimizers.orthogonalized_optimizers import Muon as EOMuon
except ImportError:  # Python < 3.12: not installable
    EOMuon = None

SINGLE = [(2048, 8), (2048, 32), (256, 128)]
TP_MATRICES, TP_SIZE = 1024, 16
QUINTIC = get_coefficients("quintic", 5)


def _matrices(n: int, size: int, device: str, seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for _ in range(n):
        p = torch.nn.Parameter(torch.randn(size, size, generator=gen).to(device))
        p.grad = torch.randn(size, size, generator=gen).to(device)
        params.append(p)
    return params


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(steps: dict[str, Callable[[], object]], repeats: int, device: str) -> dict[str, float]:
    """Median seconds per call of each function, interleaved over ``repeats`` rounds (2 warm-up calls each)."""
    for step in steps.values():
        step()
        step()
    times: dict[str, list[float]] = {label: [] for label in steps}
    for _ in range(repeats):
        for label, step in steps.items():
            _sync(device)
            began = time.perf_counter()
            step()
            _sync(device)
            times[label].append(time.perf_counter() - began)
    return {label: statistics.median(t) for label, t in times.items()}


def _floor_single(n: int, size: int, device: str) -> Callable[[], object]:
    gen = torch.Generator().manual_seed(1)
    momentum, grad = torch.zeros(n, size, size, device=device), torch.randn(n, size, size, generator=gen).to(device)

    def step() -> object:
        momentum.lerp_(grad, 0.05)
        return orthogonalize(momentum, QUINTIC)
    return step


def captured(params: list[torch.nn.Parameter], **options: object) -> Callable[[], object]:
    """A capturable dist_ortho Muon step over ``params`` captured in a CUDA graph: its replay."""
    opt = Muon(params, lr=1e-3, capturable=True, **options)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # plan, state and scratch buffers outside the graph
            opt.step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    return graph.replay


def single(repeats: int, device: str) -> list[dict]:
    rows = []
    for n, size in SINGLE:
        steps: dict[str, Callable[[], object]] = {}
        steps["dist_ortho"] = Muon(_matrices(n, size, device), lr=1e-3, fp32_matmul_prec="highest").step
        if device == "cuda":
            steps["dist_ortho, CUDA graph"] = captured(_matrices(n, size, device), fp32_matmul_prec="highest")
        if EOMuon is not None:
            steps["emerging_optimizers"] = EOMuon(_matrices(n, size, device), lr=1e-3, fp32_matmul_prec="highest").step
        steps["torch.optim.Muon"] = torch.optim.Muon(_matrices(n, size, device), lr=1e-3).step
        steps["floor"] = _floor_single(n, size, device)
        with torch.no_grad():
            for label, seconds in timed(steps, repeats, device).items():
                rows.append({"matrices": n, "shape": f"{size}x{size}", "optimizer": label, "us_per_matrix": 1e6 * seconds / n})
    return rows


def _tp2(rank: int, world: int, port: int, args: argparse.Namespace, out: dict) -> None:
    torch.set_num_threads(1)
    torch.set_float32_matmul_precision("highest")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    group = dist.group.WORLD

    def shards(seed: int) -> list[torch.nn.Parameter]:
        gen = torch.Generator().manual_seed(seed)
        params = []
        for _ in range(TP_MATRICES):
            full, grad = torch.randn(TP_SIZE, TP_SIZE, generator=gen), torch.randn(TP_SIZE, TP_SIZE, generator=gen)
            p = torch.nn.Parameter(full.tensor_split(world)[rank].clone())
            p.grad = grad.tensor_split(world)[rank].clone()
            p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, 0, 1
            params.append(p)
        return params

    steps: dict[str, Callable[[], object]] = {}
    for mode in ("duplicated", "distributed", "gram", "home", "auto"):
        steps[f"dist_ortho {mode}"] = Muon(shards(0), lr=1e-3, tp_group=group, tp_mode=mode, fp32_matmul_prec="highest").step
    anchor = shards(0)
    momenta = [torch.zeros_like(p) for p in anchor]

    @torch.no_grad()
    def per_matrix() -> None:  # the anchors' loop: one matrix at a time, one collective each
        for p, m in zip(anchor, momenta):
            m.lerp_(p.grad, 0.05)
            p.add_(newton_schulz_tp(m, 5, "quintic", group, 0, "duplicated", validate=False), alpha=-1e-3)

    steps["per-matrix newton_schulz_tp (anchors)"] = per_matrix
    local = torch.stack([p.grad for p in shards(0)])
    momentum = torch.zeros_like(local)

    def floor() -> None:
        momentum.lerp_(local, 0.05)
        full = gather_shards(momentum, 0, group, [TP_SIZE // world] * world)
        orthogonalize(full, QUINTIC)

    steps["floor"] = floor
    times = {label: statistics.median(t) for label, t in time_interleaved(steps, args.repeats).items()}
    if rank == 0:
        out["rows"] = [{"matrices": TP_MATRICES, "shape": f"{TP_SIZE}x{TP_SIZE} (rows sharded over 2)", "optimizer": k,
                        "us_per_matrix": 1e6 * v / TP_MATRICES} for k, v in times.items()]
    dist.destroy_process_group()


def host(repeats: int, device: str) -> dict:
    """Step seconds of 4 x 4 matrices over shapes and counts, and the least-squares host model."""
    samples = []
    for shapes in (1, 8, 64):
        for n in (64, 512, 4096):
            if n < shapes:
                continue
            gen = torch.Generator().manual_seed(0)
            params = []
            for i in range(n):
                rows = 4 + i % shapes  # distinct shapes: one group each
                p = torch.nn.Parameter(torch.randn(rows, 4, generator=gen).to(device))
                p.grad = torch.randn(rows, 4, generator=gen).to(device)
                params.append(p)
            opt = Muon(params, lr=1e-3, fp32_matmul_prec="highest")
            seconds = timed({"step": opt.step}, repeats, device)["step"]
            samples.append({"groups": shapes, "matrices": n, "seconds": seconds})
    def line(points: list[tuple[float, float]]) -> tuple[float, float]:  # least squares: (intercept, slope)
        x = torch.tensor([[1.0, u] for u, _ in points], dtype=torch.float64)
        y = torch.tensor([[v] for _, v in points], dtype=torch.float64)
        return tuple(torch.linalg.lstsq(x, y).solution.flatten().tolist())  # type: ignore[return-value]

    one_group = line([(s["matrices"], s["seconds"]) for s in samples if s["groups"] == 1])
    fewest = min(s["matrices"] for s in samples)
    by_groups = line([(s["groups"], s["seconds"] - s["matrices"] * one_group[1]) for s in samples if s["matrices"] == fewest])
    fit = [max(one_group[0] - by_groups[1], 0.0), by_groups[1], one_group[1]]
    return {"samples": samples, "per_step_us": 1e6 * fit[0], "per_group_us": 1e6 * fit[1], "per_matrix_us": 1e6 * fit[2]}


def _experts(layers: int, scale: int, stacked: bool, device: str, dtype: torch.dtype) -> list[torch.nn.Parameter]:
    """Qwen3-30B-A3B's expert weights of ``layers`` layers, each dim / ``scale``, as 2D or 3D (stacked) weights."""
    experts, hidden, ffn = 128, 2048 // scale, 768 // scale
    params = []
    for _ in range(layers):
        for out, inp in ((ffn, hidden), (ffn, hidden), (hidden, ffn)):  # gate, up, down
            if stacked:
                p = torch.nn.Parameter(torch.randn(experts, out, inp, device=device, dtype=dtype))
                p.expert_stack = True
                p.grad = torch.randn_like(p)
                params.append(p)
            else:
                for _ in range(experts):
                    p = torch.nn.Parameter(torch.randn(out, inp, device=device, dtype=dtype))
                    p.grad = torch.randn_like(p)
                    params.append(p)
    return params


def experts(repeats: int, device: str, memory_gib: float) -> list[dict]:
    """Per matrix and step: dist_ortho's Muon (fp32_matmul_prec "medium", Megatron's default) on the expert set."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    full_layers = 48
    element = 2 * 3 + 4 * 3  # bf16 weight, grad, momentum; float32 Newton-Schulz working copies
    real_layers = min(full_layers, int(memory_gib * 2**30 / (128 * 3 * 768 * 2048 * element))) if device == "cuda" else 0
    rows = []
    for label, layers, scale in (("real shapes", real_layers, 1), ("all 18,432 at 1/16 of each dim", full_layers, 16)):
        if layers == 0:
            continue
        for stacked in (False, True):
            steps: dict[str, Callable[[], object]] = {}
            steps["dist_ortho"] = Muon(_experts(layers, scale, stacked, device, dtype), lr=1e-3).step
            if device == "cuda":
                steps["dist_ortho, CUDA graph"] = captured(_experts(layers, scale, stacked, device, dtype))
            n = layers * 3 * 128
            for optimizer, seconds in timed(steps, repeats, device).items():
                rows.append({"matrices": n, "shape": f"experts {label}, {'3D' if stacked else '2D'} weights",
                             "optimizer": optimizer, "us_per_matrix": 1e6 * seconds / n, "step_ms": 1e3 * seconds})
            del steps
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sections", nargs="+", default=["single", "tp2", "host"],
                        choices=["single", "tp2", "host", "experts"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--memory-gib", type=float, default=60.0, help="experts on CUDA: memory for the real shapes")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_float32_matmul_precision("highest")
    report: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU capability "
                               f"{torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}",
                    "device": args.device, "rows": []}
    print(f"machine: {report['machine']}; float32 highest, 5 quintic steps, median of {args.repeats} steps")
    if "single" in args.sections:
        report["rows"] += single(args.repeats, args.device)
    if "tp2" in args.sections:
        report["rows"] += run_worlds(_tp2, [2], args)[2]["rows"]
    if "experts" in args.sections:
        report["experts"] = experts(args.repeats, args.device, args.memory_gib)
        print("| matrices | expert set | optimizer | us per matrix per step | step ms |\n|---|---|---|---|---|")
        for row in report["experts"]:
            print(f"| {row['matrices']:,} | {row['shape']} | {row['optimizer']} | {row['us_per_matrix']:.2f} | "
                  f"{row['step_ms']:.1f} |")
    if report["rows"]:
        print("| matrices | shape | optimizer | us per matrix per step | vs floor |")
        print("|---|---|---|---|---|")
        for row in report["rows"]:
            floor = next(r["us_per_matrix"] for r in report["rows"] if r["shape"] == row["shape"] and r["optimizer"] == "floor")
            print(f"| {row['matrices']:,} | {row['shape']} | {row['optimizer']} | {row['us_per_matrix']:.1f} | "
                  f"{row['us_per_matrix'] / floor:.2f}x |")
        if EOMuon is None:
            print("(emerging_optimizers is not installed here: run in .venv-next for its column)")
    if "host" in args.sections:
        report["host"] = host(args.repeats, args.device)
        h = report["host"]
        print(f"\nhost model (4 x 4 matrices, {len(h['samples'])} runs): "
              f"{h['per_step_us']:.0f} us per step + {h['per_group_us']:.1f} us per group + "
              f"{h['per_matrix_us']:.2f} us per matrix")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
