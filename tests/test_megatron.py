"""Real megatron-core layers on CPU + gloo at TP = 1, 2, 4: ColumnParallelLinear, RowParallelLinear and
the fused GQA ``linear_qkv`` / ``linear_proj`` of a SelfAttention built from Megatron's local layer
spec (num_query_groups = 2, so TP = 4 splits a query group), with and without the output gate.
Forward and backward run through the real layers; the gathered weights and gradients feed float64
references (Q, K, V, gate apart). After 3 steps of TensorParallelMuon in every tp_mode, the gathered
TP weights must equal the references (tolerance of test_optim). The factory is built and stepped.

SelfAttention's core attention needs CUDA in megatron-core 0.16.1 (a global CUDA buffer), so its
projections are driven directly. Experts: a SequentialMLP's local experts (their linear_fc1/fc2 sharded
over the expert TP group, pg_collection.expt_tp) are driven directly too.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install 'dist_ortho[test]')")

from tests import optim_reference  # noqa: E402
from tests.qkv_reference import muon_on_components  # noqa: E402

HIDDEN, HEADS, GROUPS, KV = 32, 8, 2, 4


def _megatron(ctx, gated: bool, dtype: torch.dtype = torch.float32, bias: bool = True):
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=ctx.world_size)
    config = TransformerConfig(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=HEADS, num_query_groups=GROUPS, kv_channels=KV,
        use_cpu_initialization=True, attention_output_gate=gated, params_dtype=dtype, bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        add_bias_linear=bias,
    )

    class Chunk(MegatronModule):
        def __init__(self) -> None:
            super().__init__(config)
            init = torch.nn.init.normal_
            self.col = ColumnParallelLinear(HIDDEN, 64, config=config, init_method=init, bias=False, gather_output=False)
            self.row = RowParallelLinear(64, HIDDEN, config=config, init_method=init, bias=False, input_is_parallel=True,
                                         skip_bias_add=False)
            self.self_attention = build_module(
                get_gpt_layer_local_spec().submodules.self_attention, config=config, layer_number=1
            )

    torch.manual_seed(0)
    return ps, config, Chunk


def _gather(t: torch.Tensor, dim: int) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=dim)


def _three_steps_match(weights: dict, pg_collection, mode: str, reference, **kwargs) -> None:
    """Three TensorParallelMuon steps (Nesterov) with a different gradient at every step (each weight's own
    backward gradient plus seeded noise, the same on every rank), so that momentum and Nesterov errors are
    not normalized away; the gathered weights must equal ``reference(name, full weight, full grads, hp)``."""
    from dist_ortho.integrations.megatron import TensorParallelMuon

    full = {k: _gather(p.detach(), p.partition_dim) for k, p in weights.items()}
    full_grad = {k: _gather(p.grad, p.partition_dim) for k, p in weights.items()}
    gen = torch.Generator().manual_seed(7)
    step_grads = {k: [g + g.std() * torch.randn(g.shape, generator=gen) for _ in range(3)] for k, g in full_grad.items()}
    hp = {"lr": 0.02, "momentum": 0.9, "weight_decay": 0.01, "nesterov": True}
    opt = TensorParallelMuon(list(weights.values()), lr=hp["lr"], momentum_beta=hp["momentum"],
                             weight_decay=hp["weight_decay"], use_nesterov=True, fp32_matmul_prec="highest",
                             pg_collection=pg_collection, mode=mode, **kwargs)
    rank, size = dist.get_rank(), dist.get_world_size()
    for step in range(3):
        for k, p in weights.items():
            p.grad = torch.tensor_split(step_grads[k][step], size, dim=p.partition_dim)[rank].clone()
        opt.step()
    errors = {}
    for k, p in weights.items():
        expected = reference(k, full[k], step_grads[k], hp)
        moved = (expected - full[k].double()).abs().max().item()
        errors[k] = ((_gather(p.detach(), p.partition_dim).double() - expected).abs().max().item(), moved)
    bad = {k: v for k, v in errors.items() if not optim_reference.weights_agree(*v)}
    assert not bad, f"(err, moved) beyond tolerance: {bad}"


def _exact(ctx, gated: bool, mode: str):
    from megatron.core.process_groups_config import ProcessGroupCollection

    from dist_ortho.integrations.megatron import megatron_qkv_split_shapes, tag_megatron_params

    ps, config, Chunk = _megatron(ctx, gated)
    chunk = Chunk()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 2, HIDDEN, generator=gen)
    attn_in = torch.randn(6, 2, HEADS * KV, generator=gen).chunk(ctx.world_size, dim=-1)[ctx.rank]
    y, _ = chunk.col(x)
    z, _ = chunk.row(y)
    qkv, _ = chunk.self_attention.linear_qkv(x)
    proj, _ = chunk.self_attention.linear_proj(attn_in)
    (z.square().sum() + qkv.square().sum() + proj.sum()).backward()

    weights = {
        "col": chunk.col.weight, "row": chunk.row.weight,
        "qkv": chunk.self_attention.linear_qkv.weight, "proj": chunk.self_attention.linear_proj.weight,
    }
    tag_megatron_params([chunk])
    assert weights["qkv"].is_qkv and weights["qkv"].qkv_split_shapes == megatron_qkv_split_shapes(config)
    shapes = megatron_qkv_split_shapes(config)

    def reference(name, full, grads, hp):
        if name == "qkv":
            return muon_on_components(full, grads, shapes, hp)
        return optim_reference.run("muon", full, grads, hp)

    _three_steps_match(weights, ProcessGroupCollection.use_mpu_process_groups(), mode, reference, split_qkv=True)


@pytest.mark.parametrize("mode", ["duplicated", "distributed", "gram", "home"])
@pytest.mark.parametrize("gated", [False, True], ids=["gqa", "gated_gqa"])
def test_megatron_layers_are_exact(world, gated, mode):
    world.run(_exact, gated, mode)


def _experts(ctx, mode: str):
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.transformer_config import TransformerConfig

    from dist_ortho.integrations.megatron import tag_megatron_params

    _megatron(ctx, False)
    config = TransformerConfig(num_layers=1, hidden_size=HIDDEN, num_attention_heads=HEADS, use_cpu_initialization=True,
                               num_moe_experts=2, moe_ffn_hidden_size=64, add_bias_linear=False)
    pgs = ProcessGroupCollection.use_mpu_process_groups()

    class Chunk(MegatronModule):
        def __init__(self) -> None:
            super().__init__(config)
            self.experts = SequentialMLP(2, config, MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                                  linear_fc2=RowParallelLinear), pg_collection=pgs)

    torch.manual_seed(0)
    chunk = Chunk()
    x = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(2))
    sum(expert(x)[0].square().sum() for expert in chunk.experts.local_experts).backward()
    tag_megatron_params([chunk])
    weights = dict(chunk.named_parameters())
    assert all(p.expert_tp for p in weights.values())
    _three_steps_match(weights, pgs, mode, lambda name, full, grads, hp: optim_reference.run("muon", full, grads, hp))


@pytest.mark.parametrize("mode", ["duplicated", "distributed", "gram", "home"])
def test_megatron_experts_use_the_expert_group(world, mode):
    world.run(_experts, mode)


def _factory(ctx) -> list:
    from megatron.core.optimizer import OptimizerConfig

    from dist_ortho import MuonAdamW
    from dist_ortho.integrations.megatron import get_megatron_muon_optimizer

    _, _, Chunk = _megatron(ctx, False)
    chunk = Chunk()
    chunk.norm = torch.nn.LayerNorm(HIDDEN)
    config = OptimizerConfig(optimizer="adam", lr=1e-3, bf16=False, use_distributed_optimizer=False, weight_decay=0.01,
                             muon_tp_mode="duplicated")
    opt = get_megatron_muon_optimizer(config, [chunk])
    assert isinstance(opt, MuonAdamW) and config.optimizer == "adam"
    routed = {id(p): g["use_muon"] for g in opt.param_groups for p in g["params"]}
    assert routed[id(chunk.self_attention.linear_qkv.weight)] and routed[id(chunk.col.weight)]
    assert not routed[id(chunk.norm.weight)] and not routed[id(chunk.self_attention.linear_qkv.bias)]
    before = {n: p.detach().clone() for n, p in chunk.named_parameters()}
    x = torch.randn(6, 2, HIDDEN, generator=torch.Generator().manual_seed(0))
    out, _ = chunk.self_attention.linear_qkv(chunk.norm(x))
    y, _ = chunk.row(chunk.col(x)[0])
    (out.square().sum() + y.sum()).backward()
    opt.step()
    return sorted(n for n, p in chunk.named_parameters() if p.grad is not None and not torch.equal(p.detach(), before[n]))


NEXT = pytest.mark.skipif(
    __import__("importlib.util").util.find_spec("megatron.core.optimizer.emerging_optimizers") is not None,
    reason="megatron-core >= 0.17 builds Muon with its own get_megatron_optimizer (tests/test_megatron_stack.py); "
           "dist_ortho's get_megatron_muon_optimizer is megatron-core 0.16's factory")


@NEXT
def test_factory_builds_and_steps(world):
    moved = world.run(_factory)[0]
    assert {"col.weight", "row.weight", "self_attention.linear_qkv.weight", "norm.weight"} <= set(moved)


def test_muon_args_have_megatron_names_and_defaults():
    import argparse

    from dist_ortho.integrations.megatron import add_muon_args

    args = add_muon_args(argparse.ArgumentParser()).parse_args([])
    assert (args.muon_momentum, args.muon_split_qkv, args.muon_use_nesterov, args.muon_scale_mode) == (0.95, True, False, "spectral")
    assert (args.muon_fp32_matmul_prec, args.muon_num_ns_steps, args.muon_extra_scale_factor) == ("medium", 5, 1.0)
    assert args.muon_tp_mode == "duplicated"  # exact by default (Megatron: "blockwise")
    args = add_muon_args(argparse.ArgumentParser()).parse_args(
        ["--muon-no-split-qkv", "--muon-tp-mode", "gram", "--muon-coefficient-type", "polar_express", "--muon-use-syrk"]
    )
    assert not args.muon_split_qkv and args.muon_tp_mode == "gram" and args.muon_use_syrk


SCALE = 1024.0  # fp16: megatron-core's constant loss scale; the gradients it receives are scaled by it


def _wrapped(ctx, precision: str, mode: str):
    """Megatron's own stack on CPU (tests/megatron_cpu.py): our factory with wrap=True builds the FP32Optimizer or
    Float16OptimizerWithFloat16Params of megatron-core (fp16: with its loss scaler), chained; three steps with
    grad clipping active. The gathered master weights must equal float64 Muon of the gathered (clipped)
    gradients; with bf16 / fp16 the QKV split reaches the fp32 master copies (it raised a ValueError) and the
    model weights are their half copies; fp16 gradients arrive scaled by the loss scale and are unscaled, and
    a step with an inf gradient is skipped."""
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    from dist_ortho.integrations.megatron import get_megatron_muon_optimizer, megatron_qkv_split_shapes
    from tests.megatron_cpu import megatron_on_cpu

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    half, scale = dtype != torch.float32, SCALE if dtype == torch.float16 else 1.0
    _, config, Chunk = _megatron(ctx, True, dtype, bias=False)
    chunk = Chunk()
    chunk.ddp_config = DistributedDataParallelConfig()  # what Megatron's DDP wrapper of a chunk carries
    weights = {"col": chunk.col.weight, "row": chunk.row.weight, "qkv": chunk.self_attention.linear_qkv.weight,
               "proj": chunk.self_attention.linear_proj.weight}
    hp = {"lr": 0.02, "momentum": 0.9, "weight_decay": 0.01, "nesterov": True}
    opt_config = OptimizerConfig(optimizer="muon", lr=hp["lr"], weight_decay=hp["weight_decay"], bf16=precision == "bf16",
                                 fp16=precision == "fp16", loss_scale=SCALE if precision == "fp16" else None,
                                 clip_grad=0.5, muon_momentum=hp["momentum"], muon_use_nesterov=True,
                                 muon_fp32_matmul_prec="highest", muon_tp_mode=mode, muon_split_qkv=True)
    full = {k: _gather(p.detach(), p.partition_dim).double() for k, p in weights.items()}
    gen = torch.Generator().manual_seed(3)
    grads = {k: [(torch.randn(w.shape, generator=gen) * 0.1).to(dtype).double() for _ in range(3)] for k, w in full.items()}
    norms = [sum(grads[k][i].square().sum() for k in grads).sqrt().item() for i in range(3)]
    clipped = {k: [g * min(1.0, 0.5 / (n + 1e-6)) for g, n in zip(v, norms)] for k, v in grads.items()}
    rank, size = ctx.rank, ctx.world_size
    with megatron_on_cpu():
        opt = get_megatron_muon_optimizer(opt_config, [chunk], wrap=True)
        reported = []
        for step in range(3):
            for k, p in weights.items():
                shard = torch.tensor_split(grads[k][step] * scale, size, dim=p.partition_dim)[rank]
                p.grad = shard.to(dtype).contiguous()
            ok, grad_norm, _ = opt.step()
            assert ok
            reported.append(grad_norm)
        if precision == "fp16":  # an overflow: the step is skipped, nothing moves
            before = {k: (p.main_param.detach().clone(), p.detach().clone()) for k, p in weights.items()}
            for k, p in weights.items():
                p.grad = torch.full_like(p, float("inf"))
            ok, _, _ = opt.step()
            assert not ok and all(torch.equal(p.main_param, before[k][0]) and torch.equal(p.detach(), before[k][1])
                                  for k, p in weights.items())
    assert reported == pytest.approx(norms, rel=1e-5)
    shapes = megatron_qkv_split_shapes(config)
    worst = {}
    for k, p in weights.items():
        master = p.main_param if half else p
        if half:
            assert torch.equal(p.detach(), master.detach().to(dtype))
        ref = (muon_on_components(full[k], clipped[k], shapes, hp) if k == "qkv"
               else optim_reference.run("muon", full[k], clipped[k], hp))
        worst[k] = ((_gather(master.detach(), p.partition_dim).double() - ref).abs().max().item(),
                    (ref - full[k]).abs().max().item())
    bad = {k: v for k, v in worst.items() if not optim_reference.weights_agree(*v)}
    assert not bad, f"(err, moved) beyond tolerance: {bad}"


@NEXT
@pytest.mark.parametrize("mode", ["duplicated", "home"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_megatron_wrapped_stack_fp32_bf16_fp16(world, precision, mode):
    world.run(_wrapped, precision, mode)


def test_checkpoint_lacking_group_keys_loads_and_the_configuration_wins(caplog):
    """A checkpoint of megatron-core's own Muon has none of dist_ortho's group keys (conv_mode, local_gram, ...):
    they take the configured values; stored hyper-parameters give way to the configured ones (the command
    line wins), except lr and weight_decay, which Megatron's scheduler sets; the momentum is kept."""
    from dist_ortho.integrations.megatron import TensorParallelMuon

    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8, 6, generator=gen))
    p.grad = torch.randn(8, 6, generator=gen)
    stored = TensorParallelMuon([p], lr=0.1, momentum=0.5, num_ns_steps=3, coefficient_type="simple", weight_decay=0.2)
    stored.step()
    checkpoint = stored.state_dict()
    for group in checkpoint["param_groups"]:
        for key in ("conv_mode", "local_gram", "nonfinite", "batch_matrices"):
            del group[key]
    q = torch.nn.Parameter(p.detach().clone())
    ours = TensorParallelMuon([q], lr=0.3, momentum=0.9, num_ns_steps=5, coefficient_type="quintic", weight_decay=0.0)
    with caplog.at_level("INFO", logger="dist_ortho.integrations.megatron.optimizers"):
        ours.load_state_dict(checkpoint)
    group = ours.param_groups[0]
    assert (group["momentum"], group["num_ns_steps"], group["coefficient_type"]) == (0.9, 5, "quintic")
    assert (group["lr"], group["weight_decay"]) == (0.1, 0.2)
    assert group["conv_mode"] == ours.defaults["conv_mode"] and "momentum 0.5 -> 0.9" in caplog.text
    assert torch.equal(ours.state[q]["momentum_buffer"], stored.state[p]["momentum_buffer"])
    q.grad = p.grad.clone()
    ours.step()  # the loaded optimizer steps
