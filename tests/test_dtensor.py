"""DTensor parameters (FSDP2 ``fully_shard`` and torch tensor parallel ``parallelize_module``) in the DP x TP grid.

World 4 as a (dp=2, tp=2) DeviceMesh (and dp=4 / tp=4 on 1D meshes). Every distributed result is compared
with a single-process optimizer on the full tensors, after 3 steps, with test_optim's tolerance
(max |W - W_ref| <= 1e-5 + 1e-4 max |W_ref - W_0|). Shapes are odd so that shards are uneven (torch.chunk
leaves the last DP piece shorter). The end-to-end test trains a real parallelize_module + fully_shard model
(FSDP2's strided shards, its reduce-scattered gradients) against the same model in one process.
"""

from __future__ import annotations

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from dist_ortho import MuonAdamW, get_optimizer
from dist_ortho.parameters.dtensor import piece_of
from tests import optim_reference
from tests.harness import started_world
from tests.test_grid import step_pair

SHAPES = [(10, 6), (7, 10), (9, 13), (12, 12)]
TP_PLACEMENTS = [Shard(0), Shard(1), Shard(0), Replicate()]  # colwise, rowwise, colwise, replicated


@pytest.fixture(scope="module")
def world():
    with started_world(4) as w:
        yield w


def _mesh(dp: int, tp: int):
    if tp == 1:
        return init_device_mesh("cpu", (dp,), mesh_dim_names=("dp",))
    if dp == 1:
        return init_device_mesh("cpu", (tp,), mesh_dim_names=("tp",))
    return init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))


def _dtensor(full: torch.Tensor, mesh, placements) -> DTensor:
    """This rank's piece of ``full`` as a DTensor (any placements, FSDP2's strided shards included)."""
    return DTensor.from_local(piece_of(full, mesh, placements).clone(), mesh, placements, shape=full.shape, stride=full.stride())


def _placements(mesh, tp_placement, dp_sharded: bool):
    """FSDP2's placements: Shard(0) over DP, or its strided shard when TP also shards dim 0."""
    dp = Replicate()
    if dp_sharded:
        both = tp_placement == Shard(0) and "tp" in mesh.mesh_dim_names
        dp = _StridedShard(0, split_factor=mesh["tp"].size()) if both else Shard(0)
    return {("dp",): (dp,), ("tp",): (tp_placement,), ("dp", "tp"): (dp, tp_placement)}[mesh.mesh_dim_names]


def _exact(ctx, kind: str, mode: str, dp: int, tp: int, dp_sharded: bool, reduce_grads: bool = False,
           mesh_given: bool = True):
    mesh = _mesh(dp, tp)
    dp_rank = mesh.get_local_rank("dp") if "dp" in mesh.mesh_dim_names else 0
    gen = torch.Generator().manual_seed(0)
    fulls = [torch.randn(shape, generator=gen) for shape in SHAPES]
    placements = [_placements(mesh, pl, dp_sharded) for pl in TP_PLACEMENTS]
    params = [torch.nn.Parameter(_dtensor(f, mesh, pls)) for f, pls in zip(fulls, placements)]
    names = [f"w{i}" for i in range(len(params))]
    ref = [torch.nn.Parameter(f.clone()) for f in fulls]
    hp = {"lr": 0.02, "fp32_matmul_prec": "highest"}
    groups = {"device_mesh": mesh} if mesh_given else {}  # else read from the parameters' mesh dim names
    opt = get_optimizer(kind)(list(zip(names, params)), **groups, tp_mode=mode, reduce_grads=reduce_grads, **hp)
    ref_opt = get_optimizer(kind)(ref, **hp)

    def feed(step: int) -> None:
        for p, q, pls in zip(params, ref, placements):
            g = torch.randn(q.shape, generator=gen)  # the DP-averaged gradient, as FSDP2 / DDP leave it
            noise = torch.randn(q.shape, generator=gen)  # reduce_grads: replicas differ, their mean is g
            mine = g + (dp_rank - (dp - 1) / 2) * noise if reduce_grads else g
            p.grad, q.grad = _dtensor(mine, mesh, pls), g

    calls = step_pair(opt, ref_opt, feed)
    bad = {}
    for name, p, q, f in zip(names, params, ref, fulls):
        moved = (q.detach() - f).abs().max().item()
        err = (p.detach().full_tensor() - q.detach()).abs().max().item()
        if not optim_reference.weights_agree(err, moved):
            bad[name] = (err, moved)
    assert not bad, bad
    state = sum(t.numel() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    return calls.total_calls, state


@pytest.mark.parametrize("kind,mode", [("muon", "home"), ("muon", "gram"), ("muon", "duplicated"),
                                       ("normuon", "home"), ("polargrad", "auto"), ("muon_hyperball", "home")])
def test_fsdp_and_tp_dtensors_equal_one_process(world, kind, mode):
    """dp=2 x tp=2, Shard(0) over DP (FSDP) and Shard(0|1)/Replicate over TP: exact, state on owners only. The
    owners send updates back (each rank applies its piece), except MuonHyperball, whose hooks read whole weights:
    its owners receive the values too and send new values back."""
    results = world.run(_exact, kind, mode, 2, 2, True)
    states = [s for _, s in results]
    if kind == "muon":  # momentum: every TP block held by one DP replica (the TP-replicated matrix: by its 2 TP ranks)
        assert sum(states) == sum(r * c for r, c in SHAPES) + 12 * 12, states


@pytest.mark.parametrize("dp,tp,dp_sharded", [(4, 1, True), (1, 4, False), (2, 2, False)])
def test_one_dimensional_meshes_and_replicated_dp(world, dp, tp, dp_sharded):
    """FSDP only (dp=4), torch TP only (tp=4), and DTensors replicated over DP (DDP / HSDP replicas)."""
    world.run(_exact, "muon", "home", dp, tp, dp_sharded)


@pytest.mark.parametrize("dp,tp,dp_sharded", [(2, 2, True), (4, 1, True), (1, 4, False)])
def test_groups_are_read_from_the_mesh_dim_names(world, dp, tp, dp_sharded):
    """No device_mesh= and no groups: the DTensors' mesh dims named 'dp' and 'tp' say them."""
    world.run(_exact, "muon", "home", dp, tp, dp_sharded, False, False)


@pytest.mark.parametrize("dp,tp", [(2, 2), (4, 1)])
def test_reduce_grads_averages_dtensors_replicated_over_dp(world, dp, tp):
    """reduce_grads=True with DTensors replicated over DP (HSDP replicas, torch TP without FSDP): each replica's
    own gradient is averaged into the owner's DTensor gradient before the update."""
    world.run(_exact, "muon", "home", dp, tp, False, True)


def _piece_bytes(ctx, weight_decay_method: str) -> tuple[int, int]:
    """FSDP over DP 4: the bytes one steady step sends, and the bytes of the pieces this rank holds of weights
    that other ranks own (its values' pieces, which only the l2 path sends to their owners)."""
    mesh = _mesh(4, 1)
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(_dtensor(torch.randn(shape, generator=gen), mesh, (Shard(0),))) for shape in SHAPES]
    opt = get_optimizer("muon")(params, device_mesh=mesh, tp_mode="home", weight_decay_method=weight_decay_method)
    for _ in range(2):
        for p in params:
            p.grad = _dtensor(torch.randn(p.shape, generator=gen), mesh, (Shard(0),))
        opt.step()
    others = sum(p.to_local().nbytes for p in params if opt.owner(p) != ctx.rank)
    return opt.comm_stats().bytes_sent, others


def test_owners_receive_gradients_only_and_send_updates_back(world):
    """Muon (decoupled decay): the owner gets the gradients' pieces only and sends each rank its piece of the
    update; with "l2" decay (the gradient reads the weight) it also gets the values' pieces: exactly those more
    bytes. Exactness of both paths: test_fsdp_and_tp_dtensors_equal_one_process."""
    for (travel, other_pieces), (values, other_pieces_l2) in zip(world.run(_piece_bytes, "decoupled"),
                                                                 world.run(_piece_bytes, "l2")):
        assert other_pieces == other_pieces_l2 > 0 and values - travel == other_pieces, (travel, values, other_pieces)


def test_collectives_per_step(world):
    """Home mode at dp=2 x tp=2, steady state: one all-to-all of the DP pieces to the owners and one back on
    every rank, and home's two all-to-alls on a replica that owns a TP-sharded matrix: at most 4 (target 6)."""
    calls = [c for c, _ in world.run(_exact, "muon", "home", 2, 2, True)]
    assert set(calls) <= {2, 4} and calls[0] == calls[1] and calls[2] == calls[3], calls


def _raised(ctx, what: str):
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("shards", "tp")) if what == "unknown dim" else _mesh(2, 2)
    placements = {"unknown dim": (Shard(0), Shard(1)), "interleaved": (Shard(0), Shard(0)),
                  "3d": (Shard(0), Shard(2))}[what]
    full = torch.randn(8, 6, 2) if what == "3d" else torch.randn(8, 6)
    p = torch.nn.Parameter(_dtensor(full, mesh, placements))
    groups = {"tp_group": mesh["tp"].get_group()} if what == "unknown dim" else {"device_mesh": mesh}
    try:
        opt = get_optimizer("muon")([("w", p)], lr=0.02, conv_mode="flatten", **groups)
        p.grad = _dtensor(torch.randn(full.shape), mesh, placements)
        opt.step()
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.parametrize("what,message", [
    # a mesh dim the optimizer was not given, named as no framework names one
    ("unknown dim", "on mesh dim 'shards' (ranks"),
    ("interleaved", "before its TP shard does, so no TP rank holds one block"),  # Shard(0) over DP, then TP
    ("3d", "only 2D DTensor weights"),
])
def test_a_placement_that_cannot_be_orthogonalized_exactly_is_an_error_on_every_rank(world, what, message):
    errors = world.run(_raised, what)
    assert all(e and message in e for e in errors), errors


def _wrong_local_piece(ctx, tp_only: bool, verify_plan: str):
    """Rank 1's local tensor is one row longer than its piece (DTensor.from_local with shape= given)."""
    mesh, placements = (_mesh(1, 4), (Shard(1),)) if tp_only else (_mesh(2, 2), (Shard(0), Shard(1)))
    full = torch.randn(8, 6)
    piece = piece_of(full, mesh, placements)
    if ctx.rank == 1:
        piece = torch.randn(piece.shape[0] + 1, piece.shape[1])

    def made(t: torch.Tensor) -> DTensor:
        return DTensor.from_local(t, mesh, placements, shape=full.shape, stride=full.stride())

    p = torch.nn.Parameter(made(piece.clone()))
    opt = get_optimizer("muon")([("w", p)], lr=0.02, device_mesh=mesh, verify_plan=verify_plan)
    p.grad = made(torch.randn(piece.shape))
    try:
        opt.step()
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.parametrize("tp_only,verify_plan", [(False, "on_change"), (True, "on_change"), (True, "every_step")])
def test_a_local_tensor_that_is_not_its_piece_is_an_error_on_every_rank(world, tp_only, verify_plan):
    # Before: gloo's size enforce aborted the processes (TP only) or a CollectiveError after the timeout (DP x TP).
    errors = world.run(_wrong_local_piece, tp_only, verify_plan)
    if not tp_only:  # the longer piece is along the dim DP pieces cut (whose extents are read from the local
        # tensors, as Megatron-FSDP's uneven ones): the ranks whose exchanges find that the blocks do not fit say
        # so, the others that they did
        assert all(e and (e.startswith("w: its ranks' blocks") or "found by this group's rank(s)" in e)
                   for e in errors), errors
        assert sum(e.startswith("w: its ranks' blocks") for e in errors) >= 2, errors
        return
    assert "parameter 'w': this rank's local tensor has shape" in errors[1], errors
    assert all(e and "found by this group's rank(s)" in e for r, e in enumerate(errors) if r != 1), errors


class _Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(6, 10, bias=False)
        self.down = torch.nn.Linear(10, 7, bias=True)
        self.norm = torch.nn.LayerNorm(7)

    def forward(self, x):
        return self.norm(self.down(torch.relu(self.up(x))))


def _trained(ctx, kind: str):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = _mesh(2, 2)
    torch.manual_seed(0)
    model = _Mlp()
    ref = _Mlp()
    ref.load_state_dict(model.state_dict())
    parallelize_module(model, mesh["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
    fully_shard(model, mesh=mesh["dp"])
    hp = {"lr": 0.02, "fp32_matmul_prec": "highest", "adamw_lr": 0.01}
    opt = MuonAdamW(model.named_parameters(), kind, device_mesh=mesh, tp_mode="home", **hp)
    ref_opt = MuonAdamW(ref.named_parameters(), kind, **hp)
    dp_rank = mesh["dp"].get_local_rank()
    gen = torch.Generator().manual_seed(1)
    norms = []
    for _ in range(3):
        x, y = torch.randn(8, 6, generator=gen), torch.randn(8, 7, generator=gen)
        half = slice(4 * dp_rank, 4 * dp_rank + 4)  # the batch split over DP; TP ranks see the same half
        torch.nn.functional.mse_loss(model(x[half]), y[half]).backward()
        torch.nn.functional.mse_loss(ref(x), y).backward()
        norms.append((opt.clip_grad_norm_(0.05).item(), torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05).item()))
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    out = {}
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        out[name] = (p.detach().full_tensor() - q.detach()).abs().max().item()
    return out, opt.owns(model.up.weight), norms


@pytest.mark.parametrize("kind", ["muon", "normuon"])
def test_parallelize_module_and_fully_shard_model_trains_as_one_process(world, kind):
    """A torch-native model (ColwiseParallel/RowwiseParallel over tp, fully_shard over dp: FSDP2's strided
    shards of the colwise weight) with MuonAdamW: weights equal one process's after 3 steps (float32
    gradients reduced in another order: 1e-5)."""
    results = world.run(_trained, kind)
    for errors, _, norms in results:
        assert max(errors.values()) <= 1e-5, errors
        assert all(abs(mine - ref) <= 1e-5 * ref and mine > 0.05 for mine, ref in norms), norms  # clipping was active
    assert sorted(owns for _, owns, _ in results) == [False, False, True, True]  # one DP replica per TP group


def _uneven_pieces(ctx) -> list[bool]:
    """DTensors whose local pieces are uneven and empty (as Megatron-FSDP builds them, DTensor.from_local with
    shape=): gathered whole and cut again from the ranks' own shapes (the main job's checkpoint reads them so)."""
    from dist_ortho.parameters.dtensor import gather_pieces, piece_like

    gen = torch.Generator().manual_seed(3)
    out = []
    flat = init_device_mesh("cpu", (4,), mesh_dim_names=("fsdp",))
    full = torch.randn(10, 6, generator=gen)
    rows = [3, 0, 5, 2]
    start = sum(rows[: ctx.rank])
    cases = [(full, flat, (Shard(0),), full[start: start + rows[ctx.rank]])]
    grid = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_cp", "tp"))
    full2 = torch.randn(7, 6, generator=gen)
    d, t = grid["dp_cp"].get_local_rank(), grid["tp"].get_local_rank()
    block = full2[:5] if d == 0 else full2[5:]  # rows 5 / 2 over DP, then columns 3 / 3 over TP
    cases.append((full2, grid, (Shard(0), Shard(1)), block[:, 3 * t: 3 * t + 3]))
    for whole, mesh, placements, piece in cases:
        p = DTensor.from_local(piece.clone(), mesh, placements, shape=whole.shape, stride=whole.stride())
        out.append(torch.equal(gather_pieces(p), whole) and torch.equal(piece_like(whole, p), piece))
    return out


def test_uneven_pieces_gathered_and_cut_by_their_real_shapes(world):
    assert all(all(r) for r in world.run(_uneven_pieces))
