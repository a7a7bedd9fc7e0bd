"""megatron-core's own optimizer stack around dist_ortho at world 4 (gloo, CPU), on both generations:
megatron-core 0.16 (.venv) and >= 0.17 (.venv-next; ``make test`` runs this module in both).

Real megatron-core layers (ColumnParallelLinear, RowParallelLinear, a local-spec SelfAttention with a
fused GQA ``linear_qkv``, a SequentialMLP of experts), real param groups, real wrappers (FP32Optimizer,
Float16OptimizerWithFloat16Params), real grad clipping and ChainedOptimizer, built as Megatron-LM builds
them once ``install()`` ran: on 0.16 through ``megatron.core.optimizer.muon.get_megatron_muon_optimizer``
(dist_ortho's after install), on >= 0.17 through megatron-core's own ``get_megatron_optimizer`` and its
registry (and its LayerWiseDistributedOptimizer for layer-wise DP). megatron-core allocates a few
tensors on CUDA unconditionally: tests/megatron_cpu.py redirects them (listed in docs/megatron.md).

- Layer-wise DP (``--optimizer dist_muon``) at TP 2 x DP 2: each matrix's momentum lives on one DP
  replica (both ranks of its TP group), the weights equal float64 Muon of the gathered clipped gradients
  on every rank. On 0.16 dist_ortho's DP x TP grid runs it; on >= 0.17 Megatron's
  LayerWiseDistributedOptimizer shards whole matrices over DP and dist_ortho's TP mode runs inside.
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
    from megatron.core.process_groups_config import ProcessGroupCollection

    from dist_ortho.integrations.megatron import megatron_qkv_split_shapes
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

        hp = {"lr": HP["lr"], "weight_decay": HP["weight_decay"], "bf16": bf16, "clip_grad": CLIP,
              "muon_momentum": HP["momentum"], "muon_tp_mode": mode, "muon_split_qkv": True}
        reported = []
        with megatron_on_cpu():
            opt = _build(hp, chunk, layer_wise)
            for step in range(3):
                for n, p in weights.items():
                    rank, size = dist.get_rank(group_of[n]), dist.get_world_size(group_of[n])
                    p.grad = torch.tensor_split(grads[n][step], size, dim=p.partition_dim)[rank].to(dtype).contiguous()
                ok, grad_norm, _ = opt.step()
                assert ok
                reported.append(grad_norm)
        split = megatron_qkv_split_shapes(config)
        errors, model_weights = {}, {}
        for n, p in weights.items():
            model_weights[n] = _gather(p.detach(), p.partition_dim, group_of[n]).double()
            # bf16: the fp32 master copy (on >= 0.17's layer-wise optimizer only the owner has one)
            master = getattr(p, "main_param", None) if bf16 else p
            if master is None:
                continue
            if bf16:
                assert torch.equal(p.detach(), master.detach().to(torch.bfloat16)), n
            ref = (muon_on_components(full[n], clipped[n], split, HP) if n.endswith("linear_qkv.weight")
                   else optim_reference.run("muon", full[n], clipped[n], HP))
            errors[n] = ((_gather(master.detach(), p.partition_dim, group_of[n]).double() - ref).abs().max().item(),
                         (ref - full[n]).abs().max().item())
        name_of = {id(getattr(p, "main_param", p)): n for n, p in weights.items()}
        held = sorted(name_of[id(p)] for m in _muons(opt) for p, s in m.state.items() if s)
    return {"reported": reported, "norms": norms, "errors": errors, "held": held, "names": sorted(weights),
            "weights": model_weights, "ep_rank": ep_rank}


def _build(hp: dict, chunk, layer_wise: bool):
    """The optimizer Megatron-LM builds for ``--optimizer muon`` (``dist_muon``: layer-wise) once dist_ortho is
    installed: megatron-core 0.16 calls get_megatron_muon_optimizer (dist_ortho's after install), >= 0.17
    its own get_megatron_optimizer, whose registry entry builds dist_ortho's TensorParallelMuon."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from dist_ortho.integrations.megatron import install
    from dist_ortho.integrations.megatron.optimizers import TensorParallelMuon

    if install() == "0.16":
        import megatron.core.optimizer.muon as upstream

        config = OptimizerConfig(optimizer="dist_muon" if layer_wise else "muon", muon_use_nesterov=True,
                                 muon_fp32_matmul_prec="highest", **hp)
        opt = upstream.get_megatron_muon_optimizer(config, [chunk], layer_wise_distributed_optimizer=layer_wise, wrap=True)
    else:
        config = OptimizerConfig(optimizer="muon", use_layer_wise_distributed_optimizer=layer_wise, muon_nesterov=True,
                                 muon_fp32_matmul_prec="high", **hp)  # "highest" is not among Megatron's choices
        opt = get_megatron_optimizer(config, [chunk])
    assert any(isinstance(m, TensorParallelMuon) for m in _inner(opt)), [type(m) for m in _inner(opt)]
    return opt


def _muons(opt) -> list:
    """dist_ortho's optimizers inside megatron-core's wrappers and chains."""
    from dist_ortho.integrations.megatron import TensorParallelMuon

    return [m for m in _inner(opt) if isinstance(m, TensorParallelMuon)]


def _inner(opt) -> list:
    """The torch optimizers inside megatron-core's wrappers and chains."""
    if isinstance(opt, torch.optim.Optimizer):
        return [opt]
    if hasattr(opt, "chained_optimizers"):
        return [inner for o in opt.chained_optimizers for inner in _inner(o)]
    return [opt.optimizer] if getattr(opt, "optimizer", None) is not None else []


def _check(results: list[dict]) -> None:
    """Reported norms, master weights against float64, and every replica's model weights alike (the experts'
    among ranks of one EP rank); every weight checked against float64 on some rank."""
    checked = {(r["ep_rank"], n) for r in results for n in r["errors"]}
    assert checked == {(r["ep_rank"], n) for r in results for n in r["names"]}
    for r in results:
        twin = next(q for q in results if q["ep_rank"] == r["ep_rank"])
        assert all(torch.equal(w, twin["weights"][n]) for n, w in r["weights"].items())
        assert r["reported"] == pytest.approx(r["norms"], rel=1e-5)
        bad = {n: v for n, v in r["errors"].items() if not optim_reference.weights_agree(*v)}
        assert not bad, f"(err, moved) beyond tolerance: {bad}"


@pytest.mark.parametrize("mode", ["home", "duplicated"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_layer_wise_dp_owns_each_matrix_once_in_the_grid(world, bf16, mode):
    from dist_ortho.integrations.megatron import generation

    if not bf16 and generation() == "registry":
        pytest.skip("megatron-core >= 0.17's LayerWiseDistributedOptimizer wraps its base optimizers only with bf16; "
                    "with fp32 its ChainedOptimizer calls prepare_grads() on the bare torch optimizer (upstream's too)")
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


STUB = """
import importlib.util
if importlib.util.find_spec("megatron.core.optimizer.emerging_optimizers"):
    from megatron.core.optimizer.emerging_optimizers import _EMERGING_OPTIMIZERS
    from megatron.training.arguments import parse_args
    args = parse_args()  # Megatron-LM's own parser, from sys.argv
    print(_EMERGING_OPTIMIZERS["muon"].optimizer_cls.__module__, _EMERGING_OPTIMIZERS["adaptive_muon"].optimizer_cls.__name__,
          args.optimizer, args.muon_tp_mode, args.muon_use_syrk)
else:
    import sys
    import megatron.core.optimizer.muon as muon
    print(muon.get_megatron_muon_optimizer.__module__, muon.TensorParallelMuon.__module__, *sys.argv[1:])
"""


def test_install_and_launcher_switch_megatron_without_edits(tmp_path):
    """``python -m dist_ortho.integrations.megatron SCRIPT ARGS`` runs a script that uses Megatron as it is."""
    from dist_ortho.integrations.megatron import generation

    script = tmp_path / "pretrain_stub.py"
    script.write_text(STUB)
    argv = ["--optimizer", "muon", "--muon-tp-mode", "gram", "--muon-use-syrk"]
    out = subprocess.run([sys.executable, "-m", "dist_ortho.integrations.megatron", str(script), *argv],
                         capture_output=True, text=True, check=True).stdout.split()
    if generation() == "registry":
        assert out[-5:] == ["dist_ortho.integrations.megatron.optimizers", "TensorParallelAdaptiveMuon", "muon", "gram", "True"]
    else:
        assert out == ["dist_ortho.integrations.megatron.factory", "dist_ortho.integrations.megatron.optimizers", *argv]


def _documented_command_lines() -> list[list[str]]:
    """The Megatron arguments of every command line in launch/megatron_lm.md (after ``pretrain_gpt.py``, or
    between the ``...`` of a fragment), shell variables replaced by a word."""
    import re
    import shlex
    from pathlib import Path

    text = (Path(__file__).parents[1] / "launch" / "megatron_lm.md").read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL):
        for command in block.replace("\\\n", " ").splitlines():
            words = shlex.split(re.sub(r"\$\w+", "x", command.split("#")[0]))
            if "pretrain_gpt.py" in words:
                lines.append(words[words.index("pretrain_gpt.py") + 1:])
            elif words[:1] == ["..."]:
                lines.append([w for w in words if w != "..."])
    return lines


def test_megatron_parser_takes_dist_ortho_flags_and_every_documented_command_line():
    """Megatron-LM's own argument parser (megatron.training, in megatron-core >= 0.17's package) after install()."""
    import argparse
    import importlib.util

    if importlib.util.find_spec("megatron.training") is None:
        pytest.skip("this megatron-core package has no megatron.training (its 0.16 wheel); the parser is tested "
                    "with megatron-core >= 0.17 (make test-next)")
    from megatron.training import arguments

    from dist_ortho.integrations.megatron import install

    def parse(argv: list[str]) -> argparse.Namespace:
        return arguments.add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False)).parse_args(argv)

    install()
    install()  # idempotent: no flag added twice
    lines = _documented_command_lines()
    assert len(lines) >= 3
    for argv in lines:
        parse(argv)
    args = parse(["--muon-tp-mode", "home", "--muon-use-syrk", "--muon-coefficient-type", "polar_express"])
    assert (args.muon_tp_mode, args.muon_use_syrk, args.muon_coefficient_type) == ("home", True, "polar_express")
    default = arguments.add_megatron_arguments.__wrapped__(argparse.ArgumentParser(allow_abbrev=False)).parse_args([])
    ours = parse([])
    assert {k: v for k, v in vars(ours).items() if k in vars(default)} == vars(default)  # Megatron's defaults kept
    with pytest.raises(SystemExit):
        parse(["--muon-tp-mode", "fastest"])
