"""The options of the optimizers, declared once: name, default, doc, scope, check and whether it is structural.

Each option is one field of a frozen dataclass, made by :func:`option`; an optimizer class names its dataclass
(``settings``), from which its constructor, signature, accepted keywords, defaults, checks and argument docs are
made (dist_ortho.optim.constructor). A field's ``metadata`` says

    doc          its argument doc
    scope        "group": a per-group option, a key of torch.optim's param-group dicts (users override it per group,
                 checkpoints store it); "optimizer": one value for the optimizer (an attribute of that name);
                 "alias": another library's name, read by the class's ``translate`` into the options above
    structural   (group options) part of the plan key: a change makes a step's plan, and its agreement, anew
    keyword      whether the constructor takes it (False: fixed by the member, or set by ``translate`` only)
    check        ``check(name, value)`` raising a ValueError/TypeError naming it (run on every param group)
    newton_schulz  a Newton-Schulz option every rank must agree on (dist_ortho.optim.agreement.plan_entry)

A field whose default is :data:`ABSENT` is put in a group only when given. Members declare their own dataclass
beside their class, from the mixins here, with :func:`settings` (new defaults, fixed values). Adding an option is
one field plus its use.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, Literal, get_args

from dist_ortho.comm.coalesce import DEFAULT_BUCKET_BYTES
from dist_ortho.math.precision import MATMUL_PRECISIONS, MatmulPrecision  # noqa: F401 (re-exported)
from dist_ortho.optim.nonfinite import NONFINITE
from dist_ortho.optim.options import check_bool, check_choice, check_number
from dist_ortho.optim.scale import SCALE_MODES, check_scale_mode
from dist_ortho.parameters.backward import DEFAULT_GRAD_BUCKET_BYTES
from dist_ortho.tp import TP_MODES
from dist_ortho.tp.local import LOCAL_GRAM

WeightDecayMethod = Literal["decoupled", "independent", "l2", "palm"]
WEIGHT_DECAY_METHODS: tuple[str, ...] = get_args(WeightDecayMethod)
ConvMode = Literal["flatten", "batched"]
CONV_MODES: tuple[str, ...] = get_args(ConvMode)
VerifyPlan = Literal["on_change", "every_step"]
VERIFY_PLAN: tuple[str, ...] = get_args(VerifyPlan)
Scope = Literal["group", "optimizer", "alias"]
ABSENT: Any = type("Absent", (), {"__repr__": lambda self: "ABSENT"})()
_REQUIRED: Any = dataclasses.MISSING


def option(default: Any = _REQUIRED, *, doc: str, scope: Scope = "group", structural: bool = False,
           check: Callable[[str, Any], Any] | None = None, keyword: bool = True, newton_schulz: bool = False) -> Any:
    """A settings field (no default: the member must give one, see :func:`settings`)."""
    metadata = dict(doc=doc, scope=scope, structural=structural, check=check, keyword=keyword, newton_schulz=newton_schulz)
    return dataclasses.field(default=default, metadata=metadata)


def choice(*choices: str, none: bool = False) -> Callable[[str, Any], Any]:
    """A check: one of ``choices`` (or None)."""
    return lambda name, value: None if none and value is None else check_choice(name, value, choices)


def number(low: float = 0.0, high: float = float("inf"), high_open: bool = False) -> Callable[[str, Any], Any]:
    """A check: a finite number in [low, high] (or [low, high))."""
    return functools.partial(_number, low=low, high=high, high_open=high_open)


def _number(name: str, value: Any, low: float, high: float, high_open: bool) -> float:
    return check_number(name, value, low, high, high_open)


def _batch_matrices(name: str, value: Any) -> None:
    if not isinstance(value, bool) and value != "auto":
        raise ValueError(f"{name} must be 'auto', True or False, got {value!r}")


def settings(cls: type | None = None, *, fixed: dict[str, Any] | None = None, **defaults: Any) -> Any:
    """A frozen, keyword-only dataclass of ``cls``'s fields and its bases', with ``defaults`` (new defaults of inherited
    fields) and ``fixed`` (inherited fields set to a value the constructor does not take) applied."""
    def make(cls: type) -> type:
        inherited = {f.name: f for base in reversed(cls.__mro__[1:]) if dataclasses.is_dataclass(base)
                     for f in dataclasses.fields(base)}  # the nearest base's field last, so it wins
        annotations = cls.__dict__.get("__annotations__", {})
        for name, value, keyword in [*((n, v, True) for n, v in defaults.items()),
                                     *((n, v, False) for n, v in (fixed or {}).items())]:
            if name not in inherited:
                raise TypeError(f"settings {cls.__name__}: {name!r} is not an inherited option")
            metadata = {**inherited[name].metadata, "keyword": keyword and inherited[name].metadata["keyword"]}
            annotations[name] = inherited[name].type
            setattr(cls, name, dataclasses.field(default=value, metadata=metadata))
        cls.__annotations__ = annotations
        return dataclasses.dataclass(frozen=True, kw_only=True)(cls)
    return make if cls is None else make(cls)


@settings
class CommonSettings:
    """The per-group options of every member."""

    lr: float = option(doc="learning rate", check=number())
    momentum: float = option(doc="beta in [0, 1)", check=number(0.0, 1.0, high_open=True))
    weight_decay: float = option(doc=">= 0", check=number())
    nesterov: bool = option(doc="use the Nesterov direction D = G + beta (M - G)")
    weight_decay_method: WeightDecayMethod = option(doc="one of WEIGHT_DECAY_METHODS (see the module doc)",
                                                    check=choice(*WEIGHT_DECAY_METHODS))
    fp32_matmul_prec: str = option(
        doc='torch float32 matmul precision while orthogonalizing ("medium" runs NS in bf16)', structural=True,
        check=choice(*MATMUL_PRECISIONS))
    ns_dtype: str | None = option(None, structural=True, newton_schulz=True, doc=(
        'the dtype Newton-Schulz runs in, "bf16", "fp16" or "fp32" (float64 weights stay float64); None: '
        "fp32_matmul_prec decides. fp16 and bf16 inputs are normalized with a float64 norm first, so entries far "
        "below float16's range are orthogonalized, not flushed to zero"))
    tp_mode: str = option("duplicated", doc="how Newton-Schulz runs on shards, one of dist_ortho.TP_MODES",
                          structural=True, check=choice(*TP_MODES))
    conv_mode: ConvMode | None = option(None, structural=True, check=choice(*CONV_MODES, none=True), doc=(
        'None (matrices only), "flatten" (out, in*k*k) or "batched" (one (out, in) matrix per spatial position, '
        "update scaled by spatial_size^-0.5) for 3D+ weights"))
    split_qkv: bool = option(True, structural=True, doc=(
        "orthogonalize the Q, K, V (and gate) rows of a fused QKV weight as separate matrices (dist_ortho.parameters.qkv). A "
        "weight is fused QKV when is_qkv_fn(p) is true, or without is_qkv_fn when it carries is_qkv=True; its split "
        "comes from its qkv_split_shapes attribute, else from qkv_split_shapes here"))
    qkv_split_shapes: tuple[int, ...] | None = option(None, doc="the split of a fused QKV weight's rows",
                                                      structural=True)
    qkv_per_head: bool = option(False, structural=True, doc=(
        "with split_qkv, orthogonalize every attention head of a fused QKV weight (each query head, and each "
        "group's key and value head: kv_channels rows) as its own matrix"))
    per_head: Any = option(None, structural=True, doc=(
        "separate attention weights orthogonalized head by head (torchtitan's wq, wk, wv; Dion's num_heads): a "
        'mapping of parameter-name keys to head_dim, e.g. {"wq": hd, "wk": hd, "wv": hd}. A key matches a name when '
        'its dotted segments appear consecutively in it ("wq" matches layers.0.attention.wq.weight), or as a glob '
        "when it has *?[. A head_dim attribute on a parameter does the same. Head h is rows [h hd, (h + 1) hd), "
        "orthogonalized and scaled as a matrix of its own, exactly under TP and FSDP pieces; a weight that cannot be "
        "split so is a ValueError naming it"))
    coalesce: bool = option(True, structural=True, doc=(
        "run the collectives of all matrices of a step together, in flat buffers (one call per round, group and "
        "dtype, buckets of at most bucket_bytes); False runs each matrix on its own"))
    local_gram: str = option("auto", structural=True, check=choice(*LOCAL_GRAM), doc=(
        'where a whole matrix is orthogonalized on one rank: "auto" runs the Gram-space recursion where it is '
        'cheaper (dist_ortho.tp.local), "always", "never"'))
    batch_matrices: Any = option("auto", structural=True, check=_batch_matrices, doc=(
        'whether same-shape whole matrices on one rank run Newton-Schulz as one batched iteration: "auto" (where it '
        "pays on this device, dist_ortho.tp.batching), True, or False (home bit-identical to duplicated)"))
    nonfinite: str | None = option(None, structural=True, check=choice(*NONFINITE), doc=(
        'a non-finite update (a NaN or Inf in some rank\'s gradient): "raise" a FloatingPointError naming the '
        'parameter and step, "skip" the step on every rank (counted in skipped_steps), "ignore" (write it); one '
        'check over the whole step, nothing written before it. None: "raise", or "skip" when capturable'))


@settings
class OptimizerSettings:
    """The options of every member that are one value for the optimizer (attributes of that name)."""

    tp_group: Any = option(None, scope="optimizer", doc=(
        "process group of tensor parallelism; parameters marked by the TE/Megatron protocol (tensor_model_parallel, "
        "partition_dim) are treated as its shards"))
    expert_tp_group: Any = option(None, scope="optimizer", doc="the group of expert weights (expert_tp=True)")
    is_qkv_fn: Callable[[Any], bool] | None = option(None, scope="optimizer", doc="is_qkv_fn(p): p is a fused QKV weight")
    bucket_bytes: int = option(DEFAULT_BUCKET_BYTES, scope="optimizer", doc="the coalesced collectives' bucket size")
    dp_group: Any = option(None, scope="optimizer", doc=(
        "the data-parallel group that replicates the TP groups (gradients already averaged over it, e.g. by DDP); "
        "each parameter is then updated by one owner replica only (dist_ortho.parameters.grid), which alone keeps its state, and "
        "shared with the others after the step"))
    reduce_grads: bool = option(False, scope="optimizer", doc=(
        "with dp_group, the gradients are this rank's own: the step averages them into each parameter's owner, one "
        "reduce-scatter per dtype (FSDP2's DTensor gradients, already reduce-scattered, are left as they are)"))
    device_mesh: Any = option(None, scope="optimizer", doc=(
        'a 2D DeviceMesh with dims "dp" and "tp": dp_group=mesh["dp"].get_group(), tp_group=mesh["tp"].get_group(); '
        "DTensor parameters on its dims are orthogonalized exactly (dist_ortho.parameters.dtensor)"))
    mesh_dims: Any = option(None, scope="optimizer", doc=(
        'the DTensor meshes\' own dim names mapped to dist_ortho.parameters.dtensor.MESH_DIM_ROLES, e.g. {"replica": '
        '"dp_replicate", "shard": "fsdp", "model": "tp"}; under HSDP each matrix is stepped once in the world'))
    capturable: bool = option(False, scope="optimizer", doc=(
        "keep the steady-state step free of host syncs (a CUDA graph can capture it): lr becomes a device tensor, "
        'a "skip" is committed on the device, and what must sync ("raise", an SVD) is refused by name'))
    param_names: Any = option(None, scope="optimizer", doc=(
        "a mapping (or (name, tensor) pairs) naming parameters in messages and plans (names also come from "
        "model.named_parameters() passed as params)"))
    overlap: bool = option(False, scope="optimizer", check=check_bool, doc=(
        "with dp_group, the share of the new weights is left in flight, waited for where the weights are next read "
        "(overlap_by_layer's hooks, wait_for, finish); Newton-Schulz runs as a pipeline of buckets. Bit-identical "
        "to overlap=False (dist_ortho.optim.overlap)"))
    overlap_with_backward: bool = option(False, scope="optimizer", check=check_bool, doc=(
        "with reduce_grads, average each gradient into its owner while backward runs (dist_ortho.parameters.backward), from "
        "the second step on; accumulate micro-batches inside no_sync()"))
    backward_bucket_bytes: int = option(DEFAULT_GRAD_BUCKET_BYTES, scope="optimizer", check=number(1),
                                        doc="the backward reductions' bucket size (without overlap_by_layer)")
    verify_plan: str = option("on_change", scope="optimizer", check=choice(*VERIFY_PLAN), doc=(
        'when the ranks check that they run the same plan (dist_ortho.optim.agreement): "on_change" (a plan new to '
        'a rank) or "every_step" (one 16-byte all-gather per group every step, a changed rank named on all)'))


@settings
class NewtonSchulzSettings:
    """The per-group options of the members that orthogonalize by Newton-Schulz."""

    num_ns_steps: int = option(5, doc="Newton-Schulz iterations", structural=True, newton_schulz=True)
    coefficient_type: str = option("quintic", doc="the coefficient set (dist_ortho.math.coefficients)", structural=True,
                                   newton_schulz=True)
    custom_coefficient_sets: Any = option(ABSENT, keyword=False, structural=True, newton_schulz=True,
                                          doc="(a, b, c) triples (from torch's ns_coefficients)")
    ns_eps: float = option(ABSENT, keyword=False, structural=True, newton_schulz=True, check=lambda _, v: check_number("eps", v),
                           doc="the normalization's epsilon (from torch's eps)")


@settings
class SyrkSettings:
    """Symmetric products by SYRK (dist_ortho.math.kernels)."""

    use_syrk: bool = option(False, doc="compute the symmetric products X X^T by SYRK", structural=True, newton_schulz=True)


@settings
class ScaleSettings:
    """The scale of an orthogonalized update (dist_ortho.optim.scale)."""

    scale_mode: str = option("spectral", doc="the shape scale, one of dist_ortho.optim.scale.SCALE_MODES",
                             check=lambda name, value: check_scale_mode(value, SCALE_MODES))
    extra_scale_factor: float = option(1.0, doc="a further factor of the update", check=number())


@settings
class HookSettings:
    """A weight-update hook (dist_ortho.optim.hooks), where Emerging-Optimizers takes one."""

    weight_update_hook: Any = option(None, scope="optimizer", doc=(
        "run around each matrix's W <- W - lr U (Emerging-Optimizers' WeightUpdateHook: pre_weight_update_inplace(W, "
        "U) -> state, post_weight_update_inplace(W, state)); the hooks of dist_ortho.optim.hooks are exact on TP "
        "shards, another class's run where a matrix is whole on the rank"))


@settings
class BaseSettings(CommonSettings, HookSettings, OptimizerSettings):
    """OrthogonalizedOptimizer's own (Emerging-Optimizers' base: lr, momentum, weight_decay, nesterov,
    weight_decay_method and fp32_matmul_prec given by the caller)."""

    scaled_orthogonalize_fn: Any = option(None, scope="optimizer", doc=(
        "fn(matrix) -> update, used by the default update; under TP it is applied to the gathered matrix (so any "
        "function is exact) and this rank's block is kept"))


def fields_of(settings_cls: type, scope: Scope | None = None) -> list[dataclasses.Field]:
    """The fields of a settings class (of one scope)."""
    return [f for f in dataclasses.fields(settings_cls) if scope is None or f.metadata["scope"] == scope]


def structural_options(*classes: type) -> tuple[str, ...]:
    """The names of the structural fields of ``classes``, each once, in declaration order."""
    names = (f.name for cls in classes for f in dataclasses.fields(cls) if f.metadata["structural"])
    return tuple(dict.fromkeys(names))


# Group options that shape a step's plan (its stacks, modes and collectives); the others (lr, momentum, ...)
# are read at every step. Members' own structural options are added by their settings' declarations.
STRUCTURAL_OPTIONS = structural_options(CommonSettings, NewtonSchulzSettings, SyrkSettings)
NEWTON_SCHULZ_OPTIONS = tuple(f.name for cls in (NewtonSchulzSettings, CommonSettings, SyrkSettings) for f in dataclasses.fields(cls)
                              if f.metadata["newton_schulz"])
