"""The real TransformerEngine, where it imports (it needs CUDA): tagging reads exactly what TE sets.

Skipped elsewhere, with the import error as the printed reason.
"""

import pytest
import torch

try:
    import transformer_engine.pytorch as te
except Exception as e:  # ImportError without TE; other errors where TE is installed but CUDA is missing
    pytest.skip(f"transformer_engine.pytorch does not import here ({type(e).__name__}: {e})", allow_module_level=True)

from dist_ortho import MuonAdamW  # noqa: E402
from dist_ortho.integrations.transformer_engine import tag_transformer_engine_model  # noqa: E402


def test_tagging_real_te_modules():
    model = torch.nn.ModuleDict({
        "attn": te.MultiheadAttention(64, 8, num_gqa_groups=2, fuse_qkv_params=True, input_layernorm=True),
        "mlp": te.LayerNormMLP(64, 128),
        "plain": te.Linear(64, 64),
    }).cuda()
    tag_transformer_engine_model(model, num_attention_heads=8, num_query_groups=2, kv_channels=8)
    qkv = model["attn"].layernorm_qkv.weight
    assert qkv.is_qkv and qkv.qkv_split_shapes == [32, 8, 8]
    assert model["mlp"].fc1_weight.partition_dim == 0 and model["mlp"].fc2_weight.partition_dim == 1
    assert model["plain"].weight.tensor_model_parallel is False  # parallel_mode=None: not sharded
    opt = MuonAdamW(model.named_parameters(), lr=0.01)
    out = model["mlp"](torch.randn(4, 64, device="cuda"))
    out.sum().backward()
    opt.step()
