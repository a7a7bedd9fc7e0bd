"""3D expert weights [E, out, in] (torchtitan's GroupedExperts, TE GroupedLinear in single-parameter mode): E
matrices each, stepped as one group.

- One process: equal, bit for bit (batch_matrices=False), to the same member on E separate 2D weights.
- Expert TP with TE attributes (partition_dim 1 or 2 of the 3D weight, ``expert_tp=True``) and DTensor expert
  parallelism (Shard(0) over a mesh dim "ep", Shard(1|2) over "tp", Shard(0) or Replicate over "dp"), at world
  2 and 4, against one process on the full tensors (test_optim's tolerance), with the process groups read
  from the meshes (no device_mesh=).
- Placements that are not expert-major, and mesh dims that say nothing, are ValueErrors on every rank.
"""

from __future__ import annotations

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from dist_ortho import MuonAdamW, get_optimizer
from dist_ortho.parameters.dtensor import piece_of
from tests import optim_reference
from tests.harness import started_world

KINDS = ["muon", "scion", "polargrad", "muon_hyperball", "adamuon", "normuon", "namo", "mop"]
EXPERTS, OUT, IN = 4, 10, 6


def _weights(seed: int = 0, steps: int = 3):
    gen = torch.Generator().manual_seed(seed)
    fulls = [torch.randn(EXPERTS, OUT, IN, generator=gen), torch.randn(EXPERTS, IN, OUT, generator=gen)]
    grads = [[torch.randn(f.shape, generator=gen) for f in fulls] for _ in range(steps)]
    return fulls, grads


def _hp(kind: str) -> dict:
    return {"lr": 0.02, "fp32_matmul_prec": "highest", "batch_matrices": False}


@pytest.mark.usefixtures("highest_precision")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("marked", ["name", "attribute"])
def test_an_expert_weight_steps_as_its_matrices(kind, marked):
    fulls, grads = _weights()
    stacked = [torch.nn.Parameter(f.clone()) for f in fulls]
    if marked == "attribute":
        for p in stacked:
            p.expert_stack = True
        named = stacked
    else:
        named = [(f"layers.0.moe.experts.w{i + 1}", p) for i, p in enumerate(stacked)]
    apart = [torch.nn.Parameter(m.clone()) for f in fulls for m in f]
    opt = get_optimizer(kind)(named, **_hp(kind))
    ref = get_optimizer(kind)(apart, **_hp(kind))
    for step_grads in grads:
        for p, g in zip(stacked, step_grads):
            p.grad = g.clone()
        for p, g in zip(apart, (m for g in step_grads for m in g)):
            p.grad = g.clone()
        opt.step()
        ref.step()
    for i, p in enumerate(stacked):
        expected = torch.stack([q.detach() for q in apart[i * EXPERTS : (i + 1) * EXPERTS]])
        assert torch.equal(p.detach(), expected), (p.detach() - expected).abs().max().item()
    held = opt.state[stacked[0]]["momentum_buffer"]
    assert held.shape == stacked[0].shape


def test_a_3d_weight_that_is_no_expert_weight_still_needs_conv_mode():
    with pytest.raises(ValueError, match="conv_mode.*expert_stack=True"):
        get_optimizer("muon")([torch.nn.Parameter(torch.randn(4, 3, 3))])


@pytest.fixture(scope="module")
def world4():
    with started_world(4) as w:
        yield w


def _compare(opt, params, fulls, grads, kind, as_local, to_full):
    ref_params = [torch.nn.Parameter(m.clone()) for f in fulls for m in f]
    ref = get_optimizer(kind)(ref_params, lr=0.02, fp32_matmul_prec="highest")
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = as_local(p, g)
        for p, g in zip(ref_params, (m for g in step_grads for m in g)):
            p.grad = g.clone()
        opt.step()
        ref.step()
    bad = {}
    for i, (p, f) in enumerate(zip(params, fulls)):
        expected = torch.stack([q.detach() for q in ref_params[i * EXPERTS : (i + 1) * EXPERTS]])
        moved = (expected - f).abs().max().item()
        err = (to_full(p) - expected).abs().max().item()
        if not optim_reference.weights_agree(err, moved):
            bad[i] = (err, moved)
    return bad


def _te_expert_tp(ctx, kind: str, partition_dim: int):
    """Expert TP over the world with TE attributes: rows (partition_dim 1) or columns (2) of each expert."""
    fulls, grads = _weights()
    params = []
    for f in fulls:
        p = torch.nn.Parameter(f.tensor_split(ctx.world_size, dim=partition_dim)[ctx.rank].clone())
        p.tensor_model_parallel, p.partition_dim, p.partition_stride, p.expert_tp = True, partition_dim, 1, True
        params.append(p)
    named = [(f"decoder.layers.0.mlp.experts.linear_fc{i + 1}.weight", p) for i, p in enumerate(params)]
    opt = get_optimizer(kind)(named, lr=0.02, expert_tp_group=ctx.group, tp_group=ctx.group, tp_mode="home",
                              fp32_matmul_prec="highest")

    def as_local(p, g):
        return g.tensor_split(ctx.world_size, dim=partition_dim)[ctx.rank].clone()

    def to_full(p):  # shards may be uneven
        parts = [None] * ctx.world_size
        torch.distributed.all_gather_object(parts, p.detach().clone())
        return torch.cat(parts, dim=partition_dim)

    return _compare(opt, params, fulls, grads, kind, as_local, to_full)


@pytest.mark.parametrize("kind,partition_dim", [("muon", 1), ("muon", 2), ("normuon", 2), ("muon_hyperball", 1)])
def test_expert_tp_with_te_attributes_is_exact(world, kind, partition_dim):
    for bad in world.run(_te_expert_tp, kind, partition_dim):
        assert not bad, bad


MESHES = {
    "ep x tp": (("ep", "tp"), (Shard(0), Shard(1))),
    "ep x tp, columns": (("ep", "tp"), (Shard(0), Shard(2))),
    "dp x ep": (("dp", "ep"), (Shard(0), Shard(0))),  # FSDP over whole experts: every DP rank its own
    "dp x tp, replicated over dp": (("dp", "tp"), (Replicate(), Shard(1))),
    # torchtitan's experts when efsdp x ep > E: every expert's rows (or columns) in pieces over efsdp
    "efsdp x ep": (("efsdp", "ep"), (Shard(1), Shard(0))),
    "efsdp x ep, columns": (("efsdp", "ep"), (Shard(2), Shard(0))),
}


def _dtensor(full, mesh, placements):
    return DTensor.from_local(piece_of(full, mesh, placements).clone(), mesh, placements, shape=full.shape,
                              stride=full.stride())


def _dtensor_experts(ctx, kind: str, layout: str, hybrid: bool):
    names, placements = MESHES[layout]
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=names)
    fulls, grads = _weights(seed=1)
    params = [torch.nn.Parameter(_dtensor(f, mesh, placements)) for f in fulls]
    named = [(f"layers.0.moe.experts.w{i + 1}", p) for i, p in enumerate(params)]
    hp = {"lr": 0.02, "fp32_matmul_prec": "highest"}
    opt = MuonAdamW(named, optimizer=kind, **hp) if hybrid else get_optimizer(kind)(named, **hp)
    return _compare(opt, params, fulls, grads, kind, lambda p, g: _dtensor(g, mesh, placements),
                    lambda p: p.detach().full_tensor())


EP_CASES = [("muon", layout) for layout in sorted(MESHES)] + [("adamuon", "ep x tp"), ("normuon", "ep x tp, columns")]


@pytest.mark.parametrize("kind,layout", EP_CASES, ids=[f"{k}-{m}" for k, m in EP_CASES])
def test_dtensor_expert_parallel_is_exact_with_groups_read_from_the_mesh(world4, layout, kind):
    for bad in world4.run(_dtensor_experts, kind, layout, False):
        assert not bad, bad


def test_muon_adamw_routes_dtensor_experts(world4):
    for bad in world4.run(_dtensor_experts, "muon", "ep x tp", True):
        assert not bad, bad


def _bad_placement(ctx, case: str):
    names, placements = {
        "split over ep by rows": (("ep", "tp"), (Shard(1), Shard(2))),
        "unnamed dims": (None, (Shard(0), Shard(1))),
        "a dim named xy": (("xy", "ep"), (Replicate(), Shard(0))),  # no framework names a dim so
    }[case]
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=names)
    fulls, _ = _weights()
    p = torch.nn.Parameter(_dtensor(fulls[0], mesh, placements))
    if names is None:
        p.expert_stack = True
    try:
        opt = get_optimizer("muon")([("layers.0.moe.experts.w1", p)], lr=0.02)
        p.grad = _dtensor(torch.randn(fulls[0].shape), mesh, placements)
        opt.step()
    except ValueError as e:
        return str(e)
    return "no error"


@pytest.mark.parametrize("case,needle", [
    ("split over ep by rows", "expert-major"),
    ("unnamed dims", "device_mesh="), ("a dim named xy", "device_mesh="),
])
def test_placements_that_are_not_expert_major_are_errors_on_every_rank(world4, case, needle):
    messages = world4.run(_bad_placement, case)
    assert len(set(messages)) == 1 and needle in messages[0], messages


def test_the_te_tagger_marks_a_grouped_3d_weight_as_experts():
    from dist_ortho.integrations.transformer_engine import tag_transformer_engine_model

    class GroupedLinear(torch.nn.Module):  # TE's name; single-parameter mode: one 3D weight
        def __init__(self):
            super().__init__()
            self.parallel_mode = "column"
            self.weight = torch.nn.Parameter(torch.randn(EXPERTS, OUT, IN))

    model = torch.nn.ModuleDict({"experts": GroupedLinear()})
    tag_transformer_engine_model(model)
    p = model["experts"].weight
    assert p.expert_stack is True and p.expert_tp is True
    opt = get_optimizer("muon")([p], lr=0.02)
    p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[p]["momentum_buffer"].shape == (EXPERTS, OUT, IN)
