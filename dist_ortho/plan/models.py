"""Model shapes for the planner: the 2D weights Muon orthogonalizes, as Megatron-LM lays them out.

Per transformer layer (Megatron's GPT with TE/local specs): ``linear_qkv`` (fused, rows = query groups x
(q + k + v) per group, sharded by rows: column-parallel, split into Q, K and V for orthogonalization),
``linear_proj`` (hidden x q_total, row-parallel: columns), ``linear_fc1`` (2 ffn with a gate (SwiGLU) or
ffn, x hidden, rows) and ``linear_fc2`` (hidden x ffn, columns). An MoE layer replaces fc1/fc2 by each
expert's own pair (sharded by expert TP), plus an optional shared expert (dense TP) and the router
(experts x hidden, replicated). Embeddings, output layer, norms and biases go to AdamW and are not listed.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from dist_ortho.parameters.qkv import qkv_split_shapes


@dataclass(frozen=True)
class Weight:
    """One weight: its global (rows, cols), the dim TP shards (None: replicated), the per-query-group row
    split of a fused QKV weight, and whether it is an expert's (expert TP / expert DP groups)."""

    name: str
    shape: tuple[int, int]
    partition_dim: int | None
    qkv_split: tuple[int, ...] | None = None
    expert: bool = False


@dataclass(frozen=True)
class ModelSpec:
    """A GPT (dense or MoE). ``moe_layers``: how many of the layers are MoE (all by default when experts > 0)."""

    name: str
    hidden: int
    layers: int
    heads: int
    query_groups: int
    ffn: int
    gated: bool = True
    kv_channels: int | None = None
    experts: int = 0
    expert_ffn: int = 0
    shared_expert_ffn: int = 0
    moe_layers: int | None = None

    def __post_init__(self) -> None:
        for field in ("hidden", "layers", "heads", "query_groups", "ffn"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"model {self.name!r}: {field} must be a positive integer, got {value!r}")
        if self.heads % self.query_groups:
            raise ValueError(f"model {self.name!r}: heads={self.heads} must be a multiple of query_groups={self.query_groups}")
        if self.experts and self.expert_ffn <= 0:
            raise ValueError(f"model {self.name!r}: experts={self.experts} needs expert_ffn > 0")

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden // self.heads

    def check_layout(self, tp: int, ep: int = 1, etp: int = 1, pp: int = 1) -> None:
        """Megatron's divisibility rules for this model at TP/EP/expert-TP/PP; ValueError naming the sizes."""
        if self.heads % tp:
            raise ValueError(f"tp={tp} must divide the attention heads ({self.heads}) of {self.name!r}")
        if self.query_groups % tp and tp % self.query_groups:
            raise ValueError(f"tp={tp} and the query groups ({self.query_groups}) of {self.name!r}: one must divide the other")
        if self.ffn % tp:
            raise ValueError(f"tp={tp} must divide ffn ({self.ffn}) of {self.name!r}")
        if self.layers % pp:
            raise ValueError(f"pp={pp} must divide the layers ({self.layers}) of {self.name!r}")
        if self.experts:
            if self.experts % ep:
                raise ValueError(f"ep={ep} must divide the experts ({self.experts}) of {self.name!r}")
            if self.expert_ffn % etp:
                raise ValueError(f"expert tp={etp} must divide expert_ffn ({self.expert_ffn}) of {self.name!r}")
        elif ep != 1:
            raise ValueError(f"ep={ep}: {self.name!r} has no experts")

    def weights(self, ep: int = 1, pp: int = 1) -> list[Weight]:
        """The weights one pipeline stage (the first, layers / pp of them) holds, its experts those of one
        EP rank (experts / ep)."""
        hd, fc = self.head_dim, (2 if self.gated else 1)
        split = tuple(qkv_split_shapes(self.heads, self.query_groups, hd))
        moe = self.layers if self.moe_layers is None and self.experts else (self.moe_layers or 0)
        out = []
        for layer in range(self.layers // pp):
            p = f"layers.{layer}"
            out += [Weight(f"{p}.self_attention.linear_qkv.weight", (self.query_groups * sum(split), self.hidden), 0, split),
                    Weight(f"{p}.self_attention.linear_proj.weight", (self.hidden, self.heads * hd), 1)]
            if layer >= self.layers - moe:  # MoE layers last, as Megatron's moe_layer_freq lists them
                out.append(Weight(f"{p}.mlp.router.weight", (self.experts, self.hidden), None))
                for e in range(self.experts // ep):
                    out += [Weight(f"{p}.mlp.experts.linear_fc1.weight{e}", (fc * self.expert_ffn, self.hidden), 0, expert=True),
                            Weight(f"{p}.mlp.experts.linear_fc2.weight{e}", (self.hidden, self.expert_ffn), 1, expert=True)]
                if self.shared_expert_ffn:
                    out += [Weight(f"{p}.mlp.shared_experts.linear_fc1.weight", (fc * self.shared_expert_ffn, self.hidden), 0),
                            Weight(f"{p}.mlp.shared_experts.linear_fc2.weight", (self.hidden, self.shared_expert_ffn), 1)]
            else:
                out += [Weight(f"{p}.mlp.linear_fc1.weight", (fc * self.ffn, self.hidden), 0),
                        Weight(f"{p}.mlp.linear_fc2.weight", (self.hidden, self.ffn), 1)]
        return out


PRESETS: dict[str, ModelSpec] = {
    # scripts/bench_optimizer_step.py's parameter set (calibration against our own measurements).
    "bench": ModelSpec("bench", hidden=256, layers=4, heads=8, query_groups=2, ffn=1024, gated=False),
    "gpt-1.3b": ModelSpec("gpt-1.3b", hidden=2048, layers=24, heads=16, query_groups=16, ffn=8192, gated=False),
    "llama3-8b": ModelSpec("llama3-8b", hidden=4096, layers=32, heads=32, query_groups=8, ffn=14336),
    "llama3-70b": ModelSpec("llama3-70b", hidden=8192, layers=80, heads=64, query_groups=8, ffn=28672),
    "llama3-405b": ModelSpec("llama3-405b", hidden=16384, layers=126, heads=128, query_groups=8, ffn=53248),
    "mixtral-8x7b": ModelSpec("mixtral-8x7b", hidden=4096, layers=32, heads=32, query_groups=8, ffn=14336,
                              experts=8, expert_ffn=14336),
    "qwen3-30b-a3b": ModelSpec("qwen3-30b-a3b", hidden=2048, layers=48, heads=32, query_groups=4, ffn=6144,
                               kv_channels=128, experts=128, expert_ffn=768),
    "qwen3-235b-a22b": ModelSpec("qwen3-235b-a22b", hidden=4096, layers=94, heads=64, query_groups=4, ffn=12288,
                                 kv_channels=128, experts=128, expert_ffn=1536),
}


def preset(name: str, **changes: int | bool) -> ModelSpec:
    if name not in PRESETS:
        raise ValueError(f"model: unknown preset {name!r}; presets: {sorted(PRESETS)}")
    return replace(PRESETS[name], **changes) if changes else PRESETS[name]


def from_hf_config(path: str | Path) -> ModelSpec:
    """A Hugging Face ``config.json`` read as plain JSON (Llama/Mistral/Qwen/Mixtral field names)."""
    try:
        c = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"hf config {str(path)!r}: cannot read it as JSON ({error})") from None

    def need(*keys: str) -> int:
        for key in keys:
            if key in c:
                return int(c[key])
        raise ValueError(f"hf config {str(path)!r}: none of {list(keys)} is set")

    heads = need("num_attention_heads")
    experts = int(c.get("num_experts", c.get("num_local_experts", 0)) or 0)
    return ModelSpec(
        name=str(c.get("_name_or_path") or c.get("model_type") or Path(path).stem),
        hidden=need("hidden_size"), layers=need("num_hidden_layers"), heads=heads,
        query_groups=int(c.get("num_key_value_heads") or heads), ffn=need("intermediate_size"),
        gated=str(c.get("hidden_act", "silu")) in ("silu", "swiglu", "gelu_pytorch_tanh") or "gate" in str(c.get("hidden_act")),
        kv_channels=int(c["head_dim"]) if c.get("head_dim") else None, experts=experts,
        expert_ffn=int(c.get("moe_intermediate_size") or (c["intermediate_size"] if experts else 0)),
        shared_expert_ffn=int(c.get("shared_expert_intermediate_size") or 0),
    )


@dataclass(frozen=True)
class MegatronLayout:
    tp: int
    pp: int
    ep: int
    etp: int
    dp: int | None


def from_megatron_args(args: Sequence[str]) -> tuple[ModelSpec, MegatronLayout]:
    """The model and layout of a Megatron-LM command line (its flag names; other flags are ignored)."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--hidden-size", type=int, required=True)
    p.add_argument("--num-layers", type=int, required=True)
    p.add_argument("--num-attention-heads", type=int, required=True)
    p.add_argument("--group-query-attention", action="store_true")
    p.add_argument("--num-query-groups", type=int, default=None)
    p.add_argument("--ffn-hidden-size", type=int, default=None)
    p.add_argument("--kv-channels", type=int, default=None)
    p.add_argument("--swiglu", action="store_true")
    p.add_argument("--num-experts", type=int, default=0)
    p.add_argument("--moe-ffn-hidden-size", type=int, default=None)
    p.add_argument("--moe-shared-expert-intermediate-size", type=int, default=0)
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--expert-model-parallel-size", type=int, default=1)
    p.add_argument("--expert-tensor-parallel-size", type=int, default=None)
    p.add_argument("--data-parallel-size", type=int, default=None)
    try:
        a, _ = p.parse_known_args(list(args))
    except SystemExit:
        raise ValueError(f"megatron args: need --hidden-size, --num-layers and --num-attention-heads ({' '.join(args)})") from None
    groups = a.num_query_groups if a.group_query_attention and a.num_query_groups else a.num_attention_heads
    ffn = a.ffn_hidden_size or (4 * a.hidden_size)
    model = ModelSpec("megatron", hidden=a.hidden_size, layers=a.num_layers, heads=a.num_attention_heads,
                      query_groups=groups, ffn=ffn, gated=a.swiglu, kv_channels=a.kv_channels, experts=a.num_experts,
                      expert_ffn=(a.moe_ffn_hidden_size or ffn) if a.num_experts else 0,
                      shared_expert_ffn=a.moe_shared_expert_intermediate_size)
    tp = a.tensor_model_parallel_size
    return model, MegatronLayout(tp, a.pipeline_model_parallel_size, a.expert_model_parallel_size,
                                 a.expert_tensor_parallel_size or tp, a.data_parallel_size)
