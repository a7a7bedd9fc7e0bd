"""Megatron-LM integration: tag a Megatron model, a drop-in ``TensorParallelMuon``, the optimizer factory
``get_megatron_muon_optimizer`` and the ``--muon-*`` command-line flags.

Megatron users switch with an import:

    from dist_ortho.integrations.megatron import get_megatron_muon_optimizer
    optimizer = get_megatron_muon_optimizer(config, model_chunks)

megatron-core is imported lazily, so this module imports without it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from dist_ortho.coefficients import COEFFICIENT_TYPES
from dist_ortho.optim.hybrid import MuonAdamW
from dist_ortho.optim.muon import Muon
from dist_ortho.optim.scale import SCALE_MODES
from dist_ortho.qkv import qkv_split_shapes
from dist_ortho.tp import TP_MODES


def megatron_qkv_split_shapes(config: Any) -> list[int]:
    """[q, k, v] (or [q, gate, k, v]) rows per query group from a Megatron TransformerConfig."""
    heads = config.num_attention_heads
    groups = config.num_query_groups or heads
    kv_channels = config.kv_channels or config.hidden_size // heads
    return qkv_split_shapes(heads, groups, kv_channels, gated=getattr(config, "attention_output_gate", False))


def tag_megatron_params(model_chunks: Iterable[torch.nn.Module]) -> None:
    """Mark fused QKV weights (with their split) and expert weights, and name every parameter.

    ``linear_qkv.weight`` -> ``is_qkv=True`` and ``qkv_split_shapes`` from the chunk's config; a name
    containing "experts" but not "shared" -> ``expert_tp=True`` (the expert TP group is used for it).
    """
    for chunk in model_chunks:
        config = getattr(chunk, "config", None)
        shapes = megatron_qkv_split_shapes(config) if config is not None else None
        for name, p in chunk.named_parameters():
            p._dist_ortho_name = name
            if "experts" in name and "shared" not in name:
                p.expert_tp = True
            if name.endswith("linear_qkv.weight") and p.ndim == 2:
                if shapes is None:
                    raise ValueError(f"{name}: the model chunk has no .config to read the QKV split from")
                p.is_qkv = True
                p.qkv_split_shapes = shapes


def is_matrix_param(p: torch.Tensor) -> bool:
    """Muon-family candidates: 2D, not embedding/output, not flagged use_muon=False."""
    return (
        p.ndim == 2
        and not getattr(p, "is_embedding_or_output_parameter", False)
        and getattr(p, "use_muon", True) is not False
    )


def _groups_of(pg_collection: Any) -> tuple[Any, Any]:
    if pg_collection is None:
        return None, None
    return getattr(pg_collection, "tp", None), getattr(pg_collection, "expt_tp", None)


class TensorParallelMuon(Muon):
    """Megatron-core's ``TensorParallelMuon`` constructor, with dist_ortho's exact TP underneath.

    Differences: ``mode``/``tp_mode`` accept every dist_ortho mode ("blockwise" keeps Megatron's inexact
    per-shard behaviour); fused QKV is split exactly also when TP > num_query_groups; expert weights
    use ``pg_collection.expt_tp`` (an expert weight without it is an error).
    """

    def __init__(
        self,
        params: Any,
        lr: float = 3e-4,
        momentum_beta: float = 0.95,
        use_nesterov: bool = True,
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
        mode: str = "duplicated",
        *,
        tp_mode: str | None = None,
        use_syrk: bool = False,
        tp_group: Any = None,
        expert_tp_group: Any = None,
    ) -> None:
        pg_tp, pg_expert = _groups_of(pg_collection)
        self.pg_collection = pg_collection
        super().__init__(
            params,
            lr,
            momentum_beta,
            weight_decay,
            nesterov=use_nesterov,
            weight_decay_method="decoupled" if use_decoupled_weight_decay else "l2",
            fp32_matmul_prec=fp32_matmul_prec,
            coefficient_type=coefficient_type,
            num_ns_steps=num_ns_steps,
            scale_mode=scale_mode,
            extra_scale_factor=extra_scale_factor,
            use_syrk=use_syrk,
            tp_group=tp_group if tp_group is not None else pg_tp,
            tp_mode=tp_mode or mode,
            expert_tp_group=expert_tp_group if expert_tp_group is not None else pg_expert,
            split_qkv=split_qkv,
            qkv_split_shapes=qkv_split_shapes,
            is_qkv_fn=is_qkv_fn,
        )


def _muon_kwargs(config: Any, pg_collection: Any, qkv_shapes: Sequence[int] | None) -> dict[str, Any]:
    return {
        "lr": config.lr,
        "momentum_beta": config.muon_momentum,
        "use_nesterov": config.muon_use_nesterov,
        "weight_decay": config.weight_decay,
        "fp32_matmul_prec": config.muon_fp32_matmul_prec,
        "num_ns_steps": config.muon_num_ns_steps,
        "scale_mode": config.muon_scale_mode,
        "split_qkv": config.muon_split_qkv,
        "qkv_split_shapes": qkv_shapes,
        "extra_scale_factor": config.muon_extra_scale_factor,
        "pg_collection": pg_collection,
        "tp_mode": getattr(config, "muon_tp_mode", "duplicated"),
        "coefficient_type": getattr(config, "muon_coefficient_type", "quintic"),
        "use_syrk": getattr(config, "muon_use_syrk", False),
    }


def get_megatron_muon_optimizer(
    config: Any,
    model_chunks: list[torch.nn.Module],
    config_overrides: dict | None = None,
    use_gloo_process_groups: bool = True,
    layer_wise_distributed_optimizer: bool = False,
    pg_collection: Any = None,
    *,
    wrap: bool | None = None,
) -> Any:
    """megatron-core's ``get_megatron_muon_optimizer`` with dist_ortho's TensorParallelMuon.

    2D non-embedding weights get TensorParallelMuon (experts on the expert TP group); the rest get
    Adam. With ``wrap`` (default: where CUDA is available, since megatron-core's wrappers allocate on
    CUDA) each is wrapped as megatron-core wraps it (FP32Optimizer, or Float16OptimizerWithFloat16Params
    with bf16; dense and expert Muon apart, for megatron's grad-norm groups) and chained
    (ChainedOptimizer), with Adam from megatron-core's own ``get_megatron_optimizer``. Without, a
    :class:`~dist_ortho.MuonAdamW` combines TensorParallelMuon and torch AdamW over the same groups
    (CPU runs, tests): same updates, plain ``p.grad``.
    """
    from megatron.core.optimizer import _get_param_groups
    from megatron.core.process_groups_config import ProcessGroupCollection

    if layer_wise_distributed_optimizer:
        raise ValueError("layer_wise_distributed_optimizer is not supported by dist_ortho's factory yet")
    if config.use_distributed_optimizer:
        raise ValueError("Muon with use_distributed_optimizer=True is not supported (as in megatron-core)")
    if config.fp16:
        raise ValueError("Muon with fp16 is not supported (as in megatron-core); use bf16")
    if pg_collection is None:
        pg_collection = ProcessGroupCollection.use_mpu_process_groups()
    if wrap is None:
        wrap = torch.cuda.is_available()

    tag_megatron_params(model_chunks)
    matrices, others = [], []
    for chunk in model_chunks:
        for _, p in chunk.named_parameters():
            if p.requires_grad:
                (matrices if is_matrix_param(p) else others).append(p)

    def groups_of(params: list[torch.Tensor], hidden: list[torch.Tensor]) -> list[dict[str, Any]]:
        # megatron-core builds groups from requires_grad parameters: hide the others while it does.
        for p in hidden:
            p.requires_grad = False
        try:
            return [g for g in _get_param_groups(model_chunks, config, config_overrides) if g["params"]]
        finally:
            for p in hidden:
                p.requires_grad = True

    kwargs = _muon_kwargs(config, pg_collection, None)
    matrix_groups = groups_of(matrices, others)
    if not wrap:
        adam_groups = groups_of(others, matrices)
        adam = torch.optim.AdamW(
            adam_groups, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps,
            weight_decay=config.weight_decay,
        ) if adam_groups else None
        return MuonAdamW.combine(TensorParallelMuon(matrix_groups, **kwargs) if matrix_groups else None, adam)
    return _wrapped(config, model_chunks, config_overrides, use_gloo_process_groups, matrix_groups, matrices, kwargs)


def _wrapped(
    config: Any,
    model_chunks: list[torch.nn.Module],
    config_overrides: dict | None,
    use_gloo_process_groups: bool,
    matrix_groups: list[dict[str, Any]],
    matrices: list[torch.Tensor],
    kwargs: dict[str, Any],
) -> Any:
    """The megatron-core wrapped and chained optimizer (needs CUDA)."""
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.optimizer.optimizer import ChainedOptimizer, Float16OptimizerWithFloat16Params, FP32Optimizer

    def init_state(opt: Any, config: Any = None) -> None:
        for group in opt.param_groups:
            for p in group["params"]:
                if not opt.state[p]:
                    opt.state[p]["momentum_buffer"] = torch.zeros_like(p.data)

    def wrap(opt: Any) -> Any:
        if config.bf16:
            return Float16OptimizerWithFloat16Params(opt, config, None, init_state)
        return FP32Optimizer(opt, config, init_state)

    optimizers = []
    for expert in (False, True):
        part = [g for g in matrix_groups if g["is_expert_parallel"] == expert]
        if part:
            optimizers.append(wrap(TensorParallelMuon(part, **kwargs)))
    saved_optimizer = config.optimizer
    config.optimizer = "adam"
    for p in matrices:
        p.requires_grad = False
    try:
        chained_adam = get_megatron_optimizer(
            config, model_chunks, config_overrides=config_overrides, use_gloo_process_groups=use_gloo_process_groups
        )
    finally:
        for p in matrices:
            p.requires_grad = True
        config.optimizer = saved_optimizer
    optimizers += getattr(chained_adam, "chained_optimizers", [chained_adam])
    return ChainedOptimizer(optimizers)


def add_muon_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-LM's ``--muon-*`` flags (names and defaults as in megatron-core's OptimizerConfig), plus ours.

    One default differs on purpose: ``--muon-tp-mode`` is "duplicated" (exact), where Megatron's is
    "blockwise" (orthogonalizes each shard alone; pass it explicitly to keep that).
    """
    group = parser.add_argument_group("muon (dist_ortho)")
    group.add_argument("--muon-momentum", type=float, default=0.95)
    group.add_argument("--muon-split-qkv", dest="muon_split_qkv", action="store_true", default=True)
    group.add_argument("--muon-no-split-qkv", dest="muon_split_qkv", action="store_false")
    group.add_argument("--muon-use-nesterov", action="store_true", default=False)
    group.add_argument("--muon-scale-mode", default="spectral", choices=SCALE_MODES)
    group.add_argument("--muon-fp32-matmul-prec", default="medium", choices=("medium", "high", "highest"))
    group.add_argument("--muon-num-ns-steps", type=int, default=5)
    group.add_argument("--muon-tp-mode", default="duplicated", choices=TP_MODES)
    group.add_argument("--muon-extra-scale-factor", type=float, default=1.0)
    group.add_argument("--muon-coefficient-type", default="quintic", choices=[c for c in COEFFICIENT_TYPES if c != "custom"])
    group.add_argument("--muon-use-syrk", action="store_true", default=False)
    return parser
