"""Layouts beyond one split per matrix (dist_ortho.parameters.layout), against one process on the gathered matrices.

Megatron GTP weight remat, with the attributes megatron-core 0.19 sets (``is_gtp_weight_remat``, ``group``,
``pad_length``; tests/test_megatron_gtp.py runs megatron-core's own stack in .venv-next): world 4 as TP 2 x GTP 2
(TP groups {0, 1}, {2, 3}; GTP groups {0, 2}, {1, 3}); every TP block cut along dim 0 into equal pieces after
zero padding at its tail, as GTP's alignment pads it, so that pieces hold parts of fused-QKV query groups and
whole pieces can be padding. Both partition dims, odd shapes, every exact mode, Muon and NorMuon; 3 steps; the
tolerance of test_optim (float32 "highest" against float64: max |W - W_ref| <= 1e-5 + 1e-4 max |W_ref - W_0|).
Bad GTP attributes are a ValueError naming the parameter on every rank, before any collective.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dist_ortho import get_optimizer
from dist_ortho.parameters.qkv import qkv_split_shapes
from tests import optim_reference
from tests.harness import started_world
from tests.qkv_reference import join_components, split_components

TP, GTP, ALIGN = 2, 2, 8
SPLIT = qkv_split_shapes(4, 2, 4)  # [8, 4, 4]: 32 rows, a TP block of 16 is one query group
# (name, global shape, partition_dim, fused QKV); rows of a TP block padded to a multiple of GTP x ALIGN
SPECS = [("qkv", (32, 24), 0, True), ("proj", (24, 12), 1, False), ("fc1", (22, 24), 0, False),
         ("fc2", (24, 22), 1, False), ("tall", (14, 6), 1, False)]
HP = {"lr": 0.02, "momentum": 0.9, "weight_decay": 0.01, "nesterov": True, "fp32_matmul_prec": "highest"}


@pytest.fixture(scope="module")
def world():
    with started_world(4) as w:
        yield w


def _groups(ctx):
    tp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    gtp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    return tp_groups[ctx.rank // TP], gtp_groups[ctx.rank % TP], ctx.rank % TP, ctx.rank // TP


def _piece(full: torch.Tensor, partition_dim: int, tp_rank: int, gtp_rank: int) -> tuple[torch.Tensor, int]:
    """This rank's GTP piece of ``full`` (its TP block padded with zero rows, cut along dim 0) and the padding."""
    block = full.tensor_split(TP, dim=partition_dim)[tp_rank]
    rows = block.size(0)
    pad = -rows % (GTP * ALIGN)
    padded = torch.nn.functional.pad(block, (0, 0, 0, pad))
    return padded.chunk(GTP)[gtp_rank].clone(), pad


def _gtp_param(full, partition_dim, tp_rank, gtp_rank, gtp_group, qkv):
    piece, pad = _piece(full, partition_dim, tp_rank, gtp_rank)
    p = torch.nn.Parameter(piece)
    p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, partition_dim, 1
    p.is_gtp_weight_remat, p.group, p.pad_length, p.gtp_remat_size = True, gtp_group, pad, GTP
    if qkv:
        p.is_qkv, p.qkv_split_shapes = True, SPLIT
    return p


def _gathered(p: torch.Tensor, tp_group, gtp_group) -> torch.Tensor:
    parts = [torch.empty_like(p) for _ in range(GTP)]
    dist.all_gather(parts, p.detach().contiguous(), group=gtp_group)
    block = torch.cat(parts)[: GTP * p.size(0) - p.pad_length]
    parts = [torch.empty_like(block) for _ in range(TP)]
    dist.all_gather(parts, block.contiguous(), group=tp_group)
    return torch.cat(parts, dim=p.partition_dim).double()


def _reference(kind: str, name: str, full: torch.Tensor, grads: list[torch.Tensor], qkv: bool) -> torch.Tensor:
    if not qkv:
        return optim_reference.run(kind, full, grads, HP)
    parts = [optim_reference.run(kind, c, [split_components(g, SPLIT)[i] for g in grads], HP)
             for i, c in enumerate(split_components(full, SPLIT))]
    return join_components(parts, SPLIT)


def _gtp_exact(ctx, kind: str, modes: list[str]) -> dict:
    tp_group, gtp_group, tp_rank, gtp_rank = _groups(ctx)
    gen = torch.Generator().manual_seed(0)
    fulls = {n: torch.randn(shape, generator=gen) for n, shape, _, _ in SPECS}
    grads = {n: [torch.randn(shape, generator=gen) for _ in range(3)] for n, shape, _, _ in SPECS}
    out = {}
    for mode in modes:
        params = {n: _gtp_param(fulls[n], pd, tp_rank, gtp_rank, gtp_group, qkv) for n, _, pd, qkv in SPECS}
        opt = get_optimizer(kind)(list(params.items()), tp_group=tp_group, tp_mode=mode, **HP)
        for step in range(3):
            for n, _, pd, _ in SPECS:
                params[n].grad = _piece(grads[n][step], pd, tp_rank, gtp_rank)[0]
            opt.step()
        errors = {}
        for n, _, _, qkv in SPECS:
            ref = _reference(kind, n, fulls[n].double(), grads[n], qkv)
            errors[n] = ((_gathered(params[n], tp_group, gtp_group) - ref).abs().max().item(),
                         (ref - fulls[n].double()).abs().max().item())
            padding = params[n].detach()[params[n].size(0) - min(params[n].pad_length, params[n].size(0)):]
            if gtp_rank == GTP - 1:
                assert not padding.any(), f"{n}: padding rows written"
        state = sum(t.numel() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
        out[mode] = (errors, state)
    return out


@pytest.mark.parametrize("kind", ["muon", "normuon"])
def test_gtp_pieces_step_as_one_process(world, kind):
    """Every exact mode: exact; momentum (and NorMuon's state) only on each matrix's owner GTP rank."""
    modes = ["duplicated", "distributed", "gram", "home", "auto"]
    results = world.run(_gtp_exact, kind, modes)
    for mode in modes:
        for r in results:
            errors, _ = r[mode]
            bad = {n: v for n, v in errors.items() if not optim_reference.weights_agree(*v)}
            assert not bad, f"{kind} {mode}: (err, moved) beyond tolerance: {bad}"
        if kind == "muon":  # momentum of every TP block on one GTP rank: the world holds each matrix once
            assert sum(r[mode][1] for r in results) == sum(s[0] * s[1] for _, s, _, _ in SPECS), mode


def _bad_gtp(ctx, what: str) -> str:
    tp_group, gtp_group, tp_rank, gtp_rank = _groups(ctx)
    p = _gtp_param(torch.randn(24, 12), 1, tp_rank, gtp_rank, gtp_group, False)
    if what == "no group":
        p.group = None
    elif what == "pad too long":
        p.pad_length = 10 * p.size(0)
    try:
        opt = get_optimizer("muon")([("w", p)], tp_group=tp_group, lr=0.02)
        p.grad = torch.randn_like(p)
        opt.step()
    except ValueError as e:
        return str(e)
    return "no error"


@pytest.mark.parametrize("what,needle", [("no group", "carries no process group as .group"),
                                         ("pad too long", "GTP pad_length=")])
def test_gtp_attributes_it_cannot_read_are_errors_naming_the_parameter(world, what, needle):
    messages = world.run(_bad_gtp, what)
    assert len(set(messages)) == 1 and needle in messages[0] and "parameter 'w'" in messages[0], messages
