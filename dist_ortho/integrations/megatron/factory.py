"""megatron-core 0.16's ``get_megatron_muon_optimizer``, building dist_ortho's TensorParallelMuon.

Same signature and result as megatron-core's: 2D non-embedding weights get TensorParallelMuon (dense
and expert apart: experts on the expert TP group, their grad statistics over ``tp_ep_pp``), the rest
megatron-core's own Adam, each wrapped as megatron-core wraps it (FP32Optimizer, or
Float16OptimizerWithFloat16Params with bf16, whose fp32 master copies get dist_ortho's tags) and chained.
fp16 works too (megatron-core's own Muon refuses it): Float16OptimizerWithFloat16Params with megatron-core's
loss scaler, which unscales the gradients, skips steps with inf/NaN and adjusts the scale.

``layer_wise_distributed_optimizer`` (``--optimizer dist_muon``) runs on dist_ortho's DP x TP grid:
each matrix has one owning DP replica (``pg_collection.dp_cp``; experts ``expt_dp``), whose TP group
orthogonalizes it once (in the chosen TP mode) and keeps its momentum; the owners' updated weights are
all-gathered over DP after the step. Megatron's LayerWiseDistributedOptimizer instead repeats each owned
matrix's Newton-Schulz on every rank of the owner's TP group (duplicated). Adam's parameters stay
replicated.
"""

from __future__ import annotations

from typing import Any

import torch

from dist_ortho.integrations.megatron.args import optimizer_kwargs
from dist_ortho.integrations.megatron.optimizers import TensorParallelMuon, init_state
from dist_ortho.integrations.megatron.params import copy_tags_to_main_params, is_matrix_param, tag_megatron_params
from dist_ortho.optim.holding import owns
from dist_ortho.optim.hybrid import MuonAdamW


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
    """megatron-core 0.16's factory with dist_ortho's TensorParallelMuon (see the module doc).

    ``wrap`` (default: where CUDA is available, since megatron-core's wrappers allocate on CUDA): False
    builds a :class:`~dist_ortho.MuonAdamW` of TensorParallelMuon and torch AdamW over the same groups
    instead (CPU runs: same updates, plain ``p.grad``, no Megatron wrappers).
    """
    from megatron.core.optimizer import _get_param_groups
    from megatron.core.process_groups_config import ProcessGroupCollection

    if config.use_distributed_optimizer:
        raise ValueError("Muon with use_distributed_optimizer=True is not supported (as in megatron-core 0.16); "
                         "use --optimizer dist_muon (layer-wise) to shard the optimizer over DP")
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

    def groups_of(hidden: list[torch.Tensor]) -> list[dict[str, Any]]:
        # megatron-core builds groups from requires_grad parameters: hide the others while it does.
        for p in hidden:
            p.requires_grad = False
        try:
            return [g for g in _get_param_groups(model_chunks, config, config_overrides) if g["params"]]
        finally:
            for p in hidden:
                p.requires_grad = True

    kwargs = optimizer_kwargs(config, model_chunks, pg_collection)
    matrix_groups = groups_of(others)

    def muon(groups: list[dict[str, Any]], dp_group: Any) -> TensorParallelMuon | None:
        return TensorParallelMuon(groups, **kwargs, dp_group=dp_group) if groups else None

    layer_wise = layer_wise_distributed_optimizer
    dense_groups = [g for g in matrix_groups if not g["is_expert_parallel"]]
    expert_groups = [g for g in matrix_groups if g["is_expert_parallel"]]
    if not wrap:
        if layer_wise and expert_groups:
            raise ValueError("wrap=False with layer_wise_distributed_optimizer: expert weights need wrap=True "
                             "(their DP group differs from the dense weights')")
        adam_groups = groups_of(matrices)
        adam = torch.optim.AdamW(
            adam_groups, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps,
            weight_decay=config.weight_decay,
        ) if adam_groups else None
        return MuonAdamW.combine(muon(matrix_groups, pg_collection.dp_cp if layer_wise else None), adam)
    dense = muon(dense_groups, pg_collection.dp_cp if layer_wise else None)
    expert = muon(expert_groups, pg_collection.expt_dp if layer_wise else None)
    return _chain(config, model_chunks, config_overrides, use_gloo_process_groups, dense, expert, matrices, pg_collection)


class GridCheckpoint:
    """Megatron dist-checkpointing of a grid (layer-wise) optimizer: each matrix's state is written by the
    replica that owns it. megatron-core marks an optimizer state tensor like its parameter, whose replica
    id carries the DP rank (only DP rank 0 writes); here an owned matrix's state gets DP replica id 0 on its
    owner (other replicas hold none). Loading gives every rank every state, then the optimizer keeps its own."""

    def sharded_state_dict(self, model_sharded_state_dict: Any, is_loading: bool = False, **kwargs: Any) -> Any:
        sharded = super().sharded_state_dict(model_sharded_state_dict, is_loading, **kwargs)  # type: ignore[misc]
        if not is_loading:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]  # type: ignore[attr-defined]
            state = sharded["optimizer"]["state"] if "optimizer" in sharded else sharded["state"]
            for index, values in state.items():
                if isinstance(index, int) and owns(self.optimizer, params[index]):  # type: ignore[attr-defined]
                    for value in values.values():
                        replica = getattr(value, "replica_id", None)
                        if replica is not None:
                            value.replica_id = (*replica[:-1], 0) if isinstance(replica, tuple) else 0
        return sharded


def grad_scaler(config: Any) -> Any:
    """megatron-core's loss scaler for the config, as its own factory makes it: constant with ``loss_scale``,
    dynamic with fp16, none with bf16 / fp32."""
    from megatron.core.optimizer.grad_scaler import ConstantGradScaler, DynamicGradScaler

    if config.loss_scale:
        return ConstantGradScaler(config.loss_scale)
    if config.fp16:
        return DynamicGradScaler(initial_scale=config.initial_loss_scale, min_scale=config.min_loss_scale,
                                 growth_factor=2.0, backoff_factor=0.5, growth_interval=config.loss_scale_window,
                                 hysteresis=config.hysteresis)
    return None


def wrap_like_megatron(opt: Any, config: Any) -> Any:
    """FP32Optimizer, or Float16OptimizerWithFloat16Params with bf16 / fp16 (its master copies tagged; fp16
    with megatron-core's loss scaler); on the DP x TP grid with :class:`GridCheckpoint` for dist-checkpointing."""
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params, FP32Optimizer

    half = config.bf16 or config.fp16
    base = Float16OptimizerWithFloat16Params if half else FP32Optimizer
    if opt.dp_group is not None:
        base = type(f"Grid{base.__name__}", (GridCheckpoint, base), {})
    if half:
        wrapped = base(opt, config, grad_scaler(config), init_state)
        copy_tags_to_main_params(wrapped)
        return wrapped
    return base(opt, config, init_state)


def _chain(
    config: Any, model_chunks: list[torch.nn.Module], config_overrides: dict | None, use_gloo_process_groups: bool,
    dense: TensorParallelMuon | None, expert: TensorParallelMuon | None, matrices: list[torch.Tensor], pg_collection: Any,
) -> Any:
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.optimizer.optimizer import ChainedOptimizer

    optimizers = []
    if dense is not None:
        optimizers.append(wrap_like_megatron(dense, config))
    if expert is not None:
        optimizers.append(wrap_like_megatron(expert, config))
        optimizers[-1].grad_stats_parallel_group = pg_collection.tp_ep_pp  # as megatron-core: over TP x EP x PP
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
    # Without non-matrix parameters megatron-core returns an Adam wrapper of no optimizer: leave it out.
    optimizers += [o for o in getattr(chained_adam, "chained_optimizers", [chained_adam]) if o.optimizer is not None]
    return ChainedOptimizer(optimizers)
