"""A small tensor-parallel GPT whose weights carry the Megatron / TransformerEngine attributes.

Column-parallel layers hold a block of output rows (partition_dim 0), row-parallel layers a block of
input columns (partition_dim 1). Attention uses a fused QKV weight laid out per query group,
[ng, (np/ng) hn q | hn k | hn v] as in Megatron's ``linear_qkv``, with grouped-query attention; each
TP rank holds ng / tp whole query groups. Every rank builds the full weights from the same seed and
keeps its block, so a model at any TP size starts from the same global weights.

:func:`parallelize_native` builds the same model the torch-native way instead: the full model
(``group=None, tp_size=T``) whose linears torch tensor parallel turns into DTensors (``parallelize_module``:
ColwiseParallel / RowwiseParallel over the mesh's "tp" dim) and FSDP2 shards over its "dp" dim
(``fully_shard``). Both hold the same global weights and compute the same losses.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dist_ortho import comm
from dist_ortho.parameters.qkv import qkv_split_shapes
from dist_ortho.tp import shard
from dist_ortho.train.moe import MoE


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 256
    seq_len: int = 128
    num_layers: int = 4
    hidden_size: int = 128
    num_attention_heads: int = 8
    num_query_groups: int = 2
    ffn_hidden_size: int = 512
    num_experts: int = 0  # > 0: every block's feed-forward is a mixture of experts (dist_ortho.train.moe)
    moe_topk: int = 1

    @property
    def kv_channels(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def check(self, tp_size: int) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must be a multiple of num_attention_heads={self.num_attention_heads}")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} must be a multiple of num_query_groups={self.num_query_groups}")
        if self.num_query_groups % tp_size or self.ffn_hidden_size % tp_size:
            raise ValueError(
                f"the TP size {tp_size} must divide num_query_groups={self.num_query_groups} and "
                f"ffn_hidden_size={self.ffn_hidden_size}"
            )
        if self.num_experts and not 1 <= self.moe_topk <= self.num_experts:
            raise ValueError(f"--topk {self.moe_topk} must be in [1, --experts {self.num_experts}]")
        if self.num_experts and tp_size > 1:
            raise ValueError(f"--experts {self.num_experts} runs without TP (--tp 1), got TP size {tp_size}")

    def as_dict(self) -> dict:
        """The fields (the MoE ones only for an MoE model: a dense model's checkpoints read as before)."""
        out = asdict(self)
        if not self.num_experts:
            del out["num_experts"], out["moe_topk"]
        return out


class _CopyToTP(torch.autograd.Function):
    """Identity forward; all-reduce of the gradient backward (input of column-parallel layers)."""

    @staticmethod
    def forward(ctx, x, group):  # type: ignore[override]
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return comm.all_reduce(grad.contiguous(), ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    """All-reduce forward; identity backward (output of row-parallel layers)."""

    @staticmethod
    def forward(ctx, x, group):  # type: ignore[override]
        return comm.all_reduce(x.contiguous(), group)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad, None


def _tp_parameter(full: torch.Tensor, partition_dim: int, group: dist.ProcessGroup | None) -> nn.Parameter:
    size, rank = comm.group_size(group), comm.group_rank(group)
    p = nn.Parameter(shard(full, partition_dim, rank, size))
    p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, partition_dim, 1
    return p


class _Linear(nn.Linear):
    """A bias-free linear holding a TP block (an nn.Linear, so that torch tensor parallel can take it too)."""

    def __init__(self, full_weight: torch.Tensor, group: dist.ProcessGroup | None, partition_dim: int):
        nn.Module.__init__(self)
        self.out_features, self.in_features = full_weight.shape
        self.group = group
        self.weight = _tp_parameter(full_weight, partition_dim, group)
        self.bias = None


class ColumnParallelLinear(_Linear):
    def __init__(self, full_weight: torch.Tensor, group: dist.ProcessGroup | None):
        super().__init__(full_weight, group, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(_CopyToTP.apply(x, self.group), self.weight)


class RowParallelLinear(_Linear):
    def __init__(self, full_weight: torch.Tensor, group: dist.ProcessGroup | None):
        super().__init__(full_weight, group, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ReduceFromTP.apply(F.linear(x, self.weight), self.group)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, group: dist.ProcessGroup | None, gen: torch.Generator, tp_size: int):
        super().__init__()
        c = config
        std, out_std = 0.02, 0.02 / (2 * c.num_layers) ** 0.5
        self.config, self.tp = c, tp_size
        self.norm1, self.norm2 = nn.LayerNorm(c.hidden_size), nn.LayerNorm(c.hidden_size)
        qkv_rows = c.num_query_groups * sum(qkv_split_shapes(c.num_attention_heads, c.num_query_groups, c.kv_channels))
        self.linear_qkv = ColumnParallelLinear(torch.randn(qkv_rows, c.hidden_size, generator=gen) * std, group)
        self.linear_proj = RowParallelLinear(torch.randn(c.hidden_size, c.hidden_size, generator=gen) * out_std, group)
        if c.num_experts:
            E, F_, H = c.num_experts, c.ffn_hidden_size, c.hidden_size
            self.moe = MoE(torch.randn(E, H, generator=gen) * std, torch.randn(E, F_, H, generator=gen) * std,
                           torch.randn(E, H, F_, generator=gen) * out_std, torch.randn(E, F_, H, generator=gen) * std,
                           c.moe_topk)
        else:
            self.fc1 = ColumnParallelLinear(torch.randn(c.ffn_hidden_size, c.hidden_size, generator=gen) * std, group)
            self.fc2 = RowParallelLinear(torch.randn(c.hidden_size, c.ffn_hidden_size, generator=gen) * out_std, group)
        self.mark_qkv()

    def mark_qkv(self) -> None:
        c = self.config
        self.linear_qkv.weight.is_qkv = True
        self.linear_qkv.weight.qkv_split_shapes = qkv_split_shapes(c.num_attention_heads, c.num_query_groups, c.kv_channels)

    # --qk-clip: armed with a (num_attention_heads,) tensor, each forward max-merges into it every head's largest
    # pre-softmax logit (this rank's heads; the other TP ranks' stay as armed, -inf); None: nothing recorded
    max_logits: torch.Tensor | None = None

    @torch.no_grad()
    def _record_max_logits(self, q: torch.Tensor, k: torch.Tensor) -> None:
        T, heads = q.size(2), q.size(1)
        logits = (q @ k.transpose(-1, -2)) * q.size(-1) ** -0.5
        logits = logits.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        start = comm.group_rank(self.linear_qkv.group) * heads
        mine = self.max_logits[start : start + heads]
        mine.copy_(torch.maximum(mine, logits.amax(dim=(0, 2, 3)).to(mine)))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        B, T, _ = x.shape
        groups = c.num_query_groups // self.tp
        per_group = c.num_attention_heads // c.num_query_groups
        qkv = self.linear_qkv(x).view(B, T, groups, per_group + 2, c.kv_channels)
        q, k, v = qkv.split([per_group, 1, 1], dim=3)
        q = q.reshape(B, T, groups * per_group, c.kv_channels).transpose(1, 2)
        k = k.expand(-1, -1, -1, per_group, -1).reshape(B, T, groups * per_group, c.kv_channels).transpose(1, 2)
        v = v.expand(-1, -1, -1, per_group, -1).reshape(B, T, groups * per_group, c.kv_channels).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if self.max_logits is not None:
            self._record_max_logits(q, k)
        return self.linear_proj(out.transpose(1, 2).reshape(B, T, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        if self.config.num_experts:
            return x + self.moe(self.norm2(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, group: dist.ProcessGroup | None = None, seed: int = 0, tp_size: int | None = None):
        """``tp_size``: the TP size the heads are split over (default: ``group``'s; set it with group=None for
        :func:`parallelize_native`)."""
        super().__init__()
        tp_size = tp_size if tp_size is not None else comm.group_size(group)
        config.check(tp_size)
        gen = torch.Generator().manual_seed(seed)
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position = nn.Embedding(config.seq_len, config.hidden_size)
        with torch.no_grad():
            self.embedding.weight.copy_(torch.randn(config.vocab_size, config.hidden_size, generator=gen) * 0.02)
            self.position.weight.copy_(torch.randn(config.seq_len, config.hidden_size, generator=gen) * 0.02)
        self.blocks = nn.ModuleList(Block(config, group, gen, tp_size) for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(config.hidden_size)
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        with torch.no_grad():
            self.output.weight.copy_(torch.randn(config.vocab_size, config.hidden_size, generator=gen) * 0.02)
        self.mark_embeddings()

    def mark_embeddings(self) -> None:
        for p in (self.embedding.weight, self.position.weight, self.output.weight):
            p.is_embedding_or_output_parameter = True

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.embedding(tokens) + self.position.weight[: tokens.size(1)]
        for block in self.blocks:
            x = block(x)
        logits = self.output(self.norm(x))
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))


def parallelize_native(model: GPT, mesh) -> GPT:
    """``model`` (built with group=None and tp_size = the mesh's "tp" size) as torch-native DTensors: linears
    over "tp" by ``parallelize_module``, every block and the whole model sharded over "dp" by ``fully_shard``."""
    names = mesh.mesh_dim_names
    if "tp" in names:
        tensor_parallel_native(model, mesh["tp"] if mesh.ndim > 1 else mesh)
    return shard_native(model, (mesh["dp"] if mesh.ndim > 1 else mesh) if "dp" in names else None)


def tensor_parallel_native(model: GPT, tp_mesh) -> None:
    """Every block's linears over ``tp_mesh`` by ``parallelize_module``: QKV and fc1 colwise, proj and fc2 rowwise."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    plan = {"linear_qkv": ColwiseParallel(), "linear_proj": RowwiseParallel(), "fc1": ColwiseParallel(),
            "fc2": RowwiseParallel()}
    for block in model.blocks:
        parallelize_module(block, tp_mesh, plan)


def shard_native(model: GPT, dp_mesh) -> GPT:
    """Every block and the whole model sharded over ``dp_mesh`` by ``fully_shard`` (None: not sharded), then the
    DTensor parameters marked again (QKV, embeddings): the new parameters carry no attributes."""
    from torch.distributed.fsdp import fully_shard

    if dp_mesh is not None:
        for block in model.blocks:
            fully_shard(block, mesh=dp_mesh)
        fully_shard(model, mesh=dp_mesh)
    for block in model.blocks:
        block.mark_qkv()
    model.mark_embeddings()
    return model
