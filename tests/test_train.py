"""The main job end to end on 2 gloo ranks (a small model, few steps): TP=1 and TP=2 give the same
loss curve; a stopped and resumed run equals an unstopped one; a TP=2 checkpoint resumes at TP=1;
bad input fails alike on every rank."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.harness import started_world

SMALL = ["--layers", "1", "--hidden", "32", "--heads", "4", "--groups", "2", "--ffn", "64", "--seq-len", "32",
         "--batch-size", "4", "--steps", "12", "--eval-interval", "6", "--eval-batches", "1", "--no-progress",
         "--muon-fp32-matmul-prec", "highest", "--warmup", "3"]


@pytest.fixture(scope="module")
def world():
    with started_world(2) as w:
        yield w


def _args(*extra: str):
    from dist_ortho.train.cli import parser

    return parser().parse_args(SMALL + list(extra))


def _single_rank_group(ctx):
    groups = [dist.new_group([r]) for r in range(ctx.world_size)]
    return groups[ctx.rank]


def _run(args, group, dp_group=None):
    from dist_ortho.train.cli import run

    return run(args, group, torch.device("cpu"), dp_group)[0]["losses"]


def _tp_equivalence(ctx, out: str, optimizer: str, mode: str):
    tp2 = _run(_args("--out", f"{out}/tp2", "--optimizer", optimizer, "--muon-tp-mode", mode), ctx.group)
    tp1 = _run(_args("--out", f"{out}/tp1_{ctx.rank}", "--optimizer", optimizer), _single_rank_group(ctx))
    return {step: abs(tp2[step] - tp1[step]) for step in tp2}


@pytest.mark.parametrize("optimizer,mode", [("muon", "duplicated"), ("muon", "gram"), ("normuon", "distributed")])
def test_tp1_and_tp2_give_the_same_loss_curve(world, tmp_path, optimizer, mode):
    for diffs in world.run(_tp_equivalence, str(tmp_path), optimizer, mode):
        assert len(diffs) == 12 and max(diffs.values()) <= 1e-4, diffs


def _resume(ctx, out: str):
    whole = _run(_args("--out", f"{out}/whole"), ctx.group)
    first = _run(_args("--out", f"{out}/parts", "--stop-after", "6"), ctx.group)
    second = _run(_args("--out", f"{out}/parts", "--resume"), ctx.group)
    return whole, first, second


def test_stop_and_resume_equals_an_unstopped_run(world, tmp_path):
    whole, first, second = world.run(_resume, str(tmp_path))[0]
    assert sorted(first) == list(range(1, 7)) and sorted(second) == list(range(7, 13))
    assert {**first, **second} == whole  # bit for bit
    log = (tmp_path / "parts" / "muon" / "log.jsonl").read_text().splitlines()
    assert len(log) == 12


def _reshard(ctx, out: str):
    whole = _run(_args("--out", f"{out}/tp2"), ctx.group)
    _run(_args("--out", f"{out}/tp2_stopped", "--stop-after", "6"), ctx.group)
    dist.barrier()
    mine = f"{out}/tp1_{ctx.rank}"
    shutil.copytree(f"{out}/tp2_stopped", mine)
    resumed = _run(_args("--out", mine, "--resume"), _single_rank_group(ctx))
    return {step: abs(resumed[step] - whole[step]) for step in resumed}


def test_tp2_checkpoint_resumes_at_tp1(world, tmp_path):
    for diffs in world.run(_reshard, str(tmp_path)):
        assert sorted(diffs) == list(range(7, 13)) and max(diffs.values()) <= 1e-4, diffs


def _bad(ctx, out: str, extra: list[str]) -> str:
    from dist_ortho.train.cli import parallel_groups

    args = _args("--out", out, *extra)
    try:
        group, dp_group = parallel_groups(args.tp or ctx.world_size)
        _run(args, group, dp_group)
    except ValueError as e:
        return str(e)
    return "no error"


def test_bad_input_fails_alike_on_every_rank(world, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cases = {
        "--tp": (["--tp", "3"], "must divide the world size"),
        "dp_batch": (["--tp", "1", "--batch-size", "3"], "multiple of the data-parallel size 2"),
        "groups": (["--groups", "3"], "multiple of num_query_groups"),
        "tp_groups": (["--groups", "1", "--heads", "4"], "must divide num_query_groups"),
        "missing": (["--data", str(tmp_path / "nope.txt")], "no such file"),
        "empty": (["--data", str(empty)], "is empty"),
        "no_ckpt": (["--resume"], "no checkpoint"),
    }
    for name, (extra, needle) in cases.items():
        messages = world.run(_bad, str(tmp_path / name), extra)
        assert len(set(messages)) == 1 and needle in messages[0], (name, messages)
    world.run(_bad, str(tmp_path / "ckpt"), ["--stop-after", "2"])
    messages = world.run(_bad, str(tmp_path / "ckpt"), ["--resume", "--hidden", "64"])
    assert len(set(messages)) == 1 and "was written for" in messages[0], messages


def test_cli_exits_non_zero_on_every_rank(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "dist_ortho.train",
         "--optimizer", "muon", "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert proc.returncode != 0
    assert (proc.stdout + proc.stderr).count("no such file") == 2  # one message per rank
    bad = subprocess.run([sys.executable, "-m", "dist_ortho.train", "--optimizer", "lion"], capture_output=True,
                         text=True, timeout=60, env=env)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def _damaged_checkpoints(ctx, out: str, how: str):
    """Checkpoints at steps 2 and 4; the step-4 one is damaged: --resume falls back to step 2 and says so,
    continuing exactly; with both damaged it refuses, naming the checkpoint."""
    whole = _run(_args("--out", f"{out}/whole"), ctx.group)
    _run(_args("--out", f"{out}/parts", "--save-interval", "2", "--stop-after", "4"), ctx.group)
    ckpt = Path(out) / "parts" / "muon" / "ckpt"
    if ctx.rank == 0:
        for step in (["step_000004"] if how != "all" else ["step_000004", "step_000002"]):
            target = sorted((ckpt / step).glob("*.distcp"))[0]
            data = bytearray(target.read_bytes())
            if how == "truncate":
                target.write_bytes(bytes(data[: len(data) // 2]))
            else:  # flip 4 KB in the middle
                middle = len(data) // 2
                data[middle : middle + 4096] = bytes(b ^ 0xFF for b in data[middle : middle + 4096])
                target.write_bytes(bytes(data))
        log = ckpt.parent / "log.jsonl"  # a run killed after logging step 5, before its checkpoint
        log.write_text(log.read_text() + '{"step": 5, "loss": 0.0}\n{"step": 6, "lo')
    dist.barrier()
    try:
        resumed = _run(_args("--out", f"{out}/parts", "--resume"), ctx.group)
    except ValueError as e:
        return str(e)
    dist.barrier()  # rank 0 writes the log
    steps = [json.loads(line)["step"] for line in (ckpt.parent / "log.jsonl").read_text().splitlines()]
    return {"resumed": resumed, "whole": whole, "steps": steps}


@pytest.mark.parametrize("how", ["flip", "truncate", "all"])
def test_a_damaged_checkpoint_is_never_loaded(world, tmp_path, how, caplog):
    results = world.run(_damaged_checkpoints, str(tmp_path), how)
    if how == "all":
        assert len(set(results)) == 1 and "is damaged" in results[0] and "step_000004" in results[0], results
        assert "no intact checkpoint" in results[0]
        return
    r = results[0]
    assert sorted(r["resumed"]) == list(range(3, 13))  # from the intact step-2 checkpoint
    assert all(r["resumed"][s] == r["whole"][s] for s in r["resumed"])  # bit for bit
    assert r["steps"] == list(range(1, 13))  # every step logged once


def _finished(ctx, out: str):
    from dist_ortho.train.cli import run

    _run(_args("--out", out), ctx.group)
    dist.barrier()  # rank 0 writes the log: read it once every rank is done
    log = (Path(out) / "muon" / "log.jsonl").read_text()
    again = run(_args("--out", out, "--resume"), ctx.group, torch.device("cpu"))[0]
    dist.barrier()
    return again["losses"], again["train_loss"] is not None, log == (Path(out) / "muon" / "log.jsonl").read_text()


def test_resuming_a_finished_run_says_so_and_does_nothing(world, tmp_path):
    for losses, has_loss, same_log in world.run(_finished, str(tmp_path)):
        assert losses == {} and has_loss and same_log


def test_tp_must_be_positive_and_the_seed_is_checked_on_resume(world, tmp_path):
    from dist_ortho.train.cli import parser

    with pytest.raises(SystemExit):
        parser().parse_args(["--tp", "0"])
    world.run(_bad, str(tmp_path / "seed"), ["--stop-after", "2"])
    messages = world.run(_bad, str(tmp_path / "seed"), ["--resume", "--seed", "5"])
    assert len(set(messages)) == 1 and "seed 0" in messages[0] and "seed 5" in messages[0], messages


def _eval_only_at_the_end(ctx, out: str):
    losses = _run(_args("--out", out, "--eval-interval", "0"), ctx.group)
    dist.barrier()
    rows = [json.loads(line) for line in (Path(out) / "muon" / "log.jsonl").read_text().splitlines()]
    return len(losses), [r["step"] for r in rows if "eval_loss" in r], [r["comm_wait_ms"] >= 0 for r in rows]


def test_eval_interval_0_evaluates_only_at_the_end_and_the_log_has_comm_waits(world, tmp_path):
    """--eval-interval 0 (it divided by zero) evaluates at the last step only, as --save-interval 0 saves; every
    step's record holds comm_wait_ms, the time this rank spent blocked on the step's collectives."""
    steps, evaluated, waits = world.run(_eval_only_at_the_end, str(tmp_path))[0]
    assert steps == 12 and evaluated == [12] and len(waits) == 12 and all(waits)
    from dist_ortho.train.cli import parser

    for flag in ("--eval-interval", "--save-interval"):
        with pytest.raises(SystemExit):
            parser().parse_args([flag, "-1"])


def test_a_line_that_every_rank_would_print_is_printed_once(tmp_path):
    """The main job at world 2 through torchrun: its summary and the library's INFO lines come from rank 0 only."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "dist_ortho.train", *SMALL, "--steps", "4", "--tp", "2", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line.split(" ", 2)[2] for line in (proc.stdout + proc.stderr).splitlines() if " dist_ortho." in line]
    assert sum("final train loss" in line for line in lines) == 1, lines
    assert len(lines) == len(set(lines)), lines  # before: each line once per rank
