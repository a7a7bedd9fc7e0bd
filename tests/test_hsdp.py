"""HSDP: owners spread over replicas x shards (x TP), each matrix Newton-Schulz'd once in the world, against one process.

Built with torch's own APIs as torchtitan builds it: ``fully_shard(model, mesh=mesh["dp_replicate", "fsdp"])`` gives
every weight ``(Replicate(), Shard(0))`` (world 4); after Colwise/Rowwise TP on "tp" (world 8, slow)
``(Replicate(), _StridedShard(0, sf=2), Shard(0))`` and ``(Replicate(), Shard(0), Shard(1))``. FSDP2 all-reduces
the gradient pieces over "dp_replicate" in backward; the optimizer (no group argument) steps each matrix on one rank
of the 4 (8: one per TP pair), which gathers its block from its own replica's pieces and sends every rank of both
replicas its piece back.

Model: bias-free Linear 6 -> 10 -> 12 -> 14 -> 9 with ReLUs (odd rows over FSDP: uneven pieces), 2 steps, each of
the 4 DP ranks its own batch (TP ranks the same one). Reference (tests/optim_reference.py, float64, whole matrices):
each step's gradient is the mean over the DP ranks of their losses' gradients at the gathered weights, in one
process; the gathered weights after the steps agree with optim_reference.weights_agree (max |W - W_ref| <= 1e-5 +
1e-4 max |W_ref - W_0|: float32 at "highest" precision against float64).

Newton-Schulz work is counted with torch.utils.flop_counter around the step (Muon's step has no other matmul): the
world's sum equals one replica's under the old rule (``layouts.spread_replicas = False``: every replica steps every
matrix of its pieces), and with 8 equal matrices the busiest rank does total / world.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from dist_ortho import Muon, get_optimizer
from tests import optim_reference
from tests.harness import started_world

HP = {"lr": 0.02, "momentum": 0.9, "weight_decay": 0.01, "nesterov": True, "fp32_matmul_prec": "highest"}
EXACT_MODES = ("duplicated", "distributed", "gram", "home")  # dist_ortho.tp.TP_MODES less "auto" and "blockwise"
DIMS = (6, 10, 12, 14, 9)
STEPS, BATCH = 2, 4


@pytest.fixture(scope="module")
def world():
    with started_world(4) as w:
        yield w


def _model(dims=DIMS) -> torch.nn.Sequential:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for a, b in zip(dims, dims[1:]):
        layers += [torch.nn.Linear(a, b, bias=False), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


def _batch(step: int, dp_rank: int, dims=DIMS) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + dp_rank)
    return torch.randn(BATCH, dims[0], generator=gen), torch.randn(BATCH, dims[-1], generator=gen)


def _reference_grads(weights: dict[str, torch.Tensor], step: int, dp: int, dims=DIMS) -> dict[str, torch.Tensor]:
    """The mean over the DP ranks of their losses' gradients at ``weights``, float64, one process."""
    model = _model(dims).double()
    model.load_state_dict({n: w.double() for n, w in weights.items()})
    for d in range(dp):
        x, y = _batch(step, d, dims)
        (torch.nn.functional.mse_loss(model(x.double()), y.double()) / dp).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _build(layout: str, dims=DIMS, names=("dp_replicate", "fsdp")):
    """The model under HSDP 2 x 2 (``"hsdp"``) or HSDP 2 x 2 x TP 2 (``"hsdp_tp"``), and this rank's DP rank."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    model = _model(dims)
    if layout == "hsdp":
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=names)
        fully_shard(model, mesh=mesh)
        return model, mesh.get_local_rank(names[0]) * 2 + mesh.get_local_rank(names[1])
    mesh = init_device_mesh("cpu", (2, 2, 2), mesh_dim_names=(*names, "tp"))
    plan = {str(i): ColwiseParallel() if (i // 2) % 2 == 0 else RowwiseParallel() for i in range(0, len(model), 2)}
    parallelize_module(model, mesh["tp"], plan)
    fully_shard(model, mesh=mesh[names])
    return model, mesh.get_local_rank(names[0]) * 2 + mesh.get_local_rank(names[1])


def _trained(ctx, layout: str, kind: str, mode: str, spread: bool = True, overlap: bool = False,
             dims=DIMS, names=("dp_replicate", "fsdp"), **options) -> dict:
    """Train ``STEPS`` steps; the gathered weights, their errors against one process, who owns what, the state
    kept, the Newton-Schulz FLOPs and the collectives of the last step on this rank."""
    from torch.utils.flop_counter import FlopCounterMode

    model, dp_rank = _build(layout, dims, names)
    initial = {n: p.detach().full_tensor().clone() for n, p in model.named_parameters()}
    opt = get_optimizer(kind)(model.named_parameters(), tp_mode=mode, overlap=overlap, **HP, **options)
    opt.layouts.spread_replicas = spread
    grads, flops = [], 0
    for step in range(STEPS):
        opt.finish()
        grads.append(_reference_grads({n: p.detach().full_tensor() for n, p in model.named_parameters()}, step, 4, dims))
        x, y = _batch(step, dp_rank, dims)
        torch.nn.functional.mse_loss(model(x), y).backward()
        counter = FlopCounterMode(display=False)
        with counter:
            opt.step()
        flops = counter.get_total_flops()
        opt.zero_grad()
    opt.finish()
    weights = {n: p.detach().full_tensor() for n, p in model.named_parameters()}
    errors = {}
    for n, w in weights.items():
        ref = optim_reference.run(kind, initial[n].double(), [g[n] for g in grads], HP)
        errors[n] = ((w.double() - ref).abs().max().item(), (ref - initial[n].double()).abs().max().item())
    params = dict(model.named_parameters())
    return {"errors": errors, "weights": weights, "flops": flops, "calls": dict(opt.comm_stats().calls),
            "bytes": opt.comm_stats().bytes_sent,
            "owns": {n: opt.owns(p) for n, p in params.items()},
            "state": {n: sorted(opt.state[p]) for n, p in params.items()},
            "group": {n: dist.get_process_group_ranks(opt.layouts.owner_group(p)) for n, p in params.items()},
            "placements": {n: tuple(repr(pl) for pl in p.placements) for n, p in params.items()}}


def _check_exact(results: list[dict]) -> float:
    for rank, r in enumerate(results):
        bad = {n: v for n, v in r["errors"].items() if not optim_reference.weights_agree(*v)}
        assert not bad, f"rank {rank}: (err, moved) beyond tolerance: {bad}"
    return max(e for r in results for e, _ in r["errors"].values())


def _check_owned_once(results: list[dict], tp: int = 1) -> None:
    """Each matrix is owned by one rank of each TP rank's grid (tp ranks in all), its state kept there only."""
    for n in results[0]["owns"]:
        owners = [rank for rank, r in enumerate(results) if r["owns"][n]]
        assert len(owners) == tp, (n, owners)
        for rank, r in enumerate(results):
            assert bool(r["state"][n]) == r["owns"][n], (rank, n, r["state"][n])
            assert len(r["group"][n]) == len(results) // tp, (rank, n, r["group"][n])


@pytest.mark.parametrize("kind", ["muon", "normuon"])
def test_hsdp_steps_each_matrix_once_and_exactly(world, kind):
    """(Replicate(), Shard(0)) on ("dp_replicate", "fsdp"): every exact mode (no TP here: the modes must not change
    the result), Muon and NorMuon, against one process; one owner per matrix over the 4 ranks, state only there."""
    for mode in EXACT_MODES if kind == "muon" else ("duplicated",):
        results = world.run(_trained, "hsdp", kind, mode)
        assert all(r["placements"]["0.weight"] == ("Replicate()", "Shard(dim=0)") for r in results)
        _check_exact(results)
        _check_owned_once(results)


def _equal_dims() -> tuple[int, ...]:
    return (12,) * 9  # 8 matrices 12 x 12: LPT over 4 ranks gives 2 each


def test_newton_schulz_work_is_once_in_the_world(world):
    """FLOPs of the step per rank: the world's sum equals one replica's under the old rule (every replica stepping
    every matrix: twice the world's work), the busiest rank total / world; both rules exact and equal."""
    dims = _equal_dims()
    spread = world.run(_trained, "hsdp", "muon", "duplicated", True, False, dims)
    old = world.run(_trained, "hsdp", "muon", "duplicated", False, False, dims)
    _check_exact(spread)
    _check_exact(old)
    ours, before = [r["flops"] for r in spread], [r["flops"] for r in old]
    assert min(ours) > 0 and sum(before) == 2 * sum(ours), (ours, before)
    assert max(ours) * 4 == sum(ours), ours  # each matrix once; the busiest rank total / world
    assert max(before) == 2 * max(ours), (ours, before)
    _check_owned_once(spread)
    for n in spread[0]["weights"]:
        assert torch.allclose(spread[0]["weights"][n], old[0]["weights"][n], rtol=0, atol=1e-6), n
    # one all-to-all each way over the grid, as the plain FSDP path over its pieces group
    assert all(r["calls"] == old[0]["calls"] for r in spread), (spread[0]["calls"], old[0]["calls"])


def test_overlap_equals_blocking(world):
    """overlap=True (the share left in flight, waited for at the next step / finish()) is bit-identical."""
    blocking = world.run(_trained, "hsdp", "muon", "duplicated")
    overlapped = world.run(_trained, "hsdp", "muon", "duplicated", True, True)
    for b, o in zip(blocking, overlapped):
        for n in b["weights"]:
            assert torch.equal(b["weights"][n], o["weights"][n]), n


def test_mesh_dims_maps_other_names(world):
    """mesh_dims={"replica": "dp_replicate", "shard": "fsdp"}: read as HSDP, spread, exact."""
    names = ("replica", "shard")
    results = world.run(_trained, "hsdp", "muon", "duplicated", True, False, DIMS, names,
                        mesh_dims={"replica": "dp_replicate", "shard": "fsdp"})
    _check_exact(results)
    _check_owned_once(results)


def _refusal(ctx, case: str) -> str:
    """The message of the ValueError that ``case`` raises on this rank (before any collective of a step)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    torch.manual_seed(0)
    try:
        if case == "unknown_role":
            w = torch.nn.Parameter(torch.randn(4, 4))
            Muon([w], mesh_dims={"replica": "replicas"})
        elif case == "unmapped_dim":
            mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replica", "shard"))
            w = torch.nn.Parameter(DTensor.from_local(torch.randn(4, 4), mesh, [Replicate(), Shard(0)]))
            Muon([("layer.weight", w)], mesh_dims={"replica": "dp_replicate"})
        else:
            dims = {"expert": ("efsdp", "ep"), "expert_two_dp": ("dp_replicate", "efsdp")}.get(case, ("fsdp", "tp"))
            mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=dims)
            if case == "dp_before_tp":  # rows interleave over TP: no TP rank holds one block
                placements = [Shard(0), Shard(0)]
            elif case == "strided_factor":  # a split factor that is not TP's 2: ranges interleave
                placements = [_StridedShard(0, split_factor=4), Shard(0)]
            elif case == "expert":  # experts cut along their rows over efsdp and their columns over ep
                placements = [Shard(1), Shard(2)]
            else:  # experts cut along their columns over one DP dim and their rows over another
                placements = [Shard(2), Shard(1)]
            full = torch.randn(8, 6) if case in ("dp_before_tp", "strided_factor") else torch.randn(4, 6, 4)
            from dist_ortho.parameters.dtensor import piece_of

            w = torch.nn.Parameter(DTensor.from_local(piece_of(full, mesh, placements).clone(), mesh, placements,
                                                      shape=full.shape, stride=full.stride()))
            opt = Muon([("moe.experts.w1" if case.startswith("expert") else "layer.weight", w)], lr=0.01)
            w.grad = torch.zeros_like(w)
            opt.step()
    except ValueError as e:
        return str(e)
    return "no error"


@pytest.mark.parametrize("case", ["unknown_role", "unmapped_dim", "dp_before_tp", "strided_factor", "expert",
                                  "expert_two_dp"])
def test_bad_layouts_are_refused_by_name_on_every_rank(world, case):
    """A mesh_dims role dist_ortho does not know, a dim no name places, placements that are not one block per rank,
    an expert stack cut along its matrix dims over both its DP and EP dims: a ValueError on every rank naming the
    parameter (or mesh_dims) and what it has."""
    results = world.run(_refusal, case)
    expected = {"unknown_role": ["mesh_dims['replica'] = 'replicas'"], "unmapped_dim": ["layer.weight", "'shard'", "Shard(dim=0)", "mesh_dims"],
                "dp_before_tp": ["layer.weight", "Shard(dim=0)"], "strided_factor": ["layer.weight", "_StridedShard"],
                "expert": ["moe.experts.w1", "Shard(dim=2)", "'ep'"],
                "expert_two_dp": ["moe.experts.w1", "Shard(dim=1)", "'efsdp'"]}[case]
    for rank, message in enumerate(results):
        assert all(s in message for s in expected), (rank, message)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["muon", "normuon"])
def test_hsdp_and_tp_at_world_8(kind):
    """("dp_replicate", "fsdp", "tp") 2 x 2 x 2: colwise (Replicate(), _StridedShard(0, sf=2), Shard(0)), rowwise
    (Replicate(), Shard(0), Shard(1)); each matrix owned by one grid place (its 2 TP ranks), every exact mode."""
    with started_world(8) as world8:
        for mode in EXACT_MODES if kind == "muon" else ("distributed",):
            results = world8.run(_trained, "hsdp_tp", kind, mode)
            assert results[0]["placements"]["0.weight"] == ("Replicate()", "_StridedShard(dim=0, sf=2)", "Shard(dim=0)")
            assert results[0]["placements"]["2.weight"] == ("Replicate()", "Shard(dim=0)", "Shard(dim=1)")
            _check_exact(results)
            _check_owned_once(results, tp=2)
