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

from tests.harness import started_world

HIDDEN, HEADS, GROUPS, KV, EXPERTS, VOCAB, SEQ = 32, 8, 2, 4, 4, 64, 16
HP = {"lr": 0.02, "momentum": 0.9, "weight_decay": 0.01, "nesterov": True}


@pytest.fixture(scope="module")
def world():
    with started_world(4) as w:
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


def _gpt(tp: int, gtp: int, ep: int, egtp: int):
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
        moe_ffn_hidden_size=16 if experts else None, moe_router_topk=2)
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


def _run(ctx, layout: tuple[int, int, int, int], mode: str, split_qkv: bool) -> dict:
    """Three Muon steps through Megatron's own optimizer stack; per Muon matrix (error against float64 Muon of the
    gathered matrix, how far it moved), or the error raised."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.process_groups_config import ProcessGroupCollection

    from dist_ortho.integrations.megatron import install, megatron_qkv_split_shapes
    from tests import optim_reference
    from tests.megatron_cpu import megatron_on_cpu
    from tests.qkv_reference import muon_on_components
    from tests.test_megatron_stack import _muons

    tp, gtp, ep, egtp = layout
    install()
    with _parallel(*layout), megatron_on_cpu():
        pgs = ProcessGroupCollection.use_mpu_process_groups()
        config, model = _gpt(*layout)
        params = dict(model.named_parameters())
        local_experts = EXPERTS // ep
        full = {n: _gather(p, n, pgs) for n, p in params.items()}
        grads = {n: [torch.randn(full[n].shape, generator=torch.Generator().manual_seed(
            zlib.crc32(f"{_key(n, pgs, local_experts)}/{step}".encode()))) * 0.1 for step in range(3)] for n in params}
        opt_config = OptimizerConfig(optimizer="muon", lr=HP["lr"], weight_decay=HP["weight_decay"], clip_grad=0.0,
                                     muon_momentum=HP["momentum"], muon_nesterov=True, muon_fp32_matmul_prec="high",
                                     muon_tp_mode=mode, muon_split_qkv=split_qkv)
        try:
            opt = get_megatron_optimizer(opt_config, [model])
            for step in range(3):
                for n, p in params.items():
                    p.grad = _piece(grads[n][step], p, n, pgs)
                ok, _, _ = opt.step()
                assert ok
        except ValueError as error:
            return {"error": str(error)}
        names = {id(p): n for n, p in params.items()}
        matrices = [names[id(p)] for m in _muons(opt) for g in m.param_groups for p in g["params"]]
        split = megatron_qkv_split_shapes(config)
        errors = {}
        for n in matrices:
            qkv = split_qkv and n.endswith("linear_qkv.weight")
            ref = (muon_on_components(full[n], grads[n], split, HP) if qkv
                   else optim_reference.run("muon", full[n], grads[n], HP))
            errors[n] = ((_gather(params[n], n, pgs) - ref).abs().max().item(), (ref - full[n]).abs().max().item())
    return {"errors": errors, "pads": {n: getattr(p, "pad_length", 0) for n, p in params.items()}}


DENSE, MOE = (2, 2, 1, 1), (1, 4, 2, 2)


@pytest.mark.parametrize("layout", [DENSE, MOE], ids=["tp2_gtp2", "gtp4_ep2_egtp2"])
def test_gtp_weight_remat_is_refused_by_name_on_every_rank(world, layout):
    """Until GTP is read: a ValueError naming a GTP-split parameter on every rank, never each piece as a matrix."""
    results = world.run(_run, layout, "duplicated", True)
    assert all("GTP weight remat" in r.get("error", "") for r in results), results
    assert len({r["error"] for r in results}) == 1
