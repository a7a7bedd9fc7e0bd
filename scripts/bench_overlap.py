"""Benchmark the main job with and without --overlap: losses, time blocked in collectives, tokens/s.

    python scripts/bench_overlap.py [--nproc 4] [--tp 2] [--steps 40] [--rounds 3] [--extra "--reduce-grads"]
                                    [--json docs/bench_overlap.json]

Runs ``torchrun -m dist_ortho.train`` (gloo on CPU; NCCL where CUDA is) for each configuration in interleaved
rounds, reads every run's log.jsonl and reports per configuration: the largest loss difference to the run without
overlap (bit-identical expected), the mean over steps (after the first 5) of ``comm_wait_ms`` (time this rank was
blocked on the step's collectives: gradients, loss, optimizer, and an overlapped share waited for in the next
forward) and ``optimizer_comm_wait_ms``, and tokens/s; medians over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run(nproc: int, tp: int, steps: int, extra: list[str], out: Path) -> list[dict]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               "-m", "dist_ortho.train", "--tp", str(tp), "--steps", str(steps), "--eval-interval", "0",
               "--no-progress", "--out", str(out), *extra]
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return [json.loads(line) for line in (out / "muon" / "log.jsonl").read_text().splitlines()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--extra", default="", help="more arguments for every run, e.g. --reduce-grads")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    extra = shlex.split(args.extra)
    configs = {"blocking": extra, "overlap": [*extra, "--overlap"]}
    rows: dict[str, list[dict]] = {name: [] for name in configs}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, flags in configs.items():
                rows[name].append({"log": run(args.nproc, args.tp, args.steps, flags, Path(tmp) / f"{name}{r}")})
    reference = rows["blocking"][0]["log"]
    summary = {}
    for name, runs in rows.items():
        def median_of(key: str) -> float:
            return statistics.median(statistics.mean(rec[key] for rec in run["log"][5:]) for run in runs)

        summary[name] = {
            "max_loss_diff": max(abs(a["loss"] - b["loss"]) for run in runs for a, b in zip(run["log"], reference)),
            "comm_wait_ms": median_of("comm_wait_ms"), "optimizer_comm_wait_ms": median_of("optimizer_comm_wait_ms"),
            "tokens_per_s": median_of("tokens_per_s"),
        }
    base = summary["blocking"]
    print(f"world {args.nproc} (TP {args.tp}, DP {args.nproc // args.tp}), {args.steps} steps, {args.rounds} rounds, "
          f"extra {extra or 'none'}")
    print(f"{'':10} {'max |dloss|':>12} {'comm_wait_ms':>13} {'optimizer':>10} {'tokens/s':>9} {'wait ratio':>10}")
    for name, s in summary.items():
        print(f"{name:10} {s['max_loss_diff']:12.3g} {s['comm_wait_ms']:13.2f} {s['optimizer_comm_wait_ms']:10.2f} "
              f"{s['tokens_per_s']:9.0f} {s['comm_wait_ms'] / base['comm_wait_ms']:10.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "summary": summary}, indent=1) + "\n")


if __name__ == "__main__":
    main()
