"""The option declarations of dist_ortho.optim.settings: the plan key's options come from them."""

from __future__ import annotations

import dataclasses

from dist_ortho.optim import base, settings


def test_structural_options_are_the_declared_structural_fields() -> None:
    assert base.STRUCTURAL_OPTIONS is settings.STRUCTURAL_OPTIONS
    assert set(settings.STRUCTURAL_OPTIONS) == {
        "tp_mode", "coalesce", "fp32_matmul_prec", "ns_dtype", "local_gram", "batch_matrices", "nonfinite",
        "conv_mode", "split_qkv", "qkv_split_shapes", "qkv_per_head", "per_head", "num_ns_steps",
        "coefficient_type", "custom_coefficient_sets", "use_syrk", "ns_eps",
    }
    assert len(set(settings.STRUCTURAL_OPTIONS)) == len(settings.STRUCTURAL_OPTIONS)


def test_every_option_has_a_doc_line_and_settings_are_frozen() -> None:
    for field in dataclasses.fields(settings.NewtonSchulzSettings):
        assert field.metadata["doc"], field.name
    assert settings.NewtonSchulzSettings.__dataclass_params__.frozen
