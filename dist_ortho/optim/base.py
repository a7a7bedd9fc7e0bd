"""OrthogonalizedOptimizer: the step every member of the Muon family shares, exact under tensor parallelism.

For each matrix parameter W with gradient G (this rank may hold one block of W, see dist_ortho.parameters.protocol):

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

A member declares its options (``settings``, dist_ortho.optim.settings: its constructor, signature, defaults,
checks and argument docs are made from them) and defines :meth:`update`: a program (dist_ortho.comm.coalesce) that
reads one :class:`~dist_ortho.optim.context.MatrixContext` (a batch of same-shape matrices with ``batched = True``)
and returns their update; every cross-rank quantity it needs is a ``yield from`` of the context's helpers.

The step is a pipeline: plan (dist_ortho.optim.planner, agreed on by every rank) -> gradients into their owners
and pieces to them (dist_ortho.optim.replicas) -> the members' step over same-shape groups (dist_ortho.optim.step:
momentum, Newton-Schulz of every direction, the members' updates, one finite check, the weight-update hooks) ->
the share of the new weights and its finite decision. Its collectives depend on the member and mode, its host
work on the number of groups, never on the number of matrices.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch.optim.optimizer import Optimizer

from dist_ortho import comm
from dist_ortho.comm.coalesce import Program
from dist_ortho.optim import constructor
from dist_ortho.optim.checks import check_matrix_param, check_optimizer_options, check_options
from dist_ortho.optim.context import MatrixContext
from dist_ortho.optim.gradients import decoupled_grads
from dist_ortho.optim.grid_methods import GridMethods
from dist_ortho.optim.holding import StackHeld, declared_holding
from dist_ortho.optim.hooks import NoOpWeightUpdateHook, as_program_hook
from dist_ortho.optim.layouts import ParamLayouts
from dist_ortho.optim.names import carry_names
from dist_ortho.optim.planner import Planner
from dist_ortho.optim.replicas import ReplicaGrid
from dist_ortho.optim.settings import (
    ABSENT,
    STRUCTURAL_OPTIONS,
    BaseSettings,
    MatmulPrecision,
    WeightDecayMethod,
    fields_of,
    structural_options,
)
from dist_ortho.optim.step import GroupStep, adds_l2, run_phase
from dist_ortho.parameters.dtensor import check_mesh_dims, groups_from_meshes, is_expert_dtensor, mesh_groups
from dist_ortho.parameters.layout import Held, Layout
from dist_ortho.parameters.protocol import is_expert_stack
from dist_ortho.parameters.qkv import per_head_option
from dist_ortho.tp import NsSpec

logger = logging.getLogger(__name__)
__all__ = ["STRUCTURAL_OPTIONS", "MatmulPrecision", "OrthogonalizedOptimizer", "WeightDecayMethod"]


class OrthogonalizedOptimizer(GridMethods, Optimizer):
    """Momentum, then an orthogonalized update, for matrix parameters; exact across tensor parallelism (see the
    module doc). Without a member's :meth:`update`, ``scaled_orthogonalize_fn`` makes it. What reads across the
    replica grid (owners, the share, skipped steps, the gradients' norm) is :class:`GridMethods`."""

    settings: ClassVar[type] = BaseSettings  # the options (dist_ortho.optim.settings)
    positional: ClassVar[tuple[str, ...]] = ("lr", "momentum", "weight_decay")  # after params, by position
    structural_options: ClassVar[tuple[str, ...]] = structural_options(BaseSettings)  # the plan key's options
    # Members whose update reads ctx.orthogonalized: the step runs Newton-Schulz of every direction first.
    uses_newton_schulz = False
    # Members whose update is written over a batch (a leading dim, one matrix per member of a group). False: every
    # parameter is its own group and the contexts carry its matrix alone.
    batched = False
    # Members whose update makes a host sync (an SVD): refused with capturable=True.
    syncs_host = False
    # The hooks a member may override; where none is (and no group adds "l2"), pieces of FSDP2 weights get the update.
    _WEIGHT_HOOKS = ("apply_weight_decay", "pre_weight_update", "post_weight_update", "pre_weight_update_fn_inplace",
                     "post_weight_update_fn_inplace", "init_state_program", "init_state")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.structural_options = structural_options(cls.settings)
        constructor.install(cls)

    @classmethod
    def translate(cls, options: dict[str, Any], given: frozenset[str]) -> dict[str, Any]:
        """The constructor's arguments (``given``: those the caller passed) as settings: members read other
        libraries' names here (call super); the base normalizes."""
        if options["qkv_split_shapes"] is not None:
            options["qkv_split_shapes"] = tuple(options["qkv_split_shapes"])
        options["per_head"] = per_head_option(options["per_head"])
        if options["nonfinite"] is None:
            options["nonfinite"] = "skip" if options["capturable"] else "raise"
        return options

    def _construct(self, params: Any, settings: Any) -> None:
        """Build from the bound settings (the generated constructor's last step): optimizer-wide options become
        attributes of their names, per-group ones the groups' defaults."""
        check_optimizer_options(settings)
        for field in fields_of(type(settings), "optimizer"):
            setattr(self, field.name, getattr(settings, field.name))
        if settings.device_mesh is not None:
            self.tp_group, self.dp_group = mesh_groups(settings.device_mesh, settings.tp_group, settings.dp_group)
        self.scaled_orthogonalize_fn = getattr(settings, "scaled_orthogonalize_fn", None)
        if self.scaled_orthogonalize_fn is None and type(self).update is OrthogonalizedOptimizer.update:
            raise TypeError("OrthogonalizedOptimizer needs scaled_orthogonalize_fn, or a subclass that overrides update")
        self.weight_hook = as_program_hook(self.make_weight_update_hook(settings))
        self._hook_states: dict[int, Any] = {}  # a weight-update context's pre-hook state, for its post-hook
        self.backward_bucket_bytes = int(settings.backward_bucket_bytes)
        self.expert_dp_group: comm.ProcessGroup | None = None  # read from expert DTensors' meshes
        # Derived once from the parameters (their shapes on every rank), never changed after:
        self.layouts = ParamLayouts(self.tp_group, self.expert_tp_group, self.dp_group, self.is_qkv)
        self.mesh_dims = self.layouts.mesh_dims = check_mesh_dims(settings.mesh_dims)
        self.step_count, self._skipped = 0, 0  # steps; those skipped for a non-finite update (nonfinite="skip")
        self._skipped_on_device: torch.Tensor | None = None  # the same, counted on the device (capturable)
        self.names: dict[torch.Tensor, str] = {}  # parameter -> name, for messages and plans
        self._given: list[tuple[dict[str, Any], list[torch.Tensor]]] = []  # each group's parameters as given
        self.planner, self.engine, self._last_comm = Planner(self), GroupStep(self), comm.CommStats()
        if settings.param_names is not None:  # before the groups are checked, so that checks can name parameters
            named = settings.param_names.items() if isinstance(settings.param_names, dict) else settings.param_names
            self.names.update((p, name) for name, p in named)
        defaults = {f.name: getattr(settings, f.name) for f in fields_of(type(settings), "group")
                    if getattr(settings, f.name) is not ABSENT}
        super().__init__(params, defaults)
        self._groups_from_params = all(g is None for g in (settings.device_mesh, self.tp_group, self.dp_group,
                                                             self.expert_tp_group))
        if self._groups_from_params:
            self._groups_from_meshes()
        self.grid = ReplicaGrid(self)  # owners, gradients into them, the share and its finite decision

    def make_weight_update_hook(self, settings: Any) -> Any:
        """The ``weight_update_hook`` the step runs (members with a hook of their own override this)."""
        return getattr(settings, "weight_update_hook", None)

    def _groups_from_meshes(self) -> None:
        """Without device_mesh= or groups: read them from DTensor parameters' named mesh dims, if any."""
        params = [p for group in self.param_groups for p in group["params"]]
        found = groups_from_meshes(params, [p.ndim == 3 and self.is_expert_stack(p) for p in params], self.mesh_dims,
                                   [self.names.get(p) for p in params])
        self.tp_group = self.layouts.tp_group = found.get("tp_group")
        self.dp_group = self.layouts.dp_group = found.get("dp_group")
        self.expert_tp_group = self.layouts.expert_tp_group = found.get("expert_tp_group")
        self.expert_dp_group = self.layouts.expert_dp_group = found.get("expert_dp_group")

    # -- parameters: names, checks, layouts, how their state is held --
    def name_of(self, p: torch.Tensor) -> str:
        """The parameter's name, or its shape when it has none."""
        return self.names.get(p) or f"a parameter of shape {tuple(p.shape)}"

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self.names.update(zip(group["params"], group.get("param_names", ())))
        self._given.append((group, list(group["params"])))
        self.check_group(group)

    def check_group(self, group: dict[str, Any]) -> None:
        """Validate a param group's options (dist_ortho.optim.checks) and parameters; members extend this."""
        check_options(self, group)
        for p in group["params"]:
            self.check_param(p, group)

    def check_param(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        check_matrix_param(self, p, group)

    def is_expert_stack(self, p: torch.Tensor) -> bool:
        """A 3D weight [E, out, in] of E expert matrices (dist_ortho.parameters.protocol.is_expert_stack, or a DTensor on a mesh
        with an "ep" dim)."""
        return is_expert_stack(p, self.names.get(p)) or is_expert_dtensor(p, self.mesh_dims)

    def is_qkv(self, p: torch.Tensor) -> bool:
        return bool(self.is_qkv_fn(p)) if self.is_qkv_fn is not None else getattr(p, "is_qkv", False) is True

    def layout(self, p: torch.Tensor) -> Layout:
        """The global layout of p's matrix view (dist_ortho.optim.layouts: found once, for every parameter)."""
        if p not in self.layouts:
            carry_names(self._given, self.names)
            if self._groups_from_params and not self.layouts.held:  # a wrapper (Megatron-FSDP's fully_shard) may have
                self._groups_from_meshes()  # put DTensors in the groups after construction
            new = [(q, group) for group in self.param_groups for q in group["params"] if q not in self.layouts]
            self.layouts.find(new, self.names.get, self.is_expert_stack)
        return self.layouts.layouts[p]

    def part_layouts(self, p: torch.Tensor) -> list[Layout]:
        """Layouts of the components of a split fused weight, in state-key order part0, part1, ... (else [])."""
        self.layout(p)
        return [layout for _, layout in self.layouts.parts.get(p, [])]

    def group_of(self, p: torch.Tensor) -> dict[str, Any]:
        return next(g for g in self.param_groups if any(q is p for q in g["params"]))

    def state_holding(self, p: torch.Tensor, path: Sequence[str]) -> Held | StackHeld:
        """How the ranks hold state tensor ``state[p][path[0]]...`` (dist_ortho.optim.holding.declared_holding,
        from the member's :meth:`held_state`; read by checkpoints)."""
        return declared_holding(self, p, path)

    def held_state(self, key: str, layout: Layout, group: dict[str, Any]) -> Held | None:
        """How a state tensor ``key`` of a matrix with ``layout`` is held; members extend this (call super)."""
        return layout.held() if key == "momentum_buffer" else None

    # -- what a member defines --
    def init_state(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        """Fill a parameter's state at its first step (not after load_state_dict), in the parameter's dtype."""
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
        self._hook_states[id(ctx)] = yield from self.weight_hook.pre_update(ctx, ctx.param, update)

    def post_weight_update(self, ctx: MatrixContext) -> Program[None]:
        """Program run after the update."""
        if type(self).post_weight_update_fn_inplace is not OrthogonalizedOptimizer.post_weight_update_fn_inplace:
            for (p,) in zip(*self._members(ctx, ctx.param)):
                self.post_weight_update_fn_inplace(p)
        yield from self.weight_hook.post_update(ctx, ctx.param, self._hook_states.pop(id(ctx), None))

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

    def apply_weight_decay(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        """Decay W in place (decoupled, independent, palm); l2 is added to the gradient instead."""
        wd, lr, method = group["weight_decay"], group["lr"], group["weight_decay_method"]
        if wd == 0 or method == "l2":
            return
        factor = {"decoupled": lr * wd, "independent": wd, "palm": lr * lr * wd}[method]
        p.mul_(1 - factor)

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

    def _step(self) -> None:
        """plan (agreed on by every rank) -> gradients into their owners -> pieces to their owners -> the members'
        step (momentum, direction, orthogonalization, update, finite check) -> the share of the new weights (or of
        the pieces' updates) and its finite decision, the same on every rank."""
        if self.verify_plan == "every_step":
            self.planner.verify()
        self.grid.reduce_gradients()
        self.grid.grads_reduced = False
        plan = self.planner.step_plan(self.planner.taking_part())
        fresh = self.planner.refresh_states(plan)
        pieces_get_update = any(share.sharded for share in plan.shares) and self._pieces_get_update()
        self.grid.gather_pieces(plan, values=not pieces_get_update)
        if fresh:  # parameters may be at their first step
            self.init_fresh([p for p, _ in plan.owned])
        if not plan.shares:
            self.engine.run(plan.stacks)
            return
        self.grid.share(plan, self.engine.run(plan.stacks, defer=True), pieces_get_update)

    def _pieces_get_update(self) -> bool:
        """DP pieces of DTensor parameters (FSDP2): the owner receives the gradients' pieces only and sends each
        rank its piece of the update U, which that rank applies to its own piece (weight decay, then W - lr U:
        elementwise, as the owner would to the whole block): 2 pieces moved per weight instead of 3. Where the
        member's weight update reads no whole weight (no hook overridden, no weight-update hook) and no group adds
        "l2" decay to the gradient (which reads the weight)."""
        cls = type(self)
        return (all(getattr(cls, hook) is getattr(OrthogonalizedOptimizer, hook) for hook in self._WEIGHT_HOOKS)
                and isinstance(self.weight_hook, NoOpWeightUpdateHook)
                and not any(adds_l2(group) for group in self.param_groups))

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

    def tp_plan(self) -> str:
        """Each matrix (and fused-QKV component) with its global shape, the mode the step runs for it and the
        predicted cost per mode (the same resolution as the step's)."""
        return self.planner.table()


constructor.install(OrthogonalizedOptimizer)


def call_closure(closure: Callable[[], float] | None) -> float | None:
    """Re-evaluate the loss as torch.optim does: the closure runs with gradients enabled."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()
