"""How a Megatron model's parameters are read: fused QKV and its split, expert weights, names, and what
megatron-core's master copies lose.

Megatron marks its TP shards itself (``tensor_model_parallel``, ``partition_dim``); dist_ortho adds
``is_qkv`` / ``qkv_split_shapes`` on ``linear_qkv.weight`` (split from the model config: heads, query
groups, kv_channels, output gate), ``expert_tp`` on expert weights (a name with "experts" and not
"shared", megatron-core's rule). :func:`megatron_param_names` names the parameters for the optimizer.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from dist_ortho.parameters.protocol import GTP_ATTRIBUTES
from dist_ortho.parameters.qkv import qkv_split_shapes

# What tag_megatron_params sets. megatron-core's fp32 master copies (Float16OptimizerWithFloat16Params)
# copy only its own tensor-parallel attributes, so copy_tags_to_main_params copies these onto them.
TAGS = ("expert_tp", "is_qkv", "qkv_split_shapes")



def megatron_qkv_split_shapes(config: Any) -> list[int]:
    """[q, k, v] (or [q, gate, k, v]) rows per query group from a Megatron TransformerConfig."""
    heads = config.num_attention_heads
    groups = config.num_query_groups or heads
    kv_channels = config.kv_channels or config.hidden_size // heads
    return qkv_split_shapes(heads, groups, kv_channels, gated=getattr(config, "attention_output_gate", False))


def chunks_qkv_split_shapes(model_chunks: Sequence[torch.nn.Module]) -> list[int] | None:
    """The model's QKV split (every chunk has the same config), None for chunks without a config."""
    configs = [c.config for c in model_chunks if getattr(c, "config", None) is not None]
    return megatron_qkv_split_shapes(configs[0]) if configs else None


def megatron_param_names(model_chunks: Sequence[torch.nn.Module]) -> dict[str, torch.Tensor]:
    """{name: parameter} of every chunk (prefixed "chunk<i>." when there are several), for ``param_names=``."""
    prefix = len(model_chunks) > 1
    return {(f"chunk{i}." if prefix else "") + name: p
            for i, chunk in enumerate(model_chunks) for name, p in chunk.named_parameters()}


def tag_megatron_params(model_chunks: Iterable[torch.nn.Module]) -> None:
    """Mark fused QKV weights (with their split) and expert weights.

    ``linear_qkv.weight`` -> ``is_qkv=True`` and ``qkv_split_shapes`` from the chunk's config; a name
    containing "experts" but not "shared" -> ``expert_tp=True`` (the expert TP group is used for it).
    """
    for chunk in model_chunks:
        config = getattr(chunk, "config", None)
        shapes = megatron_qkv_split_shapes(config) if config is not None else None
        for name, p in chunk.named_parameters():
            if "experts" in name and "shared" not in name:
                p.expert_tp = True
            if name.endswith("linear_qkv.weight") and p.ndim == 2:
                if shapes is None:
                    raise ValueError(f"{name}: the model chunk has no .config to read the QKV split from")
                p.is_qkv = True
                p.qkv_split_shapes = shapes


def copy_tags_to_main_params(wrapped: Any) -> None:
    """Copy TAGS (and a GTP weight's GTP_ATTRIBUTES) from each model parameter to its fp32 master copy in a megatron-core
    Float16 wrapper."""
    for model_group, main_group in zip(getattr(wrapped, "float16_groups", []), getattr(wrapped, "fp32_from_float16_groups", [])):
        for model_param, main_param in zip(model_group, main_group):
            gtp = getattr(model_param, "is_gtp_weight_remat", False) is True
            for tag in TAGS + (GTP_ATTRIBUTES if gtp else ()):  # megatron-core copies only is_gtp_weight_remat
                if hasattr(model_param, tag):
                    setattr(main_param, tag, getattr(model_param, tag))


def is_matrix_param(p: torch.Tensor) -> bool:
    """Muon-family candidates: 2D, not embedding/output, not flagged use_muon=False."""
    return (
        p.ndim == 2
        and not getattr(p, "is_embedding_or_output_parameter", False)
        and getattr(p, "use_muon", True) is not False
    )
