"""Per-head Newton-Schulz of separate q/k/v weights (``per_head=`` / a ``head_dim`` attribute), against one process.

torchtitan's attention: wq [n_heads * hd, dim], wk and wv [n_kv_heads * hd, dim] colwise (Shard(0) over "tp"), wo
[dim, n_heads * hd] rowwise. With per_head each head (hd rows) of wq, wk, wv is a matrix of its own; wo stays whole.
Here n_heads = 4, n_kv_heads = 2, hd = 4, dim = 12, in one world of 4 gloo ranks, TP 1, 2 and 4 on subgroups of
consecutive ranks: TP 2 holds whole heads per rank, TP 4 holds one q head per rank and cuts every k and v head over
two ranks (TP > n_kv_heads). Two ways to hold them: Megatron's attributes (``tensor_model_parallel``,
``partition_dim``; wk's head_dim from its ``head_dim`` attribute, the others' from per_head) and torch's
``parallelize_module`` (DTensors, groups read from the mesh). Every exact TP mode, Muon and NorMuon (an adaptive
member: its second moment per head), 2 steps. One more layout: FSDP2 2 x TP 2 with hd = 8, where the TP block of wq
is one head and FSDP's pieces (4 rows) cut it.

Reference (tests/qkv_reference.on_heads): each head block of the gathered weight stepped alone by
tests/optim_reference.py in float64; tolerance optim_reference.weights_agree (max |W - W_ref| <= 1e-5 + 1e-4 max
|W_ref - W_0|, float32 at "highest"); a whole-matrix reference is checked to be far (the split is not a no-op).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dist_ortho import get_optimizer
from dist_ortho.tp import local as tp_local
from tests import optim_reference
from tests.harness import started_world
from tests.qkv_reference import on_heads

HEADS, KV_HEADS, HD, DIM, STEPS = 4, 2, 4, 12, 2
MODES = ("duplicated", "distributed", "gram", "home", "auto")
KINDS = ("muon", "normuon")
HP = {"lr": 0.02, "momentum": 0.9, "weight_decay": 0.01, "fp32_matmul_prec": "highest"}
NAMES = ("layers.0.attention.wq.weight", "layers.0.attention.wk.weight", "layers.0.attention.wv.weight",
         "layers.0.attention.wo.weight")


@pytest.fixture(scope="module")
def world():
    with started_world(4) as w:
        yield w


def _fulls(hd: int = HD, heads: int = HEADS, kv: int = KV_HEADS) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    gen = torch.Generator().manual_seed(5)
    shapes = [(heads * hd, DIM), (kv * hd, DIM), (kv * hd, DIM), (DIM, heads * hd)]
    fulls = [torch.randn(s, generator=gen) for s in shapes]
    return fulls, [[torch.randn(s, generator=gen) for s in shapes] for _ in range(STEPS)]


def _expected(kind: str, fulls, grads, hd: int) -> list[torch.Tensor]:
    """The float64 one-process weights: wq, wk, wv per head, wo whole."""
    out = []
    for i, w0 in enumerate(fulls):
        g = [step[i] for step in grads]
        out.append(on_heads(kind, w0, g, hd, HP) if i < 3 else optim_reference.run(kind, w0, g, HP))
    return out


def _attention(fulls) -> nn.Module:
    attention = nn.Module()
    for name, w in zip(("wq", "wk", "wv", "wo"), fulls):
        linear = nn.Linear(w.size(1), w.size(0), bias=False)
        linear.weight.data.copy_(w)
        attention.add_module(name, linear)
    return attention


def _run_attributes(ctx, tp, kind, mode, fulls, grads):
    group, _ = ctx.new_groups(tp)
    r = dist.get_rank(group)
    dims = (0, 0, 0, 1)
    params = []
    for w, dim in zip(fulls, dims):
        p = nn.Parameter(torch.tensor_split(w, tp, dim)[r].clone())
        p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, dim, 1
        params.append(p)
    params[1].head_dim = HD  # wk by attribute, wq and wv by name
    opt = get_optimizer(kind)(params, tp_group=group, tp_mode=mode, param_names=dict(zip(NAMES, params)),
                              per_head={"attention.wq": HD, "wv": HD}, **HP)
    for step in grads:
        for p, g, dim in zip(params, step, dims):
            p.grad = torch.tensor_split(g, tp, dim)[r].clone()
        opt.step()
    return [p.detach() for p in params], [lambda e, d=d: torch.tensor_split(e, tp, d)[r] for d in dims], opt


def _run_dtensor(ctx, tp, kind, mode, fulls, grads):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from dist_ortho.parameters.dtensor import piece_of

    mesh = init_device_mesh("cpu", (4 // tp, tp), mesh_dim_names=("dp", "tp"))["tp"]
    model = nn.Module()
    model.add_module("attention", _attention(fulls))
    parallelize_module(model.attention, mesh, {"wq": ColwiseParallel(), "wk": ColwiseParallel(),
                                               "wv": ColwiseParallel(), "wo": RowwiseParallel()})
    params = [p for _, p in model.named_parameters()]
    opt = get_optimizer(kind)(model.named_parameters(), tp_mode=mode, per_head={"wq": HD, "wk": HD, "wv": HD}, **HP)
    for step in grads:
        for p, g in zip(params, step):
            p.grad = DTensor.from_local(piece_of(g, p.device_mesh, p.placements).clone(), p.device_mesh, p.placements,
                                        shape=g.shape, stride=g.stride())
        opt.step()
    return ([p.to_local().detach() for p in params],
            [lambda e, p=p: piece_of(e, p.device_mesh, p.placements) for p in params], opt)


def _separate_qkv(ctx, tp: int, how: str):
    fulls, grads = _fulls()
    bad = {}
    for kind in KINDS:
        expected = _expected(kind, fulls, grads, HD)
        for mode in MODES if tp > 1 else MODES[:1]:
            run = _run_attributes if how == "attributes" else _run_dtensor
            got, piece, opt = run(ctx, tp, kind, mode, fulls, grads)
            for i, (w, e, cut, w0) in enumerate(zip(got, expected, piece, fulls)):
                err, moved = (w.double() - cut(e)).abs().max().item(), (e - w0.double()).abs().max().item()
                if not optim_reference.weights_agree(err, moved):
                    bad[kind, mode, NAMES[i]] = (err, moved)
    plan = opt.tp_plan()
    assert "wq.weight [head 3]" in plan and "wk.weight [head 1]" in plan and "wo.weight [" not in plan, plan
    assert not bad, f"(err, moved) beyond tolerance: {bad}"
    whole = optim_reference.run("normuon", fulls[0], [s[0] for s in grads], HP)
    assert (whole - expected[0]).abs().max().item() > 100 * (1e-5 + 1e-4 * (expected[0] - fulls[0]).abs().max().item())
    return True


@pytest.mark.parametrize("how", ["attributes", "dtensor"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_separate_qkv_per_head_exact(world, tp, how):
    """wq/wk/wv per head at TP 1, 2, 4 (whole heads per rank; k and v heads cut at TP 4), every exact mode, Muon
    and NorMuon, equal to each head stepped alone in one process (float64)."""
    assert all(world.run(_separate_qkv, tp, how))


def _whole_heads_collectives(ctx, tp: int) -> dict[str, int]:
    fulls, grads = _fulls()
    group, _ = ctx.new_groups(tp)
    r = dist.get_rank(group)
    calls = {}
    for mode in MODES:
        p = nn.Parameter(torch.tensor_split(fulls[0], tp)[r].clone())
        p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, 0, 1
        opt = get_optimizer("muon")([p], tp_group=group, tp_mode=mode, param_names={NAMES[0]: p},
                                    per_head={"wq": HD}, **HP)
        for step in grads:
            p.grad = torch.tensor_split(step[0], tp)[r].clone()
            opt.step()
        calls[mode] = opt.comm_stats().total_calls
    return calls


@pytest.mark.parametrize("tp", [2, 4])
def test_whole_heads_on_a_rank_need_no_collective(world, tp):
    """Colwise TP holding whole heads (n_heads % tp == 0): each rank steps its own heads alone, in every mode (a
    head held by one rank runs there, dist_ortho.tp._held_whole): no collective in the step."""
    for calls in world.run(_whole_heads_collectives, tp):
        assert calls == dict.fromkeys(MODES, 0), calls


def _round_trip(ctx) -> tuple[float, float]:
    """NorMuon at TP 4 (its second moment per head: state part0, part1, ...) rebuilt from its state dict after step
    1, against one process."""
    import copy

    fulls, grads = _fulls()
    group, _ = ctx.new_groups(4)
    r = dist.get_rank(group)
    p = nn.Parameter(torch.tensor_split(fulls[1], 4)[r].clone())  # wk: each head cut over two ranks
    p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, 0, 1

    def build():
        return get_optimizer("normuon")([p], tp_group=group, param_names={NAMES[1]: p}, per_head={"wk": HD}, **HP)

    opt = build()
    for i, step in enumerate(grads):
        p.grad = torch.tensor_split(step[1], 4)[r].clone()
        opt.step()
        if i == 0:
            state = copy.deepcopy(opt.state_dict())
            assert "part1" in state["state"][0], state["state"][0].keys()
            opt = build()
            opt.load_state_dict(state)
    expected = on_heads("normuon", fulls[1], [s[1] for s in grads], HD, HP)
    err = (p.detach().double() - torch.tensor_split(expected, 4)[r]).abs().max().item()
    return err, (expected - fulls[1].double()).abs().max().item()


def test_state_dict_round_trip_per_head(world):
    for err, moved in world.run(_round_trip):
        assert optim_reference.weights_agree(err, moved), (err, moved)


def _fsdp_cuts_a_head(ctx):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from dist_ortho.parameters.dtensor import piece_of

    hd = 8
    fulls, grads = _fulls(hd=hd, heads=2, kv=2)
    bad, cut_heads = {}, False
    for kind in KINDS:
        expected = _expected(kind, fulls, grads, hd)
        for mode in MODES:
            mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
            model = nn.Module()
            model.add_module("attention", _attention(fulls))
            parallelize_module(model.attention, mesh["tp"], {"wq": ColwiseParallel(), "wk": ColwiseParallel(),
                                                             "wv": ColwiseParallel(), "wo": RowwiseParallel()})
            fully_shard(model, mesh=mesh["dp"])
            params = [p for _, p in model.named_parameters()]
            cut_heads = cut_heads or params[0].to_local().size(0) % hd != 0
            opt = get_optimizer(kind)(model.named_parameters(), tp_mode=mode, per_head={"*.w[qkv].weight": hd}, **HP)
            for step in grads:
                for p, g in zip(params, step):
                    p.grad = DTensor.from_local(piece_of(g, p.device_mesh, p.placements).clone(), p.device_mesh,
                                                p.placements, shape=g.shape, stride=g.stride())
                opt.step()
            for i, (p, e, w0) in enumerate(zip(params, expected, fulls)):
                err = (p.to_local().double() - piece_of(e, p.device_mesh, p.placements)).abs().max().item()
                moved = (e - w0.double()).abs().max().item()
                if not optim_reference.weights_agree(err, moved):
                    bad[kind, mode, NAMES[i]] = (err, moved)
    assert cut_heads, "the FSDP pieces were meant to cut a head"
    assert not bad, f"(err, moved) beyond tolerance: {bad}"
    return True


def test_fsdp_pieces_cutting_a_head(world):
    """FSDP2 (Shard(0) over dp) x TP 2 with hd = 8: each TP block is one head of wq, cut into 4-row FSDP pieces;
    the owner gathers the block and steps the head whole, exactly."""
    assert all(world.run(_fsdp_cuts_a_head))


def _bad(ctx, case: str) -> str:
    group, _ = ctx.new_groups(2)
    named = {"attention.wq.weight": nn.Parameter(torch.randn(12, 8))}
    options: dict = {"per_head": {"wq": 4}}
    if case == "rows":
        options["per_head"] = {"wq": 5}
    elif case == "rows_under_tp":  # global rows (2 x 6) known after the layout exchange: raised there, alike
        p = named["attention.wq.weight"] = nn.Parameter(torch.randn(6, 8))
        p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, 0, 1
        options.update(per_head={"wq": 5}, tp_group=group)
    elif case == "not_2d":
        named = {"conv.wq.weight": nn.Parameter(torch.randn(8, 4, 3, 3))}
        options["conv_mode"] = "flatten"
    elif case == "experts":
        named = {"moe.experts.wq": nn.Parameter(torch.randn(2, 8, 8))}
    elif case == "fused":
        named["attention.wq.weight"].is_qkv = True
        named["attention.wq.weight"].qkv_split_shapes = [4, 4, 4]
    elif case == "strided":
        p = named["attention.wq.weight"]
        p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, 0, 2
        options["tp_group"] = group
    elif case == "disagree":
        named["attention.wq.weight"].head_dim = 6
    elif case == "key_type":
        options["per_head"] = {0: 4}
    elif case == "not_a_mapping":
        options["per_head"] = 4
    elif case == "head_dim":
        options["per_head"] = {"wq": True}
    try:
        opt = get_optimizer("muon")(list(named.items()), lr=0.02, **options)
        for p in named.values():
            p.grad = torch.ones_like(p)
        opt.step()
    except ValueError as error:
        return str(error)
    return "no error"


BAD = {  # case -> what the message must say
    "rows": "attention.wq.weight has 12 rows, not a multiple of the head size 5",
    "rows_under_tp": "attention.wq.weight has 12 rows, not a multiple of the head size 5",
    "not_2d": "conv.wq.weight: per_head needs a 2D weight",
    "experts": "moe.experts.wq is a stack of experts",
    "fused": "attention.wq.weight is a fused QKV weight",
    "strided": "attention.wq.weight: per_head with partition_stride=2",
    "disagree": "attention.wq.weight: head_dim given differently",
    "key_type": "per_head keys must be non-empty parameter-name patterns (str), got 0",
    "not_a_mapping": "per_head must be a mapping",
    "head_dim": "per_head['wq'] must be a positive int",
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_a_value_error_naming_it_on_every_rank(world, case):
    messages = world.run(_bad, case)
    assert len(set(messages)) == 1 and BAD[case] in messages[0], messages


def test_heads_of_one_shape_run_as_one_batch(monkeypatch):
    """One process: the 4 + 2 + 2 heads of wq, wk, wv (all hd x dim) are one batched Newton-Schulz, wo another."""
    calls = []
    original = tp_local.local_newton_schulz

    def spy(x, ns):
        calls.append(tuple(x.shape))
        return original(x, ns)

    monkeypatch.setattr(tp_local, "local_newton_schulz", spy)
    fulls, grads = _fulls()
    params = [nn.Parameter(w.clone()) for w in fulls]
    opt = get_optimizer("muon")(list(zip(NAMES, params)), per_head={"wq": HD, "wk": HD, "wv": HD},
                                batch_matrices=True, **HP)
    for p, g in zip(params, grads[0]):
        p.grad = g.clone()
    opt.step()
    matrices = sorted((1, *shape) if len(shape) == 2 else shape for shape in calls)
    assert matrices == sorted([(HEADS + 2 * KV_HEADS, HD, DIM), (1, DIM, HEADS * HD)]), calls
