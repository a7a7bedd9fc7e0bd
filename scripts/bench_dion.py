"""Benchmark the Muon step on FSDP2 (DP 4, 1-D mesh): dist_ortho against Dion's Muon (github:microsoft/dion).

    git clone https://github.com/microsoft/dion /tmp/dion    # not a dependency: read from --dion-path only
    python scripts/bench_dion.py --dion-path /tmp/dion [--repeats 7] [--json out.json]

World 4 on gloo, one 1-D mesh ("dp") of 4; the parameters are bench_optimizer_step.py's GPT-like set (4 layers of
fused QKV 384 x 256, proj 256 x 256, fc1 1024 x 256, fc2 256 x 1024; QKV orthogonalized whole by both) as
DTensors sharded over rows as FSDP2's ``fully_shard`` leaves them (``Shard(0)``), with the same gradients.
Both run float32 Newton-Schulz with "highest" matmul precision, 5 steps of the same quintic coefficients:
- Dion's ``Muon(params, distributed_mesh=mesh, newton_schulz_func=...)``: its megabatch all-to-all (every
  same-shape matrix in one call) then Newton-Schulz on each rank's matrices. Made float32 the same way for
  every Dion row: its momentum update casts the direction to bfloat16 before communicating, which the
  benchmark replaces (``dion.muon.muon_update_pre_orthogonalize``) by the same arithmetic without the cast,
  so its all-to-all carries float32 as ours does; and torch.compile is off (TORCHDYNAMO_DISABLE=1) for both,
  as dist_ortho's step is eager. Newton-Schulz: "dion" gets ``dist_ortho.tp.newton_schulz`` (the plain
  iteration, float32); "dion + our local NS" gets ``dist_ortho.tp.local.local_newton_schulz``, the one-device
  function dist_ortho's own step uses (its Gram-space recursion where that pays), to separate the schedule
  from the FLOPs.
- dist_ortho's ``Muon(params, device_mesh=mesh, tp_mode="home")``: each matrix's pieces all-to-all'd to one
  owner, orthogonalized there (batched by shape), the new values all-to-all'd back; "overlap" is the pipelined
  step (``overlap=True``: one shape's all-to-all in flight while another computes, as Dion's async runtime
  does), with ``finish()`` inside the timed step so that no other configuration's step hides its share.
Momentum conventions differ (Dion M <- mu M + G, dist_ortho M <- lerp(M, G, 1 - mu)), so weights are not
compared here (tests/test_dtensor.py holds ours to a float64 reference). Per configuration: median step
seconds over --repeats interleaved steps after 2 warm-ups, the ratio to "dion", and collectives and bytes sent per
step on rank 0 (torch.distributed calls wrapped and counted: bench_common.counting_collectives).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import torch
import torch.distributed as dist
from bench_common import counting_collectives, run_worlds, time_interleaved
from bench_optimizer_step import parameter_set
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from dist_ortho import Muon, newton_schulz
from dist_ortho.tp import NsSpec
from dist_ortho.tp.local import local_newton_schulz

WORLD, STEPS, COEFFICIENTS = 4, 5, "quintic"
HP = {"lr": 0.02, "momentum": 0.95, "weight_decay": 0.01}


def _float32_direction(G, M, momentum, nesterov):
    """Dion's pre-orthogonalization (heavy-ball momentum, Nesterov look-ahead) without its cast to bfloat16."""
    G = [g.to(M[0].dtype) for g in G]
    torch._foreach_mul_(M, momentum)
    torch._foreach_add_(M, G)
    if not nesterov:
        return list(M)
    U = torch._foreach_mul(M, momentum)
    torch._foreach_add_(U, G)
    return U


def _plain_ns(x: torch.Tensor, epsilon=None) -> torch.Tensor:
    return newton_schulz(x.float(), STEPS, COEFFICIENTS)


def _local_ns(x: torch.Tensor, epsilon=None) -> torch.Tensor:
    return local_newton_schulz(x.float(), NsSpec(STEPS, COEFFICIENTS))


def _params(mesh) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    rank, params = dist.get_rank(), []
    for _, shape, _ in parameter_set():
        full, grad = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
        local = [torch.tensor_split(t, WORLD, dim=0)[rank].clone() for t in (full, grad)]
        p = torch.nn.Parameter(DTensor.from_local(local[0], mesh, (Shard(0),), shape=full.shape, stride=full.stride()))
        p.grad = DTensor.from_local(local[1], mesh, (Shard(0),), shape=full.shape, stride=full.stride())
        params.append(p)
    return params


def _measure(rank: int, world: int, port: int, args: argparse.Namespace, out: dict) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    torch.set_float32_matmul_precision("highest")
    sys.path.insert(0, args.dion_path)
    import dion
    import dion.muon

    dion.muon.muon_update_pre_orthogonalize = _float32_direction
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
    common = {"lr": HP["lr"], "weight_decay": HP["weight_decay"], "nesterov": True}
    optimizers = {
        "dion": dion.Muon(_params(mesh), distributed_mesh=mesh, mu=HP["momentum"], newton_schulz_func=_plain_ns,
                          **common),
        "dion + our local NS": dion.Muon(_params(mesh), distributed_mesh=mesh, mu=HP["momentum"],
                                         newton_schulz_func=_local_ns, **common),
    }
    for label, overlap in (("dist_ortho home", False), ("dist_ortho home, overlap", True)):
        optimizers[label] = Muon(_params(mesh), momentum=HP["momentum"], device_mesh=mesh, tp_mode="home", overlap=overlap,
                                 fp32_matmul_prec="highest", num_ns_steps=STEPS, coefficient_type=COEFFICIENTS, **common)

    def step(opt) -> None:
        opt.step()
        if isinstance(opt, Muon):
            opt.finish()  # the all-to-all back waited for inside the timed step, as Dion's step does
    for _ in range(2):
        for opt in optimizers.values():
            step(opt)
    counted = {}
    for label, opt in optimizers.items():
        with counting_collectives() as counts:
            step(opt)
        counted[label] = counts
    times = time_interleaved({label: (lambda opt=opt: step(opt)) for label, opt in optimizers.items()}, args.repeats)
    if rank == 0:
        out["rows"] = [{"config": label, "seconds": statistics.median(times[label]), "calls": counted[label]["calls"],
                        "bytes": counted[label]["bytes"]} for label in optimizers]
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dion-path", required=True, help="a checkout of github:microsoft/dion (its dion/ package)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not os.path.isfile(os.path.join(args.dion_path, "dion", "muon.py")):
        raise SystemExit(f"--dion-path: {args.dion_path!r} has no dion/muon.py (clone github:microsoft/dion there)")
    rows = run_worlds(_measure, [WORLD], args)[WORLD]["rows"]
    base = next(r["seconds"] for r in rows if r["config"] == "dion")
    print(f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, gloo, FSDP2 DP {WORLD} (1-D mesh), "
          f"float32 'highest', {STEPS} {COEFFICIENTS} steps; median of {args.repeats} steps after 2 warm-up")
    print("| configuration | collectives / step | bytes sent / step | median step s | speed vs dion |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['calls']} | {r['bytes']:,} | {r['seconds']:.3f} | {base / r['seconds']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "torch": torch.__version__, "cores": os.cpu_count(), "repeats": args.repeats}, f,
                      indent=1)


if __name__ == "__main__":
    main()
