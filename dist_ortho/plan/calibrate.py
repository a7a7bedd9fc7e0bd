"""``--calibrate``: fit the CPU profile on this machine in about 20 seconds, or (``--calibrate-device cuda``) this
GPU's in about 30.

Per world size 1, 2, 4 and 8 (gloo on loopback, one process per rank, torch threads = cores / world as the
benchmarks set them): a rank's float32 matmul rate on 512 x 512 products while every rank multiplies, the
latency of a 64-byte all-reduce, and the bus bandwidth of a 4 MiB all-reduce (2 (w-1)/w x bytes / seconds).
The profile keeps each world size's figures (``per_ranks``: the node's FLOP/s as w x a rank's rate, latency,
bandwidth); the planner uses the entry of the largest measured world size not above the job's. At world 1
also the bfloat16 matmul rate (256 x 256), and ``medium_compute`` is what ``fp32_matmul_prec="medium"``
runs in on this CPU (:func:`dist_ortho.math.precision.medium_dtype`).

On a GPU (:func:`measure_cuda`, one device): the dense matmul rate in float32, tf32 and bfloat16 (8192^3 products;
``matmul_efficiency`` 1, the rates being what the device reaches), the memory bandwidth of a 2 GiB copy, an eager
kernel's launch cost, and dist_ortho's own host time per step, group and matrix (Muon on tiny matrices in 1 or 8
shapes of 64 to 2,048, least squares). Links are kept from the base profile (one device cannot measure them).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dist_ortho.math.precision import matmul_precision, medium_dtype
from dist_ortho.plan.devices import PROFILES, DeviceProfile


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _probe(rank: int, world: int, port: int, out: dict) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    for _ in range(3):
        a @ b
    dist.barrier()
    began, n = time.perf_counter(), 40
    for _ in range(n):
        a @ b
    dist.barrier()
    rate = n * 2 * 512**3 / (time.perf_counter() - began)
    bf16_rate = _bf16_rate() if world == 1 else None
    small, big = torch.zeros(16), torch.zeros(2**20)
    dist.barrier()
    began, n = time.perf_counter(), 200
    for _ in range(n):
        dist.all_reduce(small)
    latency = (time.perf_counter() - began) / n
    dist.all_reduce(big)
    dist.barrier()
    began, n = time.perf_counter(), 20
    for _ in range(n):
        dist.all_reduce(big)
    seconds = (time.perf_counter() - began) / n
    if rank == 0:
        out[world] = {"rate": rate, "latency": latency, "bandwidth": 2 * (world - 1) / world * big.nbytes / seconds}
        if bf16_rate is not None:
            out[world] = {**out[world], "bf16_rate": bf16_rate}
    dist.destroy_process_group()


def _bf16_rate() -> float:
    a, b = torch.randn(256, 256, dtype=torch.bfloat16), torch.randn(256, 256, dtype=torch.bfloat16)
    a @ b
    began, n = time.perf_counter(), 4
    while True:  # emulated bf16 (AVX2) is ~66x slower than float32: time as few products as give 0.2 s
        for _ in range(n):
            a @ b
        seconds = time.perf_counter() - began
        if seconds > 0.2:
            return n * 2 * 256**3 / seconds
        began, n = time.perf_counter(), n * 8


def measure(worlds: tuple[int, ...] = (1, 2, 4, 8)) -> dict[int, dict[str, float]]:
    out = mp.Manager().dict()
    for world in worlds:
        mp.spawn(_probe, args=(world, _port(), out), nprocs=world, join=True)
    return dict(out)


def fit(measured: dict[int, dict[str, float]], base: DeviceProfile = PROFILES["CPU"]) -> DeviceProfile:
    """The CPU profile from :func:`measure`'s figures (bf16 at the measured ratio to float32)."""
    node = measured[1]["rate"]
    ratio = measured[1]["bf16_rate"] / measured[1]["rate"]
    per_ranks: dict[str, dict] = {}
    for world, m in sorted(measured.items()):
        node_rate = m["rate"] * world
        per_ranks[str(world)] = {"flops_per_s": {"float32": node_rate, "tf32": node_rate, "bfloat16": node_rate * ratio},
                                 "intra_latency_s": m["latency"]}
        if world > 1:
            per_ranks[str(world)]["intra_bytes_per_s"] = m["bandwidth"]
    largest = measured[max(measured)]
    return dataclasses.replace(
        base, flops_per_s={"float32": node, "tf32": node, "bfloat16": node * ratio}, intra_latency_s=largest["latency"],
        intra_bytes_per_s=largest["bandwidth"], inter_latency_s=largest["latency"], inter_bytes_per_s=largest["bandwidth"],
        per_ranks=per_ranks, medium_compute=str(medium_dtype("cpu")).removeprefix("torch."), source=f"--calibrate on this machine ({os.cpu_count()} cores, torch {torch.__version__})",
    )


def _cuda_seconds(fn, repeats: int = 10) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - began) / repeats


def measure_cuda() -> dict[str, float]:
    """This GPU's figures (see the module doc)."""
    from dist_ortho.optim.members.muon import Muon

    out: dict[str, float] = {}
    n = 8192
    for name, dtype, precision in (("float32", torch.float32, "highest"), ("tf32", torch.float32, "high"),
                                   ("bfloat16", torch.bfloat16, "highest")):
        a, b = torch.randn(n, n, device="cuda", dtype=dtype), torch.randn(n, n, device="cuda", dtype=dtype)
        with matmul_precision(precision):
            out[name] = 2 * n**3 / _cuda_seconds(lambda: a @ b)
    big = torch.empty(2**29, dtype=torch.float32, device="cuda")
    out["memory"] = 2 * big.nbytes / _cuda_seconds(lambda: big.clone())
    tiny = torch.zeros(1, device="cuda")
    out["launch"] = _cuda_seconds(lambda: [tiny.add_(1) for _ in range(100)]) / 100
    rows, times = [], []
    for shapes in (1, 8):
        for count in (64, 512, 2048):
            params = [torch.nn.Parameter(torch.randn(4 + i % shapes, 4, device="cuda")) for i in range(count)]
            for p in params:
                p.grad = torch.randn_like(p)
            opt = Muon(params, lr=1e-3)
            rows.append([1.0, shapes, count])
            times.append(_cuda_seconds(opt.step, repeats=5))
    fit_ = torch.linalg.lstsq(torch.tensor(rows, dtype=torch.float64), torch.tensor(times, dtype=torch.float64)[:, None])
    out["host_step"], out["host_group"], out["host_matrix"] = (max(v, 1e-9) for v in fit_.solution.flatten().tolist())
    return out


def fit_cuda(measured: dict[str, float], base: DeviceProfile) -> DeviceProfile:
    """``base`` (for its links and node size) with this GPU's measured figures."""
    return dataclasses.replace(
        base, name=torch.cuda.get_device_name(), matmul_efficiency=1.0,
        flops_per_s={k: measured[k] for k in ("float32", "tf32", "bfloat16")}, memory_bytes_per_s=measured["memory"],
        launch_s=measured["launch"], host_step_s=measured["host_step"], host_group_s=measured["host_group"],
        host_matrix_s=measured["host_matrix"], per_ranks={},
        source=f"--calibrate --calibrate-device cuda on {torch.cuda.get_device_name()} (torch {torch.__version__}); "
               f"links from {base.name}",
    )
