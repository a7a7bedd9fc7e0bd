"""Device profiles of the planner: what one accelerator (or one CPU host) computes and moves per second.

Figures are dense (no sparsity) from the vendors' public datasheets; bandwidths are per direction, taken
at 80% of the link rate (what NCCL's bus bandwidth reaches on large messages); latencies are one
collective's fixed cost at small sizes. Every field can be overridden (``--device-file``, ``--set``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dist_ortho.tp.cost import CostProfile

COMPUTE_DTYPES = ("float32", "tf32", "bfloat16")
# The step's host time, from scripts/bench_host.py's host section on the CI machine kind (2-core AMD EPYC, AVX2,
# torch 2.13 CPU: 0.77 ms per group, 3.4 us per matrix, docs/benchmarks.md), less the kernels the planner counts
# apart (33 per group at launch_s 10 us): the default of every profile (a GPU server's host CPU is likely faster).
HOST_STEP_S, HOST_GROUP_S, HOST_MATRIX_S = 1e-4, 4.4e-4, 3.4e-6


@dataclass(frozen=True)
class DeviceProfile:
    """One device type of a cluster.

    flops_per_s: peak dense matmul FLOP/s of one device by compute dtype ("float32", "tf32", "bfloat16");
    matmul_efficiency: the fraction of it Newton-Schulz's matmuls reach; memory_bytes_per_s: memory
    bandwidth (the element-wise part of a step); intra_*: links inside a node (NVLink domain); inter_*:
    between nodes; devices_per_node: devices on one intra-node fabric; launch_s: host cost of one eager
    kernel; shared_compute: the node's devices share one pool of FLOP/s (a CPU host running one process
    per rank), so a rank gets flops_per_s / ranks on the node; per_ranks: field values measured with that
    many ranks on one node (keys are rank counts as strings; a CPU host's gloo latency grows with them);
    medium_compute: the dtype ``fp32_matmul_prec="medium"`` runs Newton-Schulz in on this device (bfloat16 on
    GPUs and on CPUs with a native bf16 matmul, float32 on AVX2-only CPUs: ``dist_ortho.math.precision``);
    host_step_s, host_group_s, host_matrix_s: the optimizer's own host time per step, per group of same-shape
    matrices and per matrix (Python, outside the kernels: scripts/bench_host.py's fit); replay_s: the host time
    of a step captured in a CUDA graph (one replay; ``capturable=True``)."""

    name: str
    flops_per_s: dict[str, float]
    matmul_efficiency: float
    memory_bytes_per_s: float
    intra_bytes_per_s: float
    intra_latency_s: float
    inter_bytes_per_s: float
    inter_latency_s: float
    devices_per_node: int
    launch_s: float
    shared_compute: bool = False
    per_ranks: dict[str, dict[str, Any]] = field(default_factory=dict)
    medium_compute: str = "bfloat16"
    host_step_s: float = HOST_STEP_S
    host_group_s: float = HOST_GROUP_S
    host_matrix_s: float = HOST_MATRIX_S
    replay_s: float = 2e-5
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        missing = [d for d in COMPUTE_DTYPES if d not in self.flops_per_s]
        if missing:
            raise ValueError(f"device profile {self.name!r}: flops_per_s lacks {missing} (needs {list(COMPUTE_DTYPES)})")
        if self.medium_compute not in ("bfloat16", "float32"):
            raise ValueError(f"device profile {self.name!r}: medium_compute must be 'bfloat16' or 'float32', "
                             f"got {self.medium_compute!r}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("name", "source", "flops_per_s", "shared_compute", "per_ranks", "medium_compute"):
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"device profile {self.name!r}: {f.name} must be a positive number, got {value!r}")
        if not 0 < self.matmul_efficiency <= 1:
            raise ValueError(f"device profile {self.name!r}: matmul_efficiency must be in (0, 1], got {self.matmul_efficiency}")

    def on_node(self, ranks: int) -> DeviceProfile:
        """This profile with ``ranks`` ranks per node: the per_ranks entry of the largest count <= ranks."""
        counts = sorted(int(k) for k in self.per_ranks if int(k) <= ranks)
        if not counts:
            return self
        return dataclasses.replace(self, **self.per_ranks[str(counts[-1])])

    def matmul_rate(self, compute: str, ranks_on_node: int = 1) -> float:
        """FLOP/s one rank's Newton-Schulz reaches."""
        share = ranks_on_node if self.shared_compute else 1
        return self.flops_per_s[compute] * self.matmul_efficiency / share

    def link(self, span: int) -> tuple[float, float]:
        """(bytes/s, latency s) of a collective over ranks spread across ``span`` consecutive devices."""
        if span <= self.devices_per_node:
            return self.intra_bytes_per_s, self.intra_latency_s
        return self.inter_bytes_per_s, self.inter_latency_s

    def cost_profile(self, compute: str = "bfloat16", span: int = 1, ranks_on_node: int = 1) -> CostProfile:
        """The per-matrix profile of ``tp_mode="auto"`` for a TP group spanning ``span`` devices
        (``dist_ortho.plan.set_cost_profile(profile.cost_profile(...))`` makes auto use it)."""
        bandwidth, latency = self.link(span)
        return CostProfile(self.matmul_rate(compute, ranks_on_node), bandwidth, latency)

    def compute(self, precision: str, ns_dtype: str | None = None) -> tuple[str, torch.dtype]:
        """(flops_per_s key, dtype) Newton-Schulz of float32 weights runs in under ``fp32_matmul_prec``, or in
        ``ns_dtype`` when given (fp16 at the bf16 rate: the same tensor cores on every profile here)."""
        if ns_dtype in ("bf16", "fp16"):
            return "bfloat16", torch.bfloat16 if ns_dtype == "bf16" else torch.float16
        name = {"highest": "float32", "high": "tf32", "medium": self.medium_compute}[precision]
        if ns_dtype == "fp32" and name == "bfloat16":
            name = "tf32" if "tf32" in self.flops_per_s else "float32"
        return name, torch.bfloat16 if name == "bfloat16" else torch.float32


_NVLINK4, _NVLINK5 = 450e9 * 0.8, 900e9 * 0.8
PROFILES: dict[str, DeviceProfile] = {
    "H100": DeviceProfile("H100", {"float32": 67e12, "tf32": 494.5e12, "bfloat16": 989e12}, 0.6, 3.35e12,
                          _NVLINK4, 10e-6, 50e9 * 0.8, 25e-6, 8, 8e-6, source="H100 SXM datasheet; NDR 400 Gb/s per GPU"),
    "H200": DeviceProfile("H200", {"float32": 67e12, "tf32": 494.5e12, "bfloat16": 989e12}, 0.6, 4.8e12,
                          _NVLINK4, 10e-6, 50e9 * 0.8, 25e-6, 8, 8e-6, source="H200 SXM datasheet; NDR 400 Gb/s per GPU"),
    "B200": DeviceProfile("B200", {"float32": 75e12, "tf32": 1.1e15, "bfloat16": 2.25e15}, 0.6, 8e12,
                          _NVLINK5, 10e-6, 50e9 * 0.8, 25e-6, 8, 8e-6, source="HGX B200 datasheet; 400 Gb/s per GPU"),
    "GB300": DeviceProfile("GB300", {"float32": 80e12, "tf32": 1.25e15, "bfloat16": 2.5e15}, 0.6, 8e12,
                           _NVLINK5, 10e-6, 100e9 * 0.8, 25e-6, 72, 8e-6,
                           source="GB300 NVL72 datasheet (per GPU); ConnectX-8 800 Gb/s per GPU"),
    # This project's CI machine kind (2 cores, AVX2, gloo on loopback), fitted by `python -m dist_ortho.plan
    # --calibrate` (see docs/scale.md): one host, every rank a process sharing its cores.
    "CPU": DeviceProfile("CPU", {"float32": 8.3e10, "tf32": 8.3e10, "bfloat16": 1.28e9}, 1.0, 1e10,
                         6.95e8, 5.2e-3, 6.95e8, 5.2e-3, 1_000_000, 1e-5, shared_compute=True,
                         per_ranks={"1": {"intra_latency_s": 3.4e-5},
                                    "2": {"flops_per_s": {"float32": 1.11e11, "tf32": 1.11e11, "bfloat16": 1.71e9},
                                          "intra_latency_s": 1.82e-3, "intra_bytes_per_s": 9.28e8},
                                    "4": {"flops_per_s": {"float32": 1.57e11, "tf32": 1.57e11, "bfloat16": 2.42e9},
                                          "intra_latency_s": 5.21e-3, "intra_bytes_per_s": 6.95e8}},
                         medium_compute="float32",
                         source="python -m dist_ortho.plan --calibrate on the 2-core AVX2 CI machine kind (docs/scale.md)"),
}


def load_profile(name_or_path: str, overrides: dict[str, Any] | None = None) -> DeviceProfile:
    """A built-in profile by name (case-insensitive) or a JSON file of every DeviceProfile field (a file may
    also name a built-in as "base" and give only the fields it changes); ``overrides`` replace fields."""
    path = Path(name_or_path)
    if path.suffix == ".json" or path.exists():
        try:
            fields = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"device file {name_or_path!r}: cannot read it as JSON ({error})") from None
        if not isinstance(fields, dict):
            raise ValueError(f"device file {name_or_path!r}: expected a JSON object of DeviceProfile fields")
        base = fields.pop("base", None)
        if base is not None:
            fields = {**dataclasses.asdict(load_profile(base)), **fields}
    else:
        known = {k.lower(): v for k, v in PROFILES.items()}
        if name_or_path.lower() not in known:
            raise ValueError(f"device: unknown profile {name_or_path!r}; built-in: {sorted(PROFILES)} or a JSON file")
        fields = dataclasses.asdict(known[name_or_path.lower()])
    fields.update(overrides or {})
    names = {f.name for f in dataclasses.fields(DeviceProfile)}
    unknown = sorted(set(fields) - names)
    if unknown:
        raise ValueError(f"device profile: unknown field(s) {unknown}; fields are {sorted(names)}")
    missing = sorted(f.name for f in dataclasses.fields(DeviceProfile)
                     if f.name not in fields and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    if missing:
        raise ValueError(f"device profile {fields.get('name', name_or_path)!r}: missing field(s) {missing}")
    return DeviceProfile(**fields)
