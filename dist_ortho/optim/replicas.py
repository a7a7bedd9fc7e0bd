"""The DP x TP replica grid of one optimizer as one object (dist_ortho.parameters.grid, dist_ortho.optim.layouts).

Each matrix has one owner replica (``owner``/``owns``) that steps it and keeps its state. Around the members'
step the grid does: the gradients averaged into their owners (blocking, or issued during backward by a
:class:`~dist_ortho.parameters.backward.BackwardReducer` with ``overlap_with_backward``, ``no_sync`` for accumulation);
after it, the share of each owner group's new values (or, for weights held in pieces, of the update U, which each
rank applies to its own piece: W <- W - lr U after weight decay), carrying each rank's finite verdict so that every
rank of the group makes one decision (commit, skip or raise alike); with ``overlap`` the share is left in flight,
bucket by bucket (``finish``/``wait_for``, per layer of ``set_layers``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

from dist_ortho import comm
from dist_ortho.comm.coalesce import Program, start_many
from dist_ortho.optim.gradients import decoupled_grads, dp_own, start_reduce_into_owners
from dist_ortho.optim.nonfinite import Verdict, shared_verdict
from dist_ortho.optim.overlap import ShareInFlight, layer_buckets
from dist_ortho.optim.planning import Share, StepPlan
from dist_ortho.optim.step import Pending, descend
from dist_ortho.parameters.backward import BackwardReducer, cut_by_bytes
from dist_ortho.parameters.dtensor import local
from dist_ortho.parameters.grid import share_program, verdict_program


class ReplicaGrid:
    """The replica grid of ``opt`` (an OrthogonalizedOptimizer): its owners, the gradients' reduction into them,
    the share after the step and its finite decision. ``opt`` is read for its settings (``overlap``,
    ``overlap_with_backward``, ``reduce_grads``, ``capturable``, bucket sizes), its layouts and parameter groups."""

    def __init__(self, opt: Any) -> None:
        self.opt = opt
        self.in_flight: ShareInFlight | None = None  # the last step's share, with overlap
        self.layers: list[set[torch.Tensor]] = []  # overlap_by_layer's modules' parameters, in forward order
        self.backward: BackwardReducer | None = None  # overlap_with_backward's reducer, once the layout is known
        self.grads_reduced = False  # reduce_gradients() ran since the last step
        self.reduced_plan: tuple | None = None  # the parameters and options the reductions were last agreed for

    # -- owners --
    def owner(self, p: torch.Tensor) -> int:
        self.opt.layout(p)
        return self.opt.layouts.owners[p]

    def owns(self, p: torch.Tensor) -> bool:
        return self.owner(p) == comm.group_rank(self.opt.layouts.owner_group(p))

    # -- the share in flight (overlap=True) --
    def finish(self) -> None:
        if self.in_flight is not None:
            in_flight, self.in_flight = self.in_flight, None
            in_flight.wait_for(None, " by finish()")

    def wait_for(self, module: torch.nn.Module) -> None:
        if self.in_flight is not None:
            self.in_flight.wait_for(set(module.parameters()), f" before {type(module).__name__}'s forward")
            if self.in_flight.done():
                self.in_flight = None

    def overlap_by_layer(self, layers: Sequence[torch.nn.Module]) -> list[Any]:
        """The units of overlap: each layer's parameters, in forward order (checked to cover the share); with
        ``overlap`` a forward pre-hook (first of all), a state-dict and a load-state-dict pre-hook per layer that wait
        for its bucket of the share. Returns the hooks' handles."""
        opt = self.opt
        if not (opt.overlap or opt.overlap_with_backward):
            raise ValueError("overlap_by_layer needs overlap=True or overlap_with_backward=True")
        layers = list(layers)
        for i, module in enumerate(layers):
            if not isinstance(module, torch.nn.Module):
                raise TypeError(f"overlap_by_layer: layers[{i}] must be a torch.nn.Module, got {type(module).__name__}")
        self.layers = [set(module.parameters()) for module in layers]
        if not opt.overlap:
            return []
        self.check_layers_cover()

        def wait(module: torch.nn.Module, *_: Any) -> None:
            self.wait_for(module)
        return [handle for module in layers for handle in (
            module.register_forward_pre_hook(wait, prepend=True), module.register_state_dict_pre_hook(wait),
            module.register_load_state_dict_pre_hook(wait))]

    def check_layers_cover(self) -> None:
        """Every parameter the share over DP may bring (each that requires a gradient, but experts whose DP ranks
        update their own) is in one of ``overlap_by_layer``'s layers. Local: every rank holds the same layers."""
        opt = self.opt
        if not any(opt.layouts.owner_keys()) and comm.group_size(opt.dp_group) == 1:
            return
        covered = set().union(*self.layers)
        outside = [opt.name_of(p) for group in opt.param_groups for p in group["params"]
                   if p.requires_grad and p not in covered and not opt.layouts.steps_own(p)]
        if outside:
            shown = ", ".join(outside[:5]) + (f" and {len(outside) - 5} more" if len(outside) > 5 else "")
            raise ValueError(
                f"overlap_by_layer: in none of the layers: {shown}. With overlap=True nothing would wait for their "
                "share before a forward reads them. Pass the modules that hold them among the layers, in forward "
                "order (e.g. [model.embedding, *model.layers, model.head]), or leave them to another optimizer")

    # -- gradients into their owners --
    def forget_reduction(self) -> None:
        """zero_grad: complete the reductions a backward issued, and forget that these gradients were reduced."""
        if self.backward is not None:
            self.backward.drain()
        self.grads_reduced = False

    def no_sync(self) -> contextlib.AbstractContextManager[None]:
        return self.backward.no_sync() if self.backward is not None else contextlib.nullcontext()

    def reduce_gradients(self) -> None:
        opt = self.opt
        if not opt.reduce_grads or comm.group_size(opt.dp_group) == 1 or self.grads_reduced:
            return
        with decoupled_grads([p for group in opt.param_groups for p in group["params"]]):
            self._reduce_gradients()

    def _reduce_gradients(self) -> None:
        if self.backward is not None:  # overlap_with_backward: issued during backward, bucket by bucket
            self.backward.finish()
            self.grads_reduced = True
            return
        opt = self.opt
        every = [(p, group) for group in opt.param_groups for p in group["params"] if p.requires_grad]
        for p, _ in every:
            opt.layout(p)  # holdings known: DTensors whose DP ranks hold pieces of their own are left as they are
        every = [(p, group) for p, group in every if not dp_own(opt.layouts, p)]
        key = opt.planner.key(p for p, _ in every)
        if key != self.reduced_plan:  # the reduce-scatter's buffers follow the plan: agree first (as _step_plan)
            opt.planner.agree(every)
            self.reduced_plan = key
        params = [p for p, _ in every]
        self.start_reduce(params)()
        self.grads_reduced = True
        if opt.overlap_with_backward:  # the layout is known now: later steps reduce during backward
            per_layer, rest = layer_buckets(params, self.layers)
            buckets = [*([params[i] for i in layer] for layer in reversed(per_layer)),
                       *cut_by_bytes([params[i] for i in reversed(rest)], opt.backward_bucket_bytes)]
            self.backward = BackwardReducer(buckets, self.start_reduce, opt.name_of)

    def start_reduce(self, params: Sequence[torch.Tensor]) -> Callable[[], None]:
        """Start averaging ``params``' gradients into their owners over each one's DP group (the experts' own apart:
        ParamLayouts.dp_of); the callable returned writes them."""
        by_dp: dict[Any, list[torch.Tensor]] = {}
        for p in params:
            by_dp.setdefault(self.opt.layouts.dp_of(p), []).append(p)
        writes = [start_reduce_into_owners(members, [self.owner(p) for p in members], dp_group)
                  for dp_group, members in by_dp.items()]

        def write() -> None:
            for each in writes:
                each()
        return write

    # -- the share --
    def shares(self, params: Sequence[torch.Tensor]) -> list[Share]:
        """What each owner group moves after a step of ``params`` (dist_ortho.optim.planning.Share)."""
        layouts, shares = self.opt.layouts, {}
        for p in params:
            key = layouts.owner_key(p)
            if key is None:
                continue
            share = shares.setdefault(key, Share(layouts.owner_group(p), key, [], [], [], []))
            if layouts.in_pieces(p):
                share.sharded.append(p)
                share.sharded_owners.append(self.owner(p))
            elif not layouts.steps_own(p):
                share.replicated.append(p)
                share.replicated_owners.append(self.owner(p))
        return list(shares.values())

    def gather_pieces(self, plan: StepPlan, values: bool) -> None:
        """Pieces of the parameters held in pieces to their owners, each as one TP block (gradients, and the
        values where ``values``)."""
        for share in plan.shares:
            if share.sharded:
                self.opt.layouts.gather(share.sharded, share.sharded_owners, share.group, values=values)

    def share(self, plan: StepPlan, pending: Pending, pieces_get_update: bool) -> None:
        """On the grid: the owners' new values (or updates of the pieces) to every rank of each owner group, each
        rank's finite verdict in the group's first call (the pieces' all-to-all, the all-gather, or a flag alone);
        then every rank commits, or raises or skips with the same message (nothing written), as one process would.
        With ``overlap`` the calls are left in flight, bucket by bucket (dist_ortho.optim.overlap).
        ``pieces_get_update``: each rank receives its piece of U and applies it (:meth:`apply_update_pieces`)."""
        opt = self.opt
        device = local(next(p for p, _ in plan.owned) if plan.owned else
                       next(p for group in opt.param_groups for p in group["params"])).device
        # each rank's verdict about its whole step, so that a group whose ranks found nothing learns of another
        # group's non-finite update (dense weights over "fsdp", experts over "efsdp": the dense share spans both)
        whole = torch.stack([pending.flag(share.key, device) for share in plan.shares]).min()
        flags: list[torch.Tensor | None] = [whole for _ in plan.shares]
        every = [p for share in plan.shares for p in (*share.sharded, *share.replicated)]
        per_layer, rest = layer_buckets(every, self.layers if opt.overlap else [])
        values = pending.new_values()
        updates, options = (pending.updates(), self.update_options()) if pieces_get_update else (None, None)
        buckets = []
        for indices in [b for b in (*per_layer, rest) if b] or [[]]:
            members = {every[i] for i in indices}
            programs = self._bucket_programs(plan, members, flags, values, updates, options, first=not buckets)
            buckets.append((members, start_many(programs, opt.bucket_bytes)))
        in_flight = ShareInFlight(buckets, lambda found: self.decide(plan, pending, found), opt.comm_stats(),
                                  f"{type(opt).__name__} step {opt.step_count}: the share over DP")
        if opt.overlap:
            self.in_flight = in_flight
        else:
            in_flight.wait_for()

    def _bucket_programs(self, plan: StepPlan, members: set[torch.Tensor], flags: list[torch.Tensor | None],
                         values: dict[torch.Tensor, torch.Tensor], updates: dict[torch.Tensor, torch.Tensor] | None,
                         options: dict[int, dict[str, Any]] | None, first: bool) -> list[Program[Any]]:
        """One bucket's programs, per share: the pieces' scatter, the replicated values' all-gather, or (in the
        first bucket, where the group has neither) its verdict alone. Each group's flag rides in its first call
        (``flags[k]`` set to None once sent). With ``updates`` (and their ``options``) the pieces get the update U,
        else the new values; replicated weights always get their new values."""
        layouts, programs = self.opt.layouts, []
        for k, share in enumerate(plan.shares):
            sharded = [(p, o) for p, o in zip(share.sharded, share.sharded_owners) if p in members]
            replicated = [(p, o) for p, o in zip(share.replicated, share.replicated_owners) if p in members]
            flag = flags[k]
            if sharded:
                params = [p for p, _ in sharded]
                apply = self.apply_update_pieces(params, options) if updates is not None else None
                programs.append(_for_share(k, layouts.scatter(params, [o for _, o in sharded], share.group,
                                                              values if updates is None else updates, flag, apply)))
                flag = None
            if replicated:
                programs.append(_for_share(k, share_program(
                    [layouts.value(p) for p, _ in replicated], [o for _, o in replicated], share.group,
                    [values.get(p) for p, _ in replicated], flag)))
                flag = None
            if flag is not None and first:  # the group's verdict rides in the first bucket: alone here
                programs.append(_for_share(k, verdict_program(flag, share.group)))
                flag = None
            flags[k] = flag
        return programs

    def update_options(self) -> dict[int, dict[str, Any]]:
        """Per parameter (by id), what applying its update reads: the step's lr and decay, taken now (with
        ``overlap`` the update is applied after the LR scheduler's next step)."""
        out: dict[int, dict[str, Any]] = {}
        for g in self.opt.param_groups:
            lr = g["lr"].clone() if isinstance(g["lr"], torch.Tensor) else g["lr"]
            options = {"lr": lr, "weight_decay": g["weight_decay"], "weight_decay_method": g["weight_decay_method"]}
            out.update((id(p), options) for p in g["params"])
        return out

    def apply_update_pieces(self, params: Sequence[torch.Tensor], options: dict[int, dict[str, Any]]
                            ) -> Callable[[int, torch.Tensor, torch.Tensor, Any], None]:
        """``apply(i, mine, update, ok)``: apply a received piece of ``params[i]``'s update to its local piece, as the
        step applies an update to a whole weight (weight decay, then W - lr U; only where the device bool ``ok``),
        with the options of :meth:`update_options`."""
        groups = [options[id(p)] for p in params]
        apply_weight_decay = self.opt.apply_weight_decay

        def apply(i: int, mine: torch.Tensor, update: torch.Tensor, ok: torch.Tensor | None) -> None:
            new = mine if ok is None else mine.clone()
            apply_weight_decay(new, groups[i])
            descend(new, update, groups[i]["lr"])
            if ok is not None:
                mine.copy_(torch.where(ok, new, mine))
        return apply

    # -- the shared finite decision --
    def decide(self, plan: StepPlan, pending: Pending, found: Sequence[torch.Tensor]) -> list[Any]:
        """Every owner group's flags (``found[k]``: share k's, by rank) to its decision, the same on every rank of
        the group; the owners' own step committed. Returns each share's decision for its writes (None: write,
        False: nothing, a device bool: where true). A non-finite update raises or is logged and counted once."""
        if self.opt.capturable:
            oks, local_ok = self._decide_on_device(pending, found)
        else:
            oks, local_ok = self._decide_on_host(plan, pending, found)
        for share, ok in zip(plan.shares, oks):
            if ok is not False:
                pending.commit(ok, share.key)
        if None in pending.verdicts and local_ok is not False:
            pending.commit(local_ok, None)
        return oks

    def _decide_on_device(self, pending: Pending, found: Sequence[torch.Tensor]) -> tuple[list[Any], Any]:
        """capturable: one device bool, every group's writes go or none do (a skip counted once)."""
        skips = any(v.skips for v in pending.verdicts.values())
        oks = [f.min() > 0 for f in found]
        local = pending.verdicts.get(None)
        on_device = local is not None and isinstance(local.ok, torch.Tensor)
        whole = torch.stack(oks + ([local.ok] if on_device else [])).all()
        self.opt.engine.decide(Verdict(whole, skips=skips))  # counts a skip once
        return [whole for _ in oks], whole if on_device else None

    def _decide_on_host(self, plan: StepPlan, pending: Pending, found: Sequence[torch.Tensor]) -> tuple[list[Any], Any]:
        """The first failing verdict (one that raises before one that skips) decides every group alike."""
        name = type(self.opt).__name__
        verdicts = [shared_verdict(pending.verdicts.get(share.key) or Verdict(True), f.tolist(), name)
                    for share, f in zip(plan.shares, found)]
        local = pending.verdicts.get(None) or Verdict(True)
        worst = next((v for v in [local, *verdicts] if v.ok is False and v.policy == "raise"), None) or next(
            (v for v in [local, *verdicts] if v.ok is False), None)
        if worst is not None:
            self.opt.engine.decide(worst)  # raises, or logs and counts the skip
        ok = None if worst is None else False  # one step: every group's writes or none
        return [ok for _ in verdicts], ok


def _for_share(k: int, program: Program[Any]) -> Program[Any]:
    """``program`` (yielding (flags, write)) with its write taking share ``k``'s decision from the list of them
    (write nothing where it is False)."""
    flags, write = yield from program

    def write_k(decisions: Any) -> None:
        if decisions[k] is not False:
            write(decisions[k])
    return flags, write_k
