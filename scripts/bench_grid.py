"""Benchmark the DP x TP grid: one Muon step on the GPT-like set of bench_optimizer_step.py.

    python scripts/bench_grid.py [--layouts 2x2 4x1 2x4] [--repeats 5] [--json out.json]

Layouts DP x TP on gloo (world = DP x TP processes on this machine's cores). Configurations, all with
DP-averaged gradients (the same on every replica):
- replicated: no dp_group; every DP replica orthogonalizes everything (best TP mode: home);
- layer-wise: dp_group with tp_mode="duplicated", Megatron's LayerWiseDistributedOptimizer way (owners by
  DP rank, the whole TP group repeats each owned matrix's Newton-Schulz);
- grid: dp_group with tp_mode="home" (each matrix once in the grid);
- grid fsdp2: the same weights as DTensors sharded FSDP2's way over DP (and Shard over TP) on a (dp, tp)
  mesh, device_mesh= with home mode: DP pieces all-to-all'd to the owner and back.
Per rank: Newton-Schulz FLOPs (max over ranks, and over total / world), optimizer-state bytes, collectives
and bytes sent per step; median step time with the configurations interleaved.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
import torch.distributed as dist
from bench_common import run_worlds, time_interleaved
from bench_optimizer_step import GROUPS, HEADS, HIDDEN, _params, matrices, parameter_set
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.placement_types import _StridedShard
from torch.utils.flop_counter import FlopCounterMode

from dist_ortho import Muon, count_collectives
from dist_ortho.parameters.dtensor import piece_of
from dist_ortho.parameters.qkv import qkv_split_shapes
from dist_ortho.tp import NsSpec
from dist_ortho.tp.local import gram_flops, plain_flops, use_gram

CONFIGS = [("replicated", "home", False), ("layer-wise", "duplicated", True), ("grid", "home", True),
           ("grid fsdp2", "home", "dtensor")]


def _as_dtensor(t: torch.Tensor, mesh, placements) -> DTensor:
    return DTensor.from_local(piece_of(t, mesh, placements).clone(), mesh, placements, shape=t.shape, stride=t.stride())


def _dtensor_params(mesh, tp: int) -> list[torch.nn.Parameter]:
    """bench_optimizer_step's weights and gradients as FSDP2 + TP DTensors on ``mesh``."""
    gen = torch.Generator().manual_seed(0)
    params = []
    for name, shape, pd in parameter_set():
        full, grad = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
        dp = _StridedShard(0, split_factor=tp) if pd == 0 and tp > 1 else Shard(0)
        placements = (dp, Shard(pd)) if tp > 1 else (dp,)
        p = torch.nn.Parameter(_as_dtensor(full, mesh, placements))
        p.grad = _as_dtensor(grad, mesh, placements)
        if "qkv" in name:
            p.is_qkv, p.qkv_split_shapes = True, qkv_split_shapes(HEADS, GROUPS, HIDDEN // HEADS)
        params.append(p)
    return params


def _measure(rank: int, world: int, port: int, args: argparse.Namespace, out: dict) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    tp = args.tp[world]
    tp_all = [dist.new_group(list(range(s, s + tp))) for s in range(0, world, tp)]
    dp_all = [dist.new_group(list(range(t, world, tp))) for t in range(tp)]
    tp_group, dp_group = tp_all[rank // tp], dp_all[rank % tp]
    optimizers = {}
    mesh = (init_device_mesh("cpu", (world // tp, tp), mesh_dim_names=("dp", "tp")) if tp > 1
            else init_device_mesh("cpu", (world,), mesh_dim_names=("dp",)))
    for label, mode, grid in CONFIGS:
        if grid == "dtensor":
            opt = Muon(_dtensor_params(mesh, tp), lr=1e-3, device_mesh=mesh, tp_mode=mode, fp32_matmul_prec="highest")
        else:
            params = _params(rank % tp, tp)
            opt = Muon(params, lr=1e-3, tp_group=tp_group, dp_group=dp_group if grid else None, tp_mode=mode,
                       fp32_matmul_prec="highest")
        opt.step()
        optimizers[label] = (opt, None)
    stats = {}
    for label, (opt, _) in optimizers.items():
        with count_collectives() as calls, FlopCounterMode(display=False) as flops:
            opt.step()
        state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
        stats[label] = {"calls": calls.total_calls, "bytes": calls.bytes_sent, "flops": flops.get_total_flops(),
                        "state": state, "times": []}
    for label, times in time_interleaved({k: opt.step for k, (opt, _) in optimizers.items()}, args.repeats).items():
        stats[label]["times"] = times
    everything = [None] * world
    dist.all_gather_object(everything, {k: {**v, "times": None} for k, v in stats.items()})
    if rank == 0:
        out["rows"] = [{"layout": f"DP {world // tp} x TP {tp}", "world": world, "config": label,
                        "calls": stats[label]["calls"], "bytes": max(e[label]["bytes"] for e in everything),
                        "flops": max(e[label]["flops"] for e in everything),
                        "state": max(e[label]["state"] for e in everything),
                        "ms": 1e3 * statistics.median(stats[label]["times"])} for label, _, _ in CONFIGS]
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", nargs="+", default=["2x2", "4x1", "2x4"], help="DPxTP")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None, help="also write the rows here (scripts/check_plan.py reads them)")
    args = parser.parse_args()
    rows = []
    for layout in args.layouts:
        dp, tp = map(int, layout.split("x"))
        args.tp = {dp * tp: tp}
        rows += run_worlds(_measure, [dp * tp], args)[dp * tp]["rows"]
    ns = NsSpec(5, "quintic")
    total = sum(gram_flops(s, ns) if use_gram(s, ns, torch.float32) else plain_flops(s, ns) for s in matrices())
    print(f"{os.cpu_count()} cores, torch {torch.__version__}, gloo, float32 'highest'; NS GFLOP of every matrix "
          f"once: {total / 1e9:.2f}; median of {args.repeats} steps")
    print("| layout | configuration | collectives / step | bytes sent / rank | NS GFLOP / rank (max) | vs total / world "
          "| state MiB / rank | median step ms | vs replicated |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        world = r["world"]
        base = next(b["ms"] for b in rows if b["layout"] == r["layout"] and b["config"] == "replicated")
        print(f"| {r['layout']} | {r['config']} | {r['calls']} | {r['bytes']:,} | {r['flops'] / 1e9:.2f} | "
              f"{r['flops'] / (total / world):.2f} | {r['state'] / 2**20:.2f} | {r['ms']:.0f} | {base / r['ms']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "flops_once": total, "torch": torch.__version__, "cores": os.cpu_count(),
                       "repeats": args.repeats}, f, indent=1)


if __name__ == "__main__":
    main()
