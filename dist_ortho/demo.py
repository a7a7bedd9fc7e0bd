"""Orthogonalize one sharded matrix in every tp_mode and report agreement and time.

    torchrun --standalone --nproc-per-node 2 -m dist_ortho.demo [--rows 1024 --cols 512 --steps 5]

Each rank holds a block of one seeded matrix; every mode's result is gathered and compared with the
one-device newton_schulz of the whole matrix.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

from dist_ortho import TP_MODES, count_collectives, newton_schulz, newton_schulz_tp
from dist_ortho.tp import shard


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--cols", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--coefficient-type", default="quintic")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if backend == "nccl" else torch.device("cpu")
    torch.set_float32_matmul_precision("highest")
    full = torch.randn(args.rows, args.cols, generator=torch.Generator().manual_seed(0)).to(device)
    reference = newton_schulz(full, args.steps, args.coefficient_type)
    if rank == 0:
        print(f"{args.rows} x {args.cols} matrix, TP={world} ({backend}), {args.steps} steps of {args.coefficient_type}")
        print(f"{'mode':<12}{'partition_dim':>14}{'max |diff| vs 1 device':>25}{'collectives':>13}{'median ms':>11}")
    for mode in TP_MODES:
        for partition_dim in (0, 1):
            local = shard(full, partition_dim, rank, world)
            times = []
            for _ in range(args.repeats):
                dist.barrier()
                start = time.perf_counter()
                with count_collectives() as stats:
                    out = newton_schulz_tp(local, args.steps, args.coefficient_type, dist.group.WORLD, partition_dim, mode)
                times.append(time.perf_counter() - start)
            diff = (out - shard(reference, partition_dim, rank, world)).abs().max()
            dist.all_reduce(diff, op=dist.ReduceOp.MAX)
            note = "  (not exact: local shards only)" if mode == "blockwise" else ""
            if rank == 0:
                print(
                    f"{mode:<12}{partition_dim:>14}{diff.item():>25.2e}{stats.total_calls:>13}"
                    f"{1e3 * statistics.median(times):>11.1f}{note}"
                )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
