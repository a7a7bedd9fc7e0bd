"""Megatron-core's ``TensorParallelMuon`` and ``TensorParallelAdaptiveMuon``, on dist_ortho's exact TP.

One constructor serves both Megatron generations: megatron-core 0.16's keywords (``momentum_beta``,
``use_nesterov``, ``mode``) and megatron-core >= 0.17's (``momentum``, ``nesterov``, ``tp_mode``,
``use_syrk``) name the same positions, so positional calls of either work too.

TP modes: every dist_ortho mode (duplicated, distributed, gram, home, auto: exact), and Megatron's
``"blockwise"``, which orthogonalizes each TP shard alone and scales it by the *shard's* shape, exactly as
megatron-core does (so a run reproduces under its name). It is NOT exact: the update changes with the TP
size; ``"megatron_blockwise"`` is the same mode under a name that says whose it is.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from dist_ortho import comm
from dist_ortho.optim.holding import owns
from dist_ortho.optim.members.adaptive import AdaptiveMuon, AdaptiveMuonSettings
from dist_ortho.optim.members.muon import Muon, MuonSettings
from dist_ortho.optim.settings import option, settings
from dist_ortho.tp import TP_MODES

MEGATRON_BLOCKWISE = ("blockwise", "megatron_blockwise")
MEGATRON_TP_MODES: tuple[str, ...] = tuple(m for m in TP_MODES if m != "blockwise") + MEGATRON_BLOCKWISE
_UNSET: Any = object()
# Megatron's OptimizerParamScheduler sets these in every group at every step (and when it is loaded).
SCHEDULED = ("lr", "weight_decay")
logger = logging.getLogger(__name__)


def _one_of(new_name: str, new: Any, old_name: str, old: Any, default: Any) -> Any:
    """The value of a keyword that megatron-core renamed; both given and different is an error."""
    if new is not _UNSET and old is not None and new != old:
        raise ValueError(f"{new_name}={new!r} and {old_name}={old!r} (its megatron-core 0.16 name) disagree: pass one")
    if old is not None:
        return old
    return default if new is _UNSET else new


def _groups(pg_collection: Any, tp_group: Any, expert_tp_group: Any, tp_mode: str) -> dict[str, Any]:
    if tp_mode in MEGATRON_BLOCKWISE:  # every shard a whole matrix of its own (local shape, local scale)
        return {"tp_group": None, "expert_tp_group": None, "tp_mode": "blockwise"}
    if tp_mode not in MEGATRON_TP_MODES:
        raise ValueError(f"tp_mode must be one of {MEGATRON_TP_MODES}, got {tp_mode!r}")
    return {
        "tp_group": tp_group if tp_group is not None else getattr(pg_collection, "tp", None),
        "expert_tp_group": expert_tp_group if expert_tp_group is not None else getattr(pg_collection, "expt_tp", None),
        "tp_mode": tp_mode,
    }


@settings(momentum=0.95, nesterov=True, split_qkv=False, fixed=dict(weight_decay_method="decoupled"))
class MegatronMuonSettings(MuonSettings):
    """megatron-core's keywords of its TensorParallelMuon (both generations): Muon's, with its defaults, and
    0.16's names as aliases."""

    use_decoupled_weight_decay: bool = option(True, scope="alias", doc="decoupled weight decay, else l2")
    pg_collection: Any = option(None, scope="optimizer", doc="megatron-core's process groups (tp, expt_tp)")
    momentum_beta: float | None = option(None, scope="alias", doc="megatron-core 0.16's name of momentum")
    use_nesterov: bool | None = option(None, scope="alias", doc="megatron-core 0.16's name of nesterov")
    mode: str | None = option(None, scope="alias", doc="megatron-core 0.16's name of tp_mode")


@settings(momentum=0.95, nesterov=True, split_qkv=False, fixed=dict(weight_decay_method="decoupled"))
class MegatronAdaptiveMuonSettings(AdaptiveMuonSettings, MegatronMuonSettings):
    """megatron-core >= 0.17's TensorParallelAdaptiveMuon: Megatron's Muon keywords and the second moment's (the
    defaults again: AdaptiveMuonSettings, first so that its own eps wins over the torch alias, carries Muon's)."""


MEGATRON_POSITIONAL = ("lr", "momentum", "nesterov", "weight_decay", "use_decoupled_weight_decay", "split_qkv",
                       "is_qkv_fn", "qkv_split_shapes", "fp32_matmul_prec", "coefficient_type", "num_ns_steps",
                       "scale_mode", "extra_scale_factor", "pg_collection", "tp_mode")


def megatron_names(options: dict[str, Any], given: frozenset[str]) -> dict[str, Any]:
    """megatron-core's keywords as Muon's: 0.16's names (momentum_beta, use_nesterov, mode), the weight decay
    method, and the TP groups from pg_collection (or none at all for Megatron's blockwise)."""
    def one_of(name: str, old_name: str) -> Any:
        return _one_of(name, options[name] if name in given else _UNSET, old_name, options.pop(old_name), options[name])
    options["momentum"] = one_of("momentum", "momentum_beta")
    options["nesterov"] = one_of("nesterov", "use_nesterov")
    tp_mode = one_of("tp_mode", "mode")
    options["weight_decay_method"] = "decoupled" if options.pop("use_decoupled_weight_decay") else "l2"
    options.update(_groups(options["pg_collection"], options["tp_group"], options["expert_tp_group"], tp_mode))
    return options


class MegatronResume:
    """How Megatron's optimizers load a checkpoint, for dist_ortho's.

    - Group options the checkpoint lacks (one written by megatron-core's own Muon has none of dist_ortho's,
      e.g. ``conv_mode``) take the values configured now, and so do options it has: the command line wins
      over stored hyper-parameters (momentum, tp_mode, Newton-Schulz steps, ...), except ``lr`` and
      ``weight_decay``, which Megatron's scheduler owns. Replaced stored values are logged.
    - On the DP x TP grid (layer-wise), state loaded for matrices another replica owns is dropped.
    """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        configured = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        super().load_state_dict(state_dict)  # type: ignore[misc]
        replaced: dict[str, tuple[Any, Any]] = {}
        for group, now in zip(self.param_groups, configured):
            for key, value in now.items():
                if key in SCHEDULED and key in group:
                    continue
                if key in group and not _same(group[key], value):
                    replaced[key] = (group[key], value)
                group[key] = value
        if replaced:
            logger.info("%s: the configured values replace the checkpoint's: %s", type(self).__name__,
                        ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in sorted(replaced.items())))
        if comm.group_size(self.dp_group) > 1:
            for p in [p for p in self.state if not owns(self, p)]:
                del self.state[p]


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except (RuntimeError, TypeError, ValueError):
        return a is b


class TensorParallelMuon(MegatronResume, Muon):
    """megatron-core's ``TensorParallelMuon`` (either generation's keywords), exact under TP.

    Differences from megatron-core: every dist_ortho TP mode; fused QKV split exactly also when
    TP > num_query_groups; expert weights on ``pg_collection.expt_tp``; ``"blockwise"`` as Megatron's.
    """

    settings = MegatronMuonSettings
    positional = (*MEGATRON_POSITIONAL, "use_syrk")

    @classmethod
    def translate(cls, options: dict[str, Any], given: frozenset[str]) -> dict[str, Any]:
        return super().translate(megatron_names(options, given), given)


class TensorParallelAdaptiveMuon(MegatronResume, AdaptiveMuon):
    """megatron-core >= 0.17's ``TensorParallelAdaptiveMuon``: Muon's keywords plus ``moment2_method``
    ("adamuon" or "normuon"; dist_ortho also has "namo"), ``beta2`` and ``eps``."""

    settings = MegatronAdaptiveMuonSettings
    positional = (*MEGATRON_POSITIONAL, "moment2_method", "beta2", "eps", "use_syrk")

    @classmethod
    def translate(cls, options: dict[str, Any], given: frozenset[str]) -> dict[str, Any]:
        return super().translate(megatron_names(options, given), given)


def init_state(opt: Any, config: Any = None) -> None:
    """megatron-core's ``init_state_fn``: momentum buffers for parameters without state (its checkpoint
    loading needs every state tensor before the first step)."""
    for group in opt.param_groups:
        for p in group["params"]:
            if not opt.state[p]:
                opt.state[p]["momentum_buffer"] = torch.zeros_like(p.data)
