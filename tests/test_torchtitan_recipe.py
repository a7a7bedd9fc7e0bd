"""launch/torchtitan.md's recipe, run as written there, on a small torchtitan MoE decoder at world 4, against one
process.

The doc's code blocks are taken from the file and executed in every rank (block "build": a MuonAdamW over the model
parts; block "torchtitan": torchtitan's OptimizersContainer with a "MuonAdamW" optimizer name). The model is
torchtitan's tiny Qwen3 MoE tree (token embedding, separate wq / wk / wv, wo, q / k norms, a router gate, routed
experts w1_EFD / w2_EDF / w3_EFD [E = 4, out, in], norms, output head), held as torchtitan holds it at world 4 in two
layouts (``LAYOUTS``): HSDP 2 x FSDP 2 with EP 2, and FSDP 2 x TP 2 with EP 2. Builds:

- ``standin``: torch's own APIs as torchtitan's "partial_dtensor" backend calls them (TP by ``parallelize_module`` on
  a data-loading mesh, the norms and the gate replicated over "tp", experts ``Shard(0)`` over "ep" of the sparse
  mesh (dp_replicate, efsdp, ep), ``fully_shard`` over its DP dims for the experts and over the DP dims of another
  mesh object, the dense one, for the rest);
- ``standin_spmd``: the same weights as DTensors on the full meshes, replicated over their DP dims, then
  ``fully_shard(..., dp_mesh_dims=DataParallelMeshDims(...))`` as its "full_dtensor" backend calls it (torch 2.13's
  SPMD path of fully_shard; the FSDP dim is then named "dp_shard");
- ``torchtitan_partial`` / ``torchtitan_full``: torchtitan 0.3.0's own ParallelDims and ``parallelize_qwen3``, the
  optimizer built by its OptimizersContainer (torchtitan importable only; skipped with the reason elsewhere: it is not
  in the test extra).

The placements of every build are asserted equal to what torchtitan 0.3.0 gives on torch 2.13 (``PLACEMENTS``, read
from its run; the torchtitan builds check them live). At FSDP 2 x TP 2 x EP 2 the experts' "ep" dim has the
dense TP group's ranks (torchtitan's EP borrows the TP ranks when ep == tp): an expert stack's dim named "ep" is read
as EP by its name (it was read as TP, a ValueError before any step).

Gradients: seeded global gradients given to every rank as its DTensor piece (no forward: what is tested is the
optimizer's reading of the layout and its step); 2 steps. Reference: float64 in one process on the gathered weights,
Muon (tests/optim_reference.py) on every matrix and on every expert of a stack, torch's AdamW for the embedding, the
output head and the 1D weights; tolerance optim_reference.weights_agree (max |W - W_ref| <= 1e-5 + 1e-4 max |W_ref -
W_0|: float32 at "highest" precision against float64).
"""

from __future__ import annotations

import pathlib
import re
import types

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from tests import optim_reference
from tests.harness import started_world
from tests.test_torchtitan_meshes import _steps

DOC = pathlib.Path(__file__).resolve().parent.parent / "launch" / "torchtitan.md"
HP = {"lr": 0.02, "momentum": 0.9, "weight_decay": 0.01, "nesterov": True, "fp32_matmul_prec": "highest"}
ADAMW = {"lr": 0.01, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.0}  # MuonAdamW's defaults but lr
DIM, HEAD, KV_HEADS, HEADS, HIDDEN, VOCAB, EXPERTS = 32, 8, 2, 4, 24, 64, 4
STEPS = 2
LAYOUTS = {  # torchtitan's degrees (dp_replicate, dp_shard, tp, ep) at world 4, E = 4
    "hsdp_ep": (2, 2, 1, 2),
    "fsdp_tp_ep": (1, 2, 2, 2),
}
_HSDP, _COL = ("Replicate()", "Shard(dim=0)"), ("_StridedShard(dim=0, sf=2)", "Shard(dim=0)")
_EXPERTS = [f"layers.0.moe.routed_experts.inner_experts.{n}" for n in ("w1_EFD", "w2_EDF", "w3_EFD")]
_TP_PLAN = {"tok_embeddings": "row", "lm_head": "col", "layers.0.attention.wo": "row",
            **{f"layers.0.attention.qkv_linear.{n}": "col" for n in ("wq", "wk", "wv")}}
_NAMES = ["tok_embeddings.weight", "lm_head.weight", "norm.weight", "layers.0.attention_norm.weight",
          "layers.0.ffn_norm.weight", "layers.0.moe.router.gate.weight",
          *[f"layers.0.attention.{n}.weight" for n in ("qkv_linear.wq", "qkv_linear.wk", "qkv_linear.wv", "wo",
                                                      "q_norm", "k_norm")]]
PLACEMENTS = {  # what torchtitan 0.3.0 gives on torch 2.13 (partial_dtensor and full_dtensor alike), by layout
    "hsdp_ep": {**{n: _HSDP for n in _NAMES}, **{n: ("Replicate()", *_COL) for n in _EXPERTS}},
    "fsdp_tp_ep": {**{n: ("Shard(dim=0)", "Replicate()") for n in _NAMES},  # norms and gate: replicated over TP
                   # TP's Shard(0) (colwise, and the embedding's rowwise: its rows), then FSDP's strided shard
                   **{f"{n}.weight": _COL for n in _TP_PLAN if n != "layers.0.attention.wo"},
                   "layers.0.attention.wo.weight": ("Shard(dim=0)", "Shard(dim=1)"), **{n: _COL for n in _EXPERTS}},
}
MESHES = {  # (dense, experts) mesh dim names by layout and fully_shard path ("fsdp": its old name, "dp_shard": SPMD)
    "hsdp_ep": lambda dp: (("dp_replicate", dp), ("dp_replicate", "efsdp", "ep")),
    "fsdp_tp_ep": lambda dp: ((dp, "tp"), ("efsdp", "ep")),
}


def doc_block(tag: str) -> str:
    """The python code block of launch/torchtitan.md whose first line is ``# recipe: <tag>``."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    found = [b for b in blocks if b.startswith(f"# recipe: {tag}\n")]
    assert len(found) == 1, f"launch/torchtitan.md has {len(found)} blocks tagged {tag!r}"
    return found[0]


def _recipe(tag: str) -> dict:
    namespace: dict = {}
    exec(compile(doc_block(tag), f"{DOC}:{tag}", "exec"), namespace)  # noqa: S102 - the doc's own code, as written
    return namespace


@pytest.fixture(scope="module")
def world():
    with started_world(4) as w:
        yield w


@pytest.fixture(scope="module")
def titan_world():
    """A world of its own for torchtitan's builds (after the stand-ins' in the same processes, torchtitan's
    full_dtensor build met a mesh that was not the one it passed to fully_shard)."""
    pytest.importorskip("torchtitan", reason="torchtitan is not installed (not in the test extra: pip install "
                                             "torchtitan==0.3.0 to run this against torchtitan itself)")
    with started_world(4) as w:
        yield w


# -- the stand-in: torchtitan's tiny Qwen3 MoE tree, its meshes and placements with torch's APIs --

class _Attention(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv_linear = torch.nn.Module()
        self.qkv_linear.wq = torch.nn.Linear(DIM, HEADS * HEAD, bias=False)
        self.qkv_linear.wk = torch.nn.Linear(DIM, KV_HEADS * HEAD, bias=False)
        self.qkv_linear.wv = torch.nn.Linear(DIM, KV_HEADS * HEAD, bias=False)
        self.wo = torch.nn.Linear(HEADS * HEAD, DIM, bias=False)
        self.q_norm, self.k_norm = torch.nn.RMSNorm(HEAD), torch.nn.RMSNorm(HEAD)


def _standin() -> torch.nn.Module:
    """torchtitan's parameter tree for the tiny Qwen3 MoE (its names; torch modules; one layer)."""
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.tok_embeddings = torch.nn.Embedding(VOCAB, DIM)
    layer = torch.nn.Module()
    layer.attention, layer.attention_norm, layer.ffn_norm = _Attention(), torch.nn.RMSNorm(DIM), torch.nn.RMSNorm(DIM)
    layer.moe = torch.nn.Module()
    layer.moe.router = torch.nn.Module()
    layer.moe.router.gate = torch.nn.Linear(DIM, EXPERTS, bias=False)
    layer.moe.routed_experts = torch.nn.Module()
    experts = layer.moe.routed_experts.inner_experts = torch.nn.Module()
    for name, shape in (("w1_EFD", (HIDDEN, DIM)), ("w2_EDF", (DIM, HIDDEN)), ("w3_EFD", (HIDDEN, DIM))):
        experts.register_parameter(name, torch.nn.Parameter(0.1 * torch.randn(EXPERTS, *shape)))
    model.layers = torch.nn.ModuleDict({"0": layer})
    model.norm, model.lm_head = torch.nn.RMSNorm(DIM), torch.nn.Linear(DIM, VOCAB, bias=False)
    return model


def _set(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    module, _, leaf = name.rpartition(".")
    model.get_submodule(module).register_parameter(leaf, torch.nn.Parameter(value))


def _build_standin(layout: str, spmd: bool) -> torch.nn.Module:
    """The stand-in under ``layout``: torchtitan's meshes (a data-loading mesh for TP, a dense mesh for FSDP over the
    same ranks, a sparse mesh for the experts), TP by parallelize_module, experts Shard(0) over "ep", fully_shard
    over the DP dims (``spmd``: on the full meshes with dp_mesh_dims, every weight replicated over DP first)."""
    from torch.distributed.fsdp import DataParallelMeshDims, fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    replicate, shard, tp, ep = LAYOUTS[layout]
    model = _standin()
    dense_names, sparse_names = MESHES[layout]("dp_shard" if spmd else "fsdp")
    sizes = {"dp_replicate": replicate, "fsdp": shard, "dp_shard": shard, "tp": tp, "ep": ep,
             "efsdp": shard * tp // ep}
    loading, dense = (init_device_mesh("cpu", tuple(sizes[n] for n in dense_names), mesh_dim_names=dense_names)
                      for _ in range(2))  # torchtitan's data-loading mesh and its dense mesh: two objects
    sparse = init_device_mesh("cpu", tuple(sizes[n] for n in sparse_names), mesh_dim_names=sparse_names)
    dense_dp = tuple(n for n in dense_names if n != "tp")
    sparse_dp = tuple(n for n in sparse_names if n != "ep")
    if tp > 1:
        styles = {"col": ColwiseParallel, "row": RowwiseParallel}
        parallelize_module(model, loading["tp"], {n: styles[s]() for n, s in _TP_PLAN.items()})
    for name, p in list(model.named_parameters()):
        if name in _EXPERTS:
            if spmd:
                placements = tuple(Shard(0) if n == "ep" else Replicate() for n in sparse_names)
                _set(model, name, DTensor.from_local(_piece(p, sparse, placements), sparse, placements,
                                                     shape=p.shape, stride=p.stride()))
            else:
                _set(model, name, distribute_tensor(p.detach(), sparse["ep"], [Shard(0)]))
        elif spmd:  # TP's placement (or Replicate) on "tp", replicated over the full mesh's DP dims
            tp_placements = tuple(p.placements) if isinstance(p, DTensor) else (Replicate(),) * (tp > 1)
            placements = (Replicate(),) * len(dense_dp) + tp_placements
            local = p.to_local() if isinstance(p, DTensor) else p
            _set(model, name, DTensor.from_local(local.detach(), dense, placements, shape=p.shape, stride=p.stride()))
        elif tp > 1 and not isinstance(p, DTensor):  # norms and the gate: replicated over TP
            _set(model, name, distribute_tensor(p.detach(), loading["tp"], [Replicate()]))
    experts = model.get_submodule("layers.0.moe.routed_experts.inner_experts")
    if spmd:
        dims = {"shard": "dp_shard", "replicate": "dp_replicate" if replicate > 1 else None}
        fully_shard(experts, mesh=sparse, dp_mesh_dims=DataParallelMeshDims(**{**dims, "shard": "efsdp"}),
                    shard_placement_fn=lambda p: Shard(0))
        for module in (model.layers["0"], model):
            fully_shard(module, mesh=dense, dp_mesh_dims=DataParallelMeshDims(**dims))
    else:
        fully_shard(experts, mesh=sparse[sparse_dp], shard_placement_fn=lambda p: Shard(0))
        for module in (model.layers["0"], model):
            fully_shard(module, mesh=dense[dense_dp])
    return model


def _piece(p: torch.Tensor, mesh, placements) -> torch.Tensor:
    from dist_ortho.parameters.dtensor import piece_of

    return piece_of(p.detach(), mesh, placements).clone()


# -- torchtitan itself --

def _build_torchtitan(layout: str, backend: str) -> torch.nn.Module:
    """torchtitan 0.3.0's tiny Qwen3 MoE under ``layout``, parallelized by its own ParallelDims and
    parallelize_qwen3 with spmd_backend ``backend``."""
    import torchtitan.distributed.parallel_dims as parallel_dims_module
    from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig
    from torchtitan.distributed import ParallelDims
    from torchtitan.models.common import CosSinRoPE, Embedding, Linear, RMSNorm
    from torchtitan.models.qwen3 import _build_qwen3_moe_layers, parallelize_qwen3
    from torchtitan.models.qwen3.model import Qwen3Model

    parallel_dims_module.device_type = "cpu"  # torchtitan falls back to "cuda" where it finds no accelerator
    replicate, shard, tp, ep = LAYOUTS[layout]
    parallelism = ParallelismConfig(data_parallel_replicate_degree=replicate, data_parallel_shard_degree=shard,
                                    tensor_parallel_degree=tp, expert_parallel_degree=ep, spmd_backend=backend)
    dims = ParallelDims.from_config(parallelism, 4)
    dims.build_mesh()
    config = Qwen3Model.Config(
        vocab_size=VOCAB, dim=DIM, norm=RMSNorm.Config(normalized_shape=DIM),
        tok_embeddings=Embedding.Config(num_embeddings=VOCAB, embedding_dim=DIM),
        lm_head=Linear.Config(in_features=DIM, out_features=VOCAB),
        layers=_build_qwen3_moe_layers(
            n_layers=1, fuse_qkv=False, dim=DIM, n_heads=HEADS, n_kv_heads=KV_HEADS, head_dim=HEAD,
            moe_hidden_dim=HIDDEN, num_experts=EXPERTS, top_k=2, attn_backend="flex", moe_comm_backend="standard",
            rope=CosSinRoPE.Config(dim=HEAD, max_seq_len=64, theta=1e6)))
    config.update_from_config(config=types.SimpleNamespace(parallelism=parallelism))  # its sharding configs
    torch.manual_seed(0)
    with torch.device("meta"):
        model = config.build()
    model = parallelize_qwen3(model, parallel_dims=dims, training=TrainingConfig(mixed_precision_param="float32"),
                              parallelism=parallelism, compile_config=CompileConfig(), ac_config=None,
                              dump_folder="/tmp")
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    return model


# -- the run --

def _to_adamw(name: str, p: torch.Tensor) -> bool:
    """The doc's routing, stated here: the embedding, the output head and every 1D weight to AdamW."""
    return name.startswith(("tok_embeddings.", "lm_head.")) or p.ndim == 1


def _reference(name: str, w0: torch.Tensor, grads: list[torch.Tensor]) -> torch.Tensor:
    """``w0`` after ``grads`` in float64 in one process: AdamW (torch's) or Muon, per expert for a stack."""
    if _to_adamw(name, w0):
        q = torch.nn.Parameter(w0.double().clone())
        adamw = torch.optim.AdamW([q], **ADAMW)
        for g in grads:
            q.grad = g.double()
            adamw.step()
        return q.detach()
    if w0.ndim == 3:
        return torch.stack([optim_reference.run("muon", w0[k], [g[k] for g in grads], HP) for k in range(len(w0))])
    return optim_reference.run("muon", w0, grads, HP)


BUILDS = {"standin": lambda layout: _build_standin(layout, spmd=False),
          "standin_spmd": lambda layout: _build_standin(layout, spmd=True),
          "torchtitan_partial": lambda layout: _build_torchtitan(layout, "partial_dtensor"),
          "torchtitan_full": lambda layout: _build_torchtitan(layout, "full_dtensor")}
SPMD = {"standin": False, "standin_spmd": True, "torchtitan_partial": False, "torchtitan_full": True}


def _trained(ctx, layout: str, build: str, block: str, mode: str) -> dict:
    model = BUILDS[build](layout)
    params = dict(model.named_parameters())
    placements = {n: tuple(repr(pl) for pl in p.placements) for n, p in params.items()}
    meshes = {n: p.device_mesh.mesh_dim_names for n, p in params.items()}
    initial = {n: p.detach().full_tensor().clone() for n, p in params.items()}
    recipe = _recipe(block)
    keywords = {**HP, "adamw_lr": ADAMW["lr"], "tp_mode": mode}
    if block == "build":
        opt = recipe["build_dist_ortho_optimizer"]([model], "muon", **keywords)
        optimizers = [opt]
    else:
        container = recipe["dist_ortho_config"]("muon", **keywords).build(model_parts=[model])
        optimizers, opt = list(container), container
    routed = {n: (any(o.optimizer_of(p) is o.fallback_optimizer for o in optimizers if _holds(o, p)), _to_adamw(n, p))
              for n, p in params.items()}  # (to AdamW, the doc says AdamW)
    grads = _steps(opt, params, {n: p.shape for n, p in params.items()}, STEPS)
    errors = {}
    for n, p in params.items():
        ref = _reference(n, initial[n], [g[n] for g in grads])
        full = p.detach().full_tensor().double()
        errors[n] = ((full - ref).abs().max().item(), (ref - initial[n].double()).abs().max().item())
    return {"placements": placements, "meshes": meshes, "routed": routed, "errors": errors,
            "optimizers": [type(o).__name__ for o in optimizers]}


def _holds(optimizer, p: torch.Tensor) -> bool:
    return any(q is p for group in optimizer.param_groups for q in group["params"])


def _check(results: list[dict], layout: str, build: str) -> dict[str, float]:
    dense, sparse = MESHES[layout]("dp_shard" if SPMD[build] else "fsdp")
    for rank, r in enumerate(results):
        assert r["placements"] == PLACEMENTS[layout], (rank, r["placements"])
        assert r["meshes"] == {n: sparse if n in _EXPERTS else dense for n in r["meshes"]}, (rank, r["meshes"])
        assert r["optimizers"] == ["MuonAdamW"], r["optimizers"]
        wrong = {n: adamw for n, (adamw, expected) in r["routed"].items() if adamw != expected}
        assert not wrong, f"rank {rank}: routed to AdamW (True) or Muon (False) against the doc: {wrong}"
        bad = {n: v for n, v in r["errors"].items() if not optim_reference.weights_agree(*v)}
        assert not bad, f"rank {rank}: (err, moved) beyond tolerance: {bad}"
    return {n: max(r["errors"][n][0] for r in results) for n in results[0]["errors"]}


CASES = [pytest.param(layout, build, mode, id=f"{layout}-{build}-{mode}")
         for layout, build, mode in [("hsdp_ep", "standin", "home"), ("hsdp_ep", "standin", "duplicated"),
                                     ("hsdp_ep", "standin_spmd", "home"), ("fsdp_tp_ep", "standin", "home"),
                                     ("fsdp_tp_ep", "standin", "duplicated"), ("fsdp_tp_ep", "standin", "distributed"),
                                     ("fsdp_tp_ep", "standin_spmd", "home")]]


@pytest.mark.parametrize("layout,build,mode", CASES)
def test_recipe_on_torchtitans_layouts_with_torch_apis(world, layout, build, mode):
    """The doc's block "build" on torchtitan's MoE layouts made with torch's APIs (fully_shard's old path and its
    SPMD path): dense and expert weights on their own meshes under one MuonAdamW with no group argument, every
    gathered weight one process's float64 step after 2 steps."""
    _check(world.run(_trained, layout, build, "build", mode), layout, build)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", ["partial", "full"])
def test_recipe_through_torchtitans_own_parallelize_and_container(titan_world, backend, layout):
    """torchtitan's own ParallelDims, parallelize_qwen3 (spmd_backend partial_dtensor or full_dtensor) and, through
    the doc's block "torchtitan", its OptimizersContainer building MuonAdamW: the stand-in's placements, exact."""
    build = f"torchtitan_{backend}"
    _check(titan_world.run(_trained, layout, build, "torchtitan", "home"), layout, build)
