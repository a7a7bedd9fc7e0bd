"""Stand-ins for TransformerEngine modules (TE cannot be imported without CUDA).

They set exactly the attributes TE sets, and nothing else:
- ``Linear`` / ``LayerNormLinear`` (transformer_engine/pytorch/module/linear.py, layernorm_linear.py):
  ``set_tensor_model_parallel_attributes(weight, is_parallel=True, dim=1 if parallel_mode == "row" else 0,
  stride=1)`` for every parallel_mode, None included; the module keeps ``parallel_mode``.
  LayerNormLinear's ``layer_norm_weight`` / ``layer_norm_bias`` get no TP attributes.
- ``LayerNormMLP`` (layernorm_mlp.py): ``fc1_weight`` dim 0, ``fc2_weight`` dim 1, is_parallel=True.
- ``MultiheadAttention`` (attention/multi_head_attention.py) with fuse_qkv_params=True, input_layernorm=True
  and interleaved QKV: a ``layernorm_qkv`` LayerNormLinear ("column") whose rows are
  [ng, (np/ng) hn q | hn k | hn v] (gated: q | gate | k | v), and a ``proj`` Linear ("row").
- ``GroupedLinear`` (grouped_linear.py): ``weight0 .. weight{N-1}``, each marked as Linear marks its weight.
Each is built from the FULL weights and keeps this rank's block, so that a TP run can be checked
against a one-device run on the same full weights.
"""

from __future__ import annotations

import torch
from torch import nn


def _mark(p: nn.Parameter, parallel_mode: str | None) -> nn.Parameter:
    p.tensor_model_parallel = True
    p.partition_dim = 1 if parallel_mode == "row" else 0
    p.partition_stride = 1
    return p


def _block(full: torch.Tensor, parallel_mode: str | None, rank: int, tp: int) -> torch.Tensor:
    if parallel_mode is None or tp == 1:
        return full.clone()
    dim = 1 if parallel_mode == "row" else 0
    return torch.tensor_split(full, tp, dim=dim)[rank].clone()


class Linear(nn.Module):
    def __init__(self, full: torch.Tensor, parallel_mode: str | None, rank: int = 0, tp: int = 1):
        super().__init__()
        self.parallel_mode = parallel_mode
        self.weight = _mark(nn.Parameter(_block(full, parallel_mode, rank, tp)), parallel_mode)


class LayerNormLinear(Linear):
    def __init__(self, full: torch.Tensor, parallel_mode: str | None, rank: int = 0, tp: int = 1):
        super().__init__(full, parallel_mode, rank, tp)
        self.layer_norm_weight = nn.Parameter(torch.ones(full.size(1)))
        self.layer_norm_bias = nn.Parameter(torch.zeros(full.size(1)))


class LayerNormMLP(nn.Module):
    def __init__(self, fc1: torch.Tensor, fc2: torch.Tensor, rank: int = 0, tp: int = 1):
        super().__init__()
        self.set_parallel_mode = True
        self.layer_norm_weight = nn.Parameter(torch.ones(fc1.size(1)))
        self.fc1_weight = _mark(nn.Parameter(_block(fc1, "column", rank, tp)), "column")
        self.fc2_weight = _mark(nn.Parameter(_block(fc2, "row", rank, tp)), "row")


class MultiheadAttention(nn.Module):
    def __init__(self, qkv: torch.Tensor, proj: torch.Tensor, rank: int = 0, tp: int = 1):
        super().__init__()
        self.layernorm_qkv = LayerNormLinear(qkv, "column", rank, tp)
        self.proj = Linear(proj, "row", rank, tp)


class GroupedLinear(nn.Module):
    def __init__(self, fulls: list[torch.Tensor], parallel_mode: str, rank: int = 0, tp: int = 1):
        super().__init__()
        self.parallel_mode = parallel_mode
        self.num_gemms = len(fulls)
        for i, full in enumerate(fulls):
            self.register_parameter(f"weight{i}", _mark(nn.Parameter(_block(full, parallel_mode, rank, tp)), parallel_mode))
