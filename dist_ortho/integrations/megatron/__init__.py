"""Megatron-LM integration, both megatron-core generations (0.16; >= 0.17 / Megatron-LM main).

Zero-edit switch (:func:`install`, or ``python -m dist_ortho.integrations.megatron pretrain_gpt.py ARGS``);
drop-in ``TensorParallelMuon`` / ``TensorParallelAdaptiveMuon`` (:mod:`.optimizers`); megatron-core 0.16's
factory ``get_megatron_muon_optimizer`` (:mod:`.factory`); the ``--muon-*`` flags (:mod:`.args`); how the
model's parameters are tagged (:mod:`.params`). megatron-core is imported lazily: this package imports
without it.
"""

from dist_ortho.integrations.megatron.args import add_muon_args, muon_settings
from dist_ortho.integrations.megatron.factory import get_megatron_muon_optimizer, wrap_like_megatron
from dist_ortho.integrations.megatron.install import generation, install
from dist_ortho.integrations.megatron.optimizers import (
    MEGATRON_TP_MODES,
    TensorParallelAdaptiveMuon,
    TensorParallelMuon,
    init_state,
)
from dist_ortho.integrations.megatron.params import (
    copy_tags_to_main_params,
    is_matrix_param,
    megatron_qkv_split_shapes,
    tag_megatron_params,
)

__all__ = [
    "MEGATRON_TP_MODES", "TensorParallelAdaptiveMuon", "TensorParallelMuon", "add_muon_args", "copy_tags_to_main_params",
    "generation", "get_megatron_muon_optimizer", "init_state", "install", "is_matrix_param", "megatron_qkv_split_shapes",
    "muon_settings", "tag_megatron_params", "wrap_like_megatron",
]
