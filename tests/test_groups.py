"""The grouped step (dist_ortho.optim.groups, dist_ortho.optim.step): same-shape parameters stepped as one stack.

- Against the per-matrix path (the same member with ``batched = False``: each parameter its own context, as
  before groups): bit-identical with ``batch_matrices=False`` (the same one-matrix Newton-Schulz, elementwise
  ops on stacked tensors round alike), within 1e-6 of the weights' change batched (a batched matmul may round
  differently from single ones).
- State: one stacked tensor per key, each parameter's entry a view of it; a state dict written before groups
  existed loads and continues exactly as that code did; the format written now is the same.
- Bad input: a member that returns the wrong shape for a batch is a ValueError naming batched = False.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.distributed.checkpoint as dcp

from dist_ortho import get_optimizer
from dist_ortho.optim.members.muon import Muon
from tests.data.make_pre_groups_state import HP, KINDS, grads, parameters
from tests.test_optim import IDS, VARIANTS

pytestmark = pytest.mark.usefixtures("highest_precision")


def per_matrix(cls: type) -> type:
    """The member with its update run per matrix (the path before groups)."""
    return type(f"PerMatrix{cls.__name__}", (cls,), {"batched": False})


def _run(opt, params, steps: int = 3, start: int = 0) -> None:
    for step in range(start, start + steps):
        for p, g in zip(params, grads(step, params)):
            p.grad = g
        opt.step()


def _factory(kind: str):
    return get_optimizer(kind)



def _ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| in float32 ulps of max|b|. The grouped and per-matrix paths (and the recorded file, written on
    an AVX2 machine) do the same operations on stacked or single tensors, where the CPU's BLAS may pick other
    kernels (AVX-512 or AVX2) and sum in another order: MOP's differ by 0.2 ulp on an AVX-512 machine, the
    recorded continuation by up to 0.96; a wrong update would be off by lr = 0.02."""
    return ((a.detach() - b.detach()).abs().max() / (torch.finfo(torch.float32).eps * b.detach().abs().max())).item()

@pytest.mark.parametrize("kind,hp", VARIANTS, ids=IDS)
def test_grouped_equals_per_matrix(kind, hp):
    factory = _factory(kind)
    cls = factory.func if hasattr(factory, "func") else factory
    extra = dict(factory.keywords) if hasattr(factory, "keywords") else {}
    settings = {"lr": 0.02, **hp, **extra, "fp32_matmul_prec": "highest"}
    results = {}
    for label, member, batch in (("grouped", cls, False), ("per-matrix", per_matrix(cls), False),
                                 ("batched", cls, True)):
        params = parameters()
        _run(member(params, batch_matrices=batch, **settings), params)
        results[label] = params
    start = parameters()
    for a, b, c, w0 in zip(results["grouped"], results["per-matrix"], results["batched"], start):
        assert _ulps(a, b) <= 2, (kind, hp, _ulps(a, b))
        moved = (b.detach() - w0.detach()).abs().max().item()
        assert (c.detach() - b.detach()).abs().max().item() <= 1e-6 * max(moved, 1.0)


def test_same_shape_parameters_share_one_stacked_state():
    params = parameters()
    opt = get_optimizer("normuon")(params, **HP)
    _run(opt, params, steps=2)
    buffers = [opt.state[p]["momentum_buffer"] for p in params[:3]]  # three 12 x 8 weights: one group
    assert len({b.untyped_storage().data_ptr() for b in buffers}) == 1
    assert len({b.data_ptr() for b in buffers}) == 3
    for p, b in zip(params, buffers):
        assert b.shape == p.shape
    moment = [opt.state[params[5]][f"part{i}"]["moment2"] for i in range(3)]  # the fused QKV weight's parts
    assert [tuple(m.shape) for m in moment] == [(12, 1), (1, 8), (1, 8)]  # NorMuon: mean over the longer dim


def test_a_state_entry_assigned_from_outside_is_used():
    """A state tensor replaced by hand (e.g. megatron-core's init_state_fn, a user) is stacked anew."""
    params, twins = parameters(), parameters()
    opt, ref = Muon(params, **HP), per_matrix(Muon)(twins, **HP)
    for o, ps in ((opt, params), (ref, twins)):
        _run(o, ps, steps=1)
        o.state[ps[1]]["momentum_buffer"] = torch.full_like(ps[1], 0.5)
        _run(o, ps, steps=2, start=1)
    for p, q in zip(params, twins):
        assert torch.equal(p.detach(), q.detach())


def _structure(state_dict: dict) -> dict:
    def describe(value):
        if isinstance(value, dict):
            return {k: describe(v) for k, v in value.items()}
        return (tuple(value.shape), value.dtype) if torch.is_tensor(value) else type(value).__name__

    return {k: describe(v) for k, v in state_dict["state"].items()}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_state_written_before_groups_loads_and_continues(kind):
    """tests/data/pre_groups_state.pt was written by the per-matrix code (tests/data/make_pre_groups_state.py):
    loading its state dict and stepping on gives the weights that code computed (to _ulps' 2); the state
    dict written now has the same structure (keys, shapes, dtypes: the old code loads it)."""
    saved = torch.load("tests/data/pre_groups_state.pt", weights_only=False)[kind]
    params = parameters()
    with torch.no_grad():
        for p, w in zip(params, saved["weights"]):
            p.copy_(w)
    opt = get_optimizer(kind)(params, **HP, **KINDS[kind])
    opt.load_state_dict(copy.deepcopy(saved["state"]))
    _run(opt, params, steps=2, start=2)
    for p, expected in zip(params, saved["final"]):
        assert _ulps(p, expected) <= 2, (kind, _ulps(p, expected))
    fresh = parameters()
    now = get_optimizer(kind)(fresh, **HP, **KINDS[kind])
    _run(now, fresh, steps=2)
    assert _structure(now.state_dict()) == _structure(saved["state"])


@pytest.mark.parametrize("via", ["torch.save", "dcp"])
def test_resume_from_a_saved_state_is_exact(via, tmp_path):
    params, twins = parameters(), parameters()
    opt = get_optimizer("normuon")(params, **HP)
    _run(opt, params, steps=2)
    if via == "torch.save":
        buffer = io.BytesIO()
        torch.save(opt.state_dict(), buffer)
        state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    else:
        flat = {f"{i}/{k}": v for i, s in opt.state_dict()["state"].items() for k, v in _leaves(s)}
        dcp.save(flat, checkpoint_id=str(tmp_path))
        loaded = {k: torch.empty_like(v) for k, v in flat.items()}
        dcp.load(loaded, checkpoint_id=str(tmp_path))
        state = copy.deepcopy(opt.state_dict())
        for key, value in loaded.items():
            index, *path = key.split("/")
            target = state["state"][int(index)]
            for part in path[:-1]:
                target = target[part]
            target[path[-1]] = value
    with torch.no_grad():
        for p, q in zip(twins, params):
            p.copy_(q)
    twin_opt = get_optimizer("normuon")(twins, **HP)
    twin_opt.load_state_dict(state)
    _run(opt, params, steps=2, start=2)
    _run(twin_opt, twins, steps=2, start=2)
    for p, q in zip(params, twins):
        assert torch.equal(p.detach(), q.detach())


def _leaves(state: dict, prefix: str = ""):
    for key, value in state.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}/")
        elif torch.is_tensor(value):
            yield f"{prefix}{key}", value


class WrongShape(Muon):
    """Claims a batched update but returns one matrix."""

    batched = True

    def update(self, ctx):
        yield from ()
        return ctx.orthogonalized[0]


def test_a_member_that_cannot_run_batched_is_named():
    params = parameters()
    opt = WrongShape(params, **HP)
    for p, g in zip(params, grads(0, params)):
        p.grad = g
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match="batched = False"):
        opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))


def _tp_grouped(ctx, mode: str, partition_dim: int, kind: str):
    """Same-shape sharded weights (two groups, uneven shards at world 4) and a replicated one, grouped vs per
    matrix: bit-identical (batch_matrices=False), with the same number of collectives per step."""
    from dist_ortho import count_collectives
    from tests.test_optim_tp import block, sharded

    gen = torch.Generator().manual_seed(7)
    fulls = [torch.randn(18, 10, generator=gen) for _ in range(4)] + [torch.randn(10, 14, generator=gen) for _ in range(3)]
    steps = [[torch.randn(f.shape, generator=gen) for f in fulls] for _ in range(3)]
    factory = get_optimizer(kind)
    cls = factory.func if hasattr(factory, "func") else factory
    extra = dict(factory.keywords) if hasattr(factory, "keywords") else {}
    results, calls = {}, {}
    for label, member in (("grouped", cls), ("per-matrix", per_matrix(cls))):
        params = [sharded(block(f, partition_dim, ctx.rank, ctx.world_size), partition_dim) for f in fulls[:-1]]
        params.append(torch.nn.Parameter(fulls[-1].clone()))  # replicated
        opt = member(params, lr=0.02, tp_group=ctx.group, tp_mode=mode, batch_matrices=False,
                     fp32_matmul_prec="highest", **extra)
        for i, step_grads in enumerate(steps):
            for p, g in zip(params, step_grads):
                p.grad = block(g, partition_dim, ctx.rank, ctx.world_size) if p is not params[-1] else g.clone()
            with count_collectives() as stats:
                opt.step()
        results[label], calls[label] = [p.detach() for p in params], stats.total_calls
    same = all(torch.equal(a, b) for a, b in zip(results["grouped"], results["per-matrix"]))
    return same, calls["grouped"], calls["per-matrix"]


TP_CASES = ([("muon", mode, pd) for mode in ("duplicated", "distributed", "gram", "home", "auto") for pd in (0, 1)]
            + [(kind, mode, 0) for kind in ("normuon", "polargrad", "muon_hyperball") for mode in ("distributed", "home")])


@pytest.mark.parametrize("kind,mode,partition_dim", TP_CASES, ids=[f"{k}-{m}-{pd}" for k, m, pd in TP_CASES])
def test_grouped_equals_per_matrix_under_tp(world, mode, partition_dim, kind):
    """Muon in every mode and both partition dims; the members with cross-rank quantities (means, inner products,
    norms) in a per-matrix-collective mode and home."""
    for same, grouped, single in world.run(_tp_grouped, mode, partition_dim, kind):
        assert same
        assert grouped <= single, (grouped, single)
