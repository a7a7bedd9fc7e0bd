"""torchtitan's dense layouts, built with torch's own APIs, stepped with no group argument, against one process.

torchtitan (parallel_dims.py, distributed/fsdp.py, models/*/parallelize.py) names its mesh dims "dp_replicate",
"fsdp" (its newer backend: "dp_shard") and "tp", applies Colwise/Rowwise TP with ``parallelize_module`` on its
data-loading mesh's "tp" and then ``fully_shard`` on its dense mesh's DP dims: a different DeviceMesh object over
the same ranks with the same names. Reproduced here on gloo with ``init_device_mesh``, ``parallelize_module`` and
``torch.distributed.fsdp.fully_shard`` (no torchtitan import):

- HSDP 2 x FSDP 2, no TP (world 4): ``fully_shard(model, mesh=mesh["dp_replicate", "fsdp"])``, every weight
  ``(Replicate(), Shard(0))``; the same with the FSDP dim named "dp_shard";
- FSDP 2 x TP 2 (world 4), TP on one mesh object and FSDP on another: the colwise weight
  ``(_StridedShard(0, sf=2), Shard(0))``, the rowwise one ``(Shard(0), Shard(1))``;
- HSDP 2 x FSDP 2 x TP 2 (world 8, slow): ``(Replicate(), _StridedShard(0, sf=2), Shard(0))`` and
  ``(Replicate(), Shard(0), Shard(1))`` on ("dp_replicate", "fsdp", "tp");
- PP 2 stages (world 4) on ("pp", "fsdp" | "tp"): each stage FSDP 2 or TP 2 on its own sub-mesh and its own
  optimizer over its own parameters, given the one-process gradients directly (no pipeline schedule); every
  collective of its steps, plan included, is over a group within its stage (torch.distributed's calls recorded);
- routed experts [E, out, in] when efsdp x ep <= E (world 4, E = 4): Shard(0) over "ep", then ``fully_shard`` over
  "efsdp" with ``Shard(0)``: ``(_StridedShard(0, sf=2), Shard(0))`` on ("efsdp", "ep"), rank (f, e) holding expert
  2e + f; each expert against one process. A strided shard whose experts interleave (split factor not the later
  dims' cuts) is a ValueError on every rank before any collective; the checkpoint contract holds a stack's state by
  experts (dist_ortho.optim.holding.StackHeld), gathered whole.

The model is test_dtensor's (Linear 6 -> 10 without bias, Linear 10 -> 7 with bias, LayerNorm 7: odd sizes, so
FSDP's pieces are uneven), under MuonAdamW built WITHOUT device_mesh= / tp_group= / dp_group=: the groups are read
from the parameters' mesh dim names. 3 steps, each DP rank its own batch (TP ranks the same one).

Reference (tests/optim_reference.py, float64, whole matrices; AdamW's side: torch's AdamW in float64): each step's
gradient is the mean over DP ranks of their losses' gradients at the gathered weights (what FSDP2 reduces), computed
in one process on the whole batch; after 3 steps every gathered weight (``DTensor.full_tensor``) is compared with
optim_reference.weights_agree (max |W - W_ref| <= 1e-5 + 1e-4 max |W_ref - W_0|).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from dist_ortho import MuonAdamW, comm
from dist_ortho.parameters.dtensor import piece_of
from tests import optim_reference
from tests.harness import started_world
from tests.test_dtensor import _Mlp

HP = {"lr": 0.02, "momentum": 0.9, "weight_decay": 0.01, "nesterov": True, "fp32_matmul_prec": "highest"}
ADAMW = {"lr": 0.01, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.0}  # MuonAdamW's AdamW side
STEPS, BATCH = 3, 8  # BATCH rows per DP rank


@pytest.fixture(scope="module")
def world():
    with started_world(4) as w:
        yield w


def _batch(step: int, dp_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + dp_rank)
    return torch.randn(BATCH, 6, generator=gen), torch.randn(BATCH, 7, generator=gen)


def _reference_grads(weights: dict[str, torch.Tensor], step: int, dp: int) -> dict[str, torch.Tensor]:
    """The mean over the DP ranks of their losses' gradients at ``weights``, in float64 in one process."""
    model = _Mlp().double()
    model.load_state_dict({n: w.double() for n, w in weights.items()})
    for d in range(dp):
        x, y = _batch(step, d)
        (torch.nn.functional.mse_loss(model(x.double()), y.double()) / dp).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _reference(w0: torch.Tensor, grads: list[torch.Tensor]) -> torch.Tensor:
    """``w0`` after the steps with ``grads`` in float64 in one process: Muon for a matrix, AdamW for a vector."""
    if w0.ndim == 2:
        return optim_reference.run("muon", w0.double(), grads, HP)
    q = torch.nn.Parameter(w0.double().clone())  # AdamW's side (bias, LayerNorm)
    adamw = torch.optim.AdamW([q], **ADAMW)
    for g in grads:
        q.grad = g.double()
        adamw.step()
    return q.detach()


def _error(w: torch.Tensor, w0: torch.Tensor, grads: list[torch.Tensor]) -> tuple[float, float]:
    """(max |w - w_ref|, max |w_ref - w0|) of the gathered weight ``w`` against :func:`_reference`."""
    ref = _reference(w0, grads)
    return (w.double() - ref).abs().max().item(), (ref - w0.double()).abs().max().item()


def _build(layout: str, names: str):
    """The model under torchtitan's layout, this rank's DP rank and the DP size."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.manual_seed(0)
    model = _Mlp()
    if layout == "hsdp":  # dp_replicate x fsdp, no TP
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_replicate", names))
        fully_shard(model, mesh=mesh["dp_replicate", names])
        return model, mesh.get_local_rank("dp_replicate") * 2 + mesh.get_local_rank(names), 4
    dims = ("dp_replicate", names, "tp") if layout == "hsdp_tp" else (names, "tp")
    shape = (2,) * len(dims)
    # two mesh objects over the same ranks with the same names: torchtitan's data-loading mesh (TP) and dense mesh
    loading = init_device_mesh("cpu", shape, mesh_dim_names=dims)
    dense = init_device_mesh("cpu", shape, mesh_dim_names=dims)
    assert loading is not dense
    parallelize_module(model, loading["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
    if layout == "hsdp_tp":
        fully_shard(model, mesh=dense["dp_replicate", names])
        return model, dense.get_local_rank("dp_replicate") * 2 + dense.get_local_rank(names), 4
    fully_shard(model, mesh=dense[names])
    return model, dense.get_local_rank(names), 2


def _trained(ctx, layout: str, names: str, mode: str) -> dict:
    model, dp_rank, dp = _build(layout, names)
    placements = {n: tuple(repr(pl) for pl in p.placements) for n, p in model.named_parameters()}
    dim_names = {n: p.device_mesh.mesh_dim_names for n, p in model.named_parameters()}
    initial = {n: p.detach().full_tensor().clone() for n, p in model.named_parameters()}
    opt = MuonAdamW(model.named_parameters(), "muon", tp_mode=mode, adamw_lr=ADAMW["lr"], **HP)  # no groups
    grads = []
    for step in range(STEPS):
        grads.append(_reference_grads({n: p.detach().full_tensor() for n, p in model.named_parameters()}, step, dp))
        x, y = _batch(step, dp_rank)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    errors = {n: _error(p.detach().full_tensor(), initial[n], [g[n] for g in grads])
              for n, p in model.named_parameters()}
    groups = {role: None if g is None else tuple(dist.get_process_group_ranks(g))
              for role, g in (("tp", opt.tp_group), ("dp", opt.dp_group))}
    return {"errors": errors, "placements": placements, "dims": dim_names, "groups": groups}


PLACEMENTS = {  # what torch's APIs give for torchtitan's layouts (the layouts this test is about)
    "hsdp": {"up.weight": ("Replicate()", "Shard(dim=0)"), "down.weight": ("Replicate()", "Shard(dim=0)")},
    "fsdp_tp": {"up.weight": ("_StridedShard(dim=0, sf=2)", "Shard(dim=0)"),
                "down.weight": ("Shard(dim=0)", "Shard(dim=1)")},
    "hsdp_tp": {"up.weight": ("Replicate()", "_StridedShard(dim=0, sf=2)", "Shard(dim=0)"),
                "down.weight": ("Replicate()", "Shard(dim=0)", "Shard(dim=1)")},
}


def _check(results: list[dict], layout: str) -> dict[str, float]:
    for rank, r in enumerate(results):
        for n, expected in PLACEMENTS[layout].items():
            assert r["placements"][n] == expected, (rank, n, r["placements"][n])
        bad = {n: v for n, v in r["errors"].items() if not optim_reference.weights_agree(*v)}
        assert not bad, f"rank {rank}: (err, moved) beyond tolerance: {bad}"
    return {n: max(r["errors"][n][0] for r in results) for n in results[0]["errors"]}


@pytest.mark.parametrize("mode", ["home", "duplicated"])
@pytest.mark.parametrize("names", ["fsdp", "dp_shard"])
def test_hsdp_without_tp_needs_no_group_argument(world, names, mode):
    """(Replicate(), Shard(0)) on ("dp_replicate", "fsdp" | "dp_shard"), read by the dims' names. (The owners spread
    over replicas x shards, each matrix stepped once in the world, are tests/test_hsdp.py's.)"""
    results = world.run(_trained, "hsdp", names, mode)
    _check(results, "hsdp")
    for r in results:
        assert r["dims"]["up.weight"] == ("dp_replicate", names) and r["groups"]["tp"] is None, r


@pytest.mark.parametrize("mode", ["home", "duplicated"])
def test_fsdp_and_tp_on_different_mesh_objects_needs_no_group_argument(world, mode):
    """TP applied on one DeviceMesh ("fsdp", "tp") and fully_shard on another over the same ranks and names
    (torchtitan's data-loading and dense meshes): the groups are read by name and compared by ranks."""
    results = world.run(_trained, "fsdp_tp", "fsdp", mode)
    _check(results, "fsdp_tp")
    for rank, r in enumerate(results):
        assert r["groups"] == {"tp": (2 * (rank // 2), 2 * (rank // 2) + 1), "dp": (rank % 2, rank % 2 + 2)}, r




# -- pipeline parallelism: each stage's optimizer alone --

_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
                "all_to_all", "all_to_all_single", "all_gather_object", "broadcast", "broadcast_object_list", "barrier",
                "gather", "scatter", "reduce", "send", "recv", "isend", "irecv")


@contextlib.contextmanager
def _groups_used() -> Iterator[list[tuple[int, ...]]]:
    """The ranks of the group of every torch.distributed collective called inside (the world's for group=None),
    whoever calls it: torch.distributed's functions wrapped (as scripts/bench_common.py counting_collectives does;
    dist_ortho.comm looks them up at each call)."""
    used: list[tuple[int, ...]] = []

    def wrap(call):
        signature = inspect.signature(call)

        def recorded(*args, **kwargs):
            group = signature.bind(*args, **kwargs).arguments.get("group")
            used.append(tuple(dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)))
            return call(*args, **kwargs)
        return recorded

    targets = [(dist, name) for name in _COLLECTIVES if hasattr(dist, name)]
    saved = [(module, name, getattr(module, name)) for module, name in targets]
    for module, name, call in saved:
        setattr(module, name, wrap(call))
    try:
        yield used
    finally:
        for module, name, call in saved:
            setattr(module, name, call)


def _global_grads(shapes: dict[str, torch.Size], step: int) -> dict[str, torch.Tensor]:
    """Seeded gradients of every parameter of the whole model at ``step``: what one process would see."""
    gen = torch.Generator().manual_seed(500 + step)
    return {n: torch.randn(shape, generator=gen) for n, shape in sorted(shapes.items())}


def _like(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """This rank's piece of the global tensor ``full`` held as ``p`` is (a DTensor with p's mesh and placements)."""
    if not isinstance(p, DTensor):
        return full.clone()
    return DTensor.from_local(piece_of(full, p.device_mesh, p.placements).clone(), p.device_mesh, p.placements,
                              shape=full.shape, stride=full.stride())


def _steps(opt, params: dict[str, torch.Tensor], shapes: dict[str, torch.Size], steps: int) -> list[dict[str, torch.Tensor]]:
    """``steps`` optimizer steps on this rank's pieces of the seeded whole-model gradients; those gradients, by step."""
    grads = []
    for step in range(steps):
        grads.append(_global_grads(shapes, step))
        for n, p in params.items():
            p.grad = _like(grads[-1][n], p)
        opt.step()
        opt.zero_grad()
    return grads


def _whole(p: torch.Tensor) -> torch.Tensor:
    """The global tensor of a parameter (gathered when it is a DTensor; TP leaves LayerNorm's plain)."""
    return (p.full_tensor() if isinstance(p, DTensor) else p).detach()


def _stage(ctx, inner: str, mode: str) -> dict:
    """Two pipeline stages at world 4 on ("pp", inner): ranks {0, 1} stage 0 (the first layer, ``up``), ranks
    {2, 3} stage 1 (``down`` and ``norm``); each stage FSDP 2 (``fully_shard`` on mesh["fsdp"]) or TP 2
    (``parallelize_module`` on mesh["tp"]) on its own sub-mesh, as torchtitan slices its world mesh per stage, and
    its own MuonAdamW over its own parameters, with no group argument."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", inner))
    stage = mesh.get_local_rank("pp")
    torch.manual_seed(0)
    whole = _Mlp()
    shapes = {n: p.shape for n, p in whole.named_parameters()}
    model = torch.nn.Module()
    for layer in (("up",) if stage == 0 else ("down", "norm")):
        model.add_module(layer, getattr(whole, layer))
    if inner == "fsdp":
        fully_shard(model, mesh=mesh["fsdp"])
    else:
        parallelize_module(model, mesh["tp"], {"up": ColwiseParallel()} if stage == 0 else {"down": RowwiseParallel()})
    initial = {n: _whole(p).clone() for n, p in model.named_parameters()}
    opt = MuonAdamW(model.named_parameters(), "muon", tp_mode=mode, adamw_lr=ADAMW["lr"], **HP)  # this stage's only
    grads, calls = [], 0
    with _groups_used() as used:
        for step in range(STEPS):
            grads.append(_global_grads(shapes, step))
            for n, p in model.named_parameters():
                p.grad = _like(grads[-1][n], p)
            opt.step()
            calls += sum(opt.comm_stats().calls.values())
            opt.zero_grad()
    errors = {n: _error(_whole(p), initial[n], [g[n] for g in grads]) for n, p in model.named_parameters()}
    return {"stage": stage, "errors": errors, "used": sorted(set(used)), "calls": calls,
            "pp": tuple(dist.get_process_group_ranks(mesh["pp"].get_group())),
            "groups": {role: None if g is None else tuple(dist.get_process_group_ranks(g))
                       for role, g in (("tp", opt.tp_group), ("dp", opt.dp_group))}}


@pytest.mark.parametrize("inner,mode", [("fsdp", "home"), ("fsdp", "duplicated"), ("tp", "home")])
def test_pipeline_stages_step_alone_and_exact(world, inner, mode):
    """PP 2 stages x FSDP 2 (or TP 2) at world 4: each stage's optimizer, given the one-process gradients of its
    own parameters, steps them exactly (3 steps against float64 one process), reads its groups from its own
    sub-mesh, and issues collectives (plan included) only over groups within its stage's ranks: never the "pp"
    dim's group or the world, so a stage's step needs nothing from the other stage."""
    results = world.run(_stage, inner, mode)
    for rank, r in enumerate(results):
        own = {2 * r["stage"], 2 * r["stage"] + 1}
        assert r["stage"] == rank // 2 and r["pp"] == (rank % 2, rank % 2 + 2), r
        assert set(r["errors"]) == ({"up.weight"} if r["stage"] == 0 else {"down.weight", "down.bias", "norm.weight",
                                                                           "norm.bias"}), r
        bad = {n: v for n, v in r["errors"].items() if not optim_reference.weights_agree(*v)}
        assert not bad, f"rank {rank}: (err, moved) beyond tolerance: {bad}"
        assert r["groups"] == ({"tp": None, "dp": tuple(sorted(own))} if inner == "fsdp"
                               else {"tp": tuple(sorted(own)), "dp": None}), r
        assert r["calls"] > 0 and r["used"], r  # the stage's step did communicate, over its own ranks only
        assert all(set(ranks) <= own for ranks in r["used"]), (rank, r["used"])


# -- torchtitan's experts over ("efsdp", "ep") with FSDP's _StridedShard(0) --

EXPERTS = 4
STRIDED = (_StridedShard(0, split_factor=2), Shard(0))  # on ("efsdp", "ep"): what fully_shard gives (checked below)


def _experts(ctx, build: str) -> dict:
    """torchtitan's routed experts when efsdp x ep <= E (distributed/fsdp.py): w1 [4, 10, 6] and w2 [4, 6, 10] on a
    ("efsdp", "ep") 2 x 2 mesh, Shard(0) over "ep" and then ``fully_shard(..., mesh=mesh["efsdp"],
    shard_placement_fn=lambda p: Shard(0))``: (_StridedShard(0, sf=2), Shard(0)), whole experts, interleaved in rank
    order (rank (f, e) holds expert 2e + f); or the same DTensors made by ``DTensor.from_local``. MuonAdamW with no
    group argument, 3 steps of seeded gradients."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("efsdp", "ep"))
    gen = torch.Generator().manual_seed(7)
    fulls = {"w1": torch.randn(EXPERTS, 10, 6, generator=gen), "w2": torch.randn(EXPERTS, 6, 10, generator=gen)}
    model = torch.nn.Module()
    for n, full in fulls.items():
        if build == "fully_shard":
            model.register_parameter(n, torch.nn.Parameter(distribute_tensor(full.clone(), mesh["ep"], [Shard(0)])))
        else:
            model.register_parameter(n, torch.nn.Parameter(DTensor.from_local(
                piece_of(full, mesh, STRIDED).clone(), mesh, STRIDED, shape=full.shape, stride=full.stride())))
    if build == "fully_shard":
        fully_shard(model, mesh=mesh["efsdp"], shard_placement_fn=lambda p: Shard(0))
    params = dict(model.named_parameters())
    held = {n: [next(k for k in range(EXPERTS) if torch.equal(m, fulls[n][k])) for m in p.to_local()]
            for n, p in params.items()}
    opt = MuonAdamW([(f"layers.0.moe.experts.{n}", p) for n, p in params.items()], "muon", **HP)
    grads = _steps(opt, params, {n: f.shape for n, f in fulls.items()}, STEPS)
    errors = {}
    for n, p in params.items():
        full = p.detach().full_tensor()
        for k in range(EXPERTS):
            errors[f"{n}[{k}]"] = _error(full[k], fulls[n][k], [g[n][k] for g in grads])
    return {"placements": {n: tuple(repr(pl) for pl in p.placements) for n, p in params.items()},
            "dims": {n: p.device_mesh.mesh_dim_names for n, p in params.items()}, "held": held, "errors": errors,
            "owns": all(opt.owns(p) for p in params.values()),
            "dp": tuple(dist.get_process_group_ranks(opt.dp_group))}


@pytest.mark.parametrize("build", ["fully_shard", "from_local"])
def test_experts_strided_over_efsdp_are_exact(world, build):
    """(_StridedShard(0, sf=2), Shard(0)) on ("efsdp", "ep"): every rank holds one whole expert, rank (f, e) expert
    2e + f; read as the EP rank's experts cut again over efsdp (consecutive there, checked against DTensor's
    offsets), each rank steps its own, and every expert of the gathered weights is one process's Muon step."""
    results = world.run(_experts, build)
    for rank, r in enumerate(results):
        f, e = divmod(rank, 2)
        assert r["placements"] == {n: ("_StridedShard(dim=0, sf=2)", "Shard(dim=0)") for n in ("w1", "w2")}, r
        assert r["dims"]["w1"] == ("efsdp", "ep") and r["held"] == {"w1": [2 * e + f], "w2": [2 * e + f]}, r
        assert r["owns"] and r["dp"] == (e, e + 2), r  # the DP group is efsdp's; each rank steps its own expert
        bad = {n: v for n, v in r["errors"].items() if not optim_reference.weights_agree(*v)}
        assert not bad, f"rank {rank}: (err, moved) beyond tolerance: {bad}"


def _interleaved(ctx) -> str:
    """A strided shard of a stack over a DP dim with no EP shard inside it (one "efsdp" dim of 4 ranks,
    _StridedShard(0, sf=2), E = 8): rank f holds experts f and f + 4, not one range; dist_ortho must refuse it, not
    step them as experts 2f, 2f + 1."""
    mesh = init_device_mesh("cpu", (4,), mesh_dim_names=("efsdp",))
    placements = (_StridedShard(0, split_factor=2),)
    full = torch.randn(8, 10, 6, generator=torch.Generator().manual_seed(3))
    p = torch.nn.Parameter(DTensor.from_local(full[[ctx.rank, ctx.rank + 4]].clone(), mesh, placements,
                                              shape=full.shape, stride=full.stride()))
    assert torch.equal(p.detach().full_tensor(), full)  # what torch holds: experts f and f + 4 on rank f
    p.expert_stack = True
    p.grad = DTensor.from_local(torch.ones(2, 10, 6), mesh, placements, shape=full.shape, stride=full.stride())
    opt = MuonAdamW([("experts.w1", p)], "muon", **HP)
    before = p.detach().to_local().clone()
    with _groups_used() as used:
        try:
            opt.step()
        except ValueError as error:
            assert torch.equal(p.detach().to_local(), before)  # refused before it stepped anything
            return str(error), used
    return "no error", used


def test_experts_strided_into_interleaved_ranges_are_refused(world):
    """Where a strided shard leaves a rank experts that are not one range of the stack (its split factor is not
    the number of ranges the later mesh dims cut), reading them as consecutive experts would step them at the
    wrong positions: a ValueError naming the parameter and the placement, alike on every rank, before any
    collective."""
    results = world.run(_interleaved)
    assert len({m for m, _ in results}) == 1, results
    message = results[0][0]
    assert "'experts.w1'" in message and "_StridedShard(dim=0, sf=2)" in message and "interleave" in message, message
    assert all(used == [] for _, used in results), results


def _expert_state_held(ctx) -> dict[str, dict]:
    """The checkpoint contract (dist_ortho.optim.holding) of a stack's momentum after one step, strided over efsdp
    inside EP, and Shard(0) over "ep" replicated over efsdp: which experts this rank says it holds, the whole stack
    it gathers, the same assembled independently (every keeping rank's momentum placed at DTensor's own offsets),
    and what it says of a tensor that is not one entry per expert."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    from dist_ortho.optim.holding import holding

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("efsdp", "ep"))
    full = torch.randn(EXPERTS, 10, 6, generator=torch.Generator().manual_seed(5))
    out = {}
    for case, placements in (("strided", STRIDED), ("ep", (Replicate(), Shard(0)))):
        p = torch.nn.Parameter(DTensor.from_local(piece_of(full, mesh, placements).clone(), mesh, placements,
                                                  shape=full.shape, stride=full.stride()))
        opt = MuonAdamW([("layers.0.moe.experts.w1", p)], "muon", **HP)
        p.grad = _like(full, p)
        opt.step()
        momentum = opt.optimizer_of(p).state[p].get("momentum_buffer")
        _, offset = compute_local_shape_and_global_offset(p.shape, mesh, placements)
        kept = comm.all_gather_object((offset[0], momentum) if opt.owns(p) else None, dist.group.WORLD)
        assembled = torch.full(full.shape, float("nan"))
        for entry in filter(None, kept):
            assembled[entry[0] : entry[0] + entry[1].shape[0]] = entry[1]
        if opt.owns(p):  # (over efsdp's replicas one of them keeps the state)
            held = holding(opt, p, ["momentum_buffer"], None)
            try:
                held.to_global(momentum[:0])
                refused = "no error"
            except ValueError as e:
                refused = str(e)
            out[case] = {"first": held.first(), "count": held.count(), "offset": offset[0], "refused": refused,
                         "gathered": held.to_global(momentum), "assembled": assembled}
    return out


def test_expert_state_is_held_by_experts_and_gathers_whole(world):
    """A stack's experts split over ranks (EP, FSDP's strided shard over experts) is held as a StackHeld: this
    rank's experts (its first is DTensor's own offset; rank (f, e) holds expert 2e + f when strided), and its
    to_global gathers the whole stack's momentum, equal to the keeping ranks' momenta placed at their offsets (it
    gave Held(None) before: one rank's experts written as the whole stack). A state tensor that is not one entry
    per expert of the rank is refused, before any collective."""
    results = world.run(_expert_state_held)
    assert all("strided" in r for r in results) and any("ep" in r for r in results), results
    for rank, r in enumerate(results):
        f, e = divmod(rank, 2)
        assert (r["strided"]["first"], r["strided"]["count"]) == (2 * e + f, 1), (rank, r["strided"])
        for case, v in r.items():
            assert v["first"] == v["offset"], (rank, case, v["first"], v["offset"])
            assert not v["assembled"].isnan().any() and torch.equal(v["gathered"], v["assembled"]), (rank, case)
            assert "not one entry per expert" in v["refused"], (rank, case, v["refused"])
        if "ep" in r:
            assert (r["ep"]["first"], r["ep"]["count"]) == (2 * e, 2), (rank, r["ep"])


# -- experts under HSDP: replicated over "dp_replicate", whole experts per rank over ("efsdp", "ep") --

HSDP_EXPERTS = {  # (dp_replicate, efsdp, ep) sizes and the stacks' placements torchtitan gives there
    "whole": ((2, 2, 1), (Replicate(), Shard(0), Replicate())),  # ep 1: fully_shard's Shard(0) over efsdp
    "rows": ((2, 2, 1), (Replicate(), Shard(1), Replicate())),  # efsdp x ep > E: rows of every expert
    "strided": ((2, 2, 2), (Replicate(), _StridedShard(0, split_factor=2), Shard(0))),  # world 8
}
HSDP_STACKS = {"moe.experts.w1": (EXPERTS, 10, 6), "moe.experts.w2": (EXPERTS, 6, 10), "moe.experts.w3": (EXPERTS, 10, 6)}


def _hsdp_experts(ctx, case: str, overlap: bool) -> dict:
    """Three expert stacks on ("dp_replicate", "efsdp", "ep") as :data:`HSDP_EXPERTS` places them, MuonAdamW with no
    group argument (``overlap``: the share left in flight until the next step or ``finish``), 2 steps of seeded
    one-process gradients (FSDP2 all-reduces them over the replicas: every replica holds the same)."""
    sizes, placements = HSDP_EXPERTS[case]
    mesh = init_device_mesh("cpu", sizes, mesh_dim_names=("dp_replicate", "efsdp", "ep"))
    gen = torch.Generator().manual_seed(13)
    fulls = {n: torch.randn(shape, generator=gen) for n, shape in HSDP_STACKS.items()}
    params = {n: torch.nn.Parameter(DTensor.from_local(piece_of(full, mesh, placements).clone(), mesh, placements,
                                                       shape=full.shape, stride=full.stride()))
              for n, full in fulls.items()}
    opt = MuonAdamW(list(params.items()), "muon", tp_mode="home", overlap=overlap, **HP)
    grads = _steps(opt, params, HSDP_STACKS, 2)
    opt.finish()
    errors = {}
    for n, p in params.items():
        full = p.detach().full_tensor()
        for k in range(EXPERTS):
            errors[f"{n}[{k}]"] = _error(full[k], fulls[n][k], [g[n][k] for g in grads])
    inner = opt.matrix_optimizer
    return {"errors": errors, "owns": [inner.owns(p) for p in params.values()],
            "kept": [bool(inner.state[p]) for p in params.values()],
            "groups": [tuple(dist.get_process_group_ranks(inner.layouts.owner_group(p))) for p in params.values()]}


@pytest.mark.parametrize("case,overlap", [("whole", False), ("whole", True), ("rows", False)])
def test_experts_under_hsdp_are_stepped_once_in_the_world(world, case, overlap):
    """HSDP 2 x efsdp 2 over expert stacks (world 4). Whole experts per rank (Shard(0) over efsdp), replicated over
    "dp_replicate": each stack is owned over its replicas group (the ranks holding the same experts): one replica
    steps it and keeps its state, the other gets the result (it was every replica stepping its own, alike: twice
    the Newton-Schulz in the world). Rows of every expert (Shard(1)): owned once over replicas x pieces as a dense
    HSDP weight. Every expert of the gathered weights is one process's Muon step (weights_agree)."""
    results = world.run(_hsdp_experts, case, overlap)
    for rank, r in enumerate(results):
        replica, f = divmod(rank, 2)
        expected = (f, f + 2) if case == "whole" else (0, 1, 2, 3)
        assert r["groups"] == [expected] * len(HSDP_STACKS), (rank, r["groups"])
        assert r["kept"] == r["owns"], (rank, r)  # the owner keeps the state, nobody else
        bad = {n: v for n, v in r["errors"].items() if not optim_reference.weights_agree(*v)}
        assert not bad, f"rank {rank}: (err, moved) beyond tolerance: {bad}"
    places = 2 if case == "whole" else 1  # efsdp ranks holding their own experts, or one grid over the pieces
    assert sum(sum(r["owns"]) for r in results) == len(HSDP_STACKS) * places, [r["owns"] for r in results]


def test_strided_experts_under_hsdp_are_stepped_once_in_the_world():
    """torchtitan's experts at HSDP 2 x efsdp 2 x EP 2 (world 8): (Replicate(), _StridedShard(0, sf=2), Shard(0)) on
    ("dp_replicate", "efsdp", "ep"), one whole expert per rank; each (efsdp, ep) place's stack owned by one of
    its two replicas (12 owners of 3 stacks x 4 places, not 24), every expert one process's Muon step."""
    with started_world(8) as world8:
        results = world8.run(_hsdp_experts, "strided", False)
    for rank, r in enumerate(results):
        assert r["groups"] == [(rank % 4, rank % 4 + 4)] * len(HSDP_STACKS), (rank, r["groups"])
        assert r["kept"] == r["owns"], (rank, r)
        bad = {n: v for n, v in r["errors"].items() if not optim_reference.weights_agree(*v)}
        assert not bad, f"rank {rank}: (err, moved) beyond tolerance: {bad}"
    assert sum(sum(r["owns"]) for r in results) == len(HSDP_STACKS) * 4, [r["owns"] for r in results]


# -- one MoE model: dense weights FSDP'd over "fsdp" (4 ranks), expert stacks over "efsdp" (2) x "ep" (2) --

MOE_SHAPES = {"attention.wq.weight": (10, 6), "feed_forward.w1.weight": (12, 6),  # dense, FSDP 4 (10 rows: uneven)
              "moe.experts.w1": (EXPERTS, 10, 6), "moe.experts.w2": (EXPERTS, 6, 10)}
MOE_PLACEMENTS = {"moe.experts.w1": STRIDED,  # efsdp x ep <= E: whole experts, interleaved (fully_shard's Shard(0))
                  "moe.experts.w2": (Shard(1), Shard(0))}  # efsdp x ep > E in torchtitan: rows of every expert
MOE_STEPS = 2


def _moe(ctx, member: str, mode: str) -> dict:
    """torchtitan's FSDP 4 x EP 2 at world 4: the dense weights ``fully_shard`` over "fsdp" of the dense mesh
    ("dp_replicate", "fsdp", "tp") = (1, 4, 1), the expert stacks on the experts' mesh ("dp_replicate", "efsdp",
    "ep") = (1, 2, 2) over the same ranks (efsdp = dp_shard x cp x tp / ep = 2), Shard(0) over "ep" and over
    "efsdp" FSDP's _StridedShard(0) (w1) or Shard(1) (w2): two FSDP groups in one model, one optimizer, no group
    argument. 2 steps of seeded one-process gradients."""
    fulls, params = _moe_params()
    opt = MuonAdamW(list(params.items()), member, tp_mode=mode, **HP)  # no group argument
    grads = _steps(opt, params, MOE_SHAPES, MOE_STEPS)
    errors = {}
    for n, p in params.items():
        full = p.detach().full_tensor()
        for k, (w, w0) in enumerate(zip(full, fulls[n]) if full.ndim == 3 else [(full, fulls[n])]):
            ref = optim_reference.run(member, w0.double(), [g[n][k] if full.ndim == 3 else g[n] for g in grads], HP)
            errors[f"{n}[{k}]"] = ((w.double() - ref).abs().max().item(), (ref - w0.double()).abs().max().item())
    inner = opt.matrix_optimizer
    ranks = {n: tuple(dist.get_process_group_ranks(inner.layouts.owner_group(p)))
             for n, p in params.items() if inner.layouts.owner_group(p) is not None}
    return {"errors": errors, "owner_groups": ranks,
            "placements": {n: tuple(map(repr, p.placements)) for n, p in params.items()},
            "groups": [None if g is None else tuple(dist.get_process_group_ranks(g))
                       for g in (inner.dp_group, inner.expert_dp_group)],
            "owns": sum(inner.owns(p) for p in params.values()), "skipped": inner.skipped_steps}


def _moe_params() -> tuple[dict[str, torch.Tensor], dict[str, torch.nn.Parameter]]:
    """The whole tensors of :data:`MOE_SHAPES` and their DTensor parameters as :func:`_moe` lays them out."""
    from torch.distributed.fsdp import fully_shard

    dense = init_device_mesh("cpu", (1, 4, 1), mesh_dim_names=("dp_replicate", "fsdp", "tp"))
    experts = init_device_mesh("cpu", (1, 2, 2), mesh_dim_names=("dp_replicate", "efsdp", "ep"))
    gen = torch.Generator().manual_seed(11)
    fulls = {n: torch.randn(shape, generator=gen) for n, shape in MOE_SHAPES.items()}
    params = {}
    for n, full in fulls.items():
        if full.ndim == 2:
            layer = torch.nn.Module()
            layer.register_parameter("weight", torch.nn.Parameter(full.clone()))
            fully_shard(layer, mesh=dense["fsdp"])
            params[n] = layer.weight
        else:
            mesh = experts["efsdp", "ep"]
            params[n] = torch.nn.Parameter(DTensor.from_local(
                piece_of(full, mesh, MOE_PLACEMENTS[n]).clone(), mesh, MOE_PLACEMENTS[n], shape=full.shape,
                stride=full.stride()))
    return fulls, params


def _moe_nonfinite(ctx) -> dict:
    """The MoE model of :func:`_moe` with nonfinite="skip": a NaN in the gradient of rank 0's own expert of w1 (its
    efsdp pair's, not the dense weights' group); which ranks skip and whether anything was written."""
    _, params = _moe_params()
    opt = MuonAdamW(list(params.items()), "muon", nonfinite="skip", **HP)
    grads = _global_grads(MOE_SHAPES, 0)
    before = {n: p.detach().to_local().clone() for n, p in params.items()}
    for n, p in params.items():
        p.grad = _like(grads[n], p)
    if ctx.rank == 0:
        params["moe.experts.w1"].grad.to_local()[0, 0, 0] = float("nan")
    opt.step()
    return {"skipped": opt.matrix_optimizer.skipped_steps,
            "unchanged": [n for n, p in params.items() if torch.equal(p.detach().to_local(), before[n])]}


@pytest.mark.parametrize("member,mode", [("muon", "home"), ("muon", "duplicated"), ("normuon", "distributed"),
                                         ("normuon", "gram")])
def test_moe_model_with_dense_and_expert_dp_groups_is_exact(world, member, mode):
    """One MoE model whose dense weights are FSDP'd over 4 ranks and whose expert stacks are over efsdp 2 x ep 2
    (refused before: "the DTensor parameters' DP mesh dims are different groups"): the dense DP group is "fsdp"
    and the experts' own (expert_dp_group) "efsdp"; a dense weight's pieces are owned within the 4 ranks, a
    Shard(1) stack's within its efsdp pair, a strided one by each rank for its own expert; every matrix after 2
    steps equals float64 one process (weights_agree: 1e-5 + 1e-4 x how far it moved). The modes are TP modes: with
    no TP they run alike, exercised so the plan's mode paths see an expert DP group."""
    results = world.run(_moe, member, mode)
    for rank, r in enumerate(results):
        f, e = divmod(rank, 2)
        assert r["groups"] == [(0, 1, 2, 3), (e, e + 2)], r
        assert r["owner_groups"]["attention.wq.weight"] == (0, 1, 2, 3), r
        assert r["owner_groups"]["moe.experts.w2"] == (e, e + 2), r  # rows of each expert, over its efsdp pair
        assert r["owner_groups"]["moe.experts.w1"] == (e, e + 2) and r["skipped"] == 0, r
        bad = {n: v for n, v in r["errors"].items() if not optim_reference.weights_agree(*v)}
        assert not bad, f"rank {rank}: (err, moved) beyond tolerance: {bad}"
    # each dense matrix and each w2 stack owned once in its group; w1's experts each by their own rank
    assert sum(r["owns"] for r in results) == 2 + 2 + 4, [r["owns"] for r in results]


def test_moe_model_skips_a_step_on_every_rank_alike(world):
    """A non-finite update of one rank's own expert (an efsdp pair's matter) skips the whole step on every rank of
    the world, dense weights included, as one process would (each rank's verdict is about its whole step, and the
    dense weights' share over the 4 ranks carries it): skipped_steps 1 everywhere, nothing written."""
    results = world.run(_moe_nonfinite)
    for rank, r in enumerate(results):
        assert r["skipped"] == 1 and r["unchanged"] == list(MOE_SHAPES), (rank, r)


@pytest.mark.slow
def test_hsdp_and_tp_at_world_8_needs_no_group_argument():
    """("dp_replicate", "fsdp", "tp") 2 x 2 x 2: colwise (Replicate(), _StridedShard(0, sf=2), Shard(0)), rowwise
    (Replicate(), Shard(0), Shard(1)); TP on the data-loading mesh, FSDP on the dense one."""
    with started_world(8) as world8:
        for mode in ("home", "duplicated"):
            _check(world8.run(_trained, "hsdp_tp", "fsdp", mode), "hsdp_tp")


def _clip_norms(ctx, case: str) -> dict:
    """MuonAdamW.clip_grad_norm_ (max_norm large: nothing scaled) on seeded one-process gradients given as each
    rank's pieces: "hsdp" dense (Replicate(), Shard(0)) on ("dp_replicate", "fsdp") with a 1D weight for AdamW;
    "moe" :func:`_moe_params`' model (dense over "fsdp" 4, experts over "efsdp" x "ep"). The norm returned, or the
    error's message, and the one-process norm."""
    if case == "hsdp":
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_replicate", "fsdp"))
        shapes = {"a.weight": (8, 6), "b.weight": (6, 8), "norm.weight": (6,)}
        gen = torch.Generator().manual_seed(3)
        params = {n: torch.nn.Parameter(DTensor.from_local(piece_of(full, mesh, (Replicate(), Shard(0))).clone(), mesh,
                                                           (Replicate(), Shard(0)), shape=full.shape, stride=full.stride()))
                  for n, full in ((n, torch.randn(s, generator=gen)) for n, s in shapes.items())}
    else:
        shapes, (_, params) = MOE_SHAPES, _moe_params()
    grads = _global_grads(shapes, 0)
    for n, p in params.items():
        p.grad = _like(grads[n], p)
    opt = MuonAdamW(list(params.items()), "muon", **HP)
    true = torch.sqrt(sum(g.double().square().sum() for g in grads.values())).item()
    try:
        return {"norm": opt.clip_grad_norm_(1e9).item(), "true": true}
    except ValueError as e:
        return {"error": str(e), "true": true}


def test_clip_grad_norm_is_refused_where_its_sum_cannot_reach_the_holders(world):
    """HSDP: the norm's sum runs over the TP and DP (FSDP) groups, but the weights are also replicated over
    "dp_replicate": each replica counted a different part (the 1D weight on replica 0 only: 8.96 against the
    one-process 9.24 on replica 1, a different clip per replica). Now a ValueError naming the parameter and the mesh
    dim, on every rank, before any collective. On the MoE model (dense over "fsdp" 4, experts over "efsdp" x "ep",
    every dim within the 4-rank DP group) the norm is the one-process one on every rank (float64 sums: 1e-9)."""
    for rank, r in enumerate(world.run(_clip_norms, "hsdp")):
        assert "error" in r and "'dp_replicate'" in r["error"] and "a.weight" in r["error"], (rank, r)
    for rank, r in enumerate(world.run(_clip_norms, "moe")):
        assert "norm" in r and abs(r["norm"] - r["true"]) <= 1e-9 * r["true"], (rank, r)
