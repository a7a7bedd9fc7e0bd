"""The planner (dist_ortho.plan): its counts are the optimizer's, its inputs are checked.

Under gloo at world 4, a small GPT (fused GQA QKV split into Q, K, V; gated fc1; TP 4 > 2 query groups
gives uneven Q/K/V shards) is stepped by the real Muon at TP 2 x DP 2 and TP 4, replicated over DP and in
the DP x TP grid, for every mode and the per-matrix anchors; each rank's Newton-Schulz FLOPs
(FlopCounterMode), bytes sent and collectives (count_collectives) in a steady-state step, maximum over
ranks, must equal the planner's exactly, and so must the Muon state (momentum) bytes. auto runs with the
cost profile the planner derives from its CPU device profile (set_cost_profile), so both choose alike.
MoE expert domains are planned with the same code path but not stepped here (no EP groups in this test).
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dist_ortho import Muon, count_collectives
from dist_ortho.plan import (
    ANCHORS,
    MODES,
    PROFILES,
    Layout,
    ModelSpec,
    Settings,
    estimate,
    from_hf_config,
    from_megatron_args,
    load_profile,
    preset,
    set_cost_profile,
)
from dist_ortho.plan.__main__ import main
from dist_ortho.plan.published import compare_6676, compare_overlap_6676
from tests.harness import started_world
from tests.test_grid import _grid, _params

TINY = ModelSpec("tiny", hidden=64, layers=2, heads=8, query_groups=2, ffn=96, gated=True)
SETTINGS = Settings(precision="highest")


@pytest.fixture(scope="module")
def world():
    with started_world(4) as w:
        yield w


def _measured(ctx, tp: int, arrangement: str, modes: list[str]):
    tp_group, dp_group, tp_rank = _grid(ctx, tp)
    profile = PROFILES["CPU"].on_node(ctx.world_size)
    set_cost_profile(profile.cost_profile("float32", tp, ctx.world_size))
    spec = [(w.name, w.shape, w.partition_dim, w.qkv_split) for w in TINY.weights()]
    out = {}
    try:
        for mode in modes:
            _, params = _params(spec, tp_rank, tp)
            for p in params:
                p.grad = torch.randn_like(p)
            base, per_matrix = mode.split("/")[0], mode.endswith("/per-matrix")
            extra = {"coalesce": False, "local_gram": "never", "batch_matrices": False} if per_matrix else {}
            opt = Muon(params, lr=0.01, tp_group=tp_group, tp_mode=base, fp32_matmul_prec="highest",
                       dp_group=dp_group if arrangement == "grid" else None, **extra)
            opt.step()
            with count_collectives() as calls, FlopCounterMode(display=False) as flops:
                opt.step()
            state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
            out[mode] = (flops.get_total_flops(), calls.bytes_sent, calls.total_calls, state)
    finally:
        set_cost_profile(None)
    return out


@pytest.mark.parametrize("tp,dp,arrangement", [(2, 2, "replicated"), (4, 1, "replicated"), (2, 2, "grid")])
def test_planner_counts_equal_the_optimizers(world, tp, dp, arrangement):
    modes = list(MODES) + (list(ANCHORS) if arrangement == "replicated" else [])
    results = world.run(_measured, tp, arrangement, modes)
    planned = {r.mode: r for r in estimate(TINY, Layout(tp=tp, dp=dp), PROFILES["CPU"], SETTINGS, modes, (arrangement,))}
    for mode in modes:
        measured = tuple(max(rank[mode][i] for rank in results) for i in range(4))
        p = planned[mode]
        assert (int(p.flops), int(p.bytes), p.calls, int(p.state_bytes)) == measured, (mode, measured, p)


def test_grid_plans_fewer_flops_per_rank_than_replicated():
    rows = {(r.arrangement, r.mode): r for r in estimate(preset("bench"), Layout(tp=2, dp=2), PROFILES["CPU"], SETTINGS)}
    assert rows[("grid", "home")].flops < 0.6 * rows[("replicated", "home")].flops
    assert rows[("grid", "home")].state_bytes == rows[("replicated", "home")].state_bytes / 2


def test_presets_megatron_args_and_hf_config(tmp_path):
    assert set(preset("llama3-70b").weights()[0].qkv_split) == {1024, 128}  # 8 heads per group of 128 channels
    model, layout = from_megatron_args(
        "--num-layers 4 --hidden-size 512 --num-attention-heads 8 --group-query-attention --num-query-groups 2 "
        "--ffn-hidden-size 1536 --swiglu --num-experts 4 --moe-ffn-hidden-size 256 --tensor-model-parallel-size 2 "
        "--expert-model-parallel-size 2 --lr 1e-3".split())
    assert (model.hidden, model.query_groups, model.gated, model.experts, model.expert_ffn) == (512, 2, True, 4, 256)
    assert (layout.tp, layout.ep, layout.etp) == (2, 2, 2)
    experts = [w for w in model.weights(ep=2) if w.expert]
    assert len(experts) == 4 * 2 * 2 and experts[0].shape == (512, 512)  # 4 layers x 2 local experts x fc1, fc2
    config = {"hidden_size": 1024, "num_hidden_layers": 2, "num_attention_heads": 16, "num_key_value_heads": 4,
              "intermediate_size": 2816, "hidden_act": "silu", "model_type": "llama"}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    hf = from_hf_config(path)
    assert (hf.hidden, hf.layers, hf.query_groups, hf.ffn, hf.gated, hf.head_dim) == (1024, 2, 4, 2816, True, 64)
    assert hf.weights()[2].shape == (2 * 2816, 1024)


@pytest.mark.parametrize("call,message", [
    (lambda: preset("gpt-9000"), "unknown preset 'gpt-9000'"),
    (lambda: estimate(preset("llama3-8b"), Layout(tp=3, dp=1), PROFILES["H100"]), "tp=3 must divide the attention heads"),
    (lambda: estimate(preset("mixtral-8x7b"), Layout(tp=2, dp=4, ep=3), PROFILES["H100"]), "ep x expert tp"),
    (lambda: estimate(preset("bench"), Layout(tp=1, dp=1), PROFILES["H100"], modes=["fast"]), "modes: unknown"),
    (lambda: Layout(tp=0, dp=1), "tp must be a positive integer"),
    (lambda: load_profile("TPUv9"), "unknown profile 'TPUv9'"),
    (lambda: load_profile("H100", {"flops_per_s": {"float32": 1.0}}), "flops_per_s lacks"),
    (lambda: load_profile("H100", {"warp_speed": 9}), "unknown field(s) ['warp_speed']"),
    (lambda: load_profile("H100", {"matmul_efficiency": 2.0}), "matmul_efficiency must be in (0, 1]"),
    (lambda: load_profile("CPU", {"medium_compute": "float8"}), "medium_compute must be 'bfloat16' or 'float32'"),
    (lambda: from_megatron_args(["--num-layers", "2"]), "need --hidden-size"),
])
def test_bad_input_is_a_clear_error(call, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        call()


def test_device_file_missing_a_field_is_an_error(tmp_path):
    fields = dataclasses.asdict(PROFILES["H100"])
    del fields["inter_bytes_per_s"]
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(fields))
    with pytest.raises(ValueError, match=r"missing field\(s\) \['inter_bytes_per_s'\]"):
        load_profile(str(path))
    path.write_text(json.dumps({"base": "H100", "name": "H100-slow-ib", "inter_bytes_per_s": 1e10}))
    assert load_profile(str(path)).inter_bytes_per_s == 1e10


def test_command_line_table_json_png_and_errors(tmp_path, capsys):
    png = tmp_path / "scale.png"
    assert main(["--model", "bench", "--device", "CPU", "--tp", "2", "--dp", "2", "--precision", "highest",
                 "--png", str(png)]) == 0
    text = capsys.readouterr().out
    assert "| grid | home |" in text and "auto (grid) runs:" in text and png.stat().st_size > 10_000
    assert main(["--model", "mixtral-8x7b", "--tp", "2", "--dp", "8", "--ep", "4", "--json", "--set", "launch_s=1e-6"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["device"]["launch_s"] == 1e-6 and {r["mode"] for r in data["rows"]} == set(MODES) | set(ANCHORS)
    assert main(["--model", "llama3-8b", "--tp", "5"]) == 2
    assert "tp=5 must divide" in capsys.readouterr().err


def test_published_setting_runs_one_call_pair_per_domain_for_home():
    rows = {r["dist_ortho mode"]: r for r in compare_6676()}
    assert rows["home"]["predicted calls"] == 4  # the 4 NCCL calls: two all-to-alls per domain
    assert rows["duplicated/per-matrix"]["predicted vs layer-sharded"] > 1
    # dist_ortho's grouped step: launches per group, its host time counted; a CUDA graph leaves one replay
    grouped, captured = rows["home, grouped step"], rows["home, grouped step, CUDA graph"]
    assert captured["predicted ms"] < grouped["predicted ms"] < rows["home"]["predicted ms"]
    assert grouped["predicted calls"] == captured["predicted calls"] == 4


def test_calibrate_writes_a_profile_the_planner_loads(tmp_path, capsys):
    """``--calibrate`` at worlds 1 and 2 (the CLI default adds 4 and 8): the written profile loads, keeps each
    world's figures, measures bf16 against float32 and records what "medium" runs in on this CPU."""
    from dist_ortho.math.precision import medium_dtype

    out = tmp_path / "cpu.json"
    assert main(["--calibrate", "--worlds", "1", "2", "--out", str(out)]) == 0
    profile = load_profile(str(out))
    assert set(profile.per_ranks) == {"1", "2"} and profile.shared_compute
    assert profile.medium_compute == str(medium_dtype("cpu")).removeprefix("torch.")
    measured = json.loads(capsys.readouterr().out.split("measured per world size: ")[1].splitlines()[0])
    assert profile.flops_per_s["bfloat16"] / profile.flops_per_s["float32"] == pytest.approx(
        measured["1"]["bf16_rate"] / measured["1"]["rate"])
    assert profile.per_ranks["2"]["intra_latency_s"] == measured["2"]["latency"] > 0
    (row,) = estimate(preset("bench"), Layout(tp=2, dp=1), profile, modes=["home"], arrangements=["replicated"])
    assert row.seconds > 0
    assert main(["--calibrate", "--worlds", "2"]) == 2
    assert "--worlds" in capsys.readouterr().err


def test_overlap_hides_the_grid_share_and_part_of_the_tp_collectives():
    """overlap=True takes the grid's share over DP off the step (and off its communication), and of the TP
    collectives (B - 1) / B as far as compute covers them (B = 4 shapes of a Llama layer: 3/4 here, where compute
    exceeds them); a step per weight (the anchors') is not pipelined; every row's communication is part of its time."""
    model, layout = preset("llama3-8b"), Layout(tp=4, dp=4)
    plain = {(r.arrangement, r.mode): r for r in estimate(model, layout, PROFILES["H100"], Settings())}
    hidden = {(r.arrangement, r.mode): r for r in estimate(model, layout, PROFILES["H100"], Settings(overlap=True))}
    for key, r in plain.items():
        assert 0 < r.comm_seconds < r.seconds, key
        shown = r.seconds - hidden[key].seconds
        assert r.comm_seconds - hidden[key].comm_seconds == pytest.approx(shown), key
        if key[1].endswith("/per-matrix"):
            assert hidden[key] == r, key
        elif key[0] == "replicated":  # no share: 3/4 of the TP collectives hidden
            assert shown == pytest.approx(0.75 * r.comm_seconds), key
        else:  # the share, and 3/4 of the TP collectives
            assert 0.75 * r.comm_seconds < shown < r.comm_seconds, key
    rows = compare_overlap_6676()
    assert rows[0]["published stall share"] == 0.17 and rows[2]["predicted ms"] < rows[1]["predicted ms"] < rows[0]["predicted ms"]


def test_gtp_pieces_are_owned_within_their_group():
    """Megatron GTP (Layout.gtp): a TP block's pieces go to one owner of its GTP group, so with GTP = DP the
    Newton-Schulz FLOPs per rank are the grid's over DP (the same owners), with an all-to-all in and one out per
    bucket where the grid all-gathers once, and fewer bytes (each rank gets its piece back, not every block); with GTP 2 of DP 4 each of the two replicas of a GTP group steps its matrices.
    A GTP size that does not divide DP is a ValueError."""
    model = preset("llama3-8b")
    grid = {r.arrangement: r for r in estimate(model, Layout(tp=2, dp=4), PROFILES["H100"], modes=["home"])}["grid"]
    gtp4 = estimate(model, Layout(tp=2, dp=4, gtp=4), PROFILES["H100"], modes=["home"], arrangements=("replicated",))[0]
    gtp2 = estimate(model, Layout(tp=2, dp=4, gtp=2), PROFILES["H100"], modes=["home"], arrangements=("replicated",))[0]
    replicated = estimate(model, Layout(tp=2, dp=4), PROFILES["H100"], modes=["home"], arrangements=("replicated",))[0]
    assert gtp4.flops == grid.flops < gtp2.flops < replicated.flops
    assert gtp4.calls > grid.calls and gtp4.bytes < grid.bytes
    with pytest.raises(ValueError, match="gtp = 3 must divide dp = 4"):
        Layout(tp=2, dp=4, gtp=3)
