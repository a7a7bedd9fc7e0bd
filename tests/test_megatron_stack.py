"""megatron-core's own optimizer stack around dist_ortho at world 4 (gloo, CPU; megatron-core 0.16).

Real megatron-core layers (ColumnParallelLinear, RowParallelLinear, a local-spec SelfAttention with a
fused GQA ``linear_qkv``, a SequentialMLP of experts), real param groups (``_get_param_groups``), real
wrappers (FP32Optimizer, Float16OptimizerWithFloat16Params), real grad clipping and ChainedOptimizer,
built by dist_ortho's ``get_megatron_muon_optimizer`` with ``wrap=True``. megatron-core allocates a few
tensors on CUDA unconditionally: tests/megatron_cpu.py redirects them (listed in README.md).

- Layer-wise DP (``--optimizer dist_muon``) at TP 2 x DP 2: each matrix's momentum lives on one DP
  replica (both ranks of its TP group), the weights equal float64 Muon of the gathered clipped gradients
  on every rank.
- MoE at TP 2, EP 2 (expert TP 2): the expert optimizer's grad statistics span TP x EP x PP, so the
  reported grad norm is the norm of every gradient of the model and every rank clips by the same factor;
  dense and expert weights equal the float64 reference on every rank.
Gradients are seeded per weight (and per expert, by its global index), the same on every DP replica, as
Megatron's DDP leaves them; clipping (clip_grad 0.5) is active at every step.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import zlib

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install 'dist_ortho[test]')")

from tests import optim_reference
from tests.harness import started_world
from tests.qkv_reference import muon_on_components

HIDDEN, HEADS, GROUPS, KV, EXPERTS, CLIP = 32, 8, 2, 4, 4, 0.5
HP = {"lr": 0.02, "momentum": 0.9, "weight_decay": 0.01, "nesterov": True}


@pytest.fixture(scope="module")
def world():
    with started_world(4) as w:
        yield w


@contextlib.contextmanager
def _parallel(tp: int, ep: int):
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=ep)
    try:
        yield ps
    finally:
        ps.destroy_model_parallel()


def _gather(t: torch.Tensor, dim: int, group) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _model(dtype: torch.dtype, experts: bool, pgs):
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=HEADS, num_query_groups=GROUPS, kv_channels=KV,
        use_cpu_initialization=True, params_dtype=dtype, bf16=dtype == torch.bfloat16, add_bias_linear=False,
        num_moe_experts=EXPERTS if experts else None, moe_ffn_hidden_size=16 if experts else None,
        tensor_model_parallel_size=dist.get_world_size(pgs.tp), expert_model_parallel_size=dist.get_world_size(pgs.ep),
    )

    class Chunk(MegatronModule):
        def __init__(self) -> None:
            super().__init__(config)
            init = torch.nn.init.normal_
            self.col = ColumnParallelLinear(HIDDEN, 64, config=config, init_method=init, bias=False, gather_output=False)
            self.row = RowParallelLinear(64, HIDDEN, config=config, init_method=init, bias=False, input_is_parallel=True,
                                         skip_bias_add=False)
            self.self_attention = build_module(get_gpt_layer_local_spec().submodules.self_attention, config=config,
                                               layer_number=1)
            if experts:
                local = EXPERTS // dist.get_world_size(pgs.ep)
                self.experts = SequentialMLP(local, config, MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                                          linear_fc2=RowParallelLinear), pg_collection=pgs)

    torch.manual_seed(0)
    chunk = Chunk()
    chunk.ddp_config = DistributedDataParallelConfig()  # what Megatron's DDP wrapper of a chunk carries
    return config, chunk


def _key(name: str, ep_rank: int, local_experts: int) -> str:
    """A weight's name in the whole model (local expert i of EP rank r is global expert r * local + i)."""
    if ".local_experts." not in name:
        return name
    head, rest = name.split(".local_experts.")
    index, tail = rest.split(".", 1)
    return f"{head}.global_experts.{ep_rank * local_experts + int(index)}.{tail}"


def _grad(key: str, step: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(zlib.crc32(f"{key}/{step}".encode()))
    return (torch.randn(shape, generator=gen) * 0.1).to(dtype).double()


def _stack(ctx, tp: int, ep: int, bf16: bool, layer_wise: bool, mode: str) -> dict:
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.process_groups_config import ProcessGroupCollection

    from dist_ortho.integrations.megatron import get_megatron_muon_optimizer, megatron_qkv_split_shapes
    from tests.megatron_cpu import megatron_on_cpu

    dtype = torch.bfloat16 if bf16 else torch.float32
    with _parallel(tp, ep):
        pgs = ProcessGroupCollection.use_mpu_process_groups()
        config, chunk = _model(dtype, ep > 1, pgs)
        local_experts = EXPERTS // dist.get_world_size(pgs.ep) if ep > 1 else 0
        ep_rank = dist.get_rank(pgs.ep) if ep > 1 else 0
        weights = {n: p for n, p in chunk.named_parameters()}
        group_of = {n: pgs.expt_tp if "experts" in n else pgs.tp for n in weights}
        full = {n: _gather(p.detach(), p.partition_dim, group_of[n]).double() for n, p in weights.items()}
        keys = {n: _key(n, ep_rank, local_experts) for n in weights}
        # Every weight of the model, all EP ranks' experts included, for the norm every rank must clip by.
        shapes = {keys[n]: tuple(w.shape) for n, w in full.items()}
        every = [None] * ctx.world_size
        dist.all_gather_object(every, shapes)
        model_shapes = {k: v for s in every for k, v in s.items()}
        norms = [sum(_grad(k, step, s, dtype).square().sum() for k, s in model_shapes.items()).sqrt().item()
                 for step in range(3)]
        grads = {n: [_grad(keys[n], step, full[n].shape, dtype) for step in range(3)] for n in weights}
        clipped = {n: [g * min(1.0, CLIP / (norm + 1e-6)) for g, norm in zip(v, norms)] for n, v in grads.items()}

        opt_config = OptimizerConfig(
            optimizer="dist_muon" if layer_wise else "muon", lr=HP["lr"], weight_decay=HP["weight_decay"], bf16=bf16,
            clip_grad=CLIP, muon_momentum=HP["momentum"], muon_use_nesterov=True, muon_fp32_matmul_prec="highest",
            muon_tp_mode=mode, muon_split_qkv=True,
        )
        reported = []
        with megatron_on_cpu():
            opt = get_megatron_muon_optimizer(opt_config, [chunk], layer_wise_distributed_optimizer=layer_wise, wrap=True)
            for step in range(3):
                for n, p in weights.items():
                    rank, size = dist.get_rank(group_of[n]), dist.get_world_size(group_of[n])
                    p.grad = torch.tensor_split(grads[n][step], size, dim=p.partition_dim)[rank].to(dtype).contiguous()
                ok, grad_norm, _ = opt.step()
                assert ok
                reported.append(grad_norm)
        split = megatron_qkv_split_shapes(config)
        errors = {}
        for n, p in weights.items():
            master = p.main_param if bf16 else p
            if bf16:
                assert torch.equal(p.detach(), master.detach().to(torch.bfloat16)), n
            ref = (muon_on_components(full[n], clipped[n], split, HP) if n.endswith("linear_qkv.weight")
                   else optim_reference.run("muon", full[n], clipped[n], HP))
            errors[n] = ((_gather(master.detach(), p.partition_dim, group_of[n]).double() - ref).abs().max().item(),
                         (ref - full[n]).abs().max().item())
        muons = [o.optimizer for o in opt.chained_optimizers if type(o.optimizer).__name__ == "TensorParallelMuon"]
        held = sorted(getattr(p, "_dist_ortho_name", "?") for m in muons for p, s in m.state.items() if s)
    return {"reported": reported, "norms": norms, "errors": errors, "held": held, "names": sorted(weights)}


def _check(results: list[dict]) -> None:
    for r in results:
        assert r["reported"] == pytest.approx(r["norms"], rel=1e-5)
        bad = {n: v for n, v in r["errors"].items() if not optim_reference.weights_agree(*v)}
        assert not bad, f"(err, moved) beyond tolerance: {bad}"


@pytest.mark.parametrize("mode", ["home", "duplicated"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_layer_wise_dp_owns_each_matrix_once_in_the_grid(world, bf16, mode):
    results = world.run(_stack, 2, 1, bf16, True, mode)
    _check(results)
    # TP 2 x DP 2 (ranks 0,1 | 2,3 are TP groups): each matrix's momentum on one replica, on both its TP ranks.
    replicas = [set(results[0]["held"]) | set(results[1]["held"]), set(results[2]["held"]) | set(results[3]["held"])]
    assert results[0]["held"] == results[1]["held"] and results[2]["held"] == results[3]["held"]
    assert replicas[0].isdisjoint(replicas[1]) and replicas[0] | replicas[1] == set(results[0]["names"])
    assert replicas[0] and replicas[1]


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_moe_expert_parallel_clips_by_the_norm_of_every_gradient(world, bf16):
    results = world.run(_stack, 2, 2, bf16, False, "duplicated")
    _check(results)
    assert len({tuple(r["reported"]) for r in results}) == 1  # one clip factor on every rank
    assert any("experts" in n for n in results[0]["names"])


def test_install_and_launcher_switch_megatron_without_edits(tmp_path):
    script = tmp_path / "pretrain_stub.py"
    script.write_text(
        "import sys\n"
        "import megatron.core.optimizer.muon as muon\n"
        "print(muon.get_megatron_muon_optimizer.__module__, muon.TensorParallelMuon.__module__, sys.argv[1:])\n"
    )
    out = subprocess.run([sys.executable, "-m", "dist_ortho.integrations.megatron", str(script), "--optimizer", "muon"],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["dist_ortho.integrations.megatron.factory", "dist_ortho.integrations.megatron.optimizers",
                   "['--optimizer',", "'muon']"]
