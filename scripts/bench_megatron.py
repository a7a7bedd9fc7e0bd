"""Benchmark the Muon step on Megatron's own stack: dist_ortho's exact modes against megatron-core's own
``TensorParallelMuon`` (its inexact ``blockwise``, Megatron's default, and its exact ``duplicated``).

    .venv-next/bin/python scripts/bench_megatron.py [--layers 2] [--hidden 256] [--repeats 5] [--json out.json]
        [--wrappings bare megatron layer-wise] [--precisions highest medium]

Runs where megatron-core >= 0.17 and emerging-optimizers are installed (``make setup-next``: .venv-next,
Python 3.12), at world 4 = DP 2 x TP 2 on gloo. The parameters are a real megatron-core ``GPTModel``'s (local
spec; fused GQA ``linear_qkv`` split into Q, K, V; ``linear_proj``, ``linear_fc1``, ``linear_fc2`` of every
layer: the matrices megatron-core gives Muon), built by ``parallel_state``'s TP groups; every configuration
steps its own copy of them with the same seeded gradients (the same on both DP replicas, as Megatron's DDP
leaves them), float32 with "highest" matmul precision, Nesterov, decoupled weight decay, 5 quintic
iterations. Configurations:
- upstream blockwise / upstream duplicated: megatron-core's class (``install.upstream``: its own, even
  after dist_ortho is installed), every DP replica stepping every matrix, as Megatron-LM's default
  (non-layer-wise) optimizer does;
- ours <mode>: dist_ortho's TensorParallelMuon with that ``tp_mode``, every DP replica stepping every matrix;
- ours grid <mode>: the same with ``dp_group`` (the DP x TP grid: each matrix's Newton-Schulz once in the
  grid, its new value all-gathered over DP; what ``--optimizer dist_muon`` / layer-wise DP builds).
Per configuration: median step seconds over ``--repeats`` interleaved steps (after 2 warm-up steps), its
ratio to upstream blockwise, collectives and bytes sent per step on rank 0 (torch.distributed calls counted
by wrapping them, the same way for upstream and ours: bench_common.counting_collectives), FLOPs of the step on
every rank (torch.utils.flop_counter, every dtype alike; the table shows the largest), and the largest difference of any gathered weight from upstream
duplicated's after every step of the run (the exact reference; blockwise's own distance shows what inexact means).

``--wrappings`` adds the comparisons in Megatron's own optimizer wrapping, where upstream and ours are built by
megatron-core's ``get_megatron_optimizer`` from the same ``OptimizerConfig`` (upstream's before dist_ortho's
``install()``, ours after, in a world of their own per wrapping and precision: install() is for good), on a
bf16 ``GPTModel`` chunk (fp32 master copies in Megatron's Float16 wrapper; the whole chunk, so embeddings and
norms go to Megatron's Adam alike):
- ``megatron``: without the layer-wise optimizer: every DP replica steps every matrix, upstream and ours;
- ``layer-wise``: ``use_layer_wise_distributed_optimizer``: Megatron shards whole matrices over DP and
  all-gathers them after the step, around upstream's TensorParallelMuon or ours alike. The chunk carries the
  ``ddp_config`` a DDP wrapper gives it, not Megatron's DDP itself (its buffers are allocated on CUDA), so
  Megatron shards by its legacy ping-pong-by-numel rule and all-gathers with ``allgather_params``.
``--precisions`` runs each wrapping at Muon's ``fp32_matmul_prec`` "highest" (float32) and/or "medium" (bf16, Megatron's
default), the same option for upstream and ours. Weights there are compared as the bf16 model weights (every rank has
them after the step): bf16 rounding of the weight, ~4e-3 relative, is the floor of "max weight diff".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import warnings
import zlib
from importlib.metadata import version

import torch
import torch.distributed as dist
from bench_common import counting_collectives, run_worlds, time_interleaved

TP, DP = 2, 2
HP = {"lr": 0.02, "momentum": 0.9, "weight_decay": 0.01, "nesterov": True}


def _model_matrices(args: argparse.Namespace, dtype: torch.dtype = torch.float32, whole: bool = False):
    """A GPTModel's Muon matrices (name -> parameter; ``whole``: the model itself) and the fused QKV's split sizes."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from dist_ortho.integrations.megatron import megatron_qkv_split_shapes

    heads = args.hidden // 32
    config = TransformerConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=heads, num_query_groups=max(1, heads // 4),
        ffn_hidden_size=4 * args.hidden, use_cpu_initialization=True, add_bias_linear=False,
        tensor_model_parallel_size=TP, params_dtype=dtype, bf16=dtype == torch.bfloat16)
    torch.manual_seed(0)
    model = GPTModel(config, get_gpt_layer_local_spec(), vocab_size=512, max_sequence_length=64)
    if whole:
        return model, megatron_qkv_split_shapes(config)
    matrices = {n: p for n, p in model.named_parameters()
                if p.ndim == 2 and "embedding" not in n and "output_layer" not in n}
    return matrices, megatron_qkv_split_shapes(config)


def _copy(p: torch.Tensor, qkv: bool) -> torch.nn.Parameter:
    from megatron.core.tensor_parallel.layers import copy_tensor_model_parallel_attributes

    q = torch.nn.Parameter(p.detach().clone())
    copy_tensor_model_parallel_attributes(q, p)
    q.is_qkv = qkv
    return q


def _gather(t: torch.Tensor, dim: int, group) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _bare(args: argparse.Namespace, precision: str, pgs) -> tuple[dict, dict, dict]:
    """The bare wrapping's configurations: (label -> optimizer, label -> its copy of the matrices, the matrices)."""
    from megatron.core.optimizer import emerging_optimizers as registry

    from dist_ortho.integrations.megatron import TensorParallelMuon
    from dist_ortho.integrations.megatron.install import upstream

    matrices, split = _model_matrices(args)
    upstream_cls = upstream(registry.__name__, "TensorParallelMuon")
    assert upstream_cls.__module__ == "megatron.core.optimizer.emerging_optimizers"  # megatron-core's own
    common = {**HP, "split_qkv": True, "is_qkv_fn": lambda p: getattr(p, "is_qkv", False), "qkv_split_shapes": split,
              "fp32_matmul_prec": precision, "pg_collection": pgs}
    configs: dict[str, tuple[type, dict]] = {
        "upstream blockwise": (upstream_cls, {"tp_mode": "blockwise"}),
        "upstream duplicated": (upstream_cls, {"tp_mode": "duplicated"}),
    }
    for mode in args.modes:
        configs[f"ours {mode}"] = (TensorParallelMuon, {"tp_mode": mode})
    for mode in args.modes:
        configs[f"ours grid {mode}"] = (TensorParallelMuon, {"tp_mode": mode, "dp_group": pgs.dp})
    copies, optimizers = {}, {}
    for label, (cls, options) in configs.items():
        copies[label] = {n: _copy(p, n.endswith("linear_qkv.weight")) for n, p in matrices.items()}
        optimizers[label] = cls(list(copies[label].values()), **common, **options)
    return optimizers, copies, matrices


def _wrapped(args: argparse.Namespace, precision: str, layer_wise: bool, pgs) -> tuple[dict, dict, dict]:
    """Megatron's own wrapping (``get_megatron_optimizer`` of a bf16 GPTModel chunk, with or without the layer-wise
    optimizer): upstream's configurations built before dist_ortho's install(), ours after, from one config."""
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from dist_ortho.integrations.megatron import install

    labels = [("upstream blockwise", "blockwise"), ("upstream duplicated", "duplicated")]
    labels += [(f"ours {mode}", mode) for mode in args.modes]
    optimizers, copies = {}, {}
    start = None
    from megatron.core.optimizer import emerging_optimizers as registry

    for label, mode in labels:
        if label.startswith("ours"):
            install()
        else:  # install() is for good: upstream's rows need a world where it has not run yet
            cls = registry._EMERGING_OPTIMIZERS["muon"].optimizer_cls
            assert not cls.__module__.startswith("dist_ortho"), f"{label} would be dist_ortho's {cls.__module__}"
        model, _ = _model_matrices(args, torch.bfloat16, whole=True)
        model.ddp_config = DistributedDataParallelConfig()  # what Megatron's DDP wrapper of a chunk carries
        config = OptimizerConfig(optimizer="muon", lr=HP["lr"], weight_decay=HP["weight_decay"], clip_grad=0.0, bf16=True,
                                 use_layer_wise_distributed_optimizer=layer_wise, muon_momentum=HP["momentum"],
                                 muon_nesterov=True, muon_fp32_matmul_prec=precision, muon_tp_mode=mode,
                                 muon_split_qkv=True)
        optimizers[label] = get_megatron_optimizer(config, [model])
        copies[label] = dict(model.named_parameters())  # every weight gets a gradient: Adam's part steps alike
        start = start or {n: _copy(p, False) for n, p in copies[label].items()
                          if p.ndim == 2 and "embedding" not in n and "output_layer" not in n}
    return optimizers, copies, start


def _measure(rank: int, world: int, port: int, args: argparse.Namespace, out: dict) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    warnings.filterwarnings("ignore")  # megatron-core's deprecation notes, once per rank
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection

    ps.initialize_model_parallel(tensor_model_parallel_size=TP)
    pgs = ProcessGroupCollection.use_mpu_process_groups()
    tables = {}
    # upstream's wrapped configurations are built before anything installs dist_ortho
    for wrapping in sorted(args.wrappings, key=lambda w: w == "bare"):
        for precision in args.precisions:
            with _on_cpu(wrapping):
                if wrapping == "bare":
                    optimizers, copies, matrices = _bare(args, precision, pgs)
                else:
                    optimizers, copies, matrices = _wrapped(args, precision, wrapping == "layer-wise", pgs)
                tables[f"{wrapping} / {precision}"] = _table(args, optimizers, copies, matrices, pgs)
    if rank == 0:
        out["tables"] = tables
    ps.destroy_model_parallel()
    dist.destroy_process_group()


@contextlib.contextmanager
def _on_cpu(wrapping: str):
    """Megatron's wrappers on CPU tensors (tests/megatron_cpu.py's stand-ins for its few CUDA calls)."""
    if wrapping == "bare":
        yield
        return
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from tests.megatron_cpu import megatron_on_cpu

    with megatron_on_cpu():
        yield


def _table(args: argparse.Namespace, optimizers: dict, copies: dict, matrices: dict, pgs) -> dict:
    """Time, count and compare one set of configurations (each stepping its own copy of the same matrices)."""
    from megatron.core import parallel_state as ps

    steps = {label: 0 for label in optimizers}
    wrapped = not isinstance(next(iter(optimizers.values())), torch.optim.Optimizer)

    def step(label: str) -> None:
        """The label's next step with the gradients of that step (seeded by name, TP rank and step)."""
        for n, p in copies[label].items():
            seed = zlib.crc32(f"{n}/{ps.get_tensor_model_parallel_rank()}/{steps[label]}".encode())
            p.grad = (torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.1).to(p.dtype)
            if p.dtype == torch.float32 and wrapped:
                p.main_grad = p.grad  # what Megatron's DDP buffers give fp32 weights of a bf16 model
        out = optimizers[label].step()
        assert out is None or out[0], (label, out)
        steps[label] += 1

    for _ in range(2):
        for label in optimizers:
            step(label)
    from torch.utils.flop_counter import FlopCounterMode

    counted = {}
    for label in optimizers:
        flops = FlopCounterMode(display=False)
        with counting_collectives() as counts, flops:
            step(label)
        every: list = [None] * dist.get_world_size()
        dist.all_gather_object(every, flops.get_total_flops())
        counted[label] = {"calls": counts["calls"], "bytes": counts["bytes"], "flops_per_rank": every}
    times = time_interleaved({label: (lambda label=label: step(label)) for label in optimizers}, args.repeats)
    assert len(set(steps.values())) == 1
    tp = pgs.tp
    weights = {label: {n: _gather(params[n].detach(), params[n].partition_dim, tp).double() for n in matrices}
               for label, params in copies.items()}
    start = {n: _gather(p.detach(), p.partition_dim, tp).double() for n, p in matrices.items()}
    reference = weights["upstream duplicated"]
    rows = []
    for label in optimizers:
        diff = max((weights[label][n] - reference[n]).abs().max().item() for n in start)
        rows.append({"config": label, "seconds": statistics.median(times[label]), "calls": counted[label]["calls"],
                     "bytes": counted[label]["bytes"], "flops_per_rank": counted[label]["flops_per_rank"],
                     "max_weight_diff": diff})
    return {"rows": rows, "moved": max((reference[n] - start[n]).abs().max().item() for n in start),
            "steps": steps["upstream duplicated"], "shapes": sorted({tuple(p.shape) for p in matrices.values()})}



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256, help="hidden size (heads of 32, a query group per 4 heads, FFN 4x)")
    parser.add_argument("--modes", nargs="+", default=["home", "auto"], help="dist_ortho's tp_mode(s) to run")
    parser.add_argument("--wrappings", nargs="+", default=["bare"], choices=["bare", "megatron", "layer-wise"])
    parser.add_argument("--precisions", nargs="+", default=["highest"], choices=["highest", "high", "medium"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    try:
        import megatron.core.optimizer.emerging_optimizers  # noqa: F401
    except ImportError as error:
        raise SystemExit(f"needs megatron-core >= 0.17 with emerging-optimizers (make setup-next; .venv-next): {error}")
    tables = {}
    # one world for the bare wrapping (upstream's class is taken by name there), one per wrapped configuration:
    # install() is for good, so a wrapped upstream row built in a world where ours was built is ours
    runs = [(["bare"], args.precisions)] if "bare" in args.wrappings else []
    runs += [([w], [p]) for w in args.wrappings if w != "bare" for p in args.precisions]
    for wrappings, precisions in runs:
        one = argparse.Namespace(**{**vars(args), "wrappings": wrappings, "precisions": precisions})
        tables.update(run_worlds(_measure, [TP * DP], one)[TP * DP]["tables"])
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, megatron-core "
          f"{version('megatron-core')}, gloo, DP {DP} x TP {TP}, GPTModel {args.layers} layers hidden {args.hidden}; "
          f"median of {args.repeats} steps after 2 warm-up")
    for name, result in tables.items():
        rows = result["rows"]
        base = next(r["seconds"] for r in rows if r["config"] == "upstream blockwise")
        print(f"\n{name}: local shards {result['shapes']}; weights after {result['steps']} steps (they moved up to "
              f"{result['moved']:.3g})")
        print("| configuration | exact | collectives / step | bytes sent / step | FLOPs / step (max over ranks) | "
              "median step s | speed vs upstream blockwise | max weight diff vs upstream duplicated |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            exact = "no" if "blockwise" in r["config"] else "yes"
            print(f"| {r['config']} | {exact} | {r['calls']} | {r['bytes']:,} | {max(r['flops_per_rank']) / 1e6:,.1f} M | "
                  f"{r['seconds']:.3f} | {base / r['seconds']:.2f}x | {r['max_weight_diff']:.1e} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tables": tables, "layers": args.layers, "hidden": args.hidden, "torch": torch.__version__,
                       "megatron_core": version("megatron-core"), "cores": os.cpu_count()}, f, indent=1)


if __name__ == "__main__":
    main()
