"""The per-group options of the optimizers, declared once: name, default, doc line and whether it is structural.

Each option is one field of a frozen dataclass, made by :func:`option`; its ``metadata`` says

    doc          one line for the argument docs
    structural   part of the plan key (a change makes a step's plan, and its agreement, anew), else read every step

Options still travel as string keys of torch.optim's param-group dicts (users override them per group and
checkpoints store them); their names and structural flags come from here:

    STRUCTURAL_OPTIONS = the names of every field f of CommonSettings and NewtonSchulzSettings with
                         f.metadata["structural"]

Adding an option is one field here plus its use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

_UNSET: Any = dataclasses.MISSING


def option(default: Any = _UNSET, *, doc: str, structural: bool = False) -> Any:
    """A settings field: its default (none: the member must give one), doc line and structural flag."""
    return dataclasses.field(default=default, metadata={"doc": doc, "structural": structural})


@dataclasses.dataclass(frozen=True, kw_only=True)
class CommonSettings:
    """The per-group options of OrthogonalizedOptimizer (every member's)."""

    lr: float = option(doc="learning rate")
    momentum: float = option(doc="beta in [0, 1)")
    weight_decay: float = option(doc=">= 0")
    nesterov: bool = option(doc="use the Nesterov direction")
    weight_decay_method: str = option(doc="one of WEIGHT_DECAY_METHODS")
    fp32_matmul_prec: str = option(doc="torch float32 matmul precision while orthogonalizing", structural=True)
    ns_dtype: str | None = option(None, doc="the dtype Newton-Schulz runs in (None: fp32_matmul_prec decides)",
                                  structural=True)
    tp_mode: str = option("duplicated", doc="how Newton-Schulz runs on shards, one of TP_MODES", structural=True)
    coalesce: bool = option(True, doc="run the collectives of all matrices of a step together", structural=True)
    local_gram: str = option("auto", doc="where a whole matrix runs the Gram-space recursion", structural=True)
    batch_matrices: Any = option("auto", doc="batch same-shape whole matrices on one rank", structural=True)
    nonfinite: str | None = option(None, doc="raise, skip or ignore a non-finite update", structural=True)
    conv_mode: str | None = option(None, doc="None, flatten or batched for 3D+ weights", structural=True)
    split_qkv: bool = option(True, doc="orthogonalize Q, K, V of a fused QKV weight apart", structural=True)
    qkv_split_shapes: Sequence[int] | None = option(None, doc="the split of a fused QKV weight", structural=True)
    qkv_per_head: bool = option(False, doc="with split_qkv, every attention head on its own", structural=True)
    per_head: Any = option(None, doc="parameter-name keys to head_dim: heads orthogonalized apart", structural=True)


@dataclasses.dataclass(frozen=True, kw_only=True)
class NewtonSchulzSettings(CommonSettings):
    """The per-group Newton-Schulz options of the members that orthogonalize by it (Muon and its kin)."""

    num_ns_steps: int = option(5, doc="Newton-Schulz iterations", structural=True)
    coefficient_type: str = option("quintic", doc="the coefficient set (dist_ortho.coefficients)", structural=True)
    custom_coefficient_sets: Any = option(None, doc="(a, b, c) triples (ns_coefficients=; in a group only when given)",
                                         structural=True)
    use_syrk: bool = option(False, doc="symmetric products by SYRK", structural=True)
    ns_eps: float | None = option(None, doc="the normalization's epsilon (torch.optim.Muon's eps; in a group only when given)",
                                  structural=True)


def structural_options(*settings: type) -> tuple[str, ...]:
    """The names of the structural fields of ``settings``, each once, in declaration order."""
    names = (f.name for cls in settings for f in dataclasses.fields(cls) if f.metadata["structural"])
    return tuple(dict.fromkeys(names))


# Group options that shape a step's plan (its stacks, modes and collectives); the others (lr, momentum, ...)
# are read at every step.
STRUCTURAL_OPTIONS = structural_options(NewtonSchulzSettings)
