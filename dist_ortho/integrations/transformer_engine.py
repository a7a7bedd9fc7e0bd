"""TransformerEngine integration: tag a TE model so that every weight gets the exact update.

TE marks weights through ``set_tensor_model_parallel_attributes``: ``tensor_model_parallel=True``,
``partition_dim`` 1 for ``parallel_mode="row"`` else 0, ``partition_stride=1``, for every parallel_mode,
including None (not sharded). :func:`tag_transformer_engine_model` therefore reads each module's
``parallel_mode`` and marks the weights of unsharded modules replicated. It also marks

- fused QKV (``MultiheadAttention`` with fused, interleaved QKV: ``layernorm_qkv.weight`` or
  ``qkv.weight``): ``is_qkv=True`` with ``qkv_split_shapes`` per query group;
- ``GroupedLinear`` weights ``weight0..weightN-1`` (one per expert): ``expert_tp=True``; a 3D weight [E, out, in]
  of one (single-parameter mode) also ``expert_stack=True``: E matrices (its ``partition_dim`` must then be a
  tensor dim of the matrices, 1 or 2, else the optimizer raises a ValueError: TE's convention for it is not
  verified here, TE being absent);
- embeddings (``torch.nn.Embedding``): ``is_embedding_or_output_parameter=True`` (AdamW in MuonAdamW).

LayerNormMLP's ``fc1_weight`` (rows sharded) and ``fc2_weight`` (columns sharded) need nothing more.
TE is not imported: the attribute protocol is all that is read, so this works wherever TE runs.
A non-interleaved fused QKV layout ([all q; all k; all v]) is not supported under TP.
"""

from __future__ import annotations

import re

import torch

from dist_ortho.parameters.qkv import qkv_split_shapes

_QKV_NAMES = ("layernorm_qkv", "qkv")
_EXPERT_WEIGHT = re.compile(r"weight\d+$")


def tag_transformer_engine_model(
    model: torch.nn.Module,
    num_attention_heads: int | None = None,
    num_query_groups: int | None = None,
    kv_channels: int | None = None,
    attention_output_gate: bool = False,
) -> None:
    """Tag the parameters of a TE model in place (head counts are needed only for fused QKV)."""
    shapes = None
    if num_attention_heads is not None:
        shapes = qkv_split_shapes(
            num_attention_heads, num_query_groups or num_attention_heads, kv_channels, gated=attention_output_gate
        )
    for module_name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if isinstance(module, torch.nn.Embedding):
            module.weight.is_embedding_or_output_parameter = True
        if hasattr(module, "parallel_mode") and module.parallel_mode is None:
            for _, p in own:
                p.tensor_model_parallel = False
        if type(module).__name__ == "GroupedLinear":
            for name, p in own:
                if _EXPERT_WEIGHT.match(name) or (name == "weight" and p.ndim == 3):
                    p.expert_tp = True
                if p.ndim == 3:
                    p.expert_stack = True
        if module_name.rsplit(".", 1)[-1] in _QKV_NAMES:
            weight = dict(own).get("weight")
            if weight is not None and weight.ndim == 2:
                if shapes is None:
                    raise ValueError(
                        f"{module_name}.weight is a fused QKV weight: pass num_attention_heads, num_query_groups "
                        "and kv_channels so that its Q, K and V can be orthogonalized apart"
                    )
                weight.is_qkv = True
                weight.qkv_split_shapes = shapes
