"""Benchmark newton_schulz_tp per mode: collectives, bytes sent and FLOPs per rank, median wall time.

    python scripts/bench_ns.py [--worlds 1 2 4] [--shapes 1024x1024 4096x1024 1024x4096] [--json out.json]

Each world size runs in its own gloo process group (torch.multiprocessing, CPU). Counts come from
dist_ortho.count_collectives (per call, per rank, without the optional shape check) and FLOPs from
torch.utils.flop_counter.FlopCounterMode; times are medians over --repeats calls with the modes
interleaved within each repeat, so that machine noise hits every mode alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
import torch.distributed as dist
from bench_common import run_worlds
from torch.utils.flop_counter import FlopCounterMode

from dist_ortho import TP_MODES, count_collectives, newton_schulz_tp
from dist_ortho.tp import shard

EXACT_MODES = [m for m in TP_MODES if m != "blockwise"]


def _measure(rank: int, world: int, port: int, args: argparse.Namespace, out: dict) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_float32_matmul_precision(args.precision)
    rows = []
    for shape in args.shapes:
        full = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
        for partition_dim in (0, 1):
            local = shard(full, partition_dim, rank, world)

            def call(mode: str) -> torch.Tensor:
                return newton_schulz_tp(
                    local, args.steps, args.coefficient_type, dist.group.WORLD, partition_dim, mode, validate=False
                )

            stats = {}
            for mode in EXACT_MODES:
                with count_collectives() as comm, FlopCounterMode(display=False) as flops:
                    call(mode)
                stats[mode] = {"collectives": comm.total_calls, "bytes": comm.bytes_sent, "flops": flops.get_total_flops()}
                stats[mode]["times"] = []
            for _ in range(args.repeats):
                for mode in EXACT_MODES:
                    dist.barrier()
                    start = time.perf_counter()
                    call(mode)
                    stats[mode]["times"].append(time.perf_counter() - start)
            for mode, s in stats.items():
                rows.append(
                    {
                        "world": world, "shape": list(shape), "partition_dim": partition_dim, "mode": mode,
                        "collectives": s["collectives"], "bytes_sent_per_rank": s["bytes"],
                        "flops_per_rank": s["flops"], "median_ms": 1e3 * statistics.median(s["times"]),
                    }
                )
    if rank == 0:
        out["rows"] = rows
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--shapes", nargs="+", default=["512x512", "1024x256", "256x1024"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--coefficient-type", default="quintic")
    parser.add_argument("--precision", default="highest", choices=["highest", "high", "medium"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args()
    args.shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]

    rows = [row for out in run_worlds(_measure, args.worlds, args).values() for row in out["rows"]]

    baseline = {
        (r["world"], tuple(r["shape"]), r["partition_dim"]): r["median_ms"] for r in rows if r["mode"] == "duplicated"
    }
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, gloo, "
          f"{args.steps} steps {args.coefficient_type}, precision {args.precision}")
    print("| TP | shape | partition_dim | mode | collectives | bytes sent / rank | GFLOP / rank | median ms | vs duplicated |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        key = (r["world"], tuple(r["shape"]), r["partition_dim"])
        print(
            f"| {r['world']} | {r['shape'][0]}x{r['shape'][1]} | {r['partition_dim']} | {r['mode']} | {r['collectives']} | "
            f"{r['bytes_sent_per_rank']:,} | {r['flops_per_rank'] / 1e9:.3f} | {r['median_ms']:.1f} | "
            f"{baseline[key] / r['median_ms']:.2f}x |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items()}, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
