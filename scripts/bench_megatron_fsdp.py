"""Muon on Megatron-FSDP: dist_ortho against the all-gather-and-duplicate baseline (Megatron-LM #5078's idea).

    .venv/bin/python scripts/bench_megatron_fsdp.py [--layers 4] [--hidden 128] [--repeats 3] [--world 4] [--json out.json]

A real Megatron-FSDP v1 model (``megatron-fsdp`` from the registry; its CUDA calls replaced by no-ops,
tests/megatron_fsdp_cpu.py) on gloo, FSDP over every rank, no TP: ``--layers`` blocks of two bias-free weights
(h x 4h and 4h x h, h = ``--hidden``), each block one Megatron-FSDP unit, so that its bucket's row-aligned pieces
are uneven and matrices cross piece boundaries. float32, "highest" matmul precision, 5 quintic iterations,
momentum 0.95 (Nesterov), the same gradients (one backward through Megatron-FSDP) for both:

- ours: dist_ortho's Muon on Megatron-FSDP's DTensor parameters (``home``: each matrix's pieces to one owner rank,
  Newton-Schulz once in the world, every rank its piece back: two all-to-alls per step for all matrices);
- baseline: per matrix, the momentum's pieces all-gathered (padded to the largest piece: gloo's all-gather needs
  equal sizes, as NCCL's does), Newton-Schulz on the whole matrix on every rank that holds a piece of it, each
  keeping its piece (the exact update #5078 proposes; written here, in the same wrapping and precision).

Per configuration, from every rank: Newton-Schulz FLOPs per rank (torch.utils.flop_counter.FlopCounterMode around
the step: the matmuls), their max and their sum / world (the share if spread evenly), collectives and bytes sent per
step (bench_common.counting_collectives), median step seconds (interleaved, after a warm-up step), and the largest
difference between the two configurations' weights after the run (both exact: float32 rounding).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
import torch.distributed as dist
from bench_common import counted_per_rank, run_worlds, time_interleaved

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

HP = {"lr": 0.02, "momentum": 0.95, "nesterov": True, "weight_decay": 0.0, "fp32_matmul_prec": "highest"}


class _Block(torch.nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.up = torch.nn.Linear(hidden, 4 * hidden, bias=False)
        self.down = torch.nn.Linear(4 * hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


def _model(args, mfsdp, mesh):
    torch.manual_seed(0)
    net = torch.nn.Sequential(*[_Block(args.hidden) for _ in range(args.layers)])
    model = mfsdp.fully_shard_model(net, device_mesh=mesh, dp_shard_dim="fsdp", tp_dim="tp", device=torch.device("cpu"),
                                    fsdp_unit_modules=[_Block])
    model._replace_param_with_distributed_if_needed()
    return model


class _AllGatherMuon:
    """The baseline: per matrix, momentum pieces all-gathered, Newton-Schulz on every holder (see the module doc)."""

    def __init__(self, params: list[torch.Tensor], group: dist.ProcessGroup) -> None:
        from megatron_fsdp.uneven_dtensor import gather_and_compute_chunk_metadata

        self.params, self.group = params, group
        self.momenta = [torch.zeros_like(p.to_local()) for p in params]
        # each rank's (offset, rows): Megatron-FSDP's own metadata, gathered once
        self.layout = []
        for p in params:
            chunk = gather_and_compute_chunk_metadata(p.detach())
            views = [None] * dist.get_world_size(group)
            dist.all_gather_object(views, (chunk.offsets[0], p.to_local().shape[0]), group=group)
            self.layout.append(views)

    @torch.no_grad()
    def step(self) -> None:
        from dist_ortho import newton_schulz
        from dist_ortho.math.precision import matmul_precision

        for p, m, views in zip(self.params, self.momenta, self.layout):
            g = p.grad.to_local() if p.grad is not None else torch.zeros_like(m)
            m.mul_(HP["momentum"]).add_(g)
            d = g.add(m, alpha=HP["momentum"]) if HP["nesterov"] else m
            most = max(rows for _, rows in views)
            padded = torch.zeros((most, *p.shape[1:]), dtype=d.dtype)
            padded[: d.shape[0]] = d
            pieces = [torch.empty_like(padded) for _ in views]
            dist.all_gather(pieces, padded, group=self.group)
            if d.shape[0] == 0:
                continue  # a rank without a piece of this matrix computes nothing for it
            full = torch.zeros(p.shape, dtype=d.dtype)
            for (offset, rows), piece in zip(views, pieces):
                full[offset: offset + rows] = piece[:rows]
            with matmul_precision(HP["fp32_matmul_prec"]):
                o = newton_schulz(full, 5, "quintic")
            rows, cols = p.shape
            mine = views[dist.get_rank(self.group)]
            scale = max(1.0, rows / cols) ** 0.5
            p.to_local().add_(o[mine[0]: mine[0] + mine[1]], alpha=-HP["lr"] * scale)


def _measure(rank: int, world: int, port: int, args, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from tests.megatron_fsdp_cpu import import_megatron_fsdp, install

    install()
    mfsdp = import_megatron_fsdp()
    from torch.distributed.device_mesh import init_device_mesh

    from dist_ortho import get_optimizer

    mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("fsdp", "tp"))
    ours_model, base_model = _model(args, mfsdp, mesh), _model(args, mfsdp, mesh)
    ours_params = [p for _, p in ours_model.named_parameters()]
    base_params = [p for _, p in base_model.named_parameters()]
    ours = get_optimizer("muon")(list(ours_model.named_parameters()), tp_mode="home", scale_mode="shape_scaling", **HP)
    base = _AllGatherMuon(base_params, mesh["fsdp"].get_group())
    x = torch.randn(8, args.hidden, generator=torch.Generator().manual_seed(rank))
    for model in (ours_model, base_model):
        model(x).square().mean().backward()
        model.finish_grad_sync()
    for q, p in zip(base_params, ours_params):  # the same gradients for both (Megatron-FSDP reduced them alike)
        if p.grad is not None:
            q.grad = p.grad
    steps = {"ours home": ours.step, "baseline all-gather": base.step}
    rows = counted_per_rank(steps, world)
    times = time_interleaved(steps, args.repeats)
    differences = max((p.to_local() - q.to_local()).abs().max().item() if p.to_local().numel() else 0.0
                      for p, q in zip(ours_params, base_params))
    difference = torch.tensor(differences)
    dist.all_reduce(difference, op=dist.ReduceOp.MAX)
    if rank == 0:
        for label, row in rows.items():
            row["seconds"] = statistics.median(times[label])
        out.update(rows=rows, weight_difference=difference.item())
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--json")
    args = parser.parse_args()
    result = run_worlds(_measure, [args.world], args)[args.world]
    rows = result["rows"]
    base_seconds = rows["baseline all-gather"]["seconds"]
    print(f"Megatron-FSDP v1, FSDP {args.world}, {args.layers} blocks of h={args.hidden} (2 matrices each), float32 "
          "highest, 5 quintic steps; per step")
    print("| configuration | NS FLOPs max rank | its FLOPs summed / world | max rank / (once per matrix / world) | collectives | "
          "MB sent (max rank) | seconds | vs baseline |")
    print("|---|---|---|---|---|---|---|---|")
    total = sum(rows["ours home"]["flops_per_rank"])  # every matrix's Newton-Schulz once: the work to share
    for label, row in rows.items():
        flops = row["flops_per_rank"]
        even = total / args.world
        print(f"| {label} | {max(flops) / 1e6:.1f} M | {sum(flops) / args.world / 1e6:.1f} M | {max(flops) / even:.2f} | "
              f"{max(row['calls'])} | {max(row['bytes_sent']) / 1e6:.2f} | {row['seconds']:.4f} | "
              f"{row['seconds'] / base_seconds:.2f}x |")
    ours_max = max(rows["ours home"]["flops_per_rank"])
    print(f"ours: max rank {ours_max / (total / args.world):.2f}x the baseline's total / world "
          f"(its max rank: {max(rows['baseline all-gather']['flops_per_rank']) / (total / args.world):.2f}x); "
          f"weights differ by {result['weight_difference']:.1e} after the run")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), **result}, f, indent=1)


if __name__ == "__main__":
    main()
