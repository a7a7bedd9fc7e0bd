"""Benchmark one Muon optimizer step on a GPT-like parameter set, per tp_mode, at TP = 1, 2, 4 on gloo.

    python scripts/bench_optimizer_step.py [--worlds 1 2 4] [--repeats 5] [--json out.json]

Parameter set: hidden 256, FFN 1024, 8 heads in 2 query groups (fused QKV, split into Q, K, V), 4
layers of QKV (384 x 256, rows sharded), proj (256 x 256, columns), fc1 (1024 x 256, rows), fc2
(256 x 1024, columns). Configurations: the anchors' ways, one set of collectives per matrix
("duplicated/per-matrix", "distributed/per-matrix"), and dist_ortho's coalesced modes. Per rank:
collectives in one step, bytes sent, FLOPs (torch.utils.flop_counter), median step time over
--repeats steps with the configurations interleaved in every repeat; home mode's extra memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics

import torch
import torch.distributed as dist
from bench_common import run_worlds, time_interleaved
from torch.utils.flop_counter import FlopCounterMode

from dist_ortho import Muon, count_collectives
from dist_ortho.math.coefficients import get_coefficients
from dist_ortho.parameters.qkv import qkv_split_shapes
from dist_ortho.tp import NsSpec
from dist_ortho.tp.home import home_extra_bytes
from dist_ortho.tp.local import plain_flops

# (label, tp_mode, coalesce, extra optimizer options). The anchors' ways run the plain iteration, one
# matrix at a time; "home/plain" is home without the one-device Gram recursion and without batching.
PLAIN = {"local_gram": "never", "batch_matrices": False}
CONFIGS = [
    ("duplicated/per-matrix", "duplicated", False, PLAIN),
    ("distributed/per-matrix", "distributed", False, PLAIN),
    ("duplicated", "duplicated", True, {}),
    ("distributed", "distributed", True, {}),
    ("gram", "gram", True, {}),
    ("home/plain", "home", True, PLAIN),
    ("home", "home", True, {}),
    ("auto", "auto", True, {}),
]
HIDDEN, FFN, HEADS, GROUPS, LAYERS = 256, 1024, 8, 2, 4


def parameter_set() -> list[tuple[str, tuple[int, int], int]]:
    split = qkv_split_shapes(HEADS, GROUPS, HIDDEN // HEADS)
    out = []
    for layer in range(LAYERS):
        out += [
            (f"layers.{layer}.linear_qkv.weight", (GROUPS * sum(split), HIDDEN), 0),
            (f"layers.{layer}.linear_proj.weight", (HIDDEN, HIDDEN), 1),
            (f"layers.{layer}.fc1.weight", (FFN, HIDDEN), 0),
            (f"layers.{layer}.fc2.weight", (HIDDEN, FFN), 1),
        ]
    return out


def _params(rank: int, world: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    split = qkv_split_shapes(HEADS, GROUPS, HIDDEN // HEADS)
    params = []
    for name, shape, pd in parameter_set():
        full, grad = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
        p = torch.nn.Parameter(torch.tensor_split(full, world, dim=pd)[rank].clone())
        p.grad = torch.tensor_split(grad, world, dim=pd)[rank].clone()
        p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, pd, 1
        if "qkv" in name:
            p.is_qkv, p.qkv_split_shapes = True, split
        params.append(p)
    return params


def matrices() -> list[tuple[int, int]]:
    """Global shapes of the orthogonalized matrices (fused QKV split into Q, K, V)."""
    split = qkv_split_shapes(HEADS, GROUPS, HIDDEN // HEADS)
    shapes = []
    for name, shape, _ in parameter_set():
        shapes += [(GROUPS * s, HIDDEN) for s in split] if "qkv" in name else [shape]
    return shapes


def _ns_float64(g: torch.Tensor) -> torch.Tensor:
    X = g.double() / g.double().norm()
    transpose = X.size(0) > X.size(1)
    X = X.mT if transpose else X
    for a, b, c in get_coefficients("quintic", 5):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if transpose else X


def _update_error(rank: int, world: int, mode: str, coalesce: bool, options: dict, precision: str) -> float:
    """Max |U - U_64| / max |U_64| of one step's orthogonalized update, against float64 Newton-Schulz of the
    gathered gradient (Q, K, V apart), on this rank's blocks."""
    params = _params(rank, world)
    before = [p.detach().clone() for p in params]
    grads = [p.grad.clone() for p in params]
    Muon(params, lr=1.0, momentum=0.0, weight_decay=0.0, scale_mode="shape_scaling", tp_group=dist.group.WORLD,
         tp_mode=mode, coalesce=coalesce, fp32_matmul_prec=precision, **options).step()
    split = qkv_split_shapes(HEADS, GROUPS, HIDDEN // HEADS)
    worst = 0.0
    for (name, shape, pd), p, w0, g in zip(parameter_set(), params, before, grads):
        parts = [torch.empty_like(g) for _ in range(world)]
        dist.all_gather(parts, g.contiguous())
        full = torch.cat(parts, dim=pd)
        if "qkv" in name:
            groups = full.reshape(GROUPS, sum(split), -1).split(split, dim=1)
            outs = [_ns_float64(c.reshape(-1, full.size(1))) * max(1, c.numel() / full.size(1) / full.size(1)) ** 0.5
                    for c in groups]
            ref = torch.cat([o.reshape(GROUPS, s, -1) for o, s in zip(outs, split)], dim=1).reshape(full.shape)
        else:
            ref = _ns_float64(full) * max(1.0, full.size(0) / full.size(1)) ** 0.5
        ref = torch.tensor_split(ref, world, dim=pd)[rank]
        update = (w0 - p.detach()).double()
        worst = max(worst, ((update - ref).abs().max() / ref.abs().max()).item())
    return worst


def _measure(rank: int, world: int, port: int, args: argparse.Namespace, out: dict) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    optimizers, errors = {}, {}
    for label, mode, coalesce, options in CONFIGS:
        errors[label] = _update_error(rank, world, mode, coalesce, options, args.precision)
        params = _params(rank, world)
        named = list(zip((name for name, _, _ in parameter_set()), params))
        opt = Muon(named, lr=1e-3, tp_group=dist.group.WORLD, tp_mode=mode, coalesce=coalesce,
                   fp32_matmul_prec=args.precision, **options)
        opt.step()  # finds the layouts (one all-gather of shapes) and warms up
        optimizers[label] = opt
    stats = {}
    for label, opt in optimizers.items():
        with count_collectives() as comm, FlopCounterMode(display=False) as flops:
            opt.step()
        stats[label] = {"collectives": comm.total_calls, "calls": dict(comm.calls), "bytes": comm.bytes_sent,
                        "flops": flops.get_total_flops(), "times": []}
    for label, times in time_interleaved({k: opt.step for k, opt in optimizers.items()}, args.repeats).items():
        stats[label]["times"] = times
    flops_all = [None] * world
    dist.all_gather_object(flops_all, {k: v["flops"] for k, v in stats.items()})
    errors_all = [None] * world
    dist.all_gather_object(errors_all, errors)
    if rank == 0:
        plan = optimizers["auto"].tp_plan() if world > 1 else ""
        out["rows"] = [
            {"world": world, "config": label, "collectives": s["collectives"], "calls": s["calls"],
             "bytes_sent_per_rank": s["bytes"], "flops_per_rank_max": max(f[label] for f in flops_all),
             "flops_total": sum(f[label] for f in flops_all), "median_ms": 1e3 * statistics.median(s["times"]),
             "max_rel_error_vs_float64": max(e[label] for e in errors_all)}
            for label, s in stats.items()
        ]
        out["plan"] = plan
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--precision", default="highest", choices=["highest", "high", "medium"])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    outs = run_worlds(_measure, args.worlds, args)
    rows = [row for out in outs.values() for row in out["rows"]]
    plans = {world: out["plan"] for world, out in outs.items()}

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, gloo; "
          f"fp32_matmul_prec={args.precision}; {len(parameter_set())} weights (QKV split into Q, K, V: "
          f"{len(parameter_set()) + 2 * LAYERS} matrices); median of {args.repeats} steps")
    shapes = matrices()
    plain_total = sum(plain_flops(s, NsSpec(5, "quintic")) for s in shapes)
    print(f"plain iteration, all matrices: {plain_total / 1e9:.2f} GFLOP (total / TP is the floor of exact "
          "modes that run it)")
    print("| TP | configuration | collectives / step | bytes sent / rank | NS GFLOP / rank (max) | vs plain total / TP "
          "| GFLOP all ranks | max rel. error vs float64 | median step ms | vs duplicated/per-matrix "
          "| vs distributed/per-matrix |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        base = {c["config"]: c["median_ms"] for c in rows if c["world"] == r["world"]}
        print(f"| {r['world']} | {r['config']} | {r['collectives']} | {r['bytes_sent_per_rank']:,} | "
              f"{r['flops_per_rank_max'] / 1e9:.2f} | {r['flops_per_rank_max'] / (plain_total / r['world']):.2f} | "
              f"{r['flops_total'] / 1e9:.2f} | {r['max_rel_error_vs_float64']:.1e} | {r['median_ms']:.0f} | "
              f"{base['duplicated/per-matrix'] / r['median_ms']:.2f}x | {base['distributed/per-matrix'] / r['median_ms']:.2f}x |")
    for world in args.worlds:
        if world > 1:
            extra = home_extra_bytes(shapes, world, 4)
            print(f"\nhome mode at TP={world}: extra memory per rank (whole matrices held as home), "
                  f"max {max(extra) / 2**20:.2f} MiB, min {min(extra) / 2**20:.2f} MiB")
    for world, plan in plans.items():
        if plan:
            print(f"\nauto plan at TP={world} (predicted ms per mode):\n{plan}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "plans": plans}, f, indent=1)


if __name__ == "__main__":
    main()
