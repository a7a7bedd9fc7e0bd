"""Megatron-FSDP (the ``megatron-fsdp`` package): dist_ortho's optimizers on the parameters it builds, against one
process on the gathered matrices.

Megatron-FSDP keeps each weight as a DTensor ``Shard(0)`` over its data-parallel mesh dim whose local tensor is a
view of a flat bucket cut at whole rows: pieces are uneven and often empty (not torch.chunk's sizes), their
gradients None (v1) or (0, n) (v2) where empty. With tensor parallelism (Megatron-style attributes
``tensor_model_parallel``, ``partition_dim``) the DTensor is ``[Shard(0), Shard(k)]`` on (dp, tp) with a private
``_shard_order=[1, 0]``: the DP pieces cut each rank's TP block. HSDP adds an outer dim that v1 replicates over
(``outer_dp_sharding_strategy=0``; v2 0.6.1's backward raises NotImplementedError on two DP axes). Run here at world 4 on gloo, through Megatron-FSDP's own
forward, backward (its reduce-scatters into the pieces) and optimizer hooks (tests/megatron_fsdp_cpu.py replaces
its CUDA calls by no-ops):

- v1 ``fully_shard_model`` + ``fully_shard_optimizer`` (its documented path; the mesh named as Megatron-LM names it,
  "dp_cp", "tp", "outer_fsdp_dp", or standalone "fsdp"), v2 ``experimental.fully_shard`` + its
  ``fully_shard_optimizer``;
- layouts: FSDP 4; TP 2 x FSDP 2 (v1); HSDP 2 x FSDP 2 (v1); every exact mode where there is TP; Muon and NorMuon;
- gradients in ``.grad``, or in ``.decoupled_grad`` (``use_decoupled_grad=True``), also bf16 ones
  (``main_grads_dtype``) beside float32 weights;
- 3 training steps, each rank's loss on its own batch. v1's ``fully_shard_optimizer`` runs one step on zero
  gradients when it wraps the optimizer: a step like any other for us (weight decay applied once, the step count
  starts at 1), as for torch's own optimizers; the reference runs it too.

Reference (tests/optim_reference.py, float64, on whole matrices): the gradient of each step is the mean over the
data-parallel ranks of their losses' gradients at the gathered weights (Megatron-FSDP averages over DP; each TP
rank's loss reads only its own blocks), the gathered weights are compared after 3 steps with the tolerance of
test_optim (float32 "highest" against float64: max |W - W_ref| <= 1e-5 + 1e-4 max |W_ref - W_0|). The weights are
gathered by Megatron-FSDP's own ``uneven_dtensor_to_full_tensor``.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.distributed as dist

from tests import optim_reference
from tests.harness import started_world

pytestmark = pytest.mark.skipif(importlib.util.find_spec("megatron_fsdp") is None,
                                reason="megatron-fsdp is not installed (pip install -e '.[test]')")

WORLD = 4
# (name, global shape, TP partition dim): a column-, a row- and a column-parallel weight, in one bucket
SPECS = [("a", (12, 8), 0), ("b", (6, 12), 1), ("c", (10, 6), 0)]
HP = {"lr": 0.02, "momentum": 0.9, "weight_decay": 0.01, "nesterov": True, "fp32_matmul_prec": "highest"}
STEPS = 3


@pytest.fixture(scope="module")
def world():
    with started_world(WORLD) as w:
        yield w


class _Net(torch.nn.Module):
    """Three weights; on TP rank t the local blocks of a column-, a row- and a column-parallel layer. Each rank's
    loss reads its own blocks only (no TP collective in the forward), so its gradient is its blocks'."""

    def __init__(self, weights: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for name, w in weights.items():
            self.register_parameter(name, torch.nn.Parameter(w.clone()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _loss(x, self.a, self.b, self.c, getattr(self, "scale", None))


def _loss(x, a, b, c, scale=None) -> torch.Tensor:
    y = torch.tanh(x @ a.t()) @ b.t()
    return ((y if scale is None else y * scale) @ c.t()).square().mean()


def _block(full: torch.Tensor, dim: int, tp: int, t: int) -> torch.Tensor:
    return full.tensor_split(tp, dim=dim)[t]


def _batch(step: int, dp_rank: int) -> torch.Tensor:
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(100 * step + dp_rank))


def _reference_grads(weights: dict[str, torch.Tensor], step: int, dp: int, tp: int) -> dict[str, torch.Tensor]:
    """The mean over DP ranks of their losses' gradients (summed over TP ranks' blocks) at ``weights``."""
    leaves = {n: w.detach().double().requires_grad_() for n, w in weights.items()}
    for d in range(dp):
        for t in range(tp):
            blocks = [_block(leaves[n], dim, tp, t) for n, _, dim in SPECS]
            (_loss(_batch(step, d).double(), *blocks) / dp).backward()
    return {n: leaf.grad for n, leaf in leaves.items()}


def _mesh(layout: str, names: str):
    from torch.distributed.device_mesh import init_device_mesh

    dp_name, outer_name = {"megatron": ("dp_cp", "outer_fsdp_dp"), "standalone": ("fsdp", "outer")}[names]
    shape, dims = {"fsdp": ((WORLD, 1), (dp_name, "tp")), "tp": ((2, 2), (dp_name, "tp")),
                   "hsdp": ((2, 2, 1), (outer_name, dp_name, "tp"))}[layout]
    return init_device_mesh("cpu", shape, mesh_dim_names=dims), dp_name, outer_name


def _full(p: torch.Tensor) -> torch.Tensor:
    """The global tensor of a Megatron-FSDP DTensor, each rank's piece placed where Megatron-FSDP's own
    ``gather_and_compute_chunk_metadata`` says (its ``uneven_dtensor_to_full_tensor`` all-gathers uneven tensors,
    which gloo cannot)."""
    from megatron_fsdp.uneven_dtensor import gather_and_compute_chunk_metadata

    chunk = gather_and_compute_chunk_metadata(p.detach())
    views = [None] * dist.get_world_size()
    dist.all_gather_object(views, (tuple(chunk.offsets), p.detach().to_local().clone()))
    full = torch.zeros(p.shape, dtype=p.dtype)
    for offsets, piece in views:
        full[tuple(slice(o, o + n) for o, n in zip(offsets, piece.shape))] = piece
    return full


def _v1(ctx, weights, layout: str, names: str, grads: str = "grad"):
    """The model and optimizer parameters under Megatron-FSDP v1 (fully_shard_model, its DTensor parameters)."""
    from tests.megatron_fsdp_cpu import import_megatron_fsdp

    mfsdp = import_megatron_fsdp()
    mesh, dp_name, outer_name = _mesh(layout, names)
    tp = mesh["tp"].size()
    t = mesh["tp"].get_local_rank()
    net = _Net({n: _block(weights[n], dim, tp, t) for n, _, dim in SPECS})
    if tp > 1:
        for (n, _, dim) in SPECS:
            p = getattr(net, n)
            p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, dim, 1
    hsdp = {"dp_outer_dim": outer_name, "hybrid_fsdp_group": dist.new_group(list(range(WORLD)))} if layout == "hsdp" else {}
    if grads != "grad":  # into .decoupled_grad (precision-aware optimizers), bf16 ones where asked
        hsdp["use_decoupled_grad"] = True
        if grads == "decoupled bf16":
            hsdp["mixed_precision_policy"] = mfsdp.MixedPrecisionPolicy(main_grads_dtype=torch.bfloat16)
    model = mfsdp.fully_shard_model(net, device_mesh=mesh, dp_shard_dim=dp_name, tp_dim="tp", device=torch.device("cpu"),
                                    fsdp_unit_modules=[_Net], **hsdp)
    model._replace_param_with_distributed_if_needed()
    dp_rank = mesh[dp_name].get_local_rank() + (mesh[outer_name].get_local_rank() * mesh[dp_name].size() if layout == "hsdp" else 0)
    return model, list(model.named_parameters()), dp_rank, lambda opt: mfsdp.fully_shard_optimizer(opt)


def _v2(ctx, weights, layout: str, names: str):
    from megatron_fsdp.experimental import placement
    from megatron_fsdp.experimental.fully_shard import fully_shard
    from megatron_fsdp.experimental.optimizer import fully_shard_optimizer

    from tests.megatron_fsdp_cpu import import_megatron_fsdp

    import_megatron_fsdp()
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("fsdp",))
    placements = placement.Placements(["fsdp"], [placement.Flat()], [placement.Flat()], [placement.Flat()])
    dp_rank = ctx.rank
    net = _Net(weights)
    fully_shard(net, mesh, placements)
    return net, list(net.named_parameters()), dp_rank, fully_shard_optimizer


def _one_call(ctx, kind: str) -> dict:
    """v1's one call, ``fully_shard(module, optimizer)``: it empties the optimizer's groups and adds its DTensor
    parameters as one group; MuonAdamW routes them again (the matrices to ``kind``, the vector to AdamW). Against
    one process: the matrices by tests/optim_reference.py, the vector by torch's AdamW, both in float64."""
    from dist_ortho import MuonAdamW
    from tests.megatron_fsdp_cpu import import_megatron_fsdp, install

    install()
    mfsdp = import_megatron_fsdp()
    gen = torch.Generator().manual_seed(0)
    weights = {n: torch.randn(shape, generator=gen) * 0.5 for n, shape, _ in SPECS}
    scale = torch.rand(6, generator=gen) + 0.5
    net = _Net(weights)
    net.scale = torch.nn.Parameter(scale.clone())
    hp = {**HP, "adamw_lr": 0.01, "adamw_weight_decay": 0.1}
    opt = MuonAdamW(net.named_parameters(), kind, tp_mode="home", **hp)
    mesh, dp_name, _ = _mesh("fsdp", "megatron")
    model, opt = mfsdp.fully_shard(net, opt, device_mesh=mesh, dp_shard_dim=dp_name, tp_dim="tp",
                                   device=torch.device("cpu"), fsdp_unit_modules=[_Net])
    params = {n.split(".")[-1]: p for group in opt.param_groups for p in group["params"] for n, q in model.named_parameters() if q is p}
    leaves = {**{n: weights[n].double().clone() for n in weights}, "scale": scale.double().clone()}
    ref_vector = torch.nn.Parameter(leaves["scale"].clone())
    ref_adamw = torch.optim.AdamW([ref_vector], lr=0.01, betas=(0.9, 0.95), weight_decay=0.1)
    ref_vector.grad = torch.zeros_like(ref_vector)
    ref_adamw.step()  # the zero-gradient step fully_shard runs
    grads = [{n: torch.zeros_like(w) for n, w in leaves.items()}]
    for step in range(STEPS):
        at = {n: w.detach() for n, w in ({n: _full(params[n]) for n in weights} | {"scale": ref_vector}).items()}
        if step == 0:  # the zero-gradient step's decay is installed into the model after the first real step
            at = {**{n: weights[n] for n in weights}, "scale": scale}
        grads.append(_scaled_grads(at, step, WORLD))
        model(_batch(step, ctx.rank)).backward()
        opt.step()
        opt.zero_grad()
        ref_vector.grad = grads[-1]["scale"]
        ref_adamw.step()
    errors = {}
    for n in weights:
        ref = optim_reference.run(kind, weights[n].double(), [g[n] for g in grads], HP)
        errors[n] = ((_full(params[n]).double() - ref).abs().max().item(), (ref - weights[n].double()).abs().max().item())
    errors["scale"] = ((_full(params["scale"]).double() - ref_vector.detach()).abs().max().item(),
                       (ref_vector.detach() - scale.double()).abs().max().item())
    kinds = sorted(type(o).__name__ for _, o in opt._inner())
    return {"errors": errors, "kinds": kinds}


def _scaled_grads(weights: dict[str, torch.Tensor], step: int, dp: int) -> dict[str, torch.Tensor]:
    """As _reference_grads, for _Net with its vector ``scale`` (no TP)."""
    leaves = {n: w.detach().double().requires_grad_() for n, w in weights.items()}
    for d in range(dp):
        (_loss(_batch(step, d).double(), leaves["a"], leaves["b"], leaves["c"], leaves["scale"]) / dp).backward()
    return {n: leaf.grad for n, leaf in leaves.items()}


def test_megatron_fsdps_one_call_with_muon_adamw_equals_one_process(world):
    for rank, r in enumerate(world.run(_one_call, "muon")):
        assert r["kinds"] == ["AdamW", "Muon"], r
        for n, (err, moved) in r["errors"].items():
            assert optim_reference.weights_agree(err, moved), (rank, n, err, moved)


def _trained(ctx, version: str, layout: str, names: str, kind: str, mode: str, grads: str = "grad") -> dict:
    from dist_ortho import get_optimizer
    from tests.megatron_fsdp_cpu import install

    install()
    gen = torch.Generator().manual_seed(0)
    weights = {n: torch.randn(shape, generator=gen) * 0.5 for n, shape, _ in SPECS}
    model, named, dp_rank, wrap = _v1(ctx, weights, layout, names, grads) if version == "v1" else _v2(ctx, weights, layout, names)
    opt = get_optimizer(kind)(named, tp_mode=mode, **HP)
    wrap(opt)
    tp = 2 if layout == "tp" else 1
    dp = WORLD // tp
    params = dict(named)
    grads = [{n: torch.zeros(shape, dtype=torch.float64) for n, shape, _ in SPECS}] if version == "v1" else []
    pieces = {n: tuple(p.to_local().shape) for n, p in params.items()}
    for step in range(STEPS):
        gathered = {n.split(".")[-1]: _full(p) for n, p in params.items()}
        # v1's zero-gradient step decayed the optimizer's weights without installing them: the first forward
        # reads the initial weights (installed after every later step)
        grads.append(_reference_grads(weights if version == "v1" and step == 0 else gathered, step, dp, tp))
        loss = model(_batch(step, dp_rank))
        loss.backward()
        opt.step()
        opt.zero_grad()
    out = {"pieces": pieces, "errors": {}}
    for n, p in params.items():
        short = n.split(".")[-1]
        ref = optim_reference.run(kind, weights[short].double(), [g[short] for g in grads], HP)
        out["errors"][short] = ((_full(p).double() - ref).abs().max().item(), (ref - weights[short].double()).abs().max().item())
    return out


CASES = [
    ("v1", "fsdp", "megatron", "muon", "home"),
    ("v1", "fsdp", "standalone", "normuon", "home"),
    *[("v1", "tp", "megatron", "muon", mode) for mode in ("duplicated", "distributed", "gram", "home", "auto")],
    ("v1", "tp", "megatron", "normuon", "home"),
    ("v1", "hsdp", "megatron", "muon", "home"),
    ("v2", "fsdp", "standalone", "muon", "home"),
    ("v2", "fsdp", "standalone", "normuon", "home"),
]


@pytest.mark.parametrize("grads", ["decoupled", "decoupled bf16"])
def test_decoupled_gradients_are_read(world, grads):
    """``use_decoupled_grad=True``: Megatron-FSDP installs the reduced gradients in ``.decoupled_grad`` (``.grad``
    stays None), in bf16 with ``main_grads_dtype=torch.bfloat16``; the step reads them (it stepped on zeros
    before). float32 ones: the float64 tolerance; bf16 ones: within bf16 rounding of the gradient (the update is
    Newton-Schulz of a momentum whose entries are rounded to 8 bits: 2e-2 of the distance moved)."""
    results = world.run(_trained, "v1", "fsdp", "megatron", "muon", "home", grads)
    for rank, r in enumerate(results):
        for n, (err, moved) in r["errors"].items():
            close = optim_reference.weights_agree(err, moved) if grads == "decoupled" else err <= 2e-2 * moved
            assert moved > 1e-2 and close, (rank, n, err, moved)


@pytest.mark.parametrize("version,layout,names,kind,mode", CASES)
def test_trained_through_megatron_fsdp_equals_one_process(world, version, layout, names, kind, mode):
    results = world.run(_trained, version, layout, names, kind, mode)
    for rank, r in enumerate(results):
        for n, (err, moved) in r["errors"].items():
            assert optim_reference.weights_agree(err, moved), (rank, n, err, moved)
    # the layouts are the ones this test is about: uneven pieces, and empty ones
    rows = {n: [r["pieces"][n][0] for r in results] for n in results[0]["pieces"]}
    assert any(len(set(sizes)) > 1 for sizes in rows.values()), rows
    assert any(0 in sizes for sizes in rows.values()), rows
