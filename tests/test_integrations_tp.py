"""TE-protocol models at TP = 1, 2, 4: fused GQA QKV (TP <= and > num_query_groups, gated or not),
expert weights on their own group, LayerNormMLP, an unsharded parallel_mode=None Linear, embeddings
and norms to AdamW. The TP run must equal float64 references on the full weights (Q, K, V and gate
orthogonalized apart), with the tolerance of test_optim."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dist_ortho import MuonAdamW
from dist_ortho.integrations.transformer_engine import tag_transformer_engine_model
from dist_ortho.parameters.qkv import qkv_split_shapes
from tests import optim_reference, te_standins
from tests.qkv_reference import muon_on_components

HEADS, GROUPS, KV, HIDDEN, FFN, EXPERTS = 8, 2, 4, 16, 32, 2  # TP = 4 > GROUPS = 2: a rank holds half a group


def full_weights(gated: bool, gen: torch.Generator) -> dict[str, torch.Tensor]:
    rows = GROUPS * sum(qkv_split_shapes(HEADS, GROUPS, KV, gated))
    shapes = {
        "embed": (50, HIDDEN), "qkv": (rows, HIDDEN), "proj": (HIDDEN, HEADS * KV), "fc1": (FFN, HIDDEN),
        "fc2": (HIDDEN, FFN), "local": (HIDDEN, HIDDEN), **{f"expert{i}": (FFN, HIDDEN) for i in range(EXPERTS)},
    }
    return {k: torch.randn(s, generator=gen) for k, s in shapes.items()}


class Model(nn.Module):
    def __init__(self, w: dict[str, torch.Tensor], rank: int, tp: int, expert_rank: int, expert_tp: int):
        super().__init__()
        self.embed = nn.Embedding(50, HIDDEN)
        with torch.no_grad():
            self.embed.weight.copy_(w["embed"])
        self.attn = te_standins.MultiheadAttention(w["qkv"], w["proj"], rank, tp)
        self.mlp = te_standins.LayerNormMLP(w["fc1"], w["fc2"], rank, tp)
        self.experts = te_standins.GroupedLinear([w[f"expert{i}"] for i in range(EXPERTS)], "column", expert_rank, expert_tp)
        self.local = te_standins.Linear(w["local"], None, rank, tp)


def _te_model(ctx, gated: bool, mode: str):
    gen = torch.Generator().manual_seed(5)
    w = full_weights(gated, gen)
    steps = 3
    expert_tp = min(2, ctx.world_size)
    expert_group, _ = ctx.new_groups(expert_tp)
    model = Model(w, ctx.rank, ctx.world_size, ctx.rank % expert_tp, expert_tp)
    tag_transformer_engine_model(model, HEADS, GROUPS, KV, attention_output_gate=gated)
    hp = {"lr": 0.02, "momentum": 0.9, "weight_decay": 0.01, "fp32_matmul_prec": "highest"}
    opt = MuonAdamW(model.named_parameters(), tp_group=ctx.group, tp_mode=mode, expert_tp_group=expert_group, **hp)
    assert opt.matrix_optimizer.layout(model.local.weight).group is None, "parallel_mode=None must stay unsharded"
    full_grads = {k: [torch.randn(v.shape, generator=gen) for _ in range(steps)] for k, v in w.items()}
    params = {
        "embed": model.embed.weight, "qkv": model.attn.layernorm_qkv.weight, "proj": model.attn.proj.weight,
        "fc1": model.mlp.fc1_weight, "fc2": model.mlp.fc2_weight, "local": model.local.weight,
        **{f"expert{i}": getattr(model.experts, f"weight{i}") for i in range(EXPERTS)},
    }

    def local_block(name: str, t: torch.Tensor) -> torch.Tensor:
        p = params[name]
        if name == "embed" or name == "local":
            return t.clone()
        rank, size = (ctx.rank % expert_tp, expert_tp) if name.startswith("expert") else (ctx.rank, ctx.world_size)
        return torch.tensor_split(t, size, dim=p.partition_dim)[rank].clone()

    for step in range(steps):
        opt.zero_grad()
        for name, p in params.items():
            p.grad = local_block(name, full_grads[name][step])
        for p in model.parameters():  # norms: zero gradients, AdamW still decays nothing (wd 0)
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        opt.step()

    shapes = qkv_split_shapes(HEADS, GROUPS, KV, gated)
    muon_hp = {k: v for k, v in hp.items() if k != "fp32_matmul_prec"}
    errors = {}
    for name, p in params.items():
        if name == "embed":
            ref = nn.Parameter(w[name].clone())
            adam = torch.optim.AdamW([ref], lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
            for g in full_grads[name]:
                ref.grad = g.clone()
                adam.step()
            expected = ref.detach().double()
        elif name == "qkv":
            expected = muon_on_components(w[name], full_grads[name], shapes, muon_hp)
        else:
            expected = optim_reference.run("muon", w[name], full_grads[name], muon_hp)
        moved = (expected - w[name].double()).abs().max().item()
        err = (p.detach().double() - local_block(name, expected)).abs().max().item()
        errors[name] = (err, moved)
    bad = {k: v for k, v in errors.items() if not optim_reference.weights_agree(*v, min_moved=1e-4)}
    assert not bad, f"(err, moved) beyond tolerance: {bad}"


@pytest.mark.parametrize("mode", ["duplicated", "distributed", "gram", "home", "auto"])
@pytest.mark.parametrize("gated", [False, True], ids=["qkv", "gated_qkv"])
def test_te_protocol_model_is_exact(world, gated, mode):
    world.run(_te_model, gated, mode)


def _bad_qkv(ctx) -> str:
    w = nn.Parameter(torch.randn(3, 8))  # 3 * world rows: never a multiple of 8
    w.tensor_model_parallel, w.partition_dim, w.partition_stride = True, 0, 1
    w.is_qkv, w.qkv_split_shapes = True, [4, 2, 2]
    from dist_ortho import Muon

    opt = Muon([("decoder.layers.0.self_attention.linear_qkv.weight", w)], tp_group=ctx.group)
    w.grad = torch.randn_like(w)
    try:
        opt.step()
    except ValueError as e:
        return str(e)
    return "no error"


def test_qkv_rows_not_divisible_is_an_error_naming_the_parameter(world):
    messages = world.run(_bad_qkv)
    assert len(set(messages)) == 1 and "linear_qkv.weight" in messages[0] and "not a multiple" in messages[0]


def _per_head(ctx, mode: str):
    from dist_ortho import Muon

    gen = torch.Generator().manual_seed(9)
    rows = GROUPS * sum(qkv_split_shapes(HEADS, GROUPS, KV))
    full, grads = torch.randn(rows, HIDDEN, generator=gen), [torch.randn(rows, HIDDEN, generator=gen) for _ in range(3)]
    p = te_standins._mark(nn.Parameter(torch.tensor_split(full, ctx.world_size)[ctx.rank].clone()), "column")
    p.is_qkv, p.qkv_split_shapes = True, qkv_split_shapes(HEADS, GROUPS, KV)
    hp = {"lr": 0.02, "momentum": 0.9, "weight_decay": 0.01}
    opt = Muon([p], tp_group=ctx.group, tp_mode=mode, qkv_per_head=True, fp32_matmul_prec="highest", **hp)
    for g in grads:
        p.grad = torch.tensor_split(g, ctx.world_size)[ctx.rank].clone()
        opt.step()
    # reference: every KV-row head block is its own matrix
    heads = [optim_reference.run("muon", full[i : i + KV], [g[i : i + KV] for g in grads], hp) for i in range(0, rows, KV)]
    expected = torch.tensor_split(torch.cat(heads), ctx.world_size)[ctx.rank]
    moved = (torch.cat(heads) - full.double()).abs().max().item()
    err = (p.detach().double() - expected).abs().max().item()
    assert optim_reference.weights_agree(err, moved), (err, moved)
    assert "[head 11]" in opt.tp_plan() or ctx.world_size == 1  # 2 groups x (4 q + 1 k + 1 v) heads


@pytest.mark.parametrize("mode", ["duplicated", "distributed", "home"])
def test_per_head_qkv_mode(world, mode):
    """qkv_per_head: every head (KV = 4 rows here) its own matrix, exact under TP (TP = 4 > groups)."""
    world.run(_per_head, mode)
