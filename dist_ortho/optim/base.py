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
:class:`~dist_ortho.optim.context.MatrixContext` (layout, state, gradient, direction and, when the member
sets ``uses_newton_schulz``, the Newton-Schulz result of the direction) and returns the update of that
matrix. Every cross-rank quantity it needs (norms, inner products, means, a gather) is a ``yield from`` of
the context's helpers. The step runs in phases, each over all matrices in lockstep with coalesced
collectives: state initialization, Newton-Schulz of every direction, the members' updates, and the
weight-update hooks. So a step issues a number of collectives that depends on the member and mode,
never on the number of matrices.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, get_args

import torch
from torch.optim.optimizer import Optimizer, ParamsT

from dist_ortho import comm
from dist_ortho.coalesce import DEFAULT_BUCKET_BYTES, Program, run, run_many, under_precision
from dist_ortho.coefficients import get_coefficients
from dist_ortho.dtensor import DTensorHolding, find_holdings, gather_blocks, is_dtensor, local, scatter_blocks
from dist_ortho.grid import assign_owners, check_grid, reduce_to_owners, share_program
from dist_ortho.optim.context import MatrixContext
from dist_ortho.optim.options import accepted_keywords, check_choice, check_number, reject_unknown
from dist_ortho.params import Held, MatrixLayout, find_layouts
from dist_ortho.precision import MATMUL_PRECISIONS, MatmulPrecision, matmul_precision
from dist_ortho.qkv import qkv_parts
from dist_ortho.tp import TP_MODES, MatrixJob, NsSpec, orthogonalize_many
from dist_ortho.tp.cost import format_plan, plan_row, resolve
from dist_ortho.tp.local import LOCAL_GRAM, LocalGram

logger = logging.getLogger(__name__)

WeightDecayMethod = Literal["decoupled", "independent", "l2", "palm"]
WEIGHT_DECAY_METHODS: tuple[str, ...] = get_args(WeightDecayMethod)
ConvMode = Literal["flatten", "batched"]
CONV_MODES: tuple[str, ...] = get_args(ConvMode)
Nonfinite = Literal["raise", "skip", "ignore"]
NONFINITE: tuple[str, ...] = get_args(Nonfinite)
__all__ = ["MatmulPrecision", "OrthogonalizedOptimizer", "check_choice", "check_number", "param_names"]


def matrix_view(t: torch.Tensor, conv_mode: str | None) -> torch.Tensor:
    """t as a matrix (2D) or, for ``conv_mode="batched"``, a batch of (out, in) matrices per spatial position."""
    if t.ndim == 2:
        return t
    if conv_mode == "flatten":
        return t.reshape(t.size(0), -1)
    return t.flatten(2).permute(2, 0, 1)


def from_matrix_view(u: torch.Tensor, like: torch.Tensor, conv_mode: str | None) -> torch.Tensor:
    if like.ndim == 2:
        return u
    if conv_mode == "flatten":
        return u.reshape(like.shape)
    return u.permute(1, 2, 0).reshape(like.shape)


class OrthogonalizedOptimizer(Optimizer):
    """Momentum, then an orthogonalized update, for matrix parameters; exact across tensor parallelism.

    Args:
        params: parameters or parameter groups; every parameter must be 2D (or 3D+ with ``conv_mode``).
        lr: learning rate. momentum: beta in [0, 1). weight_decay: >= 0.
        nesterov: use the Nesterov direction. weight_decay_method: one of :data:`WEIGHT_DECAY_METHODS`.
        fp32_matmul_prec: torch float32 matmul precision while orthogonalizing ("medium" runs NS in bf16).
        scaled_orthogonalize_fn: ``fn(matrix) -> update`` used by the default :meth:`update`; under TP it
            is applied to the gathered matrix (so any function is exact) and this rank's block is kept.
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
        local_gram: where a whole matrix is orthogonalized on one rank (duplicated, home, unsharded): "auto"
            runs the Gram-space recursion where it is cheaper (dist_ortho.tp.local), "always", "never".
        batch_matrices: same-shape whole matrices on one rank run as one batched iteration (False keeps
            home bit-identical to duplicated: a batched matmul may round differently).
        nonfinite: what a step does when an update is not finite (a NaN or Inf in some rank's gradient):
            "raise" (default, as Megatron-LM raises on NaN gradients) a FloatingPointError naming the parameter
            and step, "skip" the step on every rank (weights and state untouched, counted in
            ``skipped_steps``), "ignore" (write it). The check runs on results every rank of a group shares,
            so all ranks decide alike; nothing is written before it.
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
        **member_options: the per-group options of a member (coefficient_type, num_ns_steps, ...), named in
            the member's own signature; any other key is a TypeError.
    """

    forwards_to_torch_optimizer = True
    # The options a member's **kwargs may carry to this class; the others (lr, momentum, weight_decay,
    # nesterov, ...) a member names in its own signature, or fixes (Scion has no weight_decay).
    forwarded_options = frozenset({
        "tp_group", "tp_mode", "expert_tp_group", "conv_mode", "split_qkv", "qkv_split_shapes", "is_qkv_fn",
        "qkv_per_head", "coalesce", "bucket_bytes", "local_gram", "batch_matrices", "nonfinite", "dp_group",
        "reduce_grads", "device_mesh",
    })
    # Members whose update reads ctx.orthogonalized: the step runs Newton-Schulz of every direction
    # first, for all matrices together.
    uses_newton_schulz = False

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
        scaled_orthogonalize_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        tp_group: comm.ProcessGroup | None = None,
        tp_mode: str = "duplicated",
        expert_tp_group: comm.ProcessGroup | None = None,
        conv_mode: ConvMode | None = None,
        split_qkv: bool = True,
        qkv_split_shapes: Sequence[int] | None = None,
        is_qkv_fn: Callable[[torch.Tensor], bool] | None = None,
        qkv_per_head: bool = False,
        coalesce: bool = True,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        local_gram: LocalGram = "auto",
        batch_matrices: bool = True,
        nonfinite: Nonfinite = "raise",
        dp_group: comm.ProcessGroup | None = None,
        reduce_grads: bool = False,
        device_mesh: Any = None,
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
            tp_mode=tp_mode,
            conv_mode=conv_mode,
            split_qkv=split_qkv,
            qkv_split_shapes=tuple(qkv_split_shapes) if qkv_split_shapes is not None else None,
            qkv_per_head=qkv_per_head,
            coalesce=coalesce,
            local_gram=local_gram,
            batch_matrices=batch_matrices,
            nonfinite=nonfinite,
            **member_options,
        )
        if scaled_orthogonalize_fn is None and type(self).update is OrthogonalizedOptimizer.update:
            raise TypeError("OrthogonalizedOptimizer needs scaled_orthogonalize_fn, or a subclass that overrides update")
        self.scaled_orthogonalize_fn = scaled_orthogonalize_fn
        self.tp_group = tp_group
        self.expert_tp_group = expert_tp_group
        self.dp_group = dp_group
        self.reduce_grads = reduce_grads
        self.is_qkv_fn = is_qkv_fn
        self.bucket_bytes = bucket_bytes
        # Derived once from the parameters (their shapes on every rank), never changed after:
        self._layouts: dict[torch.Tensor, MatrixLayout] = {}
        self._parts: dict[torch.Tensor, list[tuple[torch.Tensor, MatrixLayout]]] = {}
        self._owners: dict[torch.Tensor, int] = {}  # DP owner of each parameter (with dp_group)
        # DTensor parameters: how they are held, a shape-only stand-in of this rank's TP block, and (on the
        # owner, during a step) the block's values and gradient.
        self._holdings: dict[torch.Tensor, DTensorHolding] = {}
        self._standins: dict[torch.Tensor, torch.Tensor] = {}
        self._blocks: dict[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] = {}
        self._logged_plan: str | None = None
        self._agreed_plans: list[tuple] = []  # the last few plans all ranks agreed on
        self._step_count = 0
        self._grads_reduced = False  # reduce_gradients() ran since the last step
        self.skipped_steps = 0  # steps skipped for a non-finite update (nonfinite="skip")
        super().__init__(params, defaults)

    # -- construction-time checks, per group (so that per-group overrides are checked too) --
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self.check_group(self.param_groups[-1])

    def check_group(self, group: dict[str, Any]) -> None:
        """Validate a param group's options; members extend this (call super)."""
        check_number("lr", group["lr"])
        check_number("momentum", group["momentum"], 0.0, 1.0, high_open=True)
        check_number("weight_decay", group["weight_decay"])
        check_choice("weight_decay_method", group["weight_decay_method"], WEIGHT_DECAY_METHODS)
        check_choice("fp32_matmul_prec", group["fp32_matmul_prec"], MATMUL_PRECISIONS)
        check_choice("tp_mode", group["tp_mode"], TP_MODES)
        check_choice("local_gram", group["local_gram"], LOCAL_GRAM)
        check_choice("nonfinite", group["nonfinite"], NONFINITE)
        if group["conv_mode"] is not None:
            check_choice("conv_mode", group["conv_mode"], CONV_MODES)
        if "coefficient_type" in group:  # members that run Newton-Schulz
            get_coefficients(group["coefficient_type"], group["num_ns_steps"], group.get("custom_coefficient_sets"))
        if "extra_scale_factor" in group:
            check_number("extra_scale_factor", group["extra_scale_factor"])
        for p in group["params"]:
            self.check_param(p, group)

    def check_param(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        if p.ndim == 2 or (p.ndim > 2 and group["conv_mode"] is not None):
            return
        hint = (
            "pass conv_mode='flatten' or 'batched' for convolution weights"
            if p.ndim > 2
            else "route it to AdamW: use dist_ortho.MuonAdamW (automatic routing), or give its group use_fallback=True there"
        )
        raise ValueError(f"{type(self).__name__} orthogonalizes matrices; got a parameter of shape {tuple(p.shape)}: {hint}")

    # -- tensor-parallel layout of each parameter, found once for all of them --
    def layout(self, p: torch.Tensor) -> MatrixLayout:
        """The global layout of p's matrix view."""
        if p not in self._layouts:
            self._find_layouts()
        return self._layouts[p]

    def part_layouts(self, p: torch.Tensor) -> list[MatrixLayout]:
        """Layouts of the components of a split fused weight, in state-key order part0, part1, ... (else [])."""
        self.layout(p)
        return [layout for _, layout in self._parts.get(p, [])]

    def is_qkv(self, p: torch.Tensor) -> bool:
        return bool(self.is_qkv_fn(p)) if self.is_qkv_fn is not None else getattr(p, "is_qkv", False) is True

    def _split_fused(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        """The components of a fused QKV weight, each with its own global layout (after _find_layouts)."""
        shapes = getattr(p, "qkv_split_shapes", None) or group["qkv_split_shapes"]
        name = getattr(p, "_dist_ortho_name", None) or f"fused QKV weight of shape {tuple(p.shape)}"
        if shapes is None:
            raise ValueError(f"{name} is marked as fused QKV but has no qkv_split_shapes (set it on the parameter or pass qkv_split_shapes=)")
        if p.ndim != 2:
            raise ValueError(f"{name}: a fused QKV weight must be 2D, got shape {tuple(p.shape)}")
        layout = self._layouts[p]
        if layout.partition_dim == 0:
            rank_rows, rank = list(layout.sizes), comm.group_rank(layout.spec.group)
        else:
            rank_rows, rank = [self._standins.get(p, p).size(0)], 0
        if group["qkv_per_head"]:  # every head its own matrix: one "group" of head-sized pieces
            head, rows = shapes[-1], sum(rank_rows)
            if rows % head:
                raise ValueError(f"{name} has {rows} rows, not a multiple of the head size {head}")
            shapes = [head] * (rows // head)
        self._parts[p] = [
            (part.index, MatrixLayout(layout.spec, tuple(part.sizes) if layout.partition_dim == 0 else layout.sizes,
                                      (part.rows, layout.cols)))
            for part in qkv_parts(rank_rows, rank, shapes, name)
        ]

    def _find_layouts(self) -> None:
        """Read every new parameter's shard spec and check its shapes across ranks: one collective per group."""
        if not self._layouts:
            check_grid(self.tp_group, self.dp_group)
        new = [(p, group) for group in self.param_groups for p in group["params"] if p not in self._layouts]
        self._find_holdings([p for p, _ in new])
        views = [(q, matrix_view(q.detach(), group["conv_mode"])) for q, group in ((self._standins.get(p, p), g) for p, g in new)]
        blockwise = [group["tp_mode"] == "blockwise" for _, group in new]
        for (p, group), layout in zip(new, find_layouts(views, self.tp_group, self.expert_tp_group, blockwise)):
            if p in self._holdings and layout.shape != tuple(p.shape):
                raise ValueError(f"{self._standins[p]._dist_ortho_name}: its TP blocks make a {layout.shape} matrix, "
                                 f"not its global shape {tuple(p.shape)}: placements that dist_ortho cannot reassemble")
            self._layouts[p] = layout
        for p, group in new:  # every rank has the same layouts now, so errors here are alike
            if group["split_qkv"] and self.is_qkv(p):
                self._split_fused(p, group)
        def shapes(p: torch.Tensor) -> list[tuple[int, ...]]:
            return [layout.shape for _, layout in self._parts.get(p, [])] or [self._layouts[p].shape]

        taken = [(shapes(p), owner) for p, owner in self._owners.items()]
        owners = assign_owners([shapes(p) for p, _ in new], comm.group_size(self.dp_group), taken)
        self._owners.update(zip((p for p, _ in new), owners))

    def _find_holdings(self, params: Sequence[torch.Tensor]) -> None:
        """Holdings and TP-block stand-ins of new DTensor parameters (one all-gather over DP, when sharded).
        A stand-in has the block's shape, dtype and TE attributes, and no storage of its own."""
        dtensors = [p for p in params if is_dtensor(p)]
        if not dtensors:
            return
        for p, holding in zip(dtensors, find_holdings(dtensors, self.tp_group, self.dp_group)):
            standin = torch.zeros((), dtype=p.dtype, device=local(p).device).expand(holding.block_shape)
            if holding.tp_dim is not None:
                standin.tensor_model_parallel, standin.partition_dim = True, holding.tp_dim
            standin._dist_ortho_name = getattr(p, "_dist_ortho_name", None) or f"DTensor {tuple(p.shape)}"
            for attribute in ("is_qkv", "qkv_split_shapes"):
                if hasattr(p, attribute):
                    setattr(standin, attribute, getattr(p, attribute))
            self._holdings[p], self._standins[p] = holding, standin

    def _value(self, p: torch.Tensor) -> torch.Tensor:
        """The tensor the step updates for p: p itself, a DTensor's local tensor, or (DP-sharded DTensor) its TP
        block: the owner's buffer that each step gathers into, else a shape-only stand-in."""
        if p in self._blocks:
            return self._blocks[p][0]
        if p in self._holdings and self._holdings[p].dp_dim is None:
            return local(p)
        return self._standins.get(p, p)

    def _grad(self, p: torch.Tensor) -> torch.Tensor | None:
        if p in self._blocks:
            return self._blocks[p][1]
        return local(p.grad) if p.grad is not None else None

    # -- how each state tensor is held (read by checkpoints) --
    def state_holding(self, p: torch.Tensor, path: Sequence[str]) -> Held:
        """How the ranks hold state tensor ``state[p][path[0]]...``: like the matrix, reduced, or replicated.

        Members declare their own keys in :meth:`held_state`; an undeclared key is an error."""
        layout = self.layout(p)
        if len(path) == 2 and path[0].startswith("part"):
            layout = self.part_layouts(p)[int(path[0].removeprefix("part"))]
        group = self._group_of(p)
        held = self.held_state(path[-1], layout, group)
        if held is None:
            raise KeyError(f"{type(self).__name__} does not declare how its state {'/'.join(path)!r} is held")
        return held

    def held_state(self, key: str, layout: MatrixLayout, group: dict[str, Any]) -> Held | None:
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
        self.init_state(ctx.param, ctx.param_state, ctx.options)
        yield from ()

    def update(self, ctx: MatrixContext) -> Program[torch.Tensor]:
        """Program: this rank's block of the update of one matrix (default: scaled_orthogonalize_fn of the
        gathered direction)."""
        assert self.scaled_orthogonalize_fn is not None
        full = yield from ctx.gather(ctx.direction)
        return ctx.own_block(self.scaled_orthogonalize_fn(full))

    def pre_weight_update(self, ctx: MatrixContext, update: torch.Tensor) -> Program[None]:
        """Program run with a parameter's whole update before W <- W - lr * update."""
        self.pre_weight_update_fn_inplace(ctx.param, update)
        yield from ()

    def post_weight_update(self, ctx: MatrixContext) -> Program[None]:
        """Program run after the update."""
        self.post_weight_update_fn_inplace(ctx.param)
        yield from ()

    def pre_weight_update_fn_inplace(self, p: torch.Tensor, update: torch.Tensor) -> None:
        """Called with the update before W <- W - lr * update (local, no collectives)."""

    def post_weight_update_fn_inplace(self, p: torch.Tensor) -> None:
        """Called after the update (local, no collectives)."""

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
    @staticmethod
    def ns_spec(group: dict[str, Any]) -> NsSpec:
        custom = group.get("custom_coefficient_sets")
        return NsSpec(
            group["num_ns_steps"], group["coefficient_type"], tuple(map(tuple, custom)) if custom else None,
            use_syrk=group.get("use_syrk", False), local_gram=group["local_gram"], batch=group["batch_matrices"],
        )

    def _job(self, ctx: MatrixContext, x: torch.Tensor, sharing: int = 1) -> MatrixJob:
        """The Newton-Schulz job of a matrix, its mode resolved (auto) under the group's precision."""
        layout, options = ctx.layout, ctx.options
        job = MatrixJob(x, layout.partition_dim, layout.group, list(layout.sizes) if layout.sizes else None,
                        options["tp_mode"], self.ns_spec(options))
        with matmul_precision(options["fp32_matmul_prec"]):
            return resolve(job, sharing)

    @staticmethod
    def _sharing(contexts: Sequence[MatrixContext]) -> list[int]:
        """Per matrix, how many sharded matrices run coalesced with it in its TP group (auto's latency share)."""
        def key(ctx: MatrixContext) -> tuple | None:
            sharded = ctx.layout.partition_dim is not None and ctx.layout.group is not None
            return (id(ctx.layout.group), ctx.options["fp32_matmul_prec"]) if sharded and ctx.options["coalesce"] else None

        keys = [key(ctx) for ctx in contexts]
        counts = Counter(keys)
        return [counts[k] if k is not None else 1 for k in keys]

    def _jobs(self, contexts: Sequence[MatrixContext]) -> list[MatrixJob]:
        return [self._job(ctx, ctx.direction, n) for ctx, n in zip(contexts, self._sharing(contexts))]

    def _plan(self, contexts: Sequence[MatrixContext], jobs: Sequence[MatrixJob]) -> str:
        rows = []
        for ctx, job, n in zip(contexts, jobs, self._sharing(contexts)):
            with matmul_precision(ctx.options["fp32_matmul_prec"]):
                rows.append(plan_row(self._label(ctx), job, n))
        return format_plan(rows)

    def _label(self, ctx: MatrixContext) -> str:
        name = getattr(ctx.key, "_dist_ortho_name", None) or f"param {tuple(ctx.key.shape)}"
        if ctx.part is None:
            return name
        count = len(self._parts[ctx.key])
        parts = {3: "qkv", 4: "qgkv"}.get(count) if not ctx.options["qkv_per_head"] else None
        return f"{name} [{parts[ctx.part] if parts else f'head {ctx.part}'}]"

    def tp_plan(self) -> str:
        """Each matrix (and fused-QKV component) with its global shape, the mode the step runs for it and the
        predicted cost per mode (the same resolution as the step's)."""
        contexts = [ctx for group in self.param_groups for p in group["params"]
                    for ctx in self._matrices(self._context(p, group, self._value(p), self._value(p)))]
        return self._plan(contexts, self._jobs(contexts))

    # -- the step --
    def _context(self, p: torch.Tensor, group: dict[str, Any], grad: torch.Tensor, direction: torch.Tensor) -> MatrixContext:
        conv_mode = group["conv_mode"]
        return MatrixContext(self._value(p), group, self.layout(p), self.state[p], matrix_view(grad, conv_mode),
                             matrix_view(direction, conv_mode), source=p)

    def _matrices(self, ctx: MatrixContext) -> list[MatrixContext]:
        """The matrices of a parameter: itself, or each component of a split fused weight."""
        if ctx.key not in self._parts:
            return [ctx]
        return [
            MatrixContext(ctx.param, ctx.options, layout, ctx.param_state, ctx.grad[index], ctx.direction[index], part=i,
                          source=ctx.source)
            for i, (index, layout) in enumerate(self._parts[ctx.key])
        ]

    def _run(self, contexts: Sequence[MatrixContext], programs: Sequence[Program[Any]]) -> list[Any]:
        """Run one phase: each program under its group's precision; the coalesced ones in lockstep."""
        wrapped = [under_precision(program, ctx.options["fp32_matmul_prec"]) for ctx, program in zip(contexts, programs)]
        together = [i for i, ctx in enumerate(contexts) if ctx.options["coalesce"]]
        results: list[Any] = [None] * len(wrapped)
        for i, value in zip(together, run_many([wrapped[i] for i in together], self.bucket_bytes)):
            results[i] = value
        for i, ctx in enumerate(contexts):
            if not ctx.options["coalesce"]:
                results[i] = run(wrapped[i])
        return results

    def _newton_schulz(self, matrices: Sequence[MatrixContext]) -> None:
        """ctx.orthogonalized for every matrix: one coalesced run per fp32 matmul precision."""
        jobs = self._jobs(matrices)
        plan = self._plan(matrices, jobs) if any(ctx.options["tp_mode"] == "auto" for ctx in matrices) else None
        if plan is not None and plan != self._logged_plan:
            logger.info("%s: tp_mode='auto' plan (predicted ms per mode):\n%s", type(self).__name__, plan)
            self._logged_plan = plan
        batches: dict[tuple[str, bool], list[int]] = {}
        for i, ctx in enumerate(matrices):
            batches.setdefault((ctx.options["fp32_matmul_prec"], ctx.options["coalesce"]), []).append(i)
        for (precision, coalesce), members in batches.items():
            with matmul_precision(precision):
                if coalesce:
                    results = orthogonalize_many([jobs[i] for i in members], self.bucket_bytes)
                else:
                    results = [orthogonalize_many([jobs[i]])[0] for i in members]
            for i, result in zip(members, results):
                matrices[i].orthogonalized = result

    def _apply(self, ctx: MatrixContext, update: torch.Tensor) -> Program[None]:
        yield from self.pre_weight_update(ctx, update)
        ctx.param.add_(update, alpha=-ctx.options["lr"])
        yield from self.post_weight_update(ctx)

    def _taking_part(self) -> list[tuple[torch.Tensor, dict[str, Any]]]:
        """The parameters this step updates: those with a gradient, and every tensor-parallel one that
        requires one (a missing gradient of a shard counts as zero, on every rank alike, so that the
        shards of one matrix always step together; Megatron's gradient buffers are never None either)."""
        out = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    raise TypeError(f"{type(self).__name__} does not support sparse gradients")
                if p.grad is not None or (p.requires_grad and (self.layout(p).group is not None or p in self._holdings)):
                    out.append((p, group))
        return out

    def _plan_entry(self, p: torch.Tensor, group: dict[str, Any]) -> tuple:
        """What every rank must agree on about one parameter of the step (it decides the collectives)."""
        layout = self.layout(p)
        ns = (group.get("num_ns_steps"), group.get("coefficient_type"), group.get("custom_coefficient_sets"))
        kind = None if layout.group is None else ("expert" if layout.group is self.expert_tp_group else "dense")
        return (
            getattr(p, "_dist_ortho_name", None), tuple(layout.shape), layout.partition_dim, kind, str(p.dtype),
            group["tp_mode"], ns, group["coalesce"], group["fp32_matmul_prec"], group["local_gram"],
            group["batch_matrices"], group["nonfinite"], len(self._parts.get(p, ())),
        )

    def _agree(self, params: Sequence[tuple[torch.Tensor, dict[str, Any]]]) -> None:
        """Check that every rank runs the same plan (parameters in order, global shapes, dims, dtypes, modes,
        Newton-Schulz options; names where known): one 16-byte all-gather per group when the plan is new
        to this rank, none while it is unchanged. A disagreement raises the same ValueError on every rank."""
        entries = [self._plan_entry(p, group) for p, group in params]
        key = (type(self).__name__, tuple(entries))
        if key in self._agreed_plans:
            return
        labels = [getattr(p, "_dist_ortho_name", None) or f"param {i} {tuple(p.shape)}" for i, (p, _) in enumerate(params)]
        what = (f"the {type(self).__name__} step's plan (entry: name, global shape, partition_dim, group, dtype, "
                "tp_mode, (steps, coefficients), coalesce, fp32_matmul_prec, local_gram, batch_matrices, "
                "nonfinite, QKV parts)")
        for group in (self.tp_group, self.expert_tp_group, self.dp_group):
            if comm.group_size(group) > 1:
                comm.agree([(type(self).__name__, *e) for e in entries], labels, group, what)
        self._agreed_plans = [*self._agreed_plans[-3:], key]

    def _check_finite(self, matrices: Sequence[MatrixContext], results: Sequence[torch.Tensor]) -> bool:
        """True when every result is finite; else raise, or False to skip, per ``nonfinite``.

        The results are Newton-Schulz outputs or updates of whole global matrices, which carry a NaN of any
        rank's shard to every rank of the group through their collectives, so every rank decides alike."""
        for ctx, result in zip(matrices, results):
            if bool(torch.isfinite(result).all()):
                continue
            policy = ctx.options["nonfinite"]
            if policy == "ignore":
                continue
            if policy == "raise":
                raise FloatingPointError(
                    f"{type(self).__name__} step {self._step_count}: the update of {ctx.name} is not finite (a NaN "
                    "or Inf in its gradient or momentum on some rank). Nothing was written. Pass nonfinite='skip' "
                    "to skip such steps, or 'ignore' to write them."
                )
            logger.warning("%s step %d: skipped (the update of %s is not finite); weights and state untouched",
                           type(self).__name__, self._step_count, ctx.name)
            self.skipped_steps += 1
            return False
        return True

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One step of every parameter with a gradient (see the module doc). Nothing is written until every
        update is known finite (``nonfinite``): momentum and weight decay are committed with the update."""
        loss = call_closure(closure)
        self._step_count += 1
        try:
            self._step()
        except comm.CollectiveError as e:
            raise comm.CollectiveError(f"{type(self).__name__} step {self._step_count}: {e}") from e
        return loss

    def owner(self, p: torch.Tensor) -> int:
        """The DP rank that updates ``p`` and keeps its state (0 without dp_group)."""
        self.layout(p)
        return self._owners[p]

    def owns(self, p: torch.Tensor) -> bool:
        """Whether this rank's replica updates ``p`` and keeps its state."""
        return self.owner(p) == comm.group_rank(self.dp_group)

    def _dp_sharded(self, p: torch.Tensor) -> bool:
        return p in self._holdings and self._holdings[p].dp_dim is not None

    def reduce_gradients(self) -> None:
        """With ``reduce_grads``: average the gradients into their owners now (the step does it otherwise;
        call it before reading gradients across the grid, e.g. :meth:`grad_sum_of_squares`)."""
        if not self.reduce_grads or comm.group_size(self.dp_group) == 1 or self._grads_reduced:
            return
        every = [(p, group) for group in self.param_groups for p in group["params"]
                 if p.requires_grad and not self._dp_sharded(p)]
        self._agree(every)  # the reduce-scatter's buffers follow the plan: agree first
        params = [p for p, _ in every]
        grads = [local(p.grad) if p.grad is not None else None for p in params]
        averaged = reduce_to_owners(grads, [local(p) for p in params], [self.owner(p) for p in params], self.dp_group)
        for p, grad in zip(params, averaged):
            if grad is None:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            local(p.grad).copy_(grad)  # in place: a DTensor's gradient keeps its placements
        self._grads_reduced = True

    def grad_sum_of_squares(self) -> torch.Tensor:
        """This rank's share of sum(g^2) over every gradient of the optimizer, float64: each element of the
        global gradients counted on exactly one rank of the DP x TP grid (a shard by its TP rank on the
        owner replica, a TP-replicated matrix by TP rank 0 of it, a DP piece of a DTensor by its DP rank), so
        that the sum over the grid is the single-process value (gradients averaged over DP, or reduced)."""
        self.reduce_gradients()
        total = torch.zeros((), dtype=torch.float64)
        tp_rank = comm.group_rank(self.tp_group)
        for group in self.param_groups:
            for p in group["params"]:
                grad = local(p.grad) if p.grad is not None else None
                if grad is None or (self.layout(p).group is None and tp_rank != 0):
                    continue
                if self._dp_sharded(p) or self.owns(p):
                    total += grad.double().square().sum().cpu()
        return total

    def _step(self) -> None:
        self.reduce_gradients()
        self._grads_reduced = False
        taking_part = self._taking_part()
        self._agree(taking_part)
        dp_rank = comm.group_rank(self.dp_group)
        sharded = [p for p, _ in taking_part if self._dp_sharded(p)]
        if sharded:  # DP pieces of DTensor parameters to their owners, each as one TP block
            owners = [self.owner(p) for p in sharded]
            gather_blocks(sharded, [self._holdings[p] for p in sharded], owners, self.dp_group, self._blocks)
        self._update([(p, group) for p, group in taking_part if self.owner(p) == dp_rank])
        if sharded:
            scatter_blocks(sharded, [self._holdings[p] for p in sharded], owners, self.dp_group, self._blocks)
        replicated = [p for p, _ in taking_part if not self._dp_sharded(p)]
        if comm.group_size(self.dp_group) > 1 and replicated:
            run(share_program([self._value(p) for p in replicated], [self.owner(p) for p in replicated], self.dp_group))

    def _update(self, params: Sequence[tuple[torch.Tensor, dict[str, Any]]]) -> None:
        """The step of the parameters this replica owns (all of them without dp_group)."""
        fresh = [MatrixContext(self._value(p), group, self.layout(p), self.state[p], source=p)
                 for p, group in params if not self.state[p]]
        self._run(fresh, [self.init_state_program(ctx) for ctx in fresh])
        wholes, momenta = [], []
        for p, group in params:
            value, raw = self._value(p), self._grad(p)
            raw = raw if raw is not None else torch.zeros_like(value)
            grad = raw.add(value, alpha=group["weight_decay"]) if self._l2(group) else raw
            momentum = self.state[p]["momentum_buffer"].lerp(grad, 1 - group["momentum"])
            direction = grad.lerp(momentum, group["momentum"]) if group["nesterov"] else momentum
            wholes.append(self._context(p, group, grad, direction))
            momenta.append(momentum)
        matrices = [ctx for whole in wholes for ctx in self._matrices(whole)]
        if self.uses_newton_schulz:
            self._newton_schulz(matrices)
            if not self._check_finite(matrices, [ctx.orthogonalized for ctx in matrices]):
                return
        pieces = self._run(matrices, [self.update(ctx) for ctx in matrices])
        if not self._check_finite(matrices, pieces):
            return
        pieces = iter(pieces)
        updates = []
        for whole, momentum in zip(wholes, momenta):
            p, conv_mode = whole.param, whole.options["conv_mode"]
            if whole.key in self._parts:
                update = torch.empty(whole.direction.shape, dtype=p.dtype, device=p.device)
                for index, _ in self._parts[whole.key]:
                    update[index] = next(pieces).to(p.dtype)
            else:
                update = next(pieces)
            if p.ndim > 2 and conv_mode == "batched":
                update = update * (update.size(0) ** -0.5)
            updates.append(from_matrix_view(update, p, conv_mode).to(p.dtype))
            whole.param_state["momentum_buffer"].copy_(momentum)
            self.apply_weight_decay(p, whole.options)
        self._run(wholes, [self._apply(whole, update) for whole, update in zip(wholes, updates)])


def mesh_groups(mesh: Any, tp_group: comm.ProcessGroup | None, dp_group: comm.ProcessGroup | None
                ) -> tuple[comm.ProcessGroup | None, comm.ProcessGroup | None]:
    """(tp_group, dp_group) of a DeviceMesh with dims named "tp" and "dp" (either may be absent)."""
    names = tuple(getattr(mesh, "mesh_dim_names", None) or ())
    if not names or set(names) - {"tp", "dp"}:
        raise ValueError(f"device_mesh must have dims named 'dp' and/or 'tp', got {names or 'unnamed dims'}; "
                         "or pass tp_group= and dp_group= instead")
    if tp_group is not None or dp_group is not None:
        raise ValueError("pass either device_mesh= or tp_group=/dp_group=, not both")
    group = {name: mesh[name].get_group() if mesh.ndim > 1 else mesh.get_group() for name in names}
    return group.get("tp"), group.get("dp")


def call_closure(closure: Callable[[], float] | None) -> float | None:
    """Re-evaluate the loss as torch.optim does: the closure runs with gradients enabled."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def param_names(named: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Tag parameters with their names, so that error messages and routing logs can name them."""
    for name, p in named:
        p._dist_ortho_name = name  # type: ignore[attr-defined]

