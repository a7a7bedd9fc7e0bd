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


def test_each_constructor_signature_is_its_settings() -> None:
    """The generated constructors: positional names where each library puts them, every keyword field, no fixed one,
    and the defaults the dataclass declares (inspect.signature is what MuonAdamW and the CLI read)."""
    import inspect

    from dist_ortho import MOP, Muon, MuonHyperball, PolarGrad, Scion
    from dist_ortho.integrations.megatron.optimizers import TensorParallelAdaptiveMuon, TensorParallelMuon
    from dist_ortho.optim.options import accepted_keywords

    def positional(cls: type) -> list[str]:
        return [p.name for p in inspect.signature(cls).parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]

    assert positional(Muon) == ["params", "lr", "momentum", "weight_decay"]  # Emerging-Optimizers' order
    assert positional(Scion) == ["params", "lr", "momentum"]
    assert positional(TensorParallelMuon)[:6] == ["params", "lr", "momentum", "nesterov", "weight_decay",
                                                  "use_decoupled_weight_decay"]  # megatron-core's
    assert positional(TensorParallelAdaptiveMuon)[-4:] == ["moment2_method", "beta2", "eps", "use_syrk"]
    for cls in (Muon, Scion, MOP, PolarGrad, MuonHyperball, TensorParallelMuon):
        keywords = {f.name: f for f in dataclasses.fields(cls.settings) if f.metadata["keyword"]}
        parameters = inspect.signature(cls).parameters
        assert set(parameters) - {"params"} == set(keywords) == set(accepted_keywords(cls)), cls.__name__
        for name, f in keywords.items():
            assert parameters[name].default == (inspect.Parameter.empty if f.default is dataclasses.MISSING
                                                else f.default), (cls.__name__, name)
        assert "Args:" in cls.__doc__ and all(f"{name}:" in cls.__doc__ for name in keywords), cls.__name__
    assert "weight_decay" not in inspect.signature(Scion).parameters  # fixed at 1 by Scion
    assert Scion.settings().weight_decay == 1.0
    assert "use_syrk" not in accepted_keywords(PolarGrad) and "scale_mode" not in accepted_keywords(PolarGrad)
    assert "num_ns_steps" not in accepted_keywords(MOP)


def test_an_option_declared_in_settings_reaches_groups_checks_and_plan_key() -> None:
    """Adding an option is one field: a member declaring one gets it in its signature, its groups, its check and
    (structural) its plan key, with no other edit."""
    import pytest
    import torch

    from dist_ortho import Muon
    from dist_ortho.optim.members.muon import MuonSettings
    from dist_ortho.optim.settings import number, option
    from dist_ortho.optim.settings import settings as make_settings

    @make_settings
    class DampedSettings(MuonSettings):
        damping: float = option(0.5, doc="a made-up option", check=number(0.0, 1.0), structural=True)

    class Damped(Muon):
        settings = DampedSettings

    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = Damped([p], damping=0.25)
    assert opt.param_groups[0]["damping"] == 0.25 and "damping" in Damped.structural_options
    key = opt.planner.key([p])
    opt.param_groups[0]["damping"] = 0.5
    assert opt.planner.key([p]) != key  # a new plan, agreed anew
    with pytest.raises(ValueError, match="damping"):
        Damped([p], damping=2.0)
    with pytest.raises(TypeError, match="unknown keyword argument.*dampin"):
        Damped([p], dampin=0.3)
    with pytest.raises(TypeError, match="unknown keyword argument"):
        Muon([p], damping=0.3)  # Muon itself does not take it
