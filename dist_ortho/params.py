"""How a parameter is sharded, read from the attributes TransformerEngine and Megatron-LM set on it.

Both set ``tensor_model_parallel`` (bool), ``partition_dim`` (0 rows, 1 columns, -1 none) and
``partition_stride`` on their weights. A weight is sharded only when ``tensor_model_parallel is True``
and ``partition_dim`` is 0 or 1: TE sets partition_dim 0 even for ``parallel_mode=None``, and Megatron
sets tensor_model_parallel False on its duplicated TE linears. Megatron marks expert weights with
``expert_tp = True``: they are sharded over the expert TP group instead of the TP group.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch

from dist_ortho import comm

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardSpec:
    """``partition_dim`` None means replicated (or a group of one); ``group`` holds the other shards."""

    partition_dim: int | None
    group: comm.ProcessGroup | None

    @property
    def size(self) -> int:
        return comm.group_size(self.group) if self.partition_dim is not None else 1


REPLICATED = ShardSpec(None, None)


def is_sharded(p: torch.Tensor) -> bool:
    return getattr(p, "tensor_model_parallel", False) is True and getattr(p, "partition_dim", -1) in (0, 1)


@functools.cache
def _warn_no_group() -> None:
    logger.warning(
        "parameters carry tensor_model_parallel=True but no tp_group was given: they are treated as unsharded "
        "(TP=1). Pass tp_group= (and expert_tp_group= for expert weights) when they are sharded."
    )


def shard_spec(
    p: torch.Tensor,
    tp_group: comm.ProcessGroup | None,
    expert_tp_group: comm.ProcessGroup | None = None,
    name: str | None = None,
) -> ShardSpec:
    """The ShardSpec of ``p`` (raises ValueError for layouts that cannot be handled exactly)."""
    if not is_sharded(p):
        return REPLICATED
    label = f"parameter {name!r}" if name else f"a parameter of shape {tuple(p.shape)}"
    stride = getattr(p, "partition_stride", 1)
    if stride != 1:
        raise ValueError(
            f"{label} has partition_stride={stride}: its shard is not one contiguous block of the global matrix, "
            "which dist_ortho cannot orthogonalize exactly; use partition_stride=1 or route it to the fallback"
        )
    if getattr(p, "expert_tp", False):
        if expert_tp_group is None and tp_group is not None:
            raise ValueError(
                f"{label} is an expert weight (expert_tp=True) but no expert_tp_group was given: pass "
                "expert_tp_group= (Megatron: pg_collection.expt_tp); the dense tp_group is not used for experts"
            )
        group = expert_tp_group
    else:
        group = tp_group
    if group is None:
        _warn_no_group()
        return REPLICATED
    return ShardSpec(p.partition_dim, group)


def global_shape(shape: torch.Size | tuple[int, ...], spec: ShardSpec, sizes: list[int] | None = None) -> tuple[int, ...]:
    """Shape of the whole matrix: the local shape with the sharded dim summed over ranks."""
    if spec.partition_dim is None:
        return tuple(shape)
    out = list(shape)
    dim = len(out) - 2 + spec.partition_dim
    out[dim] = sum(sizes) if sizes is not None else out[dim] * spec.size
    return tuple(out)
