"""Megatron's Generalized Tensor Parallelism weight remat (megatron-core >= 0.19) on its own stack, world 4 under gloo.

``initialize_model_parallel(..., gtp_remat_size=G)`` and ``TransformerConfig(tensor_parallel_num_weight_shards=TP x G)``
split every TP block once more along dim 0 over a ``gtp_remat`` group (experts: ``expt_gtp_remat``), padded with zero
rows at the tail (``pad_length``): a GPTModel of the local spec, built on the CPU (GTP shards without
TransformerEngine; its forward gathers need TE, so gradients are given: each matrix's seeded global gradient, cut into
the TP block and then the GTP piece with zero padding rows, as GTP's reduce-scatter leaves them). The optimizer is the
one Megatron-LM builds for ``--optimizer muon`` once dist_ortho is installed (megatron-core's get_megatron_optimizer
and its registry). Layouts: TP 2 x GTP 2 (linear_qkv padded, its GTP pieces holding parts of query groups) and
TP 1 x GTP 4 dense with EP 2 x EGTP 2 experts (padded expert fc1, whole pieces of padding).
"""

from __future__ import annotations

import contextlib
import zlib

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("megatron.core.tensor_parallel.gtp_api",
                    reason="megatron-core >= 0.19 (GTP) is not installed in this environment (needs Python >= 3.12; "
                           "`make test` runs this module in .venv-next where a Python 3.12 exists)")

from tests import optim_reference
from tests.harness import started_world

HIDDEN, HEADS, GROUPS, KV, EXPERTS, VOCAB, SEQ = 32, 8, 2, 4, 4, 64, 16
HP = {"lr": 0.02, "momentum": 0.9, "weight_decay": 0.01, "nesterov": True}


@pytest.fixture(scope="module")
def world():
    with started_world(4) as w:
        w.timeout = 600.0  # one call runs every mode on a fresh GPTModel
        yield w


@contextlib.contextmanager
def _parallel(tp: int, gtp: int, ep: int, egtp: int):
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=ep, gtp_remat_size=gtp,
                                 expert_gtp_remat_size=egtp)
    try:
        yield ps
    finally:
        ps.destroy_model_parallel()


@contextlib.contextmanager
def _padding(rows: int):
    """GTP's alignment padding (megatron-core pads every TP block to a multiple of rows x GTP; 0: no padding, dims
    must divide)."""
    from megatron.core.tensor_parallel.generalized_tensor_parallelism import GTP_CONFIG, update_gtp_config

    before = GTP_CONFIG.pad_for_alignment
    update_gtp_config(pad_for_alignment=rows)
    try:
        yield
    finally:
        update_gtp_config(pad_for_alignment=before)


def _gpt(tp: int, gtp: int, ep: int, egtp: int, dtype: torch.dtype = torch.float32):
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    experts = EXPERTS if ep > 1 else None
    config = TransformerConfig(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=HEADS, num_query_groups=GROUPS, kv_channels=KV,
        use_cpu_initialization=True, add_bias_linear=False, tensor_model_parallel_size=tp,
        tensor_parallel_num_weight_shards=tp * gtp, expert_model_parallel_size=ep,
        expert_tensor_parallel_num_weight_shards=egtp if experts else None, num_moe_experts=experts,
        moe_ffn_hidden_size=16 if experts else None, moe_router_topk=2, params_dtype=dtype,
        bf16=dtype == torch.bfloat16)
    torch.manual_seed(0)
    model = GPTModel(config, get_gpt_layer_local_spec(num_experts=experts), vocab_size=VOCAB, max_sequence_length=SEQ)
    model.ddp_config = DistributedDataParallelConfig()  # what Megatron's DDP wrapper of a chunk carries
    return config, model


def _groups(pgs, name: str) -> tuple:
    """(TP group, GTP group) of a weight: the experts' own for expert weights."""
    expert = ".experts." in name
    return (pgs.expt_tp, pgs.expt_gtp_remat) if expert else (pgs.tp, pgs.gtp_remat)


def _gather(p: torch.Tensor, name: str, pgs) -> torch.Tensor:
    """The global matrix from this rank's GTP piece: gathered over GTP (padding stripped), then over TP."""
    tp, gtp = _groups(pgs, name)
    t = p.detach()
    if getattr(p, "is_gtp_weight_remat", False):
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size(gtp))]
        dist.all_gather(parts, t.contiguous(), group=gtp)
        t = torch.cat(parts)[: len(parts) * t.size(0) - p.pad_length]
    if getattr(p, "tensor_model_parallel", False) and dist.get_world_size(tp) > 1:
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size(tp))]
        dist.all_gather(parts, t.contiguous(), group=tp)
        t = torch.cat(parts, dim=p.partition_dim)
    return t.double()


def _piece(full: torch.Tensor, p: torch.Tensor, name: str, pgs) -> torch.Tensor:
    """This rank's GTP piece of the global ``full``: its TP block, padded with zero rows, cut along dim 0."""
    tp, gtp = _groups(pgs, name)
    t = full
    if getattr(p, "tensor_model_parallel", False) and dist.get_world_size(tp) > 1:
        t = torch.tensor_split(t, dist.get_world_size(tp), dim=p.partition_dim)[dist.get_rank(tp)]
    if getattr(p, "is_gtp_weight_remat", False):
        t = torch.nn.functional.pad(t, (0, 0, 0, p.pad_length))
        t = t.chunk(dist.get_world_size(gtp))[dist.get_rank(gtp)]
    return t.to(p.dtype).contiguous()


def _key(name: str, pgs, local_experts: int) -> str:
    """A weight's name in the whole model (local expert i of EP rank r is global expert r * local + i)."""
    if ".local_experts." not in name:
        return name
    head, rest = name.split(".local_experts.")
    index, tail = rest.split(".", 1)
    return f"{head}.global_experts.{dist.get_rank(pgs.ep) * local_experts + int(index)}.{tail}"


def _grads(full: dict[str, torch.Tensor], pgs, local_experts: int) -> dict[str, list[torch.Tensor]]:
    """Three seeded global gradients per weight (an expert's by its global index: the same on every rank)."""
    return {n: [torch.randn(f.shape, generator=torch.Generator().manual_seed(
        zlib.crc32(f"{_key(n, pgs, local_experts)}/{step}".encode()))) * 0.1 for step in range(3)] for n, f in full.items()}


def _three_steps(opt, params: dict, grads: dict, pgs) -> None:
    for step in range(3):
        for n, p in params.items():
            p.grad = _piece(grads[n][step], p, n, pgs)
            if p.dtype == torch.float32 and getattr(p, "_main_grad_expected", False):
                p.main_grad = p.grad  # what Megatron's DDP buffers give fp32 weights of a bf16 model
        out = opt.step()
        assert out is None or out[0], out


def _run(ctx, layout: tuple[int, int, int, int], modes: list[str], split_qkv: bool, pad: int = 16) -> dict:
    """Per mode, three Muon steps through Megatron's own optimizer stack on a fresh model: per Muon matrix (error
    against float64 Muon of the gathered matrix, how far it moved), or the ValueError raised."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.process_groups_config import ProcessGroupCollection

    from dist_ortho.integrations.megatron import install, megatron_qkv_split_shapes
    from tests.megatron_cpu import megatron_on_cpu
    from tests.qkv_reference import muon_on_components
    from tests.test_megatron_stack import _muons

    install()
    out: dict = {}
    with _parallel(*layout), megatron_on_cpu(), _padding(pad):
        pgs = ProcessGroupCollection.use_mpu_process_groups()
        for mode in modes:
            config, model = _gpt(*layout)
            params = dict(model.named_parameters())
            full = {n: _gather(p, n, pgs) for n, p in params.items()}
            grads = _grads(full, pgs, EXPERTS // layout[2])
            opt_config = OptimizerConfig(optimizer="muon", lr=HP["lr"], weight_decay=HP["weight_decay"], clip_grad=0.0,
                                         muon_momentum=HP["momentum"], muon_nesterov=True, muon_fp32_matmul_prec="high",
                                         muon_tp_mode=mode, muon_split_qkv=split_qkv)
            try:
                opt = get_megatron_optimizer(opt_config, [model])
                _three_steps(opt, params, grads, pgs)
            except ValueError as error:
                out[mode] = {"error": str(error)}
                continue
            names = {id(p): n for n, p in params.items()}
            matrices = [names[id(p)] for m in _muons(opt) for g in m.param_groups for p in g["params"]]
            split = megatron_qkv_split_shapes(config)
            errors = {}
            for n in matrices:
                qkv = split_qkv and n.endswith("linear_qkv.weight")
                ref = (muon_on_components(full[n], grads[n], split, HP) if qkv
                       else optim_reference.run("muon", full[n], grads[n], HP))
                errors[n] = ((_gather(params[n], n, pgs) - ref).abs().max().item(), (ref - full[n]).abs().max().item())
            out[mode] = {"errors": errors, "pads": {n: getattr(p, "pad_length", 0) for n, p in params.items()}}
    return out


def _against_upstream(ctx, layout: tuple[int, int, int, int], modes: list[str], split_qkv: bool, pad: int) -> dict:
    """megatron-core's own TensorParallelMuon (duplicated: it gathers over GTP, runs its TP-aware step, keeps its
    piece) and dist_ortho's, built alike on the same GTP-split weights, three steps: per mode and Muon matrix
    (max |ours - upstream's|, how far upstream's moved), or the error either raised."""
    from megatron.core.optimizer import emerging_optimizers as registry
    from megatron.core.process_groups_config import ProcessGroupCollection

    from dist_ortho.integrations.megatron import TensorParallelMuon, megatron_qkv_split_shapes, tag_megatron_params
    from dist_ortho.integrations.megatron.install import upstream
    from dist_ortho.integrations.megatron.params import is_matrix_param

    out: dict = {}
    with _parallel(*layout), _padding(pad):
        pgs = ProcessGroupCollection.use_mpu_process_groups()
        config, model = _gpt(*layout)
        tag_megatron_params([model])
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        params = {n: p for n, p in model.named_parameters()
                  if is_matrix_param(p) and "embedding" not in n and "output_layer" not in n}
        full = {n: _gather(p, n, pgs) for n, p in params.items()}
        grads = _grads(full, pgs, EXPERTS // layout[2])
        common = {**HP, "split_qkv": split_qkv, "is_qkv_fn": lambda p: getattr(p, "is_qkv", False),
                  "qkv_split_shapes": megatron_qkv_split_shapes(config), "fp32_matmul_prec": "highest",
                  "pg_collection": pgs}

        def weights(cls, mode: str) -> dict[str, torch.Tensor] | str:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(start[n])
            try:
                _three_steps(cls(list(params.values()), **common, tp_mode=mode), params, grads, pgs)
            except (RuntimeError, ValueError) as error:
                return f"{type(error).__name__}: {error}"
            return {n: _gather(p, n, pgs) for n, p in params.items()}

        reference = weights(upstream(registry.__name__, "TensorParallelMuon"), "duplicated")
        for mode in modes:
            got = weights(TensorParallelMuon, mode)
            if isinstance(reference, str) or isinstance(got, str):
                out[mode] = {"upstream": reference if isinstance(reference, str) else None,
                             "ours": got if isinstance(got, str) else None}
                continue
            out[mode] = {n: ((got[n] - reference[n]).abs().max().item(), (reference[n] - full[n]).abs().max().item())
                         for n in params}
    return out


DENSE, MOE = (2, 2, 1, 1), (1, 4, 2, 2)
LAYOUTS = {"tp2_gtp2": DENSE, "gtp4_ep2_egtp2": MOE}
EXACT_MODES = ["duplicated", "distributed", "gram", "home", "auto"]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_gtp_weights_step_as_one_process_on_megatrons_own_stack(world, layout):
    """Every exact mode on GTP-split dense and expert weights (fused QKV split with GTP pieces holding parts of
    query groups; padding stripped): the weights equal float64 Muon of the gathered matrices. Before: each GTP piece
    was orthogonalized as a whole matrix (0.07 off), silently."""
    for r in world.run(_run, LAYOUTS[layout], EXACT_MODES, True):
        for mode, result in r.items():
            assert "error" not in result, (mode, result["error"])
            assert any(v > 0 for v in result["pads"].values())  # padded weights are among those checked
            assert any(".experts." in n for n in result["errors"]) == (layout != "tp2_gtp2")
            bad = {n: v for n, v in result["errors"].items() if not optim_reference.weights_agree(*v)}
            assert not bad, f"{mode}: (err vs float64 Muon of the gathered matrix, moved) beyond tolerance: {bad}"


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_gtp_equals_upstreams_exact_duplicated_where_it_is_exact(world, layout):
    """Without padding and without the QKV split, megatron-core's own GTP Muon is exact: dist_ortho's every exact
    mode equals it within 5e-5 (float32 "highest", 3 steps)."""
    for r in world.run(_against_upstream, LAYOUTS[layout], EXACT_MODES, False, 0):
        for mode, errors in r.items():
            assert "upstream" not in errors, errors
            assert all(moved > 1e-3 and err <= 5e-5 for err, moved in errors.values()), (mode, errors)


def test_upstream_gtp_muon_is_inexact_where_dist_ortho_is_exact(world):
    """Pins two limits of megatron-core 0.19.2's own GTP Muon (scaled_orthogonalize_fn_with_gtp_remat) that
    dist_ortho does not share: with GTP's alignment padding its scale reads the padded shape (linear_qkv, padded
    8 rows a TP block, moves by another factor), and with the QKV split and GTP pieces that hold parts of query
    groups it raises. When this fails, upstream changed: compare against it there too."""
    padded = world.run(_against_upstream, DENSE, ["duplicated"], False, 16)[0]["duplicated"]
    qkv = "decoder.layers.0.self_attention.linear_qkv.weight"
    err, moved = padded[qkv]
    assert err > 0.05 * moved, padded  # the padded weight: upstream's scale is sqrt(64) where it is sqrt(48)
    assert all(e <= 5e-5 for n, (e, _) in padded.items() if n != qkv), padded
    split = world.run(_against_upstream, DENSE, ["duplicated"], True, 16)[0]["duplicated"]
    assert "Muon QKV split shape mismatch" in split["upstream"] and split["ours"] is None, split


def _layer_wise(ctx, mode: str) -> dict:
    """Megatron's layer-wise distributed optimizer (``use_layer_wise_distributed_optimizer``, bf16 with fp32 master
    copies) around dist_ortho's TensorParallelMuon at GTP 2 x DP 2: each matrix's fp32 master copy, on the DP
    replica that owns it, against float64 Muon of the gathered bf16 start weights and gradients."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.process_groups_config import ProcessGroupCollection

    from dist_ortho.integrations.megatron import install
    from tests.megatron_cpu import megatron_on_cpu
    from tests.test_megatron_stack import _muons

    install()
    layout = (1, 2, 1, 1)
    with _parallel(*layout), megatron_on_cpu(), _padding(16):
        pgs = ProcessGroupCollection.use_mpu_process_groups()
        config, model = _gpt(*layout, dtype=torch.bfloat16)
        params = dict(model.named_parameters())
        full = {n: _gather(p, n, pgs) for n, p in params.items()}
        grads = {n: [g.to(torch.bfloat16).double() for g in gs] for n, gs in _grads(full, pgs, EXPERTS).items()}
        opt_config = OptimizerConfig(optimizer="muon", lr=HP["lr"], weight_decay=HP["weight_decay"], clip_grad=0.0,
                                     bf16=True, use_layer_wise_distributed_optimizer=True, muon_momentum=HP["momentum"],
                                     muon_nesterov=True, muon_fp32_matmul_prec="high", muon_tp_mode=mode,
                                     muon_split_qkv=True)
        opt = get_megatron_optimizer(opt_config, [model])
        for p in params.values():
            p._main_grad_expected = True
        _three_steps(opt, params, grads, pgs)
        names = {id(getattr(p, "main_param", p)): n for n, p in params.items()}
        owned = sorted(names[id(p)] for m in _muons(opt) for g in m.param_groups for p in g["params"])
        errors = {}
        for n in owned:
            master = getattr(params[n], "main_param", params[n])
            if master is not params[n] and hasattr(params[n], "pad_length"):
                master.pad_length = params[n].pad_length
            ref = optim_reference.run("muon", full[n], grads[n], HP) if not n.endswith("linear_qkv.weight") else None
            if ref is None:
                from dist_ortho.integrations.megatron import megatron_qkv_split_shapes
                from tests.qkv_reference import muon_on_components

                ref = muon_on_components(full[n], grads[n], megatron_qkv_split_shapes(config), HP)
            errors[n] = ((_gather(master, n, pgs) - ref).abs().max().item(), (ref - full[n]).abs().max().item())
        model_weights = {n: _gather(p, n, pgs) for n, p in params.items()}
    return {"errors": errors, "weights": model_weights, "dp_rank": dist.get_rank(pgs.dp)}


def test_gtp_under_megatrons_layer_wise_distributed_optimizer(world):
    """The second entry point: Megatron's LayerWiseDistributedOptimizer shards whole matrices over DP and runs
    dist_ortho's step inside (the GTP attributes reach the fp32 master copies): every matrix is stepped by one DP
    replica, exactly (bf16 gradients, fp32 masters: the float32 tolerance), and every replica's bf16 weights agree."""
    results = world.run(_layer_wise, "home")
    owned = [set(r["errors"]) for r in results]
    assert owned[0] == owned[1] and owned[2] == owned[3] and owned[0].isdisjoint(owned[2]) and owned[0] and owned[2]
    for r in results:
        bad = {n: v for n, v in r["errors"].items() if not optim_reference.weights_agree(*v)}
        assert not bad, bad
        twin = results[0]
        assert all(torch.equal(w, twin["weights"][n]) for n, w in r["weights"].items())
