"""The main job as an MoE under torchtitan's layouts, through torchrun, against the same model at world 1.

README's command: 4 ranks, HSDP 2 replicas x FSDP 2 (dense weights on ("dp_replicate", "fsdp")), 4 experts over
EP 2 (stacks on ("dp_replicate", "efsdp", "ep"), efsdp 1), top-2 routing, stopped after step 4; resumed from its
checkpoint at FSDP 4 with EP 1 (the stacks Shard(0) over "efsdp" of 4 ranks: one expert each). Both are torchrun
processes of ``python -m dist_ortho.train``; the optimizer gets no group argument.

Reference: the same model, data and schedule in one process (world 1, plain tensors). Every step's loss of both
runs must be within 2e-5 of it: the model is identical (weights from one seed, dropless routing), so what differs is
float32 rounding only: each DP rank's mean over its batch share, averaged, against one mean over the batch; matmuls
over 1/4 of the rows and each expert over the token copies routed to it (in another order after the all-to-all);
FSDP's reduce-scatter summing gradients in another order; Newton-Schulz in float32 ("highest") on those. Measured:
4.8e-7 over 8 steps (one float32 ulp at a loss of 5.5); resuming with each rank cut the wrong expert's momentum
moves step 5's loss by 1.6e-3.

Also: dense HSDP 2 x TP 2 (no experts; TP on "tp", then HSDP with fsdp 1) in the harness's world against world 1,
and bad layout flags refused alike on every rank before any collective.

The checkpoint holds the expert stacks' optimizer state whole (gathered over "ep" by its StackHeld): its momentum is
the reference's within float32 (2e-5 relative), and after loading at FSDP 4 / EP 1 every rank's momentum of each
stack is the checkpoint's rows at the experts DTensor says this rank holds (its own offsets), bit for bit.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.harness import started_world
from tests.test_train import SMALL

MOE = ["--torch-native", "--experts", "4", "--topk", "2", "--steps", "8", "--eval-interval", "4"]
FIRST = ["--hsdp", "2", "--ep", "2", "--stop-after", "4"]  # README's command (4 ranks)
THEN = ["--ep", "1", "--resume"]  # FSDP 4, EP 1
LOSS_TOL = 2e-5
STACKS = [f"blocks.0.moe.experts.{w}" for w in ("w1", "w2", "w3")]


@pytest.fixture(scope="module")
def world():
    with started_world(4) as w:
        yield w


def _args(*extra: str):
    from dist_ortho.train.cli import parser

    return parser().parse_args(SMALL + MOE + list(extra))


def _torchrun(out: Path, extra: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4", "-m",
           "dist_ortho.train", *SMALL, *MOE, *extra, "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]


def _losses(out: Path) -> dict[int, float]:
    import json

    return {r["step"]: r["loss"] for r in map(json.loads, (out / "muon" / "log.jsonl").read_text().splitlines())}


def _saved(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a torch.distributed.checkpoint folder, read in this process alone."""
    import torch.distributed.checkpoint as dcp

    metadata = dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    state = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in metadata.items()}
    dcp.load(state, checkpoint_id=str(checkpoint), no_dist=True)
    return state


def _reference_and_runs(ctx, out: str) -> dict:
    """Rank 0: the world-1 reference in this process, then README's command and its resume through torchrun."""
    groups = [dist.new_group([r]) for r in range(ctx.world_size)]
    if ctx.rank != 0:
        return {}
    from dist_ortho.train.cli import run

    root = Path(out)
    reference = run(_args("--out", str(root / "world1"), "--save-interval", "4"), groups[0], torch.device("cpu"))
    _torchrun(root / "moe", FIRST)
    first = _losses(root / "moe")
    _torchrun(root / "moe", THEN)
    return {"reference": reference[0]["losses"], "first": first, "all": _losses(root / "moe")}


def _loaded_state(ctx, out: str) -> dict:
    """At FSDP 4 / EP 1: load the step-4 checkpoint; each stack's momentum on this rank and the experts it holds."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    from dist_ortho.train import checkpoint
    from dist_ortho.train.cli import build_model, build_optimizer, parallel_groups
    from dist_ortho.train.model import GPTConfig

    args = _args("--out", out, *THEN)
    group, dp_group = parallel_groups(1)
    config = GPTConfig(256, args.seq_len, args.layers, args.hidden, args.heads, args.groups, args.ffn, 4, 2)
    model, _ = build_model(config, args, group, dp_group, torch.device("cpu"))
    optimizer = build_optimizer("muon", model, args, group, dp_group, _)
    checkpoint.load(Path(out) / "moe" / "muon" / "ckpt" / "step_000004", model, optimizer, group, None)
    params = dict(model.named_parameters())
    out_ = {}
    for name in STACKS:
        p = params[name]
        _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        out_[name] = (offset[0], optimizer.state[p]["momentum_buffer"].clone())
    return out_


def test_moe_hsdp_run_and_its_resume_at_another_layout_match_world_1(world, tmp_path):
    runs = world.run(_reference_and_runs, str(tmp_path))[0]
    ref, first, every = runs["reference"], runs["first"], runs["all"]
    assert sorted(first) == list(range(1, 5)) and sorted(every) == list(range(1, 9)), (first, every)
    diffs = {s: abs(every[s] - ref[s]) for s in ref}
    assert max(diffs.values()) <= LOSS_TOL, diffs
    assert every[8] < every[1], every  # it trains
    saved = _saved(tmp_path / "moe" / "muon" / "ckpt" / "step_000004")
    single = _saved(tmp_path / "world1" / "muon" / "ckpt" / "step_000004")
    for name in STACKS:
        key = f"optim.{name}/momentum_buffer"
        assert saved[key].shape == single[key].shape == (4, *single[f"model.{name}"].shape[1:]), key
        scale = single[key].abs().max().item()
        assert (saved[key] - single[key]).abs().max().item() <= 2e-5 * scale, key
    for rank, held in enumerate(world.run(_loaded_state, str(tmp_path))):
        for name, (first_expert, momentum) in held.items():
            assert first_expert == rank and momentum.shape[0] == 1, (rank, name, first_expert)
            want = saved[f"optim.{name}/momentum_buffer"][first_expert : first_expert + momentum.shape[0]]
            assert torch.equal(momentum, want), (rank, name)


def _dense_hsdp_tp(ctx, out: str) -> dict[int, float] | None:
    """Dense (no experts) HSDP 2 x TP 2 (FSDP 1) on the world, and rank 0's world-1 run; their loss differences."""
    from dist_ortho.train.cli import parallel_groups, run

    singles = [dist.new_group([r]) for r in range(ctx.world_size)]
    dense = ["--steps", "4", "--eval-interval", "4"]
    group, dp_group = parallel_groups(2)
    losses = run(parser_args(dense + ["--torch-native", "--hsdp", "2", "--tp", "2", "--out", f"{out}/hsdp_tp"]), group,
                 torch.device("cpu"), dp_group)[0]["losses"]
    if ctx.rank != 0:
        return None
    # world 1: the model with TE/Megatron attributes at TP 1 (the same global weights; --torch-native would build a
    # device mesh, a collective of the whole world)
    ref = run(parser_args(dense + ["--tp", "1", "--out", f"{out}/world1"]), singles[0], torch.device("cpu"))[0]["losses"]
    return {s: abs(losses[s] - ref[s]) for s in ref}


def parser_args(extra: list[str]):
    from dist_ortho.train.cli import parser

    return parser().parse_args(SMALL + extra)


def test_dense_hsdp_and_tp_matches_world_1(world, tmp_path):
    """--hsdp 2 --tp 2 without experts: TP on "tp", then HSDP (dp_replicate 2 x fsdp 1) on the dense mesh, the
    optimizer given no group; the losses are world 1's within float32 (the same 2e-5 and reasons as above)."""
    diffs = world.run(_dense_hsdp_tp, str(tmp_path))[0]
    assert sorted(diffs) == [1, 2, 3, 4] and max(diffs.values()) <= LOSS_TOL, diffs


def _moe_fsdp_ep(ctx, out: str) -> dict[int, float] | None:
    """The MoE at FSDP 4 x EP 2 (dense weights over "fsdp" of 4 ranks, the stacks over "efsdp" of 2 x "ep" 2: two
    DP groups in one optimizer) on the world, and rank 0's world-1 run; their loss differences."""
    from dist_ortho.train.cli import parallel_groups, run

    singles = [dist.new_group([r]) for r in range(ctx.world_size)]
    steps = ["--steps", "4", "--eval-interval", "4"]
    group, dp_group = parallel_groups(1)
    losses = run(_args(*steps, "--ep", "2", "--out", f"{out}/fsdp_ep"), group, torch.device("cpu"), dp_group)
    if ctx.rank != 0:
        return None
    ref = run(_args(*steps, "--out", f"{out}/world1"), singles[0], torch.device("cpu"))[0]["losses"]
    return {s: abs(losses[0]["losses"][s] - ref[s]) for s in ref}


def test_moe_fsdp_and_ep_with_two_dp_groups_matches_world_1(world, tmp_path):
    """--experts 4 --ep 2 at FSDP 4 (no --hsdp): the dense weights' DP group is "fsdp" (4 ranks), the stacks' is
    "efsdp" (2 ranks: efsdp x ep = 4 <= E, whole experts per rank), read from the meshes with no group argument
    (refused before: no single dp_group described both); the losses are world 1's within 2e-5 (the reasons above)."""
    diffs = world.run(_moe_fsdp_ep, str(tmp_path))[0]
    assert sorted(diffs) == [1, 2, 3, 4] and max(diffs.values()) <= LOSS_TOL, diffs


def _bad(ctx, out: str, extra: list[str], native: bool) -> str:
    from dist_ortho.train.cli import parallel_groups, run

    args = _args("--out", out, *extra)
    args.torch_native = native
    try:
        group, dp_group = parallel_groups(1)
        run(args, group, torch.device("cpu"), dp_group)
    except ValueError as e:
        return str(e)
    return "no error"


def test_bad_layouts_fail_alike_on_every_rank_before_a_step(world, tmp_path):
    cases = {
        "native": (["--hsdp", "2"], False, "add --torch-native"),
        "hsdp": (["--hsdp", "3"], True, "--hsdp 3 x --tp 1 must divide the world size 4"),
        "ep": (["--ep", "3"], True, "--ep 3 must divide the FSDP size 4"),
        "topk": (["--topk", "5"], True, "--topk 5 must be in [1, --experts 4]"),
    }
    for name, (extra, native, needle) in cases.items():
        messages = world.run(_bad, str(tmp_path / name), extra, native)
        assert len(set(messages)) == 1 and needle in messages[0], (name, messages)
