"""OrthogonalizedOptimizer: the step every member of the Muon family shares, exact under tensor parallelism.

For each matrix parameter W with gradient G (this rank may hold one block of W, see dist_ortho.params):

    weight decay   decoupled   W <- W - lr * wd * W
                   independent W <- W - wd * W
                   palm        W <- W - lr^2 * wd * W
                   l2          G <- G + wd * W
    momentum       M <- beta * M + (1 - beta) * G              (M.lerp_(G, 1 - beta))
                   D = G + beta * (M - G) with Nesterov, else D = M
    direction      U = update(matrix)  under torch's fp32 matmul precision ``fp32_matmul_prec``
    apply          pre_weight_update(W, U);  W <- W - lr * U;  post_weight_update(W)

Momentum and decay are computed out of place and written together with the update, after the update is
known finite (``nonfinite``). A tensor-parallel parameter whose ``.grad`` is None steps with a zero gradient
(on every rank alike); any other parameter without a gradient is left alone, as torch.optim does.

A member defines :meth:`update`: a program (dist_ortho.coalesce) that reads one explicit
:class:`~dist_ortho.optim.context.MatrixContext` (a batch of same-shape matrices with ``batched = True``:
layout, state, gradient, direction and, when the member sets ``uses_newton_schulz``, the Newton-Schulz result
of the direction) and returns their update. Every cross-rank quantity it needs (norms, inner products, means,
a gather) is a ``yield from`` of the context's helpers. The step (dist_ortho.optim.step) runs over groups of
same-shape parameters (dist_ortho.optim.groups) in phases, each in lockstep with coalesced collectives: state
initialization, Newton-Schulz of every direction, the members' updates, one finite check, the weight-update
hooks. So a step's collectives depend on the member and mode, and its host work on the number of groups, never
on the number of matrices. This module keeps the member contract and step(); how parameters are held, the plan,
agreement, gradients and checkpoints live in the modules beside it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, get_args

import torch
from torch.optim.optimizer import Optimizer, ParamsT

from dist_ortho import comm
from dist_ortho.backward import DEFAULT_GRAD_BUCKET_BYTES
from dist_ortho.coalesce import DEFAULT_BUCKET_BYTES, Program
from dist_ortho.coefficients import get_coefficients
from dist_ortho.grid import grid_sum_problem
from dist_ortho.dtensor import MeshDims, check_mesh_dims, groups_from_meshes, is_expert_dtensor, local, mesh_groups
from dist_ortho.optim.agreement import VERIFY_PLAN, PlanAgreement, VerifyPlan, agree_batching, plan_entry
from dist_ortho.optim.context import MatrixContext
from dist_ortho.optim.gradients import decoupled_grads, sum_of_squares
from dist_ortho.optim.groups import ParamStack, Part
from dist_ortho.optim.holding import StackHeld, part_of
from dist_ortho.optim.hooks import NoOpWeightUpdateHook, WeightUpdateHook, as_program_hook, check_whole, hook_entry
from dist_ortho.optim.layouts import ParamLayouts
from dist_ortho.optim.nonfinite import NONFINITE, Nonfinite
from dist_ortho.optim.options import accepted_keywords, check_bool, check_choice, check_number, reject_unknown
from dist_ortho.optim.planning import StepPlan, batching_keys, build_stacks, plan_table, refresh_states, resolve_modes
from dist_ortho.optim.replicas import ReplicaGrid
from dist_ortho.optim.settings import STRUCTURAL_OPTIONS
from dist_ortho.optim.step import GroupStep, run_phase
from dist_ortho.layout import Held, Layout
from dist_ortho.params import GTP_ATTRIBUTES, is_expert_stack, unreadable
from dist_ortho.precision import MATMUL_PRECISIONS, MatmulPrecision, NsDtype, check_ns_dtype, log_ns_dtype
from dist_ortho.qkv import PerHead, check_per_head, head_dim_of, per_head_option, unmatched_keys
from dist_ortho.tp import TP_MODES, NsSpec
from dist_ortho.tp.batching import BatchMatrices
from dist_ortho.tp.local import LOCAL_GRAM, LocalGram

logger = logging.getLogger(__name__)

WeightDecayMethod = Literal["decoupled", "independent", "l2", "palm"]
WEIGHT_DECAY_METHODS: tuple[str, ...] = get_args(WeightDecayMethod)
ConvMode = Literal["flatten", "batched"]
CONV_MODES: tuple[str, ...] = get_args(ConvMode)
__all__ = ["MatmulPrecision", "OrthogonalizedOptimizer", "check_choice", "check_number"]


class OrthogonalizedOptimizer(Optimizer):
    """Momentum, then an orthogonalized update, for matrix parameters; exact across tensor parallelism.

    Args:
        params: parameters or parameter groups; every parameter must be 2D (or 3D+ with ``conv_mode``).
        lr: learning rate. momentum: beta in [0, 1). weight_decay: >= 0.
        nesterov: use the Nesterov direction. weight_decay_method: one of :data:`WEIGHT_DECAY_METHODS`.
        fp32_matmul_prec: torch float32 matmul precision while orthogonalizing ("medium" runs NS in bf16).
        ns_dtype: the dtype Newton-Schulz runs in, "bf16", "fp16" or "fp32" (float64 weights stay float64); None
            (default): fp32_matmul_prec decides as above. Per group; fp16 and bf16 inputs are normalized with a
            float64 norm first, so entries far below float16's range are orthogonalized, not flushed to zero.
        scaled_orthogonalize_fn: ``fn(matrix) -> update`` used by the default :meth:`update`; under TP it
            is applied to the gathered matrix (so any function is exact) and this rank's block is kept.
        weight_update_hook: run around each matrix's W <- W - lr U (Emerging-Optimizers' WeightUpdateHook:
            ``pre_weight_update_inplace(W, U) -> state``, ``post_weight_update_inplace(W, state)``); the hooks of
            dist_ortho.optim.hooks are exact on TP shards, another class's run where a matrix is whole on the rank.
        tp_group: process group of tensor parallelism; parameters marked by the TE/Megatron protocol
            (``tensor_model_parallel``, ``partition_dim``) are treated as its shards.
        tp_mode: how Newton-Schulz runs on shards, one of :data:`dist_ortho.TP_MODES`.
        expert_tp_group: the group of expert weights (``expert_tp=True``).
        conv_mode: None (matrices only), "flatten" (out, in*k*k) or "batched" (one (out, in) matrix per
            spatial position, update scaled by spatial_size^-0.5) for 3D+ weights.
        coalesce: run the collectives of all matrices of a step together, in flat buffers (one call per
            round, group and dtype, buckets of at most ``bucket_bytes``). False runs each matrix on its
            own (the anchors' way: one set of collectives per matrix).
        split_qkv: orthogonalize the Q, K, V (and gate) rows of a fused QKV weight as separate matrices
            (see dist_ortho.qkv). A weight is fused QKV when ``is_qkv_fn(p)`` is true, or without
            is_qkv_fn when it carries ``is_qkv=True``; its split comes from its ``qkv_split_shapes``
            attribute, else from ``qkv_split_shapes`` here.
        qkv_per_head: with split_qkv, orthogonalize every attention head of a fused QKV weight (each
            query head, and each group's key and value head: kv_channels rows) as its own matrix.
        per_head: separate attention weights orthogonalized head by head (torchtitan's wq, wk, wv; Dion's
            ``num_heads``): a mapping of parameter-name keys to head_dim, e.g. ``{"wq": hd, "wk": hd, "wv": hd}``
            with ``hd = dim // n_heads`` from the model config. A key matches a name when its dotted segments appear
            consecutively in it ("wq" matches ``layers.0.attention.wq.weight``), or as a glob when it has ``*?[``;
            names come from ``model.named_parameters()`` or ``param_names``. A ``head_dim`` attribute on a
            parameter does the same. Head h is rows [h * head_dim, (h + 1) * head_dim) of the weight, orthogonalized
            (and scaled, by its own head_dim x dim shape) as a matrix of its own, exactly under TP (whole heads per
            rank, or heads cut over ranks) and FSDP pieces; the heads of one shape run as one batch
            (dist_ortho.qkv, dist_ortho.tp.batching). A weight that cannot be split so (not 2D, experts, fused
            QKV: use qkv_per_head, rows not a multiple of head_dim) is a ValueError naming it.
        local_gram: where a whole matrix is orthogonalized on one rank (duplicated, home, unsharded): "auto"
            runs the Gram-space recursion where it is cheaper (dist_ortho.tp.local), "always", "never".
        batch_matrices: whether same-shape whole matrices on one rank run Newton-Schulz as one batched
            iteration: "auto" (where it pays on this device, dist_ortho.tp.batching), True, or False (keeps home
            bit-identical to duplicated: a batched matmul may round differently).
        nonfinite: what a step does when an update is not finite (a NaN or Inf in some rank's gradient):
            "raise" (default, as Megatron-LM raises on NaN gradients) a FloatingPointError naming the parameter
            and step, "skip" the step on every rank (weights and state untouched, counted in
            ``skipped_steps``), "ignore" (write it). One check over the whole step (dist_ortho.optim.nonfinite),
            on results every rank of a group shares, so all ranks decide alike; nothing is written before it.
            Default None: "raise", or "skip" when ``capturable``.
        capturable: keep the steady-state step free of host syncs, so that it can be captured in a CUDA graph
            (torch's name): ``lr`` is kept as a device tensor (a float given is converted; LR schedulers set it
            in place), a "skip" is committed on the device, and anything that must sync ("raise", MOP's SVD,
            a non-tensor lr set later) is refused with a ValueError naming it.
        param_names: a mapping (or (name, tensor) pairs) naming parameters in messages and plans; names also come
            from torch's own named parameters (``model.named_parameters()`` passed as ``params``).
        dp_group: the data-parallel group that replicates the TP groups (gradients already averaged over it,
            e.g. by DDP). Each parameter is then updated by one owner replica only (dist_ortho.grid), which
            alone keeps its state, and shared with the others after the step.
        reduce_grads: with dp_group, the gradients are this rank's own (not averaged over DP): the step
            averages them into each parameter's owner with one reduce-scatter per dtype (half the bytes of
            DDP's all-reduce) instead of expecting them averaged. (FSDP2's DTensor gradients are already
            reduce-scattered: left as they are.)
        device_mesh: a 2D DeviceMesh with dims named "dp" and "tp": the same as dp_group=mesh["dp"].get_group(),
            tp_group=mesh["tp"].get_group(). DTensor parameters (FSDP2, torch tensor parallel) on these mesh
            dims are orthogonalized exactly (dist_ortho.dtensor); their placements replace the TE attributes.
        mesh_dims: the DTensor meshes' own dim names mapped to names dist_ortho.dtensor.MESH_DIM_ROLES knows, e.g.
            ``{"replica": "dp_replicate", "shard": "fsdp", "model": "tp"}`` (an unknown one: ValueError). HSDP
            (replicated over one DP dim, in pieces over another) spreads each matrix's owner over replicas x
            shards (x TP): it is stepped once in the world, its state kept by its owner only.
        overlap: with dp_group, the step issues its share (the owners' new weights to every replica) without waiting
            for it: it is waited for where the weights are next read, by the hooks that :meth:`overlap_by_layer`
            installs (each layer's forward, ``state_dict`` and ``load_state_dict``), :meth:`wait_for`, or
            :meth:`finish` (called by the next step and the optimizer's ``state_dict`` and ``load_state_dict``).
            And Newton-Schulz runs as a pipeline of buckets of matrix shapes, one bucket's collectives in flight
            while another computes (dist_ortho.tp.orthogonalize_many). Same arithmetic: the weights are
            bit-identical to ``overlap=False`` (dist_ortho.optim.overlap).
        overlap_with_backward: with ``reduce_grads``, average each gradient into its owner while backward runs:
            a bucket's reduce-scatter is issued as soon as its gradients are final (post-accumulate-grad hooks,
            dist_ortho.backward; buckets: the layers given to :meth:`overlap_by_layer` in backward order, else
            ``backward_bucket_bytes``), and the step waits for them. From the second step on (the first
            step's reduction is blocking, as it finds the layout). With gradient accumulation run every
            micro-batch but the last inside :meth:`no_sync`.
        verify_plan: when the ranks check that they run the same plan (dist_ortho.optim.agreement): "on_change"
            (default: when the plan is new to a rank, no call while it is unchanged; a rank that changes its plan
            alone after the first step is then ended by the collective timeout, a CollectiveError) or
            "every_step" (one 16-byte all-gather per group as the first call of every step: that rank and the
            others all raise the ValueError naming the first entry they differ on).
        **member_options: the per-group options of a member (coefficient_type, num_ns_steps, ...), named in
            the member's own signature; any other key is a TypeError.
    """

    forwards_to_torch_optimizer = True
    # The options a member's **kwargs may carry to this class; the others (lr, momentum, weight_decay,
    # nesterov, ...) a member names in its own signature, or fixes (Scion has no weight_decay).
    forwarded_options = frozenset({
        "tp_group", "tp_mode", "ns_dtype", "expert_tp_group", "conv_mode", "split_qkv", "qkv_split_shapes", "is_qkv_fn",
        "qkv_per_head", "coalesce", "bucket_bytes", "local_gram", "batch_matrices", "nonfinite", "dp_group",
        "reduce_grads", "device_mesh", "capturable", "param_names", "overlap", "overlap_with_backward",
        "backward_bucket_bytes", "verify_plan", "per_head", "mesh_dims",
    })
    # Members whose update reads ctx.orthogonalized: the step runs Newton-Schulz of every direction
    # first, for all matrices together.
    uses_newton_schulz = False
    # Members whose update is written over a batch (a leading dim, one matrix per member of a group; norms and
    # the like per matrix). False (a member written for one matrix, or scaled_orthogonalize_fn): every
    # parameter is its own group and the contexts carry its matrix alone.
    batched = False
    # Members whose update makes a host sync (an SVD): refused with capturable=True.
    syncs_host = False

    def __new__(cls, *args: Any, **kwargs: Any) -> OrthogonalizedOptimizer:
        # Before any __init__ runs: a misspelled or fixed keyword is a TypeError naming it and the accepted ones.
        reject_unknown(cls.__name__, kwargs, accepted_keywords(cls))
        return super().__new__(cls)

    def __init__(
        self,
        params: ParamsT,
        lr: float,
        momentum: float,
        weight_decay: float,
        *,
        nesterov: bool,
        weight_decay_method: WeightDecayMethod,
        fp32_matmul_prec: MatmulPrecision,
        ns_dtype: NsDtype | None = None,
        scaled_orthogonalize_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        weight_update_hook: WeightUpdateHook[Any] | None = None,
        tp_group: comm.ProcessGroup | None = None,
        tp_mode: str = "duplicated",
        expert_tp_group: comm.ProcessGroup | None = None,
        conv_mode: ConvMode | None = None,
        split_qkv: bool = True,
        qkv_split_shapes: Sequence[int] | None = None,
        is_qkv_fn: Callable[[torch.Tensor], bool] | None = None,
        qkv_per_head: bool = False,
        per_head: PerHead | None = None,
        coalesce: bool = True,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        local_gram: LocalGram = "auto",
        batch_matrices: BatchMatrices = "auto",
        nonfinite: Nonfinite | None = None,
        dp_group: comm.ProcessGroup | None = None,
        reduce_grads: bool = False,
        device_mesh: Any = None,
        mesh_dims: MeshDims | None = None,
        capturable: bool = False,
        param_names: Any = None,
        overlap: bool = False,
        overlap_with_backward: bool = False,
        backward_bucket_bytes: int = DEFAULT_GRAD_BUCKET_BYTES,
        verify_plan: VerifyPlan = "on_change",
        **member_options: Any,
    ) -> None:
        if device_mesh is not None:
            tp_group, dp_group = mesh_groups(device_mesh, tp_group, dp_group)
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            nesterov=nesterov,
            weight_decay_method=weight_decay_method,
            fp32_matmul_prec=fp32_matmul_prec,
            ns_dtype=ns_dtype,
            tp_mode=tp_mode,
            conv_mode=conv_mode,
            split_qkv=split_qkv,
            qkv_split_shapes=tuple(qkv_split_shapes) if qkv_split_shapes is not None else None,
            qkv_per_head=qkv_per_head,
            per_head=per_head_option(per_head),
            coalesce=coalesce,
            local_gram=local_gram,
            batch_matrices=batch_matrices,
            nonfinite=nonfinite if nonfinite is not None else ("skip" if capturable else "raise"),
            **member_options,
        )
        if scaled_orthogonalize_fn is None and type(self).update is OrthogonalizedOptimizer.update:
            raise TypeError("OrthogonalizedOptimizer needs scaled_orthogonalize_fn, or a subclass that overrides update")
        self.scaled_orthogonalize_fn = scaled_orthogonalize_fn
        self._weight_update_hook = as_program_hook(weight_update_hook)
        self._hook_states: dict[int, Any] = {}  # a weight-update context's pre-hook state, for its post-hook
        self.tp_group = tp_group
        self.expert_tp_group = expert_tp_group
        self.dp_group = dp_group
        self.expert_dp_group: comm.ProcessGroup | None = None  # read from expert DTensors' meshes (dp_of)
        self.reduce_grads = reduce_grads
        self.is_qkv_fn = is_qkv_fn
        self.bucket_bytes = bucket_bytes
        # Derived once from the parameters (their shapes on every rank), never changed after:
        self.layouts = ParamLayouts(tp_group, expert_tp_group, dp_group, self.is_qkv)
        self.mesh_dims = self.layouts.mesh_dims = check_mesh_dims(mesh_dims)
        self._logged_plan: str | None = None
        self._agreement = PlanAgreement(type(self).__name__)
        self.verify_plan = check_choice("verify_plan", verify_plan, VERIFY_PLAN)
        self.step_count = 0
        self._skipped = 0  # steps skipped for a non-finite update (nonfinite="skip")
        self._skipped_on_device: torch.Tensor | None = None  # the same, counted on the device (capturable)
        self.capturable = capturable
        self.names: dict[torch.Tensor, str] = {}  # parameter -> name, for messages and plans
        self._given: list[tuple[dict[str, Any], list[torch.Tensor]]] = []  # each group's parameters as given
        self._without_grad: dict[torch.Tensor, bool] = {}  # steps with a zero gradient when it has none
        self._plan: tuple[tuple, StepPlan] | None = None  # the latest plan and its key (a changed one is made anew)
        self._state_seen: Any = None
        self._plan_seen: StepPlan | None = None
        self._engine = GroupStep(self)
        self._last_comm = comm.CommStats()
        check_bool("overlap", overlap)
        self.overlap = overlap
        check_bool("overlap_with_backward", overlap_with_backward)
        if overlap_with_backward and not reduce_grads:
            raise ValueError("overlap_with_backward=True needs reduce_grads=True (the step then reduces the gradients; "
                             "without it they arrive averaged, e.g. by DDP, which overlaps its own reduction)")
        self.overlap_with_backward = overlap_with_backward
        self.backward_bucket_bytes = int(check_number("backward_bucket_bytes", backward_bucket_bytes, 1))
        if param_names is not None:  # before the groups are checked, so that checks can name parameters
            named = param_names.items() if isinstance(param_names, dict) else param_names
            self.names.update((p, name) for name, p in named)
        super().__init__(params, defaults)
        unmatched = unmatched_keys(defaults["per_head"], [self.names[p] for g in self.param_groups for p in g["params"]
                                                          if p in self.names])
        if unmatched:  # a warning, not an error: a pipeline stage or a wrapper's subset may hold none of them
            logger.warning("%s: per_head keys %s match no parameter name here", type(self).__name__, unmatched)
        self._groups_from_params = device_mesh is None and tp_group is None and dp_group is None and expert_tp_group is None
        if self._groups_from_params:
            self._groups_from_meshes()
        self.grid = ReplicaGrid(self)  # owners, gradients into them, the share and its finite decision

    def _groups(self) -> tuple[comm.ProcessGroup | None, ...]:
        """Every group whose ranks must agree on the plan: TP, expert TP, DP and the owner groups found so far."""
        groups = {self.layouts.owner_key(p): g for p, g in self.layouts.owner_groups.items() if g is not None}
        groups.pop(self.layouts.ranks(self.dp_group), None)  # the DP group is there already
        return (self.tp_group, self.expert_tp_group, self.dp_group, self.expert_dp_group, *groups.values())

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for a non-finite update (``nonfinite="skip"``; reading it syncs a capturable step's count)."""
        on_device = int(self._skipped_on_device) if self._skipped_on_device is not None else 0
        return self._skipped + on_device

    def count_skip(self, ok: torch.Tensor | None = None) -> None:
        """One more skipped step, or (capturable) one where the device bool ``ok`` is False."""
        if ok is None:
            self._skipped += 1
            return
        if self._skipped_on_device is None:
            self._skipped_on_device = torch.zeros((), dtype=torch.int64, device=ok.device)
        self._skipped_on_device.add_((~ok).to(torch.int64))

    def _groups_from_meshes(self) -> None:
        """Without device_mesh= or groups: read them from DTensor parameters' named mesh dims, if any."""
        params = [p for group in self.param_groups for p in group["params"]]
        found = groups_from_meshes(params, [p.ndim == 3 and self.is_expert_stack(p) for p in params], self.mesh_dims,
                                   [self.names.get(p) for p in params])
        self.tp_group = self.layouts.tp_group = found.get("tp_group")
        self.dp_group = self.layouts.dp_group = found.get("dp_group")
        self.expert_tp_group = self.layouts.expert_tp_group = found.get("expert_tp_group")
        self.expert_dp_group = self.layouts.expert_dp_group = found.get("expert_dp_group")

    # -- names --
    def _carry_names(self) -> None:
        """Names of parameters that a wrapper replaced in their group after construction (megatron-core's fp32
        master copies of bf16 weights) pass to the tensors that took their place, and so do the GTP attributes
        that say how they are held (megatron-core copies only ``is_gtp_weight_remat``)."""
        for group, given in self._given:
            for old, new in self._replaced(given, group["params"]):
                if old in self.names and new not in self.names:
                    self.names[new] = self.names[old]
                if getattr(old, "is_gtp_weight_remat", False) is True and not hasattr(new, "pad_length"):
                    for attribute in GTP_ATTRIBUTES:
                        if hasattr(old, attribute):
                            setattr(new, attribute, getattr(old, attribute))

    @staticmethod
    def _replaced(given: Sequence[torch.Tensor], current: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(given tensor, the tensor that took its place) of a param group: by the given tensors' ``main_param``
        (megatron-core's link to a master copy; its layer-wise optimizer also drops the tensors other replicas
        own), else position by position when the group kept its length."""
        masters = {id(old.main_param): old for old in given if getattr(old, "main_param", None) is not None}
        if masters:
            return [(masters[id(new)], new) for new in current if id(new) in masters]
        if len(given) != len(current):
            return []
        return [(old, new) for old, new in zip(given, current) if new is not old]

    def name_of(self, p: torch.Tensor) -> str:
        """The parameter's name, or its shape when it has none."""
        return self.names.get(p) or f"a parameter of shape {tuple(p.shape)}"

    # -- construction-time checks, per group (so that per-group overrides are checked too) --
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self.names.update(zip(group["params"], group.get("param_names", ())))
        self._given.append((group, list(group["params"])))
        self.check_group(group)

    def check_group(self, group: dict[str, Any]) -> None:
        """Validate a param group's options; members extend this (call super)."""
        check_number("lr", group["lr"])
        check_number("momentum", group["momentum"], 0.0, 1.0, high_open=True)
        check_number("weight_decay", group["weight_decay"])
        check_choice("weight_decay_method", group["weight_decay_method"], WEIGHT_DECAY_METHODS)
        check_choice("fp32_matmul_prec", group["fp32_matmul_prec"], MATMUL_PRECISIONS)
        if check_ns_dtype(group.get("ns_dtype")) is not None:
            log_ns_dtype(group["ns_dtype"])
        check_choice("tp_mode", group["tp_mode"], TP_MODES)
        check_choice("local_gram", group["local_gram"], LOCAL_GRAM)
        check_choice("nonfinite", group["nonfinite"], NONFINITE)
        if not isinstance(group["batch_matrices"], bool) and group["batch_matrices"] != "auto":
            raise ValueError(f"batch_matrices must be 'auto', True or False, got {group['batch_matrices']!r}")
        if self.capturable:
            self._check_capturable(group)
        if group["conv_mode"] is not None:
            check_choice("conv_mode", group["conv_mode"], CONV_MODES)
        if "coefficient_type" in group:  # members that run Newton-Schulz
            get_coefficients(group["coefficient_type"], group["num_ns_steps"], group.get("custom_coefficient_sets"))
        if "extra_scale_factor" in group:
            check_number("extra_scale_factor", group["extra_scale_factor"])
        group["per_head"] = per_head_option(group.get("per_head"))
        for p in group["params"]:
            self.check_param(p, group)

    def _check_capturable(self, group: dict[str, Any]) -> None:
        """capturable=True: refuse what would sync with the host in every step; lr becomes a device tensor."""
        what = None
        if group["nonfinite"] == "raise":
            what = "nonfinite='raise' reads the finite check on the host: pass nonfinite='skip' (on the device) or 'ignore'"
        elif self.syncs_host:
            what = f"{type(self).__name__}'s update syncs with the host (an SVD)"
        elif self.verify_plan == "every_step":
            what = "verify_plan='every_step' reads every rank's plan digest on the host each step: pass 'on_change'"
        if what is not None:
            raise ValueError(f"capturable=True: {what}")
        if not isinstance(group["lr"], torch.Tensor) and group["params"]:
            group["lr"] = torch.tensor(float(group["lr"]), device=local(group["params"][0]).device)

    def is_expert_stack(self, p: torch.Tensor) -> bool:
        """A 3D weight [E, out, in] of E expert matrices (dist_ortho.params.is_expert_stack, or a DTensor on a mesh
        with an "ep" dim)."""
        return is_expert_stack(p, self.names.get(p)) or is_expert_dtensor(p, self.mesh_dims)

    def check_param(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        problem = unreadable(p, self.names.get(p))
        if problem is not None:
            raise ValueError(problem)
        head_dim = head_dim_of(p, self.names.get(p), group["per_head"])
        if head_dim is not None:
            check_per_head(p, self.names.get(p), head_dim, fused=self.is_qkv(p), expert=self.is_expert_stack(p))
        if p.ndim == 2 or (p.ndim > 2 and group["conv_mode"] is not None) or self.is_expert_stack(p):
            return
        hint = (
            "pass conv_mode='flatten' or 'batched' for convolution weights, or mark a 3D weight [E, out, in] of "
            "experts with expert_stack=True (names with 'experts' are read so)"
            if p.ndim > 2
            else "route it to AdamW: use dist_ortho.MuonAdamW (automatic routing), or give its group use_fallback=True there"
        )
        raise ValueError(f"{type(self).__name__} orthogonalizes matrices; got a parameter of shape {tuple(p.shape)}: {hint}")

    # -- how each parameter is held (dist_ortho.optim.layouts), found once for all of them --
    def layout(self, p: torch.Tensor) -> Layout:
        """The global layout of p's matrix view."""
        if p not in self.layouts:
            self._carry_names()
            if self._groups_from_params and not self.layouts.held:  # a wrapper (Megatron-FSDP's fully_shard) may have
                self._groups_from_meshes()  # put DTensors in the groups after construction
            new = [(q, group) for group in self.param_groups for q in group["params"] if q not in self.layouts]
            self.layouts.find(new, self.names.get, self.is_expert_stack)
        return self.layouts.layouts[p]

    def part_layouts(self, p: torch.Tensor) -> list[Layout]:
        """Layouts of the components of a split fused weight, in state-key order part0, part1, ... (else [])."""
        self.layout(p)
        return [layout for _, layout in self.layouts.parts.get(p, [])]

    def is_qkv(self, p: torch.Tensor) -> bool:
        return bool(self.is_qkv_fn(p)) if self.is_qkv_fn is not None else getattr(p, "is_qkv", False) is True

    # -- how each state tensor is held (read by checkpoints) --
    def state_holding(self, p: torch.Tensor, path: Sequence[str]) -> Held | StackHeld:
        """How the ranks hold state tensor ``state[p][path[0]]...``: like the matrix, reduced, or replicated; for a
        stack whose experts are split over ranks (EP, FSDP over experts) a StackHeld: which experts this rank holds
        (the owner's gathered block where the stack is held in pieces), each held so.

        Members declare their own keys in :meth:`held_state`; an undeclared key is an error."""
        layout = self.layout(p)
        experts = tuple(s for s in self.layouts.held[p].splits if s.kind == "experts" and s.size > 1)
        part = part_of(path)
        if part is not None:
            layout = self.part_layouts(p)[part]
        group = self._group_of(p)
        held = self.held_state(path[-1], layout, group)
        if held is None:
            raise KeyError(f"{type(self).__name__} does not declare how its state {'/'.join(path)!r} is held")
        return StackHeld(held, experts) if experts else held

    def held_state(self, key: str, layout: Layout, group: dict[str, Any]) -> Held | None:
        """How a state tensor ``key`` of a matrix with ``layout`` is held; members extend this (call super)."""
        if key == "momentum_buffer":
            return layout.held()
        return None

    def _group_of(self, p: torch.Tensor) -> dict[str, Any]:
        return next(g for g in self.param_groups if any(q is p for q in g["params"]))

    # -- what a member defines --
    def init_state(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        """Fill a parameter's state at its first step (not after load_state_dict). State tensors have the
        parameter's dtype, as torch's load_state_dict casts them to it."""
        state["momentum_buffer"] = torch.zeros_like(p)

    def init_state_program(self, ctx: MatrixContext) -> Program[None]:
        """Program run at a parameter's first step, for all new parameters together (default: init_state)."""
        self.init_state(ctx.param, ctx.state, ctx.options)
        yield from ()

    def update(self, ctx: MatrixContext) -> Program[torch.Tensor]:
        """Program: this rank's block of the update of one matrix (default: scaled_orthogonalize_fn of the
        gathered direction)."""
        assert self.scaled_orthogonalize_fn is not None
        full = yield from ctx.gather(ctx.direction)
        return ctx.own_block(self.scaled_orthogonalize_fn(full))

    def pre_weight_update(self, ctx: MatrixContext, update: torch.Tensor) -> Program[None]:
        """Program run with the whole update before W <- W - lr * update (a batch: the group's weights)."""
        if type(self).pre_weight_update_fn_inplace is not OrthogonalizedOptimizer.pre_weight_update_fn_inplace:
            for p, u in zip(*self._members(ctx, ctx.param, update)):
                self.pre_weight_update_fn_inplace(p, u)
        self._hook_states[id(ctx)] = yield from self._weight_update_hook.pre_update(ctx, ctx.param, update)

    def post_weight_update(self, ctx: MatrixContext) -> Program[None]:
        """Program run after the update."""
        if type(self).post_weight_update_fn_inplace is not OrthogonalizedOptimizer.post_weight_update_fn_inplace:
            for (p,) in zip(*self._members(ctx, ctx.param)):
                self.post_weight_update_fn_inplace(p)
        yield from self._weight_update_hook.post_update(ctx, ctx.param, self._hook_states.pop(id(ctx), None))

    @staticmethod
    def _members(ctx: MatrixContext, *batches: torch.Tensor) -> list[Sequence[torch.Tensor]]:
        """Each batch as one tensor per member (the members' matrix views), for per-parameter hooks."""
        count = len(ctx.names) if ctx.batched else 1
        return [list(t.chunk(count)) if ctx.batched and count != t.size(0) else (list(t) if ctx.batched else [t])
                for t in batches]

    def pre_weight_update_fn_inplace(self, p: torch.Tensor, update: torch.Tensor) -> None:
        """Called with one weight's update (its matrix view) before W <- W - lr * update (no collectives)."""

    def post_weight_update_fn_inplace(self, p: torch.Tensor) -> None:
        """Called with one weight (its matrix view) after the update (no collectives)."""

    @staticmethod
    def _l2(group: dict[str, Any]) -> bool:
        return group["weight_decay_method"] == "l2" and group["weight_decay"] != 0

    def apply_weight_decay(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        """Decay W in place (decoupled, independent, palm); l2 is added to the gradient instead."""
        wd, lr, method = group["weight_decay"], group["lr"], group["weight_decay_method"]
        if wd == 0 or method == "l2":
            return
        factor = {"decoupled": lr * wd, "independent": wd, "palm": lr * lr * wd}[method]
        p.mul_(1 - factor)

    # -- Newton-Schulz jobs and the plan they follow --
    def ns_spec(self, group: dict[str, Any]) -> NsSpec | None:
        """The group's Newton-Schulz spec (None for members that run none)."""
        if "num_ns_steps" not in group:
            return None
        custom = group.get("custom_coefficient_sets")
        return NsSpec(
            group["num_ns_steps"], group["coefficient_type"], tuple(map(tuple, custom)) if custom else None,
            use_syrk=group.get("use_syrk", False), local_gram=group["local_gram"], batch=group["batch_matrices"],
            sync_free=self.capturable, ns_dtype=group.get("ns_dtype"),
        )

    # -- the step --
    def _taking_part(self) -> list[torch.Tensor]:
        """The parameters this step updates: those with a gradient, and every tensor-parallel one that
        requires one (a missing gradient of a shard counts as zero, on every rank alike, so that the
        shards of one matrix always step together; Megatron's gradient buffers are never None either), and
        on the DP x TP grid every one that requires one (a replica may not have used a weight: its owner
        updates it from the others' gradients and shares it with every replica alike)."""
        out = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None or self._steps_without_grad(p):
                    out.append(p)
        return out

    def _steps_without_grad(self, p: torch.Tensor) -> bool:
        known = self._without_grad.get(p)
        if known is None:
            known = self._without_grad[p] = p.requires_grad and (
                self.layout(p).group is not None or self.layouts.held_apart(p) or self.layouts.owner_group(p) is not None)
        return known

    def _plan_entries(self, params: Sequence[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[list[tuple], list[str]]:
        """What every rank must agree on about ``params`` (dist_ortho.optim.agreement.plan_entry), and their labels."""
        entries, hook = [], hook_entry(self._weight_update_hook)
        for p, group in params:
            layout = self.layout(p)
            kind = None if layout.group is None else ("expert" if layout.group is self.expert_tp_group else "dense")
            entries.append(plan_entry(self.names.get(p), layout, kind, p.dtype, group, len(self.layouts.parts.get(p, ())),
                                      self.layouts.dp_local(p), hook))
        return entries, [self.names.get(p) or f"param {i} {tuple(p.shape)}" for i, (p, _) in enumerate(params)]

    def _agree(self, params: Sequence[tuple[torch.Tensor, dict[str, Any]]]) -> None:
        """Every rank runs the same plan (dist_ortho.optim.agreement), or the same ValueError on every rank."""
        self._agreement.check(*self._plan_entries(params), self._groups(),
                              self._input_error(p for p, _ in params))

    def _input_error(self, params: Iterable[torch.Tensor]) -> str | None:
        """The first thing wrong with this rank's own ``params`` that only it can see (a DTensor's local tensor
        that is not its piece), for the agreement to raise on every rank."""
        return next((e for e in map(self.layouts.problems.get, params) if e is not None), None)

    def _verify_plan(self) -> None:
        """``verify_plan="every_step"``: every rank's plan checked against the others' as the step's first call
        (dist_ortho.optim.agreement). Parameters whose layout this rank has not found yet (found with collectives,
        which the others would not join) make an entry of their own, so a rank that added some alone differs there."""
        every = [(p, group) for group in self.param_groups for p in group["params"] if p.requires_grad]
        new = [p for p, _ in every if p not in self.layouts]
        if new:
            names = tuple(self.names.get(p) or f"{tuple(p.shape)}" for p in new)
            key: Any = ("new", names)

            def entries() -> tuple[list[tuple], list[str]]:
                return [("parameters new to this rank", names)], ["new parameters"]
        else:
            taking_part = {id(p) for p in self._taking_part()}  # no collective: every layout is known
            key = (self._plan_key(p for p, _ in every), tuple(id(p) in taking_part for p, _ in every))

            def entries() -> tuple[list[tuple], list[str]]:
                made, labels = self._plan_entries(every)
                return [(*e, id(p) in taking_part) for e, (p, _) in zip(made, every)], labels
        self._agreement.verify(key, entries, self._groups(),
                               self._input_error(p for p, _ in every))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One step of every parameter with a gradient (see the module doc). Nothing is written until every
        update is known finite (``nonfinite``): momentum and weight decay are committed with the update."""
        loss = call_closure(closure)
        self.finish()
        self.step_count += 1
        self._last_comm = stats = comm.CommStats()
        try:
            with comm.count_collectives(stats), decoupled_grads([p for g in self.param_groups for p in g["params"]]):
                self._step()
        except comm.CollectiveError as e:
            prefix = f"{type(self).__name__} step {self.step_count}: "
            raise comm.CollectiveError(str(e) if str(e).startswith(prefix) else prefix + str(e)) from e
        return loss

    # -- the share in flight (overlap=True) --
    def finish(self) -> None:
        """Complete the last step's share (``overlap=True``): every replica's weights and the owners' state are
        then the step's (or it raises, as the step would have, on every rank alike). A no-op otherwise."""
        self.grid.finish()

    def wait_for(self, module: torch.nn.Module) -> None:
        """Complete the share of ``module``'s parameters (and of those shared before them)."""
        self.grid.wait_for(module)

    def qk_clip(self, max_logits: Any, tau: float, groups: Sequence[Any] = ()) -> Any:
        """QK-clip (MuonClip) after the step, with maxima agreed over TP, DP and ``groups`` (dist_ortho.optim.qk_clip)."""
        from dist_ortho.optim.qk_clip import qk_clip
        return qk_clip(self, max_logits, tau, groups)

    def overlap_by_layer(self, layers: Sequence[torch.nn.Module]) -> list[Any]:
        """The model's layers, in forward order, as the units of overlap. With ``overlap=True`` the share is cut
        into one bucket per layer and each layer's bucket is waited for where the layer's weights are next read:
        a forward pre-hook (run before any other pre-hook, FSDP2's all-gather included), and state-dict and
        load-state-dict pre-hooks (a ``model.state_dict()`` or a checkpoint save reads the new weights; a
        ``model.load_state_dict()`` is not overwritten by a share landing after it). On the DP x TP grid every
        parameter the share brings must be in one of the layers (a ValueError names those in none: nothing
        would wait for them before a forward reads them). With ``overlap_with_backward`` the gradients are
        reduced per layer, in backward order. Returns the hooks' handles (``.remove()``)."""
        if not (self.overlap or self.overlap_with_backward):
            raise ValueError("overlap_by_layer needs overlap=True or overlap_with_backward=True")
        layers = list(layers)
        for i, module in enumerate(layers):
            if not isinstance(module, torch.nn.Module):
                raise TypeError(f"overlap_by_layer: layers[{i}] must be a torch.nn.Module, got {type(module).__name__}")
        self.grid.set_layers(layers)
        if not self.overlap:
            return []

        def wait(module: torch.nn.Module, *_: Any) -> None:
            self.wait_for(module)
        return [handle for module in layers for handle in (
            module.register_forward_pre_hook(wait, prepend=True), module.register_state_dict_pre_hook(wait),
            module.register_load_state_dict_pre_hook(wait))]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch.optim's, after forgetting that these gradients were reduced (a step skipped after reading their
        norm must not leave the next backward's gradients unreduced) and completing the reductions a backward
        issued for them (``overlap_with_backward``: none is left in flight, the next backward starts afresh)."""
        self.grid.forget_reduction()
        super().zero_grad(set_to_none)

    def no_sync(self) -> contextlib.AbstractContextManager[None]:
        """Gradient accumulation with ``overlap_with_backward``: a backward inside this block reduces nothing (its
        gradients are not final); the last micro-batch's backward, outside it, starts the reductions."""
        return self.grid.no_sync()

    def state_dict(self) -> dict[str, Any]:
        self.finish()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.finish()
        super().load_state_dict(state_dict)

    def comm_stats(self) -> comm.CommStats:
        """The last step's collectives on this rank: calls and bytes by kind, and ``wait_ms``, the time it spent
        blocked waiting for them (dist_ortho.comm.CommStats). With ``overlap=True`` the share's waits (in the next
        forward's pre-hooks, ``finish()``) are added to it when they happen."""
        return self._last_comm

    def owner(self, p: torch.Tensor) -> int:
        """The rank of the grid group (dist_ortho.optim.layouts) that updates ``p`` and keeps its state (0 without one)."""
        return self.grid.owner(p)

    def owns(self, p: torch.Tensor) -> bool:
        """Whether this rank updates ``p`` and keeps its state (the checkpoint contract's owner, with the holding of
        :meth:`state_holding`): its owner replica's ranks; held in pieces its owner rank only, under HSDP one rank of
        the replicas x shards grid (the other replicas keep none)."""
        return self.grid.owns(p)

    def reduce_gradients(self) -> None:
        """With ``reduce_grads``: average the gradients into their owners now (the step does it otherwise;
        call it before reading gradients across the grid, e.g. :meth:`grad_sum_of_squares`)."""
        self.grid.reduce_gradients()

    def grad_sum_of_squares(self) -> torch.Tensor:
        """This rank's share of sum(g^2) over every gradient of the optimizer, float64, each element counted on
        one rank of the DP x TP grid (dist_ortho.optim.gradients), so that the sum over the grid is the
        single-process value (gradients averaged over DP, or reduced)."""
        params = [p for group in self.param_groups for p in group["params"]]
        problem = grid_sum_problem([(self.name_of(p), p) for p in params], self.tp_group, self.dp_group)
        if problem is not None:  # before any collective, alike on every rank
            raise ValueError(f"{type(self).__name__}.grad_sum_of_squares: {problem}")
        self.reduce_gradients()
        for p in params:
            self.layout(p)
        with decoupled_grads(params):
            return sum_of_squares(params, self.layouts, self.owns, self.tp_group)

    def _plan_key(self, params: Iterable[torch.Tensor]) -> tuple:
        """What a plan for ``params`` depends on that is cheap to compare: the parameters (by identity) and the
        options that shape a step, per group (a change makes the plan, and its agreement, anew)."""
        options = tuple((id(g), tuple(repr(g.get(k)) for k in STRUCTURAL_OPTIONS)) for g in self.param_groups)
        return tuple(map(id, params)), options

    def _step_plan(self, params: list[torch.Tensor]) -> StepPlan:
        """The plan of a step with these parameters and options: made (and agreed on by every rank) when new,
        then reused while the parameters taking part and the options that shape the step are unchanged."""
        key = self._plan_key(params)
        if self._plan is not None and self._plan[0] == key:
            return self._plan[1]
        group_of = {id(p): group for group in self.param_groups for p in group["params"]}
        taking_part = [(p, group_of[id(p)]) for p in params]
        for p in params:
            if p.grad is not None and p.grad.is_sparse:
                raise TypeError(f"{type(self).__name__} does not support sparse gradients")
        self._agree(taking_part)
        check_whole(self._weight_update_hook, [(self.name_of(p), self.layout(p)) for p in params])
        if self.overlap and self.grid.layers:  # parameter groups added after overlap_by_layer
            self.grid.check_layers_cover()
        owned = [(p, group) for p, group in taking_part if self.owns(p)]
        stacks = build_stacks(owned, self.layouts, lambda: self.state, self.name_of, type(self).batched)
        rows = resolve_modes(stacks, self.ns_spec, self._local)
        if any(stack.options["tp_mode"] == "auto" for stack in stacks):
            printed = plan_table(rows, self._label)
            if printed != self._logged_plan:
                logger.info("%s: tp_mode='auto' plan (predicted ms per mode):\n%s", type(self).__name__, printed)
                self._logged_plan = printed
        agree_batching(batching_keys(stacks, self._local), (self.tp_group, self.expert_tp_group))
        plan = StepPlan(owned, stacks, self.grid.shares(params))
        self._plan = (key, plan)
        return plan

    def _local(self, stack: ParamStack) -> torch.Tensor:
        """A member's local tensor (shape, dtype and device of the stack's members)."""
        return self.layouts.value(stack.params[0])

    def _step(self) -> None:
        """The step as a pipeline: plan (agreed on by every rank) -> gradients into their owners -> pieces to their
        owners -> the members' step (momentum, direction, orthogonalization, update, finite check) -> the share of
        the new weights (or of the pieces' updates) and its finite decision, the same on every rank."""
        if self.verify_plan == "every_step":
            self._verify_plan()
        self.grid.reduce_gradients()
        self.grid.grads_reduced = False
        plan = self._step_plan(self._taking_part())
        fresh = self._refresh_states(plan)
        pieces_get_update = any(share.sharded for share in plan.shares) and self._pieces_get_update()
        self.grid.gather_pieces(plan, values=not pieces_get_update)
        if fresh:  # parameters may be at their first step
            self.init_fresh([p for p, _ in plan.owned])
        if not plan.shares:
            self._engine.run(plan.stacks)
            return
        self.grid.share(plan, self._engine.run(plan.stacks, defer=True), pieces_get_update)

    def _refresh_states(self, plan: StepPlan) -> bool:
        """Re-read the stacks' states where the state dicts or the plan are new (a load_state_dict, a new plan);
        whether they were (then parameters may be at their first step)."""
        if self.state is self._state_seen and plan is self._plan_seen:
            return False
        refresh_states(plan.stacks)
        self._state_seen, self._plan_seen = self.state, plan
        return True

    _WEIGHT_HOOKS = ("apply_weight_decay", "pre_weight_update", "post_weight_update", "pre_weight_update_fn_inplace",
                     "post_weight_update_fn_inplace", "init_state_program", "init_state")

    def _pieces_get_update(self) -> bool:
        """DP pieces of DTensor parameters (FSDP2): the owner receives the gradients' pieces only and sends each
        rank its piece of the update U, which that rank applies to its own piece (weight decay, then W - lr U:
        elementwise, as the owner would to the whole block): 2 pieces moved per weight instead of 3 (values and
        gradient in, values out). Where the member's weight update reads no whole weight (every hook is
        OrthogonalizedOptimizer's) and no group adds "l2" decay to the gradient (which reads the weight)."""
        cls = type(self)
        return (all(getattr(cls, hook) is getattr(OrthogonalizedOptimizer, hook) for hook in self._WEIGHT_HOOKS)
                and isinstance(self._weight_update_hook, NoOpWeightUpdateHook)
                and not any(self._l2(group) for group in self.param_groups))

    def init_fresh(self, params: Sequence[torch.Tensor]) -> None:
        """Fill the state of those ``params`` that have none (their first step): init_state_program, one
        matrix per context, all together."""
        fresh = [p for p in params if not self.state[p]]
        if not fresh:
            return
        group_of = {id(p): group for group in self.param_groups for p in group["params"]}
        contexts = [MatrixContext(self.layouts.value(p), group_of[id(p)], self.layout(p), self.state[p],
                                  names=[self.name_of(p)], batched=p in self.layouts.experts) for p in fresh]
        run_phase(contexts, [self.init_state_program(ctx) for ctx in contexts], self.bucket_bytes)

    def _label(self, p: torch.Tensor, part: Part, group: dict[str, Any]) -> str:
        name = self.name_of(p)
        if part.number is None:
            return name
        count = len(self.layouts.parts[p])
        fused = self.is_qkv(p) and not group["qkv_per_head"]
        parts = {3: "qkv", 4: "qgkv"}.get(count) if fused else None
        return f"{name} [{parts[part.number] if parts else f'head {part.number}'}]"

    def tp_plan(self) -> str:
        """Each matrix (and fused-QKV component) with its global shape, the mode the step runs for it and the
        predicted cost per mode (the same resolution as the step's)."""
        every = [(p, group) for group in self.param_groups for p in group["params"]]
        for p, _ in every:
            self.layout(p)
        stacks = build_stacks(every, self.layouts, lambda: self.state, self.name_of, type(self).batched)
        return plan_table(resolve_modes(stacks, self.ns_spec, self._local), self._label)


def call_closure(closure: Callable[[], float] | None) -> float | None:
    """Re-evaluate the loss as torch.optim does: the closure runs with gradients enabled."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()
