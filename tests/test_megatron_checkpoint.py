"""Megatron dist-checkpointing of dist_ortho's optimizers, on both megatron-core generations (world 4, gloo).

A model of real megatron-core layers (column/row parallel linears, a local-spec SelfAttention's fused GQA
``linear_qkv``) and the optimizer Megatron-LM builds after ``install()`` (tests/test_megatron_stack.py's
_build: megatron-core's wrappers and chain) take 2 steps at TP 2 x DP 2; the model's and the optimizer's
``sharded_state_dict`` are saved with ``megatron.core.dist_checkpointing``; the run goes on for 2 more
steps. A fresh model and optimizer at TP 2 x DP 2, TP 1 x DP 4 or TP 4 x DP 1 (its weights zeroed, so that
only the checkpoint can restore them) load the checkpoint and take the same 2 steps: the weights must
equal the unstopped run's. fp32 with plain TP; bf16 with layer-wise DP (each matrix's momentum saved by
its owner replica). Tolerance: float32 rounding (the TP size changes the order of the Newton-Schulz sums),
plus, with bf16, one bf16 rounding of the weights.

Resuming from a checkpoint of megatron-core's own Muon (no dist_ortho group keys) and the command line
winning over stored hyper-parameters are tested in tests/test_megatron_upstream.py (the upstream optimizer
needs megatron-core >= 0.17) and here on a state dict without dist_ortho's keys.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install 'dist_ortho[test]')")

from tests.harness import started_world
from tests.test_megatron_stack import CLIP, HP, _build, _gather, _grad, _model, _parallel


@pytest.fixture(scope="module")
def world():
    with started_world(4, daemon=False) as w:  # megatron-core's checkpoint writer starts processes
        yield w


def _steps(opt, weights: dict, group, shapes: dict, steps: range, dtype: torch.dtype) -> None:
    for step in steps:
        for n, p in weights.items():
            grad = _grad(n, step, shapes[n], dtype)
            p.grad = torch.tensor_split(grad, dist.get_world_size(group), dim=p.partition_dim)[
                dist.get_rank(group)].to(dtype).contiguous()
        ok, _, _ = opt.step()
        assert ok


def _round_trip(ctx, path: str, load_tp: int, layer_wise: bool, bf16: bool) -> dict:
    from megatron.core import dist_checkpointing
    from megatron.core.process_groups_config import ProcessGroupCollection

    from tests.megatron_cpu import megatron_on_cpu

    dtype = torch.bfloat16 if bf16 else torch.float32
    hp = {"lr": HP["lr"], "weight_decay": HP["weight_decay"], "bf16": bf16, "clip_grad": CLIP,
          "muon_momentum": HP["momentum"], "muon_tp_mode": "home", "muon_split_qkv": True}
    with _parallel(2, 1), megatron_on_cpu():
        pgs = ProcessGroupCollection.use_mpu_process_groups()
        _, chunk = _model(dtype, False, pgs)
        weights = dict(chunk.named_parameters())
        shapes = {n: tuple(_gather(p.detach(), p.partition_dim, pgs.tp).shape) for n, p in weights.items()}
        opt = _build(hp, chunk, layer_wise)
        _steps(opt, weights, pgs.tp, shapes, range(2), dtype)
        model_sd = chunk.sharded_state_dict()
        dist_checkpointing.save({"model": model_sd, "optimizer": opt.sharded_state_dict(model_sd)}, path)
        saved = {n: _gather(p.detach(), p.partition_dim, pgs.tp).double() for n, p in weights.items()}
        _steps(opt, weights, pgs.tp, shapes, range(2, 4), dtype)
        unstopped = {n: _gather(p.detach(), p.partition_dim, pgs.tp).double() for n, p in weights.items()}
    with _parallel(load_tp, 1), megatron_on_cpu():
        pgs = ProcessGroupCollection.use_mpu_process_groups()
        _, chunk = _model(dtype, False, pgs)
        weights = dict(chunk.named_parameters())
        with torch.no_grad():
            for p in weights.values():
                p.zero_()
        opt = _build(hp, chunk, layer_wise)
        model_sd = chunk.sharded_state_dict()
        loaded = dist_checkpointing.load({"model": model_sd, "optimizer": opt.sharded_state_dict(model_sd, is_loading=True)},
                                         path)
        missing, _ = chunk.load_state_dict(loaded["model"], strict=False)
        assert not [k for k in missing if not k.endswith("_extra_state")], missing
        opt.load_state_dict(loaded["optimizer"])
        restored = {n: _gather(p.detach(), p.partition_dim, pgs.tp).double() for n, p in weights.items()}
        _steps(opt, weights, pgs.tp, shapes, range(2, 4), dtype)
        resumed = {n: _gather(p.detach(), p.partition_dim, pgs.tp).double() for n, p in weights.items()}
    return {n: ((resumed[n] - unstopped[n]).abs().max().item(), (unstopped[n] - saved[n]).abs().max().item(),
                (restored[n] - saved[n]).abs().max().item(), unstopped[n].abs().max().item()) for n in weights}


@pytest.mark.parametrize("load_tp", [2, 1, 4], ids=["tp2dp2", "tp1dp4", "tp4dp1"])
@pytest.mark.parametrize("layer_wise,bf16", [(False, False), (True, True)], ids=["fp32", "bf16_layer_wise"])
def test_dist_checkpoint_resumes_at_another_tp_and_dp(world, tmp_path, load_tp, layer_wise, bf16):
    (tmp_path / "ckpt").mkdir()
    results = world.run(_round_trip, str(tmp_path / "ckpt"), load_tp, layer_wise, bf16)
    for r in results:
        for name, (err, moved, restore_err, largest) in r.items():
            assert restore_err == 0, f"{name}: the weights loaded differ from those saved by {restore_err}"
            rounding = 2.0**-8 * largest if bf16 else 0.0  # one bf16 rounding of the weights
            assert moved > 1e-3 and err <= 1e-5 + 1e-4 * moved + rounding, (name, err, moved)
