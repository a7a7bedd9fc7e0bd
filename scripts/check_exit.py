"""Does a process that used the optimizer exit 0? Runs of a world-2 gloo script, in a loop (issue 31, item 4).

    python scripts/check_exit.py [--runs 20] [--quick]

Each run starts 2 fresh interpreters (as torchrun would: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) that step
every family member in every tp_mode over TP 2 (3 steps each), then every member over DP 2 with reduce_grads
(3 batches each: forward layer by layer, backward, step), and end: with or without ``destroy_process_group()``,
with or without overlap (``overlap=True, overlap_with_backward=True, overlap_by_layer``: the last step's share is
left in flight, as a script that returns after its last step leaves it). The runs cycle through the four
combinations. A run fails when a rank's exit status is not 0, its stderr says "terminate called" (a backend
thread aborting at teardown), it did not print all its results, or a collective of the library was still in
flight at exit (dist_ortho.comm.in_flight(), read after the library's exit hook). ``--quick``: one member per tp_mode (the test's
short runs). Exit status: 0 when every run passed.
"""

from __future__ import annotations

import argparse
import atexit
import itertools
import os
import socket
import subprocess
import sys
import time

MEMBERS = ("muon", "scion", "mop", "polargrad", "muon_hyperball", "adamuon", "normuon", "namo", "adaptive_muon",
           "muon_adamw")
OPTIONS = {"mop": {"momentum": 0.9}}
DONE = "check_exit: rank {rank} stepped everything"
LEFT = "check_exit: rank {rank}: {count} collectives in flight {when}"


def _sharded(full, rank: int, dim: int):
    import torch

    p = torch.nn.Parameter(torch.tensor_split(full, 2, dim=dim)[rank].clone())
    p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, dim, 1
    return p


def worker(destroy: bool, overlap: bool, quick: bool) -> None:
    import torch
    import torch.distributed as dist

    from dist_ortho import TP_MODES, comm, get_optimizer

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    # runs after the library's own exit hook (atexit is last in, first out): what the library left in flight
    atexit.register(lambda: print(LEFT.format(rank=rank, count=comm.in_flight(), when="at exit"), flush=True))
    gen = torch.Generator().manual_seed(0)
    # TP 2: every member in every mode (the members' TP programs; overlap shares nothing without DP)
    pairs = [(m, mode) for m in MEMBERS for mode in TP_MODES] if not quick else list(zip(itertools.cycle(MEMBERS), TP_MODES))
    for member, mode in pairs:
        fulls = [torch.randn(16, 24, generator=gen), torch.randn(24, 16, generator=gen)]
        params = [_sharded(fulls[0], rank, 0), _sharded(fulls[1], rank, 1)]
        opt = get_optimizer(member)(params, lr=0.02, tp_group=dist.group.WORLD, tp_mode=mode, overlap=overlap,
                                    **OPTIONS.get(member, {}))
        for k in range(3):
            g = torch.Generator().manual_seed(k)
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
    # DP 2: gradients reduced into their owners (during backward with overlap), the owners' weights shared
    for member in MEMBERS if not quick else MEMBERS[:2]:
        torch.manual_seed(0)
        layers = [torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)]
        params = [layer.weight for layer in layers]
        opt = get_optimizer(member)(params, lr=0.02, dp_group=dist.group.WORLD, reduce_grads=True, overlap=overlap,
                                    overlap_with_backward=overlap, **OPTIONS.get(member, {}))
        if overlap:
            opt.overlap_by_layer(layers)
        for k in range(3):
            h = torch.randn(4, 16, generator=torch.Generator().manual_seed(10 * k + rank))
            for layer in layers:
                h = layer(h)
            h.square().mean().backward()
            opt.step()
            opt.zero_grad()
    print(LEFT.format(rank=rank, count=comm.in_flight(), when="after the last step"), flush=True)
    print(DONE.format(rank=rank), flush=True)
    if destroy:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_run(destroy: bool, overlap: bool, quick: bool, timeout: float = 600.0) -> tuple[bool, str, list[str]]:
    """(passed, what went wrong, each rank's stdout) of one run of two ranks. Passed: every rank printed its
    results, exited 0 without "terminate called", and had no collective of the library in flight at exit."""
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        args = [sys.executable, os.path.abspath(__file__), "--worker", *(["--destroy"] if destroy else []),
                *(["--overlap"] if overlap else []), *(["--quick"] if quick else [])]
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    problems, outs = [], []
    for rank, proc in enumerate(procs):
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            problems.append(f"rank {rank} hung (killed after {timeout:g} s)")
        if proc.returncode != 0:
            problems.append(f"rank {rank} exit status {proc.returncode}")
        if "terminate called" in err:
            problems.append(f"rank {rank}: terminate called")
        outs.append(out)
        if DONE.format(rank=rank) not in out:
            problems.append(f"rank {rank} did not finish")
        elif LEFT.format(rank=rank, count=0, when="at exit") not in out:
            problems.append(f"rank {rank} left collectives in flight at exit: {out.strip()[-300:]}")
        if problems and err.strip():
            problems.append(f"rank {rank} stderr: {err.strip()[-1500:]}")
    return not problems, "; ".join(problems), outs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--destroy", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--overlap", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.destroy, args.overlap, args.quick)
        return 0
    combos = list(itertools.product((True, False), (True, False)))
    failed = 0
    for i in range(args.runs):
        destroy, overlap = combos[i % len(combos)]
        began = time.perf_counter()
        passed, why, _ = one_run(destroy, overlap, args.quick)
        failed += not passed
        print(f"run {i + 1:>2}: destroy_process_group={destroy!s:<5} overlap={overlap!s:<5} "
              f"{'exit 0' if passed else 'FAILED: ' + why} ({time.perf_counter() - began:.1f} s)", flush=True)
    print(f"{args.runs - failed} of {args.runs} runs exited cleanly")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
