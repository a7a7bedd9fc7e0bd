"""The optimizer's planner: which parameters a step updates, what every rank agrees on about them, and the step's
plan (dist_ortho.optim.planning.StepPlan), made when new and kept while its key holds.

    key(params)   = (the parameters by identity, every group's structural options: settings.STRUCTURAL_OPTIONS)
    step_plan     = agree(entries) -> check the hook -> owned parameters -> stacks -> modes (auto) -> batching
    verify()      = verify_plan="every_step": the same entries checked as the step's first call

The agreement itself is dist_ortho.optim.agreement; the stacks, modes and tables are dist_ortho.optim.planning.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from dist_ortho import comm
from dist_ortho.optim.agreement import PlanAgreement, agree_batching, plan_entry
from dist_ortho.optim.groups import ParamStack, Part
from dist_ortho.optim.hooks import check_whole, hook_entry
from dist_ortho.optim.planning import StepPlan, batching_keys, build_stacks, plan_table, refresh_states, resolve_modes

logger = logging.getLogger(__name__)
Pairs = Sequence[tuple[torch.Tensor, dict[str, Any]]]


class Planner:
    """The plan of ``opt``'s steps (an OrthogonalizedOptimizer), and the ranks' agreement on it."""

    def __init__(self, opt: Any) -> None:
        self.opt = opt
        self.agreement = PlanAgreement(type(opt).__name__)
        self.plan: tuple[tuple, StepPlan] | None = None  # the latest plan and its key (a changed one is made anew)
        self._logged: str | None = None
        self._without_grad: dict[torch.Tensor, bool] = {}  # steps with a zero gradient when it has none
        self._seen: tuple[Any, StepPlan | None] = (None, None)  # the state dict and plan the stacks were read from

    def groups(self) -> tuple[comm.ProcessGroup | None, ...]:
        """Every group whose ranks must agree on the plan: TP, expert TP, DP and the owner groups found so far."""
        opt, layouts = self.opt, self.opt.layouts
        owners = {layouts.owner_key(p): g for p, g in layouts.owner_groups.items() if g is not None}
        owners.pop(layouts.ranks(opt.dp_group), None)  # the DP group is there already
        return (opt.tp_group, opt.expert_tp_group, opt.dp_group, opt.expert_dp_group, *owners.values())

    def taking_part(self) -> list[torch.Tensor]:
        """The parameters a step updates: those with a gradient, and every one that requires one and is held across
        ranks (a TP shard, a DTensor piece, one with an owner on the DP x TP grid): a missing gradient counts as zero
        on every rank alike, so that the ranks of one matrix always step together."""
        return [p for group in self.opt.param_groups for p in group["params"]
                if p.grad is not None or self._steps_without_grad(p)]

    def _steps_without_grad(self, p: torch.Tensor) -> bool:
        known = self._without_grad.get(p)
        if known is None:
            layouts = self.opt.layouts
            known = self._without_grad[p] = p.requires_grad and (
                self.opt.layout(p).group is not None or layouts.held_apart(p) or layouts.owner_group(p) is not None)
        return known

    def key(self, params: Iterable[torch.Tensor]) -> tuple:
        """What a plan for ``params`` depends on that is cheap to compare: the parameters (by identity) and each
        group's structural options (a change makes the plan, and its agreement, anew)."""
        structural = type(self.opt).structural_options
        options = tuple((id(g), tuple(repr(g.get(k)) for k in structural)) for g in self.opt.param_groups)
        return tuple(map(id, params)), options

    def entries(self, params: Pairs) -> tuple[list[tuple], list[str]]:
        """What every rank must agree on about ``params`` (dist_ortho.optim.agreement.plan_entry), and their labels."""
        opt = self.opt
        entries, hook = [], hook_entry(opt.weight_hook)
        for p, group in params:
            layout = opt.layout(p)
            kind = None if layout.group is None else ("expert" if layout.group is opt.expert_tp_group else "dense")
            entries.append(plan_entry(opt.names.get(p), layout, kind, p.dtype, group, len(opt.layouts.parts.get(p, ())),
                                      opt.layouts.dp_local(p), hook))
        return entries, [opt.names.get(p) or f"param {i} {tuple(p.shape)}" for i, (p, _) in enumerate(params)]

    def agree(self, params: Pairs) -> None:
        """Every rank runs the same plan (dist_ortho.optim.agreement), or the same ValueError on every rank."""
        self.agreement.check(*self.entries(params), self.groups(), self._input_error(p for p, _ in params))

    def _input_error(self, params: Iterable[torch.Tensor]) -> str | None:
        """The first thing wrong with this rank's own ``params`` that only it can see (a DTensor's local tensor
        that is not its piece), for the agreement to raise on every rank."""
        return next((e for e in map(self.opt.layouts.problems.get, params) if e is not None), None)

    def verify(self) -> None:
        """``verify_plan="every_step"``: this rank's plan checked against the others' as the step's first call.
        Parameters whose layout this rank has not found yet (found with collectives, which the others would not
        join) make an entry of their own, so a rank that added some alone differs there."""
        opt = self.opt
        every = [(p, group) for group in opt.param_groups for p in group["params"] if p.requires_grad]
        new = [p for p, _ in every if p not in opt.layouts]
        if new:
            names = tuple(opt.names.get(p) or f"{tuple(p.shape)}" for p in new)
            key: Any = ("new", names)

            def entries() -> tuple[list[tuple], list[str]]:
                return [("parameters new to this rank", names)], ["new parameters"]
        else:
            taking_part = {id(p) for p in self.taking_part()}  # no collective: every layout is known
            key = (self.key(p for p, _ in every), tuple(id(p) in taking_part for p, _ in every))

            def entries() -> tuple[list[tuple], list[str]]:
                made, labels = self.entries(every)
                return [(*e, id(p) in taking_part) for e, (p, _) in zip(made, every)], labels
        self.agreement.verify(key, entries, self.groups(), self._input_error(p for p, _ in every))

    def step_plan(self, params: list[torch.Tensor]) -> StepPlan:
        """The plan of a step with these parameters and options: made (and agreed on by every rank) when new,
        then reused while the parameters taking part and the options that shape the step are unchanged."""
        opt, key = self.opt, self.key(params)
        if self.plan is not None and self.plan[0] == key:
            return self.plan[1]
        group_of = {id(p): group for group in opt.param_groups for p in group["params"]}
        taking_part = [(p, group_of[id(p)]) for p in params]
        if any(p.grad is not None and p.grad.is_sparse for p in params):
            raise TypeError(f"{type(opt).__name__} does not support sparse gradients")
        self.agree(taking_part)
        check_whole(opt.weight_hook, [(opt.name_of(p), opt.layout(p)) for p in params])
        if opt.overlap and opt.grid.layers:  # parameter groups added after overlap_by_layer
            opt.grid.check_layers_cover()
        owned = [(p, group) for p, group in taking_part if opt.owns(p)]
        stacks = build_stacks(owned, opt.layouts, lambda: opt.state, opt.name_of, type(opt).batched)
        rows = resolve_modes(stacks, opt.ns_spec, self.local)
        if any(stack.options["tp_mode"] == "auto" for stack in stacks):
            printed = plan_table(rows, self.label)
            if printed != self._logged:
                logger.info("%s: tp_mode='auto' plan (predicted ms per mode):\n%s", type(opt).__name__, printed)
                self._logged = printed
        agree_batching(batching_keys(stacks, self.local), (opt.tp_group, opt.expert_tp_group))
        plan = StepPlan(owned, stacks, opt.grid.shares(params))
        self.plan = (key, plan)
        return plan

    def refresh_states(self, plan: StepPlan) -> bool:
        """Re-read the stacks' states where the state dicts or the plan are new (a load_state_dict, a new plan);
        whether they were (then parameters may be at their first step)."""
        if self._seen[0] is self.opt.state and self._seen[1] is plan:
            return False
        refresh_states(plan.stacks)
        self._seen = (self.opt.state, plan)
        return True

    def local(self, stack: ParamStack) -> torch.Tensor:
        """A member's local tensor (shape, dtype and device of the stack's members)."""
        return self.opt.layouts.value(stack.params[0])

    def label(self, p: torch.Tensor, part: Part, group: dict[str, Any]) -> str:
        """A matrix's name in plans: the parameter's, with its fused-QKV component or head."""
        opt, name = self.opt, self.opt.name_of(p)
        if part.number is None:
            return name
        count = len(opt.layouts.parts[p])
        fused = opt.is_qkv(p) and not group["qkv_per_head"]
        parts = {3: "qkv", 4: "qgkv"}.get(count) if fused else None
        return f"{name} [{parts[part.number] if parts else f'head {part.number}'}]"

    def table(self) -> str:
        """Each matrix (and fused-QKV component) with its global shape, the mode the step runs for it and the
        predicted cost per mode (the same resolution as the step's)."""
        opt = self.opt
        every = [(p, group) for group in opt.param_groups for p in group["params"]]
        for p, _ in every:
            opt.layout(p)
        stacks = build_stacks(every, opt.layouts, lambda: opt.state, opt.name_of, type(opt).batched)
        return plan_table(resolve_modes(stacks, opt.ns_spec, self.local), self.label)
