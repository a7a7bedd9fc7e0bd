"""Muon on HSDP (FSDP2, torchtitan's layout): owners spread over replicas x shards against every replica stepping all.

    .venv/bin/python scripts/bench_hsdp.py [--layers 4] [--hidden 128] [--repeats 3] [--json docs/bench_hsdp.json]
    .venv/bin/python scripts/bench_hsdp.py --experts 4 --layers 2 --hidden 64 --json docs/bench_hsdp_experts.json

World 4 on gloo: ``fully_shard(model, mesh=mesh)`` over ("dp_replicate", "fsdp") = 2 x 2, every weight
(Replicate(), Shard(0)); ``--layers`` blocks of two bias-free weights (h x 4h and 4h x h, h = ``--hidden``). float32,
"highest" matmul precision, 5 quintic iterations, momentum 0.95 (Nesterov), the same gradients (one backward through
FSDP2, which all-reduces the pieces over "dp_replicate") for both:

- ours: dist_ortho's Muon, each matrix owned by one of the 4 ranks (replicas x shards): it gathers the matrix from
  its own replica's 2 pieces, runs Newton-Schulz once in the world and sends every rank of both replicas its piece
  of the update (one all-to-all each way over the 4 ranks for all matrices);
- before: the same optimizer with the owner rule it had before (``layouts.spread_replicas = False``): owners within
  each replica's FSDP group, so every replica runs Newton-Schulz on every matrix (what torchtitan's and AReaL's
  Muon do on HSDP today: each replica steps everything, alike).

Per configuration, from every rank: Newton-Schulz FLOPs per rank (torch.utils.flop_counter.FlopCounterMode around
the step: Muon's only matmuls), their max against the once-per-matrix total / world, collectives and bytes sent per
step (bench_common.counting_collectives: torch.distributed's calls, whoever makes them), median step seconds
(interleaved, after a warm-up step), and the largest difference between the two configurations' weights after the run
(both exact: float32 rounding). Also computed (not run), from the same owners and pieces: the bytes the other way to
bring the result to every replica would send, one share per replica dim (an all-to-all over the owner's FSDP group,
then an all-gather of each rank's updated pieces over "dp_replicate").

``--experts E``: expert stacks instead (torchtitan's experts when efsdp x ep <= E, here EP 1): ours, each stack
owned by one replica (it runs the E matrices of its efsdp rank's experts and sends them whole to the other replica);
before, every replica steps its own experts alike.
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
REPLICAS, SHARDS = 2, 2


class _Block(torch.nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.up = torch.nn.Linear(hidden, 4 * hidden, bias=False)
        self.down = torch.nn.Linear(4 * hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


def _model(args, mesh) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    net = torch.nn.Sequential(*[_Block(args.hidden) for _ in range(args.layers)])
    for block in net:
        fully_shard(block, mesh=mesh)
    return fully_shard(net, mesh=mesh)


def _expert_stacks(args, mesh) -> list[tuple[str, torch.nn.Parameter]]:
    """``--experts E``: per layer, stacks w1 [E, 4h, h] and w2 [E, h, 4h], whole experts per rank over "efsdp"
    (Shard(0), fully_shard's placement of experts when efsdp x ep <= E) and replicated over "dp_replicate"."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    torch.manual_seed(0)
    out = []
    for layer in range(args.layers):
        for name, shape in (("w1", (4 * args.hidden, args.hidden)), ("w2", (args.hidden, 4 * args.hidden))):
            full = torch.randn(args.experts, *shape) / shape[1] ** 0.5
            out.append((f"layers.{layer}.moe.experts.{name}",
                        torch.nn.Parameter(distribute_tensor(full, mesh, [Replicate(), Shard(0)]))))
    return out


def _back_bytes(opt, params: list[torch.Tensor]) -> tuple[int, int]:
    """Bytes this rank sends bringing the owners' updates to every rank (the step's way back; the way in, each
    owner's own replica's pieces, is the same either way): ours, one all-to-all over the 4 ranks (every other rank
    its piece of each matrix this rank owns); and one share per replica dim, computed: the owner's pieces over its
    FSDP group (an all-to-all), then each rank's updated pieces of the matrices its replica owns over
    "dp_replicate" (an all-gather, padded to the largest rank's, R - 1 copies)."""
    layouts = opt.layouts
    spread = layouts.spreads[params[0]]
    me = dist.get_rank(layouts.owner_group(params[0]))
    ours = per_dim = mine = 0
    for p in params:
        split, row = layouts.held[p].pieces, p.numel() // p.shape[0] * p.element_size()
        owner = layouts.owners[p]
        if opt.owns(p):
            ours += (REPLICAS * sum(split.extents) - split.extents[split.rank]) * row
            per_dim += (sum(split.extents) - split.extents[split.rank]) * row
        if spread.replica[owner] == spread.replica[me]:
            mine += split.extents[split.rank] * row
    longest = torch.tensor([mine])
    dist.all_reduce(longest, op=dist.ReduceOp.MAX)
    return ours, per_dim + (REPLICAS - 1) * int(longest.item())


def _measure(rank: int, world: int, port: int, args, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh

    from dist_ortho import get_optimizer

    shards = "efsdp" if args.experts else "fsdp"
    mesh = init_device_mesh("cpu", (REPLICAS, SHARDS), mesh_dim_names=("dp_replicate", shards))
    if args.experts:
        ours_named, base_named = _expert_stacks(args, mesh), _expert_stacks(args, mesh)
    else:
        ours_model, base_model = _model(args, mesh), _model(args, mesh)
        ours_named, base_named = list(ours_model.named_parameters()), list(base_model.named_parameters())
    ours_params, base_params = [p for _, p in ours_named], [p for _, p in base_named]
    ours = get_optimizer("muon")(ours_named, scale_mode="shape_scaling", **HP)
    base = get_optimizer("muon")(base_named, scale_mode="shape_scaling", **HP)
    base.layouts.spread_replicas = False
    if args.experts:  # seeded gradients, the same on every replica (as FSDP2's all-reduce over "dp_replicate" leaves them)
        from torch.distributed.tensor import DTensor

        gen = torch.Generator().manual_seed(1)
        for p in ours_params:
            full = torch.randn(p.shape, generator=gen)
            p.grad = DTensor.from_local(full.chunk(SHARDS)[mesh.get_local_rank(shards)].clone(), mesh, p.placements,
                                        shape=p.shape, stride=p.stride())
    else:
        dp_rank = mesh.get_local_rank("dp_replicate") * SHARDS + mesh.get_local_rank("fsdp")
        x = torch.randn(8, args.hidden, generator=torch.Generator().manual_seed(dp_rank))
        ours_model(x).square().mean().backward()
    for q, p in zip(base_params, ours_params):  # the same gradients for both (FSDP2 reduced them over both dims)
        q.grad = p.grad.detach().clone()
    steps = {"ours (owners over replicas x shards)": ours.step, "before (every replica steps all)": base.step}
    rows = counted_per_rank(steps, world)
    back = [None] * world
    dist.all_gather_object(back, (0, 0) if args.experts else _back_bytes(ours, ours_params))
    times = time_interleaved(steps, args.repeats)
    difference = torch.tensor(max((p.to_local() - q.to_local()).abs().max().item() for p, q in zip(ours_params, base_params)))
    dist.all_reduce(difference, op=dist.ReduceOp.MAX)
    if rank == 0:
        for label, row in rows.items():
            row["seconds"] = statistics.median(times[label])
        out.update(rows=rows, weight_difference=difference.item(),
                   back_bytes_per_rank={"ours (one all-to-all over replicas x shards)": [b[0] for b in back],
                                        "per replica dim (all-to-all over fsdp + all-gather over dp_replicate)":
                                            [b[1] for b in back]})
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--experts", type=int, default=0,
                        help="E > 0: expert stacks [E, 4h, h], [E, h, 4h] per layer, whole experts per rank over "
                             "'efsdp' (Shard(0)), replicated over 'dp_replicate', instead of the dense blocks")
    parser.add_argument("--json")
    args = parser.parse_args()
    world = REPLICAS * SHARDS
    result = run_worlds(_measure, [world], args)[world]
    rows = result["rows"]
    labels = list(rows)
    base_seconds = rows[labels[1]]["seconds"]
    total = sum(rows[labels[0]]["flops_per_rank"])  # every matrix's Newton-Schulz once: the work to share
    what = (f"{args.layers} layers of 2 expert stacks [{args.experts}, 4h, h] / [{args.experts}, h, 4h], h={args.hidden}, "
            "whole experts over 'efsdp'" if args.experts else f"{args.layers} blocks of h={args.hidden} (2 matrices each)")
    print(f"FSDP2 HSDP {REPLICAS} x {SHARDS} (world {world}), {what}, float32 highest, 5 quintic steps; per step")
    print("| configuration | NS FLOPs max rank | FLOPs summed over the world | max rank / (once per matrix / world) | "
          "collectives (max rank) | MB sent (max rank) | seconds | vs before |")
    print("|---|---|---|---|---|---|---|---|")
    for label, row in rows.items():
        flops = row["flops_per_rank"]
        print(f"| {label} | {max(flops) / 1e6:.1f} M | {sum(flops) / 1e6:.1f} M | {max(flops) / (total / world):.2f} | "
              f"{max(row['calls'])} | {max(row['bytes_sent']) / 1e6:.2f} | {row['seconds']:.4f} | "
              f"{row['seconds'] / base_seconds:.2f}x |")
    for label, sent in result["back_bytes_per_rank"].items() if not args.experts else ():
        print(f"the way back, {label}: {max(sent) / 1e6:.2f} MB max rank, {sum(sent) / 1e6:.2f} MB all ranks (computed)")
    print(f"weights differ by {result['weight_difference']:.1e} after the run")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), **result}, f, indent=1)


if __name__ == "__main__":
    main()
