"""Parameter names (for messages and plans), and what passes to the tensors a wrapper puts in their place."""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from typing import Any

import torch

from dist_ortho.parameters.protocol import GTP_ATTRIBUTES


def replaced(given: Sequence[torch.Tensor], current: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(given tensor, the tensor that took its place) of a param group: by the given tensors' ``main_param``
    (megatron-core's link to a master copy; its layer-wise optimizer also drops the tensors other replicas
    own), else position by position when the group kept its length."""
    masters = {id(old.main_param): old for old in given if getattr(old, "main_param", None) is not None}
    if masters:
        return [(masters[id(new)], new) for new in current if id(new) in masters]
    if len(given) != len(current):
        return []
    return [(old, new) for old, new in zip(given, current) if new is not old]


def carry_names(given: Sequence[tuple[dict[str, Any], list[torch.Tensor]]], names: MutableMapping[torch.Tensor, str]) -> None:
    """Names of parameters that a wrapper replaced in their group after construction (megatron-core's fp32
    master copies of bf16 weights) pass to the tensors that took their place, and so do the GTP attributes
    that say how they are held (megatron-core copies only ``is_gtp_weight_remat``). ``given``: each group with its
    parameters as given."""
    for group, params in given:
        for old, new in replaced(params, group["params"]):
            if old in names and new not in names:
                names[new] = names[old]
            if getattr(old, "is_gtp_weight_remat", False) is True and not hasattr(new, "pad_length"):
                for attribute in GTP_ATTRIBUTES:
                    if hasattr(old, attribute):
                        setattr(new, attribute, getattr(old, attribute))
