"""The zero-edit switch: after :func:`install`, Megatron-LM's ``--optimizer muon|dist_muon|adaptive_muon``
builds dist_ortho's optimizers, with no Megatron file changed.

- megatron-core 0.16: ``megatron.core.optimizer.muon``'s ``get_megatron_muon_optimizer`` and
  ``TensorParallelMuon`` (and ``megatron.training.training``'s imported name, where it is loaded) point at
  dist_ortho's (:mod:`.factory`); ``dist_muon`` runs on the DP x TP grid.
- megatron-core >= 0.17 (Megatron-LM main): the emerging-optimizer registry's "muon" and "adaptive_muon"
  entries build dist_ortho's TensorParallelMuon / TensorParallelAdaptiveMuon; megatron-core's own
  ``get_megatron_optimizer`` keeps building the param groups, the Adam part, the wrappers, the expert
  split and the layer-wise optimizer around them.
- Both: Megatron's argument parser (``add_megatron_arguments``) gets :func:`.args.add_muon_args`'
  additions, so ``--muon-tp-mode gram|home|auto`` parses and the flags Megatron lacks exist.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from typing import Any

from dist_ortho.integrations.megatron.args import adaptive_muon_settings, add_muon_args, optimizer_kwargs
from dist_ortho.integrations.megatron.factory import get_megatron_muon_optimizer
from dist_ortho.integrations.megatron.optimizers import TensorParallelAdaptiveMuon, TensorParallelMuon, init_state
from dist_ortho.integrations.megatron.params import tag_megatron_params


def generation() -> str:
    """"0.16" (Muon in megatron.core.optimizer.muon) or "registry" (megatron-core >= 0.17)."""
    return "registry" if importlib.util.find_spec("megatron.core.optimizer.emerging_optimizers") else "0.16"


def _registry_kwargs(adaptive: bool):
    def config_to_kwargs(config: Any, model_chunks: list, pg_collection: Any) -> dict[str, Any]:
        tag_megatron_params(model_chunks)  # QKV also where TP > query groups (megatron-core skips those)
        kwargs = optimizer_kwargs(config, model_chunks, pg_collection)
        return {**kwargs, **adaptive_muon_settings(config)} if adaptive else kwargs
    return config_to_kwargs


# What install() replaced, by (module, name), so that megatron-core's own stays reachable (upstream()).
_REPLACED: dict[tuple[str, str], Any] = {}


def _replace(module: Any, name: str, value: Any) -> None:
    _REPLACED.setdefault((module.__name__, name), getattr(module, name))
    setattr(module, name, value)


def upstream(module: str, name: str) -> Any:
    """megatron-core's own ``module.name`` (e.g. its TensorParallelMuon), also after install() replaced it."""
    return _REPLACED.get((module, name)) or getattr(importlib.import_module(module), name)


def _install_registry() -> None:
    registry = importlib.import_module("megatron.core.optimizer.emerging_optimizers")
    for name, cls, adaptive in (("muon", TensorParallelMuon, False), ("adaptive_muon", TensorParallelAdaptiveMuon, True)):
        entry = registry._EMERGING_OPTIMIZERS.get(name)
        if entry is None:
            raise RuntimeError(f"megatron-core's emerging-optimizer registry has no {name!r} entry: "
                               "is emerging-optimizers installed (pip install emerging-optimizers)?")
        registry._EMERGING_OPTIMIZERS[name] = registry.EmergingOptimizerEntry(
            optimizer_cls=cls, init_state_fn=init_state, config_to_kwargs=_registry_kwargs(adaptive),
            default_param_overrides=entry.default_param_overrides,
        )
    # The module's own class names stay megatron-core's: its TensorParallelAdaptiveMuon calls
    # TensorParallelMuon.__init__ by that name.


def _install_016() -> None:
    muon = importlib.import_module("megatron.core.optimizer.muon")
    _replace(muon, "get_megatron_muon_optimizer", get_megatron_muon_optimizer)
    _replace(muon, "TensorParallelMuon", TensorParallelMuon)
    training = sys.modules.get("megatron.training.training")
    if training is not None and hasattr(training, "get_megatron_muon_optimizer"):
        _replace(training, "get_megatron_muon_optimizer", get_megatron_muon_optimizer)


def _install_args() -> None:
    try:
        arguments = importlib.import_module("megatron.training.arguments")
    except ImportError:  # megatron-core alone: its 0.16 wheel has no megatron.training
        return
    original = getattr(arguments.add_megatron_arguments, "__wrapped__", arguments.add_megatron_arguments)

    def add_megatron_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        return add_muon_args(original(parser))

    add_megatron_arguments.__wrapped__ = original  # type: ignore[attr-defined]
    arguments.add_megatron_arguments = add_megatron_arguments


def install() -> str:
    """Switch Megatron to dist_ortho's Muon family (idempotent); returns the generation found.

    Call it before Megatron parses its arguments and builds the optimizer, or launch with
    ``python -m dist_ortho.integrations.megatron pretrain_gpt.py ARGS``.
    """
    found = generation()
    _install_registry() if found == "registry" else _install_016()
    _install_args()
    return found
