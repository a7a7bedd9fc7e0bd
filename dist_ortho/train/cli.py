"""Train a small tensor-parallel GPT with a Muon-family optimizer (and, with --compare, a baseline).

    torchrun --standalone --nproc-per-node 2 -m dist_ortho.train --tp 2 --optimizer muon --compare adamw
    torchrun --standalone --nproc-per-node 4 -m dist_ortho.train --tp 2   # DP 2 x TP 2
    torchrun --standalone --nproc-per-node 4 -m dist_ortho.train --tp 2 --torch-native   # DTensor weights
    torchrun --standalone --nproc-per-node 4 -m dist_ortho.train --torch-native --hsdp 2 --experts 4 --ep 2 --topk 2

Backend: gloo on CPU, NCCL on CUDA (one GPU per local rank). Data: the Python standard library's
source, byte-tokenized (or --data FILE); the last 10% is held out. Per run, rank 0 writes a JSON-lines
log of every step to OUT/NAME/log.jsonl, checkpoints (torch.distributed.checkpoint) to OUT/NAME/ckpt,
and OUT/loss.png plots train and eval loss of every run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dist_ortho import MuonAdamW, comm
from dist_ortho.integrations.megatron import add_muon_args
from dist_ortho.optim.options import accepted_keywords
from dist_ortho.optim.registry import OPTIMIZERS, get_optimizer
from dist_ortho.parameters.backward import BackwardReducer
from dist_ortho.train import checkpoint
from dist_ortho.train.data import ByteData, load_corpus
from dist_ortho.train.model import GPT, GPTConfig, parallelize_native
from dist_ortho.train.titan import check_layout, parallelize_titan

logger = logging.getLogger("dist_ortho.train")

# The --muon-* flags and the optimizer arguments they set (each member takes those in its signature).
_FLAG_OF = {
    "momentum": "muon_momentum", "nesterov": "muon_use_nesterov", "fp32_matmul_prec": "muon_fp32_matmul_prec",
    "coefficient_type": "muon_coefficient_type", "num_ns_steps": "muon_num_ns_steps",
    "scale_mode": "muon_scale_mode", "extra_scale_factor": "muon_extra_scale_factor", "use_syrk": "muon_use_syrk",
    "split_qkv": "muon_split_qkv",
}
MATRIX_OPTIMIZERS = sorted(k for k in OPTIMIZERS if k not in ("adamw", "muon_adamw"))


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tp", type=positive_int, default=None, help="tensor-parallel size (default: the world size)")
    p.add_argument("--optimizer", default="muon", choices=MATRIX_OPTIMIZERS + ["adamw"])
    p.add_argument("--compare", default=None, choices=MATRIX_OPTIMIZERS + ["adamw"], help="also train with this one")
    p.add_argument("--steps", type=positive_int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--groups", type=int, default=2, help="query groups (GQA)")
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--lr", type=float, default=0.003, help="learning rate of the matrix optimizer")
    p.add_argument("--adamw-lr", type=float, default=1e-3, help="AdamW's: the baseline's and for embeddings/norms")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--eval-interval", type=nonnegative_int, default=25, help="evaluate every N steps (0: only at the end)")
    p.add_argument("--eval-batches", type=positive_int, default=4)
    p.add_argument("--save-interval", type=nonnegative_int, default=0, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/NAME/ckpt/latest")
    p.add_argument("--stop-after", type=int, default=None, help="stop (with a checkpoint) after this step; "
                   "the schedule still runs to --steps, so --resume continues exactly")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--data", default=None, help="a text file (default: the Python standard library's source)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--torch-native", action="store_true",
                   help="build the model the torch-native way: DTensor weights by parallelize_module (TP) and "
                   "fully_shard (FSDP2 over DP) instead of layers that carry the TE/Megatron attributes")
    p.add_argument("--hsdp", type=positive_int, default=1,
                   help="with --torch-native: HSDP, R replicas x (world / R / TP) FSDP shards, on torchtitan's mesh "
                   "dims (dp_replicate, fsdp, tp); the optimizer reads its groups from the weights' meshes")
    p.add_argument("--experts", type=nonnegative_int, default=0,
                   help="with --torch-native: every block's feed-forward a mixture of E SwiGLU experts (a router and "
                   "3D stacks w1/w2/w3 [E, out, in], dropless), Muon'd expert by expert")
    p.add_argument("--ep", type=positive_int, default=1,
                   help="with --experts: expert-parallel size N (each stack Shard(0) over mesh dim 'ep', tokens "
                   "dispatched by all-to-all; N divides the FSDP size); the stacks FSDP'd over 'efsdp' = FSDP / N")
    p.add_argument("--topk", type=positive_int, default=1, help="with --experts: experts per token")
    p.add_argument("--reduce-grads", action="store_true",
                   help="under DP, average each matrix's gradient into its owner with one reduce-scatter (half the "
                   "bytes of an all-reduce) instead of all-reducing every gradient (the AdamW side is all-reduced)")
    p.add_argument("--overlap", action="store_true",
                   help="hide communication: gradients reduced per layer during backward, the loss all-reduce waited "
                   "for at logging, and the optimizer's share over DP waited for per layer before its forward "
                   "(overlap=True; with --reduce-grads also overlap_with_backward=True). Bit-identical weights")
    p.add_argument("--qk-clip", type=float, default=None, metavar="TAU",
                   help="QK-clip (MuonClip) after every step: heads whose largest pre-softmax logit (agreed over TP x DP) "
                   "exceeds TAU get their query and key rows scaled down (dist_ortho.optim.qk_clip); logged per step")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--timeout-s", type=float, default=comm.DEFAULT_TIMEOUT_S,
                   help="how long a collective may wait for the other ranks before every rank fails (process group "
                   "and dist_ortho's collectives; default %(default)s)")
    return add_muon_args(p)


def parallel_groups(tp: int) -> tuple[dist.ProcessGroup, dist.ProcessGroup | None]:
    """DP x TP over the world: consecutive ranks form a TP group, ranks tp apart a DP group (DP = world / tp).
    This rank's TP group and DP group (None when DP = 1)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if tp < 1 or world % tp:
        raise ValueError(f"--tp {tp} must divide the world size {world}")
    # the library's timeout for these groups' own waits too (the checkpoint's barriers): new_group's default is
    # torch's 30 minutes, not the world group's
    bound = {"timeout": datetime.timedelta(seconds=comm.timeout_s())} if comm.timeout_s() > 0 else {}
    tp_all = [dist.new_group(list(range(start, start + tp)), **bound) for start in range(0, world, tp)]
    dp_all = [dist.new_group(list(range(t, world, tp)), **bound) for t in range(tp)]
    return tp_all[rank // tp], (dp_all[rank % tp] if world > tp else None)


def average_gradients(params: Any, dp_group: dist.ProcessGroup | None) -> None:
    """Average every gradient over the DP group, as DistributedDataParallel does (one all-reduce per dtype)."""
    start_average(list(params), dp_group)()


def start_average(params: list[torch.Tensor], dp_group: dist.ProcessGroup | None) -> Callable[[], None]:
    """:func:`average_gradients` issued now (the gradients read now); the returned function waits and writes."""
    size = comm.group_size(dp_group)
    if size == 1:
        return lambda: None
    grads = [p.grad for p in params if p.grad is not None]
    started = []
    for dtype in sorted({g.dtype for g in grads}, key=str):
        same = [g for g in grads if g.dtype == dtype]
        started.append((same, comm.all_reduce(torch.cat([g.reshape(-1) for g in same]), dp_group, async_op=True)))

    def write() -> None:
        for same, handle in started:
            for g, part in zip(same, handle.wait().split([g.numel() for g in same])):
                g.copy_(part.view_as(g) / size)

    return write


def backward_buckets(model: GPT, params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """``params`` in the order backward makes their gradients final: the head, each block from the last, the
    embeddings (a bucket each)."""
    wanted = set(params)
    head = [p for m in (model.norm, model.output) for p in m.parameters() if p in wanted]
    blocks = [[p for p in block.parameters() if p in wanted] for block in reversed(model.blocks)]
    seen = {p for bucket in [head, *blocks] for p in bucket}
    return [head, *blocks, [p for p in params if p not in seen]]


def build_optimizer(
    name: str, model: GPT, args: argparse.Namespace, group: Any, dp_group: Any = None, mesh: Any = None
) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=args.adamw_lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    accepted = accepted_keywords(get_optimizer(name))
    kwargs = {k: getattr(args, flag) for k, flag in _FLAG_OF.items() if k in accepted}
    if "weight_decay" in accepted:
        kwargs["weight_decay"] = args.weight_decay
    if titan_layout(args) and mesh is not None:  # no group argument: the optimizer reads them from the meshes
        groups = {}
    else:
        groups = {"device_mesh": mesh} if mesh is not None else {"tp_group": group, "dp_group": dp_group}
    if getattr(args, "reduce_grads", False) and mesh is None and dp_group is not None:
        kwargs["reduce_grads"] = True
        kwargs["overlap_with_backward"] = getattr(args, "overlap", False)
    if getattr(args, "overlap", False):
        kwargs["overlap"] = True
    return MuonAdamW(model.named_parameters(), optimizer=name, lr=args.lr, adamw_lr=args.adamw_lr,
                     tp_mode=args.muon_tp_mode, **groups, **kwargs)


def build_model(config: GPTConfig, args: argparse.Namespace, group: Any, dp_group: Any, device: torch.device) -> tuple[GPT, Any]:
    """The model (TE/Megatron-attribute layers, or with --torch-native DTensors on a (dp, tp) mesh) and its mesh."""
    if not args.torch_native:
        return GPT(config, group, seed=args.seed).to(device), None
    from torch.distributed.device_mesh import init_device_mesh

    tp, dp = comm.group_size(group), comm.group_size(dp_group)
    if titan_layout(args):
        model = GPT(config, None, seed=args.seed, tp_size=tp).to(device)
        return parallelize_titan(model, tp * dp, args.hsdp, tp, args.ep, device)
    dims = [(n, size) for n, size in (("dp", dp), ("tp", tp)) if size > 1] or [("tp", 1)]
    mesh = init_device_mesh(device.type, tuple(size for _, size in dims), mesh_dim_names=tuple(n for n, _ in dims))
    return parallelize_native(GPT(config, None, seed=args.seed, tp_size=tp).to(device), mesh), mesh


def titan_layout(args: argparse.Namespace) -> bool:
    """Whether the run is laid out as torchtitan's (dist_ortho.train.titan): --hsdp or --experts."""
    return getattr(args, "hsdp", 1) > 1 or getattr(args, "experts", 0) > 0


def check_titan_args(args: argparse.Namespace, ranks: int, tp: int) -> None:
    """--hsdp / --experts / --ep / --topk against each other and the run's size (before any collective)."""
    if titan_layout(args) and not args.torch_native:
        raise ValueError("--hsdp and --experts lay the model out with DTensors: add --torch-native")
    if titan_layout(args) or args.ep > 1:
        check_layout(ranks, args.hsdp, tp, args.experts, args.ep)


def lr_factor(step: int, args: argparse.Namespace) -> float:
    if step < args.warmup:
        return (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model: GPT, data: ByteData, args: argparse.Namespace, device: torch.device) -> float:
    losses = [model(*(t.to(device) for t in data.batch(i, args.batch_size, "eval"))).item() for i in range(args.eval_batches)]
    checkpoint.sharded(model)
    return sum(losses) / len(losses)


def train_one(
    name: str, args: argparse.Namespace, group: Any, data: ByteData, device: torch.device, dp_group: Any = None
) -> dict:
    """One training run over TP ``group`` x DP ``dp_group``; returns its final train and eval loss and timing.

    Each DP rank takes its share of the batch; gradients are averaged over DP before the step."""
    config = GPTConfig(256, args.seq_len, args.layers, args.hidden, args.heads, args.groups, args.ffn,
                       getattr(args, "experts", 0), getattr(args, "topk", 1))
    dp_size, dp_rank = comm.group_size(dp_group), comm.group_rank(dp_group)
    check_titan_args(args, comm.group_size(group) * dp_size, comm.group_size(group))
    if args.batch_size % dp_size:
        raise ValueError(f"--batch-size {args.batch_size} must be a multiple of the data-parallel size {dp_size}")
    run_group = group if dp_group is None else None  # every rank of this run (the world under DP)
    model, mesh = build_model(config, args, group, dp_group, device)
    optimizer = build_optimizer(name, model, args, group, dp_group, mesh)
    if mesh is not None:  # FSDP2 averages gradients over DP (reduce-scatter); without FSDP (DP = 1) nothing to do
        averaged: list = []
    elif getattr(optimizer, "matrix_optimizer", None) is not None and optimizer.matrix_optimizer.reduce_grads:
        averaged = [p for g in optimizer.fallback_optimizer.param_groups for p in g["params"]] if optimizer.fallback_optimizer else []
    else:
        averaged = list(model.parameters())
    reducer = None
    if args.overlap and comm.group_size(dp_group) > 1:
        if getattr(optimizer, "overlap_by_layer", None) is not None:
            optimizer.overlap_by_layer(list(model.blocks))
        if averaged:
            reducer = BackwardReducer(backward_buckets(model, averaged), lambda bucket: start_average(bucket, dp_group))
    for g in optimizer.param_groups:
        g["initial_lr"] = g["lr"]
    run_dir, rank0 = Path(args.out) / name, comm.group_rank(group) == 0 and dp_rank == 0
    ckpt_dir = run_dir / "ckpt"
    meta_base = {"model": config.as_dict(), "optimizer": name, "seed": args.seed}
    start = 0
    if args.resume:
        found = _resume_from(ckpt_dir)
        meta = checkpoint.read_meta(found)
        if {k: meta.get(k) for k in meta_base} != meta_base:
            raise ValueError(f"--resume: {found} was written for model {meta.get('model')}, optimizer "
                             f"{meta.get('optimizer')}, seed {meta.get('seed')}; this run is model {meta_base['model']}, "
                             f"optimizer {name}, seed {args.seed}")
        if meta["step"] >= args.steps:
            logger.info("%s: the run already finished at step %d (--steps %d); nothing to do", name, meta["step"], args.steps)
            return {"optimizer": name, "losses": {}, "train_loss": meta.get("train_loss"),
                    "eval_loss": meta.get("eval_loss"), "optimizer_share": 0.0, "seconds": 0.0}
        checkpoint.load(found, model, optimizer, group, run_group)
        start = meta["step"]
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
    if rank0 and args.resume:  # steps after the checkpoint are run again: drop their old records
        _keep_log_until(run_dir / "log.jsonl", start)
    log = open(run_dir / "log.jsonl", "a" if args.resume else "w") if rank0 else None
    progress = None
    if rank0 and not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=args.steps, initial=start, desc=name, dynamic_ncols=True, file=sys.stdout)
    tokens_per_step = args.batch_size * args.seq_len
    result: dict[str, Any] = {"optimizer": name, "losses": {}}
    opt_time = total_time = 0.0
    last_stats, last_logged = None, 0.0  # the optimizer's previous step: its share may be waited for later
    stop = min(args.steps, args.stop_after or args.steps)
    for step in range(start, stop):
        began = time.perf_counter()
        for g in optimizer.param_groups:
            g["lr"] = g["initial_lr"] * lr_factor(step, args)
        share = args.batch_size // dp_size
        tokens, targets = (t[dp_rank * share : (dp_rank + 1) * share].to(device)
                           for t in data.batch(step, args.batch_size))
        if args.qk_clip is not None:  # the attention reports its heads' max logits for this step's forward
            for block in model.blocks:
                block.max_logits = torch.full((config.num_attention_heads,), float("-inf"), device=device)
        loss = model(tokens, targets)
        loss.backward()
        with comm.count_collectives() as waits:  # the step's collectives: gradients, loss, the optimizer's
            if reducer is not None:
                reducer.finish()
            else:
                average_gradients(averaged, dp_group)
            summed = comm.all_reduce(loss.detach().clone(), dp_group, async_op=True)
            opt_began = time.perf_counter()
            optimizer.step()
            opt_time += time.perf_counter() - opt_began
        optimizer.zero_grad(set_to_none=True)
        clipped = _qk_clip(model, optimizer, args.qk_clip) if args.qk_clip is not None else {}
        with comm.count_collectives(waits):
            loss = summed.wait() / dp_size
        elapsed = time.perf_counter() - began
        total_time += elapsed
        # The previous step's share, when overlapped, was waited for during this step's forward.
        deferred = last_stats.wait_ms - last_logged if last_stats is not None else 0.0
        last_stats = _optimizer_stats(optimizer)
        last_logged = last_stats.wait_ms if last_stats is not None else 0.0
        record = {"step": step + 1, "loss": loss.item(), "lr_factor": lr_factor(step, args),
                  "tokens_per_s": tokens_per_step / elapsed, "optimizer_share": opt_time / total_time,
                  "comm_wait_ms": waits.wait_ms + deferred, "optimizer_comm_wait_ms": last_logged + deferred, **clipped}
        if args.eval_interval and (step + 1) % args.eval_interval == 0 or step + 1 == args.steps:
            record["eval_loss"] = evaluate(model, data, args, device)
        if args.save_interval and (step + 1) % args.save_interval == 0 or step + 1 == stop:
            losses = {"train_loss": record["loss"], "eval_loss": record.get("eval_loss", result.get("eval_loss"))}
            checkpoint.save(ckpt_dir, model, optimizer, group, {**meta_base, "step": step + 1, **losses}, run_group)
        if log:
            log.write(json.dumps(record) + "\n")
            log.flush()
        if progress:
            progress.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                 opt=f"{100 * record['optimizer_share']:.0f}%")
            progress.update(1)
        result["losses"][step + 1] = record["loss"]
        result.update(train_loss=record["loss"], eval_loss=record.get("eval_loss", result.get("eval_loss")),
                      optimizer_share=record["optimizer_share"], seconds=total_time)
    if progress:
        progress.close()
    if log:
        log.close()
    return result


def _qk_clip(model: GPT, optimizer: Any, tau: float) -> dict[str, float]:
    """QK-clip of every block after the step, with the maxima its forward recorded; what the log shows of it: the
    largest agreed max logit, the largest the clipped weights give on the same batch (<= tau), heads clipped."""
    matrices = getattr(optimizer, "matrix_optimizer", None)
    if matrices is None:
        raise ValueError("--qk-clip clips through dist_ortho's optimizer: not with --optimizer/--compare adamw")
    if any(block.linear_qkv.group is None and block.tp > 1 for block in model.blocks):
        raise ValueError("--qk-clip with --torch-native needs --tp 1 (the attention does not know its TP rank's heads)")
    result = matrices.qk_clip({block.linear_qkv.weight: block.max_logits for block in model.blocks}, tau)
    for block in model.blocks:
        block.max_logits = None
    return {"max_logit": result.max_logit, "max_logit_clipped": result.max_logit_after, "qk_clipped_heads": result.clipped}


def _optimizer_stats(optimizer: Any) -> comm.CommStats | None:
    """The optimizer's last step's collectives (None for a torch optimizer); its wait_ms grows while an
    overlapped share is waited for later."""
    stats = getattr(optimizer, "comm_stats", None)
    return stats() if stats is not None else None


def _resume_from(ckpt_dir: Path) -> Path:
    """The checkpoint --resume continues from: ``latest`` when intact, else the newest intact one (said so)."""
    found = checkpoint.latest(ckpt_dir)
    if found is None:
        raise ValueError(f"--resume: no checkpoint under {ckpt_dir}")
    problem = checkpoint.damage(found)
    if problem is None:
        return found
    intact = checkpoint.newest_intact(ckpt_dir)
    if intact is None:
        raise ValueError(f"--resume: checkpoint {found} is damaged ({problem}) and no intact checkpoint is left under "
                         f"{ckpt_dir}")
    logger.warning("--resume: checkpoint %s is damaged (%s); resuming from the newest intact checkpoint %s",
                   found, problem, intact)
    return intact


def _loss(value: float | None) -> str:
    return f"{value:.4f}" if value is not None else "n/a"


def _keep_log_until(path: Path, step: int) -> None:
    """Keep the log's records of steps <= ``step`` (a line cut by a kill is dropped too)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    path.write_text("".join(line + "\n" for line in kept))


def plot(out: Path, names: list[str]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in names:
        rows = [json.loads(line) for line in (out / name / "log.jsonl").read_text().splitlines()]
        steps = [r["step"] for r in rows]
        smooth, ema = [], None
        for r in rows:
            ema = r["loss"] if ema is None else 0.9 * ema + 0.1 * r["loss"]
            smooth.append(ema)
        line, = ax.plot(steps, smooth, label=f"{name} train (EMA)")
        evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
        ax.plot(*zip(*evals), "o--", color=line.get_color(), label=f"{name} eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / byte)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "loss.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(args: argparse.Namespace, group: Any, device: torch.device, dp_group: Any = None) -> list[dict]:
    data = ByteData(load_corpus(args.data), args.seq_len, seed=args.seed)
    names = [args.optimizer] + ([args.compare] if args.compare and args.compare != args.optimizer else [])
    results = [train_one(name, args, group, data, device, dp_group) for name in names]
    if comm.group_rank(group) == 0 and comm.group_rank(dp_group) == 0:
        path = plot(Path(args.out), names)
        for r in results:
            logger.info("%s: final train loss %s, eval loss %s, optimizer step %.0f%% of step time, %.0f s",
                    r["optimizer"], _loss(r.get("train_loss")), _loss(r.get("eval_loss")),
                    100 * r["optimizer_share"], r["seconds"])
        logger.info("plot: %s; logs: %s", path, ", ".join(str(Path(args.out) / n / "log.jsonl") for n in names))
    return results


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cuda = torch.cuda.is_available()
    timeout = datetime.timedelta(seconds=args.timeout_s) if args.timeout_s > 0 else None
    dist.init_process_group("nccl" if cuda else "gloo", **({"timeout": timeout} if timeout else {}))
    comm.set_timeout(args.timeout_s)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if dist.get_rank() != 0:  # every rank decides alike: one copy of each line, from rank 0; errors are per rank
        logging.getLogger().setLevel(logging.ERROR)
    code = 0
    try:
        default_tp = 1 if titan_layout(args) else dist.get_world_size()  # torchtitan's: TP only when asked
        group, dp_group = parallel_groups(args.tp if args.tp is not None else default_tp)
        run(args, group, device, dp_group)
    except ValueError as e:  # the same on every rank: all exit, none hangs
        logger.error("rank %d: %s", dist.get_rank(), e)
        code = 2
    dist.destroy_process_group()
    sys.exit(code)
