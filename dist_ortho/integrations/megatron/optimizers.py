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
from collections.abc import Callable, Sequence
from typing import Any

import torch

from dist_ortho import comm
from dist_ortho.optim.members.adaptive import AdaptiveMuon
from dist_ortho.optim.holding import owns
from dist_ortho.optim.members.muon import Muon
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


def _muon_options(
    momentum: Any, momentum_beta: float | None, nesterov: Any, use_nesterov: bool | None, tp_mode: Any, mode: str | None,
    use_decoupled_weight_decay: bool, pg_collection: Any, tp_group: Any, expert_tp_group: Any,
) -> dict[str, Any]:
    resolved_mode = _one_of("tp_mode", tp_mode, "mode", mode, "duplicated")
    return {
        "momentum": _one_of("momentum", momentum, "momentum_beta", momentum_beta, 0.95),
        "nesterov": _one_of("nesterov", nesterov, "use_nesterov", use_nesterov, True),
        "weight_decay_method": "decoupled" if use_decoupled_weight_decay else "l2",
        **_groups(pg_collection, tp_group, expert_tp_group, resolved_mode),
    }


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

    def __init__(
        self,
        params: Any,
        lr: float = 3e-4,
        momentum: float = _UNSET,
        nesterov: bool = _UNSET,
        weight_decay: float = 0.01,
        use_decoupled_weight_decay: bool = True,
        split_qkv: bool = False,
        is_qkv_fn: Callable[[torch.Tensor], bool] | None = None,
        qkv_split_shapes: Sequence[int] | None = None,
        fp32_matmul_prec: str = "medium",
        coefficient_type: str = "quintic",
        num_ns_steps: int = 5,
        scale_mode: str = "spectral",
        extra_scale_factor: float = 1.0,
        pg_collection: Any = None,
        tp_mode: str = _UNSET,
        use_syrk: bool = False,
        *,
        momentum_beta: float | None = None,
        use_nesterov: bool | None = None,
        mode: str | None = None,
        tp_group: Any = None,
        expert_tp_group: Any = None,
        **kwargs: Any,
    ) -> None:
        self.pg_collection = pg_collection
        options = _muon_options(momentum, momentum_beta, nesterov, use_nesterov, tp_mode, mode,
                                use_decoupled_weight_decay, pg_collection, tp_group, expert_tp_group)
        super().__init__(
            params, lr, options.pop("momentum"), weight_decay, fp32_matmul_prec=fp32_matmul_prec,
            coefficient_type=coefficient_type, num_ns_steps=num_ns_steps, scale_mode=scale_mode,
            extra_scale_factor=extra_scale_factor, use_syrk=use_syrk, split_qkv=split_qkv,
            qkv_split_shapes=qkv_split_shapes, is_qkv_fn=is_qkv_fn, **options, **kwargs,
        )


class TensorParallelAdaptiveMuon(MegatronResume, AdaptiveMuon):
    """megatron-core >= 0.17's ``TensorParallelAdaptiveMuon``: Muon's keywords plus ``moment2_method``
    ("adamuon" or "normuon"; dist_ortho also has "namo"), ``beta2`` and ``eps``."""

    def __init__(
        self,
        params: Any,
        lr: float = 3e-4,
        momentum: float = _UNSET,
        nesterov: bool = _UNSET,
        weight_decay: float = 0.01,
        use_decoupled_weight_decay: bool = True,
        split_qkv: bool = False,
        is_qkv_fn: Callable[[torch.Tensor], bool] | None = None,
        qkv_split_shapes: Sequence[int] | None = None,
        fp32_matmul_prec: str = "medium",
        coefficient_type: str = "quintic",
        num_ns_steps: int = 5,
        scale_mode: str = "spectral",
        extra_scale_factor: float = 1.0,
        pg_collection: Any = None,
        tp_mode: str = _UNSET,
        moment2_method: str = "adamuon",
        beta2: float = 0.95,
        eps: float = 1e-8,
        use_syrk: bool = False,
        *,
        momentum_beta: float | None = None,
        use_nesterov: bool | None = None,
        mode: str | None = None,
        tp_group: Any = None,
        expert_tp_group: Any = None,
        **kwargs: Any,
    ) -> None:
        self.pg_collection = pg_collection
        options = _muon_options(momentum, momentum_beta, nesterov, use_nesterov, tp_mode, mode,
                                use_decoupled_weight_decay, pg_collection, tp_group, expert_tp_group)
        super().__init__(
            params, lr, options.pop("momentum"), weight_decay, moment2_method=moment2_method, beta2=beta2, eps=eps,
            fp32_matmul_prec=fp32_matmul_prec, coefficient_type=coefficient_type, num_ns_steps=num_ns_steps,
            scale_mode=scale_mode, extra_scale_factor=extra_scale_factor, use_syrk=use_syrk, split_qkv=split_qkv,
            qkv_split_shapes=qkv_split_shapes, is_qkv_fn=is_qkv_fn, **options, **kwargs,
        )


def init_state(opt: Any, config: Any = None) -> None:
    """megatron-core's ``init_state_fn``: momentum buffers for parameters without state (its checkpoint
    loading needs every state tensor before the first step)."""
    for group in opt.param_groups:
        for p in group["params"]:
            if not opt.state[p]:
                opt.state[p]["momentum_buffer"] = torch.zeros_like(p.data)
