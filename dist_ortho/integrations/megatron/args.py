"""The ``--muon-*`` flags and how the optimizer's settings are read from Megatron's config.

Megatron-LM's parser has its own ``--muon-*`` flags; dist_ortho reuses them as they are (same names,
same defaults as that generation) and adds only what the generation lacks. Field names differ between
generations (0.16: ``muon_use_nesterov``; >= 0.17: ``muon_nesterov``); :func:`muon_settings` reads either.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from dist_ortho.integrations.megatron.optimizers import MEGATRON_TP_MODES
from dist_ortho.integrations.megatron.params import chunks_qkv_split_shapes, megatron_param_names
from dist_ortho.math.coefficients import COEFFICIENT_TYPES
from dist_ortho.math.precision import MATMUL_PRECISIONS
from dist_ortho.optim.scale import SCALE_MODES
from dist_ortho.tp import TP_MODES

logger = logging.getLogger(__name__)


def add_muon_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``--muon-*`` flags dist_ortho reads, only where ``parser`` lacks them.

    Next to Megatron-LM's parser, Megatron's flags stay as they are, ``--muon-tp-mode`` gains dist_ortho's
    modes (gram, home, auto, megatron_blockwise), ``--muon-scale-mode`` its scale modes (unit_rms_norm's alias
    rms_to_rms, match_rms_adamw) and ``--muon-fp32-matmul-prec`` "highest" (and "low", which Megatron-LM main
    offers: see :func:`matmul_precision_of`); what the generation lacks is added
    (``--muon-coefficient-type`` on megatron-core 0.16, ``--muon-use-syrk`` on 0.16-0.19). On a bare
    parser the defaults are megatron-core OptimizerConfig's, except ``--muon-tp-mode`` "duplicated"
    (exact), where Megatron's is "blockwise" (each shard alone), and the TP modes dist_ortho's own
    optimizers take (where "blockwise" scales by the global shape). Adding twice changes nothing.
    """
    known = parser._option_string_actions  # argparse has no public lookup of registered options
    for flag, ours in (("--muon-tp-mode", MEGATRON_TP_MODES), ("--muon-scale-mode", SCALE_MODES),
                       ("--muon-fp32-matmul-prec", (*MATMUL_PRECISIONS, "low"))):
        action = known.get(flag)
        if action is not None and action.choices is not None:
            action.choices = list(action.choices) + [m for m in ours if m not in action.choices]
    group = parser.add_argument_group("muon (dist_ortho)")

    def add(*flags: str, **kwargs: Any) -> None:
        if not any(f in known for f in flags):
            group.add_argument(*flags, **kwargs)

    add("--muon-momentum", type=float, default=0.95)
    add("--muon-split-qkv", dest="muon_split_qkv", action="store_true", default=True)
    add("--muon-no-split-qkv", dest="muon_split_qkv", action="store_false")
    add("--muon-use-nesterov", "--muon-nesterov", dest="muon_use_nesterov", action="store_true", default=False)
    add("--muon-scale-mode", default="spectral", choices=SCALE_MODES)
    add("--muon-fp32-matmul-prec", default="medium", choices=(*MATMUL_PRECISIONS, "low"))
    add("--muon-num-ns-steps", type=int, default=5)
    add("--muon-tp-mode", default="duplicated", choices=TP_MODES)
    add("--muon-extra-scale-factor", type=float, default=1.0)
    add("--muon-coefficient-type", default="quintic", choices=[c for c in COEFFICIENT_TYPES if c != "custom"])
    add("--muon-use-syrk", action="store_true", default=False)
    return parser


def megatron_args() -> Any:
    """Megatron-LM's parsed arguments where its training package is loaded and has parsed them, else None."""
    global_vars = sys.modules.get("megatron.training.global_vars")
    return getattr(global_vars, "_GLOBAL_ARGS", None) if global_vars is not None else None


def setting(config: Any, names: Sequence[str], default: Any) -> Any:
    """The first of ``names`` on the OptimizerConfig, else on Megatron's parsed arguments (flags this
    generation's OptimizerConfig lacks are not copied into it), else ``default``."""
    for source in (config, megatron_args()):
        for name in names:
            if source is not None and hasattr(source, name):
                return getattr(source, name)
    return default


def matmul_precision_of(value: str) -> str:
    """dist_ortho's fp32_matmul_prec for Megatron's ``--muon-fp32-matmul-prec``. Megatron-LM's parser also offers
    "low", which torch's set_float32_matmul_precision ignores (a warning; the process's precision stays as it was,
    so upstream's Newton-Schulz precision then depends on what ran before): dist_ortho runs it as "medium", the
    lowest precision torch has (the device's fast reduced precision, dist_ortho.math.precision), and says so once."""
    if value != "low":
        return value
    if not _said_low:
        _said_low.append(True)
        logger.info("--muon-fp32-matmul-prec low: Newton-Schulz runs at 'medium' (torch has no lower float32 matmul "
                    "precision; megatron-core passes 'low' to torch, which ignores it)")
    return "medium"


_said_low: list[bool] = []


def muon_settings(config: Any) -> dict[str, Any]:
    """TensorParallelMuon's keywords from an OptimizerConfig of either generation (0.19's names)."""
    return {
        "lr": config.lr,
        "momentum": config.muon_momentum,
        "nesterov": setting(config, ("muon_nesterov", "muon_use_nesterov"), False),
        "weight_decay": config.weight_decay,
        "fp32_matmul_prec": matmul_precision_of(config.muon_fp32_matmul_prec),
        "num_ns_steps": config.muon_num_ns_steps,
        "scale_mode": config.muon_scale_mode,
        "split_qkv": config.muon_split_qkv,
        "extra_scale_factor": config.muon_extra_scale_factor,
        "tp_mode": setting(config, ("muon_tp_mode",), "duplicated"),
        "coefficient_type": setting(config, ("muon_coefficient_type",), "quintic"),
        "use_syrk": setting(config, ("muon_use_syrk",), False),
    }


def optimizer_kwargs(config: Any, model_chunks: Sequence[Any], pg_collection: Any) -> dict[str, Any]:
    """TensorParallelMuon's keywords for a model: :func:`muon_settings`, the model's QKV split, the groups."""
    return {**muon_settings(config), "qkv_split_shapes": chunks_qkv_split_shapes(model_chunks),
            "pg_collection": pg_collection, "param_names": megatron_param_names(model_chunks)}


def adaptive_muon_settings(config: Any) -> dict[str, Any]:
    """TensorParallelAdaptiveMuon's extra keywords (megatron-core >= 0.17's adaptive_muon_* fields)."""
    return {
        "moment2_method": setting(config, ("adaptive_muon_moment2_method",), "adamuon"),
        "beta2": setting(config, ("adaptive_muon_beta2",), 0.95),
        "eps": setting(config, ("adaptive_muon_eps",), 1e-8),
    }
