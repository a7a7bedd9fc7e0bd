"""OrthogonalizedOptimizer: the step every member of the Muon family shares, exact under tensor parallelism.

For each matrix parameter W with gradient G (this rank may hold one block of W, see dist_ortho.params):

    weight decay   decoupled   W <- W - lr * wd * W
                   independent W <- W - wd * W
                   palm        W <- W - lr^2 * wd * W
                   l2          G <- G + wd * W
    momentum       M <- beta * M + (1 - beta) * G              (M.lerp_(G, 1 - beta))
                   D = G + beta * (M - G) with Nesterov, else D = M
    direction      U = orthogonalize(W, D)  under torch's fp32 matmul precision ``fp32_matmul_prec``
    update         pre_weight_update_fn_inplace(W, U);  W <- W - lr * U;  post_weight_update_fn_inplace(W)

Members override :meth:`orthogonalize` (and, for statistics of the orthogonalized update, :meth:`update_direction`).
Everything global about a sharded matrix (its shape, norms, the Newton-Schulz iteration) goes through
the helpers here, so every member is exact across TP: at TP = t it takes the steps it takes at TP = 1
on the gathered matrix. Momentum and other elementwise state stay local to the shard.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch.optim.optimizer import Optimizer, ParamsT

from dist_ortho import comm, reductions
from dist_ortho.newton_schulz import matmul_precision
from dist_ortho.optim.scale import muon_scale
from dist_ortho.params import REPLICATED, ShardSpec, global_shape, shard_spec
from dist_ortho.qkv import qkv_parts
from dist_ortho.coalesce import DEFAULT_BUCKET_BYTES
from dist_ortho.coefficients import get_coefficients
from dist_ortho.plan import AUTO_CANDIDATES, format_plan, matrix_costs
from dist_ortho.tp import TP_MODES, MatrixJob, NsSpec, exchange_shard_sizes, gather_shards, orthogonalize_many, own_block

WeightDecayMethod = Literal["decoupled", "independent", "l2", "palm"]
WEIGHT_DECAY_METHODS: tuple[str, ...] = get_args(WeightDecayMethod)
MatmulPrecision = Literal["highest", "high", "medium"]
MATMUL_PRECISIONS: tuple[str, ...] = get_args(MatmulPrecision)
ConvMode = Literal["flatten", "batched"]
CONV_MODES: tuple[str, ...] = get_args(ConvMode)


def check_number(name: str, value: Any, low: float = 0.0, high: float = math.inf, high_open: bool = False) -> float:
    """Raise unless ``low <= value <= high`` (``< high`` when ``high_open``); a ValueError naming ``name``."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    ok = low <= value and (value < high if high_open else value <= high)
    if not ok or math.isnan(value):
        bound = f"[{low}, {high})" if high_open else f"[{low}, {high}]"
        raise ValueError(f"{name} must be in {bound}, got {value}")
    return float(value)


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


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


@dataclass(frozen=True)
class MatrixLayout:
    """How this rank's matrix view of a parameter sits in the global one."""

    spec: ShardSpec
    sizes: list[int] | None  # every rank's size along partition_dim (None when replicated)
    shape: tuple[int, ...]  # the global matrix view's shape: (rows, cols) or (batch, rows, cols)

    @property
    def rows(self) -> int:
        return self.shape[-2]

    @property
    def cols(self) -> int:
        return self.shape[-1]

    @property
    def group(self) -> comm.ProcessGroup | None:
        """The group to reduce over for a global quantity (None when unsharded)."""
        return self.spec.group if self.spec.partition_dim is not None else None


class OrthogonalizedOptimizer(Optimizer):
    """Momentum, then an orthogonalized update, for matrix parameters; exact across tensor parallelism.

    Args:
        params: parameters or parameter groups; every parameter must be 2D (or 3D+ with ``conv_mode``).
        lr: learning rate. momentum: beta in [0, 1). weight_decay: >= 0.
        nesterov: use the Nesterov direction. weight_decay_method: one of :data:`WEIGHT_DECAY_METHODS`.
        fp32_matmul_prec: torch float32 matmul precision while orthogonalizing ("medium" runs NS in bf16).
        scaled_orthogonalize_fn: ``fn(matrix) -> update`` used by the default :meth:`orthogonalize`; under TP
            it is applied to the gathered matrix (so any function is exact) and this rank's block is kept.
        tp_group: process group of tensor parallelism; parameters marked by the TE/Megatron protocol
            (``tensor_model_parallel``, ``partition_dim``) are treated as its shards.
        tp_mode: how Newton-Schulz runs on shards, one of :data:`dist_ortho.TP_MODES`.
        expert_tp_group: the group of expert weights (``expert_tp=True``).
        conv_mode: None (matrices only), "flatten" (out, in*k*k) or "batched" (one (out, in) matrix per
            spatial position, update scaled by spatial_size^-0.5) for 3D+ weights.
        coalesce: run the Newton-Schulz of all matrices of a step together, their collectives sharing
            flat buffers (one call per round, group and dtype, buckets of at most ``bucket_bytes``).
            False runs each matrix on its own (the anchors' way: one set of collectives per matrix).
        split_qkv: orthogonalize the Q, K, V (and gate) rows of a fused QKV weight as separate matrices
            (see dist_ortho.qkv). A weight is fused QKV when ``is_qkv_fn(p)`` is true, or without
            is_qkv_fn when it carries ``is_qkv=True``; its split comes from its ``qkv_split_shapes``
            attribute, else from ``qkv_split_shapes`` here.
        qkv_per_head: with split_qkv, orthogonalize every attention head of a fused QKV weight (each
            query head, and each group's key and value head: kv_channels rows) as its own matrix.
        **kwargs: further per-group defaults of a member (coefficient_type, num_ns_steps, ...).
    """

    # Members whose orthogonalize() runs self.newton_schulz on the momentum direction: the step then
    # computes all those iterations up front, together, with coalesced collectives.
    orthogonalizes_with_newton_schulz = False

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
        **kwargs: Any,
    ) -> None:
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
            **kwargs,
        )
        if scaled_orthogonalize_fn is None and type(self).orthogonalize is OrthogonalizedOptimizer.orthogonalize:
            raise TypeError("OrthogonalizedOptimizer needs scaled_orthogonalize_fn, or a subclass that overrides orthogonalize")
        self.scaled_orthogonalize_fn = scaled_orthogonalize_fn
        self.tp_group = tp_group
        self.expert_tp_group = expert_tp_group
        self.is_qkv_fn = is_qkv_fn
        self.bucket_bytes = bucket_bytes
        self._ns_cache: dict[tuple[torch.Tensor, int | None], torch.Tensor] = {}
        self._layouts: dict[torch.Tensor, MatrixLayout] = {}
        self._parts: dict[torch.Tensor, list[tuple[torch.Tensor, MatrixLayout]]] = {}
        self._active: tuple[torch.Tensor, MatrixLayout, int] | None = None  # (param, layout, part) in a split
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
        """p's matrix layout (while a fused weight is split: the current component's)."""
        if self._active is not None and self._active[0] is p:
            return self._active[1]
        if p not in self._layouts:
            self._find_layouts()
        return self._layouts[p]

    def part_layouts(self, p: torch.Tensor) -> list[MatrixLayout]:
        """Layouts of the components of a split fused weight, in state-key order part0, part1, ... (else [])."""
        self.layout(p)
        return [layout for _, layout in self._parts.get(p, [])]

    def matrix_state(self, p: torch.Tensor) -> dict[str, Any]:
        """The optimizer state of the matrix being updated (a component's own, within a split fused weight)."""
        if self._active is not None and self._active[0] is p:
            return self.state[p].setdefault(f"part{self._active[2]}", {})
        return self.state[p]

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
        if layout.spec.partition_dim == 0:
            rank_rows, rank = layout.sizes, comm.group_rank(layout.spec.group)
        else:
            rank_rows, rank = [p.size(0)], 0
        if group["qkv_per_head"]:  # every head its own matrix: one "group" of head-sized pieces
            head, rows = shapes[-1], sum(rank_rows)
            if rows % head:
                raise ValueError(f"{name} has {rows} rows, not a multiple of the head size {head}")
            shapes = [head] * (rows // head)
        self._parts[p] = [
            (part.index, MatrixLayout(layout.spec, part.sizes if layout.spec.partition_dim == 0 else layout.sizes,
                                      (part.rows, layout.cols)))
            for part in qkv_parts(rank_rows, rank, shapes, name)
        ]

    def _find_layouts(self) -> None:
        """Read every parameter's shard spec and check the shapes across ranks: one collective per group."""
        by_group: dict[Any, list[tuple[torch.Tensor, torch.Tensor, ShardSpec]]] = {}
        for group in self.param_groups:
            for p in group["params"]:
                spec = shard_spec(p, self.tp_group, self.expert_tp_group, getattr(p, "_dist_ortho_name", None))
                view = matrix_view(p.detach(), group["conv_mode"])
                if spec.partition_dim is None or spec.size == 1:
                    self._layouts[p] = MatrixLayout(REPLICATED, None, tuple(view.shape))
                else:
                    by_group.setdefault(spec.group, []).append((p, view, spec))
        for tp_group, entries in by_group.items():
            sizes = exchange_shard_sizes([v for _, v, _ in entries], [s.partition_dim for _, _, s in entries], tp_group)
            for (p, view, spec), shard_sizes in zip(entries, sizes):
                self._layouts[p] = MatrixLayout(spec, shard_sizes, global_shape(view.shape, spec, shard_sizes))
        for group in self.param_groups:  # every rank has the same layouts now, so errors here are alike
            for p in group["params"]:
                if group["split_qkv"] and self.is_qkv(p):
                    self._split_fused(p, group)

    # -- helpers members use for anything global --
    @staticmethod
    def ns_spec(group: dict[str, Any]) -> NsSpec:
        custom = group.get("custom_coefficient_sets")
        return NsSpec(
            group["num_ns_steps"], group["coefficient_type"], tuple(map(tuple, custom)) if custom else None,
            use_syrk=group.get("use_syrk", False),
        )

    def _job(self, x: torch.Tensor, layout: MatrixLayout, group: dict[str, Any]) -> MatrixJob:
        return MatrixJob(x, layout.spec.partition_dim, layout.spec.group, layout.sizes, group["tp_mode"], self.ns_spec(group))

    def _part_key(self, p: torch.Tensor) -> tuple[torch.Tensor, int | None]:
        return p, self._active[2] if self._active is not None and self._active[0] is p else None

    def newton_schulz(self, p: torch.Tensor, x: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        """Newton-Schulz of the global matrix of which x is this rank's block (group's coefficients and mode).

        Within a step, the direction's iteration was already run together with every other matrix's."""
        cached = self._ns_cache.pop(self._part_key(p), None)
        if cached is not None and cached.shape == x.shape:
            return cached
        return orthogonalize_many([self._job(x, self.layout(p), group)], self.bucket_bytes)[0]

    def _prefetch_newton_schulz(self, entries: list[tuple[torch.Tensor, dict[str, Any], torch.Tensor, torch.Tensor]]) -> None:
        """Run the Newton-Schulz of every direction of the step together (per fp32 matmul precision)."""
        by_precision: dict[str, tuple[list[MatrixJob], list[tuple[torch.Tensor, int | None]]]] = {}
        for p, group, _, direction in entries:
            if not group["coalesce"]:
                continue
            jobs, keys = by_precision.setdefault(group["fp32_matmul_prec"], ([], []))
            if p in self._parts:
                for part, (index, layout) in enumerate(self._parts[p]):
                    jobs.append(self._job(direction[index], layout, group))
                    keys.append((p, part))
            else:
                jobs.append(self._job(direction, self._layouts[p], group))
                keys.append((p, None))
        for precision, (jobs, keys) in by_precision.items():
            with matmul_precision(precision):
                self._ns_cache.update(zip(keys, orthogonalize_many(jobs, self.bucket_bytes)))

    def tp_plan(self) -> str:
        """Each matrix (and fused-QKV component) with its global shape, mode and predicted cost per mode."""
        rows = []
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                name = getattr(p, "_dist_ortho_name", f"param{i} {tuple(p.shape)}")
                layouts = self.part_layouts(p) or [self.layout(p)]
                for n, layout in enumerate(layouts):
                    pd = layout.spec.partition_dim
                    if pd is None:
                        rows.append({"name": name, "shape": layout.shape, "partition_dim": None, "mode": "local",
                                     "costs": dict.fromkeys(AUTO_CANDIDATES, float("nan"))})
                        continue
                    costs = matrix_costs(layout.shape, pd, layout.spec.size, self.ns_spec(group), p.dtype, p.device)
                    mode = group["tp_mode"]
                    if mode == "auto":
                        mode = min(AUTO_CANDIDATES, key=lambda m: (costs[m], AUTO_CANDIDATES.index(m)))
                    parts = {3: "qkv", 4: "qgkv"}.get(len(layouts)) if not group["qkv_per_head"] else None
                    label = name if len(layouts) == 1 else f"{name} [{parts[n] if parts else f'head {n}'}]"
                    rows.append({"name": label, "shape": layout.shape, "partition_dim": pd, "mode": mode, "costs": costs})
        return format_plan(rows)

    def gather(self, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The global matrix of which x is this rank's block."""
        layout = self.layout(p)
        if layout.group is None:
            return x
        return gather_shards(x, layout.spec.partition_dim, layout.group, layout.sizes)

    def own_block(self, p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
        layout = self.layout(p)
        if layout.group is None:
            return full
        return own_block(full, layout.spec.partition_dim, comm.group_rank(layout.group), layout.sizes)

    def global_norm(self, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """||x||_F over every dim of the global tensor of which x is this rank's block, float64 scalar."""
        return reductions.frobenius_norm(x, self.layout(p).group, dims=tuple(range(x.ndim)))

    def global_inner(self, p: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """<a, b>_F per matrix of the global matrix views, float64 (shape: the batch dims)."""
        return reductions.inner_product(a, b, self.layout(p).group)

    def shape_scale(self, p: torch.Tensor, group: dict[str, Any]) -> float:
        """Muon's scale factor from the global shape, times extra_scale_factor."""
        layout = self.layout(p)
        return muon_scale(group["scale_mode"], layout.rows, layout.cols) * group.get("extra_scale_factor", 1.0)

    # -- the step --
    def orthogonalize(self, p: torch.Tensor, grad: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """The update direction from the (momentum) matrix ``grad``; default: scaled_orthogonalize_fn."""
        assert self.scaled_orthogonalize_fn is not None
        return self.own_block(p, self.scaled_orthogonalize_fn(self.gather(p, grad)))

    def update_direction(
        self, p: torch.Tensor, grad: torch.Tensor, direction: torch.Tensor, group: dict[str, Any]
    ) -> torch.Tensor:
        """Matrix view of the update from the raw gradient and the momentum direction (both matrix views)."""
        return self.orthogonalize(p, direction, **group)

    def init_state(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        """Fill a parameter's state at its first step (not after load_state_dict). State tensors have the
        parameter's dtype, as torch's load_state_dict casts them to it."""
        state["momentum_buffer"] = torch.zeros_like(p)

    @contextlib.contextmanager
    def _part(self, p: torch.Tensor, layout: MatrixLayout, part: int) -> Iterator[None]:
        self._active = (p, layout, part)
        try:
            yield
        finally:
            self._active = None

    def _update_by_parts(
        self, p: torch.Tensor, grad: torch.Tensor, direction: torch.Tensor, group: dict[str, Any]
    ) -> torch.Tensor:
        """update_direction of the whole matrix, or of each component of a split fused weight, put back in place."""
        if p not in self._parts:
            return self.update_direction(p, grad, direction, group)
        pieces = []
        for part, (index, layout) in enumerate(self._parts[p]):
            with self._part(p, layout, part):
                pieces.append(self.update_direction(p, grad[index], direction[index], group))
        update = torch.empty(direction.shape, dtype=pieces[0].dtype, device=direction.device)
        for (index, _), piece in zip(self._parts[p], pieces):
            update[index] = piece
        return update

    def pre_weight_update_fn_inplace(self, p: torch.Tensor, update: torch.Tensor) -> None:
        """Called with the update before W <- W - lr * update."""

    def post_weight_update_fn_inplace(self, p: torch.Tensor) -> None:
        """Called after the update."""

    def apply_weight_decay(self, p: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        """Decay W in place (or, for l2, return G + wd W)."""
        wd, lr, method = group["weight_decay"], group["lr"], group["weight_decay_method"]
        if wd == 0:
            return grad
        if method == "l2":
            return grad.add(p, alpha=wd)
        factor = {"decoupled": lr * wd, "independent": wd, "palm": lr * lr * wd}[method]
        p.mul_(1 - factor)
        return grad

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = call_closure(closure)
        entries = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise TypeError(f"{type(self).__name__} does not support sparse gradients")
                self.layout(p)  # the first step finds every layout in one collective, before any other
                state = self.state[p]
                if not state:
                    self.init_state(p, state, group)
                grad = self.apply_weight_decay(p, p.grad, group)
                buf = state["momentum_buffer"]
                buf.lerp_(grad, 1 - group["momentum"])
                direction = grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                conv_mode = group["conv_mode"]
                entries.append((p, group, matrix_view(grad, conv_mode), matrix_view(direction, conv_mode)))
        if self.orthogonalizes_with_newton_schulz:
            self._prefetch_newton_schulz(entries)
        try:
            for p, group, grad, direction in entries:
                with matmul_precision(group["fp32_matmul_prec"]):
                    update = self._update_by_parts(p, grad, direction, group)
                conv_mode = group["conv_mode"]
                if p.ndim > 2 and conv_mode == "batched":
                    update = update * (update.size(0) ** -0.5)
                update = from_matrix_view(update, p, conv_mode).to(p.dtype)
                self.pre_weight_update_fn_inplace(p, update)
                p.add_(update, alpha=-group["lr"])
                self.post_weight_update_fn_inplace(p)
        finally:
            self._ns_cache.clear()
        return loss


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
