"""The step of an OrthogonalizedOptimizer, over groups of same-shape parameters (dist_ortho.optim.groups).

For every :class:`~dist_ortho.optim.groups.ParamStack` of the step, with W, G, M its members' stacked
weights, gradients and momenta:

    G <- G + wd * W                                  (l2 weight decay)
    M' = M.lerp(G, 1 - beta);  D = G.lerp(M', beta) (Nesterov) or M'
    O  = Newton-Schulz(D)       all stacks together: one coalesced run per fp32 matmul precision
    U  = update(context)        the member's program, once per stack (per fused-QKV part), coalesced
    one finite check over every U and new member state (dist_ortho.optim.nonfinite; a non-finite M' makes U so)
    M <- M';  W <- W - lr * wd * W (decoupled, ...);  pre-hook(U);  W <- W - lr * U;  post-hook(W)

so the step issues a number of host operations and collectives that depends on the number of groups, not of
matrices. Nothing is written before the check; a capturable step (``capturable=True``) makes no host sync:
lr may be a device tensor and a "skip" is committed through ``torch.where``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from dist_ortho.comm.coalesce import Program, run, run_many, under_precision
from dist_ortho.math.precision import matmul_precision
from dist_ortho.optim.context import MatrixContext
from dist_ortho.optim.groups import ParamStack
from dist_ortho.optim.holding import part_key
from dist_ortho.optim.nonfinite import Verdict, all_finite, commit, first_nonfinite
from dist_ortho.tp import PIPELINE_BUCKETS, MatrixJob, orthogonalize_many

if TYPE_CHECKING:
    from dist_ortho.optim.layouts import ParamLayouts

logger = logging.getLogger(__name__)




def momentum_direction(grad: torch.Tensor, momentum: torch.Tensor, beta: float, nesterov: bool,
                       out: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """M' = M.lerp(G, 1 - beta) and the direction D = G.lerp(M', beta) (Nesterov) or M', out of place (into
    ``out``'s tensors when given: M', then D's with Nesterov)."""
    if out is None:
        new_momentum = momentum.lerp(grad, 1 - beta)
        return new_momentum, grad.lerp(new_momentum, beta) if nesterov else new_momentum
    new_momentum = torch.lerp(momentum, grad, 1 - beta, out=out[0])
    return new_momentum, torch.lerp(grad, new_momentum, beta, out=out[1]) if nesterov else new_momentum


def descend(weights: torch.Tensor, update: torch.Tensor, lr: float | torch.Tensor) -> None:
    """W <- W - lr * U in place; lr a number, or a device tensor (capturable steps: no host sync)."""
    if isinstance(lr, torch.Tensor):
        weights.sub_(update * lr.to(update.dtype))
    else:
        weights.add_(update, alpha=-lr)


def run_phase(contexts: Sequence[MatrixContext], programs: Sequence[Program[Any]], bucket_bytes: int) -> list[Any]:
    """Run one phase: each program under its group's precision; the coalesced ones in lockstep."""
    wrapped = [under_precision(program, ctx.options["fp32_matmul_prec"]) for ctx, program in zip(contexts, programs)]
    together = [i for i, ctx in enumerate(contexts) if ctx.options["coalesce"]]
    results: list[Any] = [None] * len(wrapped)
    for i, value in zip(together, run_many([wrapped[i] for i in together], bucket_bytes)):
        results[i] = value
    for i, ctx in enumerate(contexts):
        if not ctx.options["coalesce"]:
            results[i] = run(wrapped[i])
    return results


@dataclass
class _Work:
    """One stack's tensors during a step."""

    stack: ParamStack
    values: list[torch.Tensor]
    weights: torch.Tensor  # stacked (size, *local shape), written back to ``values`` at the end
    views: list[torch.Tensor] | None  # None: ``weights`` is a view of the one member's weight
    momentum: torch.Tensor
    new_momentum: torch.Tensor
    contexts: list[MatrixContext]
    update: torch.Tensor | None = None


def adds_l2(options: dict[str, Any]) -> bool:
    """Whether a group's weight decay is "l2": lambda W added to the gradient (which then reads the weight)."""
    return options["weight_decay_method"] == "l2" and options["weight_decay"] != 0


class StepHost(Protocol):
    """What :class:`GroupStep` reads of its optimizer (an OrthogonalizedOptimizer): the layouts and state, the
    step's settings, the member contract's programs, and the step's count, skips and fresh states."""

    layouts: ParamLayouts
    state: Any
    capturable: bool
    bucket_bytes: int
    overlap: bool
    uses_newton_schulz: bool
    step_count: int

    def update(self, ctx: MatrixContext) -> Program[torch.Tensor]: ...
    def pre_weight_update(self, ctx: MatrixContext, update: torch.Tensor) -> Program[None]: ...
    def post_weight_update(self, ctx: MatrixContext) -> Program[None]: ...
    def apply_weight_decay(self, p: torch.Tensor, group: dict[str, Any]) -> None: ...
    def init_fresh(self, params: Sequence[torch.Tensor]) -> None: ...
    def count_skip(self, ok: torch.Tensor | None = None) -> None: ...


class GroupStep:
    """Runs a step of ``optimizer`` (an OrthogonalizedOptimizer) over its stacks; see the module doc."""

    def __init__(self, optimizer: StepHost) -> None:
        self.opt = optimizer

    # -- per step: the members' tensors --
    def _values(self, stack: ParamStack) -> list[torch.Tensor]:
        return [self.opt.layouts.value(p) for p in stack.params] if stack.held_apart else stack.params

    def _grad(self, stack: ParamStack, values: list[torch.Tensor]) -> torch.Tensor:
        """The members' gradients, stacked (a tensor-parallel shard without one steps with zeros)."""
        grads = [self.opt.layouts.grad(p) for p in stack.params] if stack.held_apart else [p.grad for p in stack.params]
        first = values[0]
        out = stack.buffers.get("grad", (len(values), *first.shape), first.dtype, first.device)
        try:
            return torch.stack(grads, out=out)
        except TypeError:  # some gradient is None
            return torch.stack([g if g is not None else torch.zeros_like(v) for g, v in zip(grads, values)], out=out)

    def _prepare(self, stack: ParamStack, copy_weights: bool = False) -> _Work:
        opt, options = self.opt, stack.options
        values = self._values(stack)
        if len(values) == 1 and not copy_weights and not (self.opt.capturable and options["nonfinite"] == "skip"):
            weights, views = values[0].unsqueeze(0), None  # the weight itself: nothing to write back
        else:
            weights, views = stack.weights.stack(values)
        grad = self._grad(stack, values)
        if adds_l2(options):
            grad.add_(weights, alpha=options["weight_decay"])
        try:
            momentum = stack.state["momentum_buffer"]
        except KeyError:  # state cleared since the last step: the members start afresh
            opt.init_fresh(stack.params)
            momentum = stack.state["momentum_buffer"]
        buffer = functools.partial(stack.buffers.get, shape=momentum.shape, dtype=momentum.dtype, device=momentum.device)
        out = (buffer("momentum"), buffer("direction") if options["nesterov"] else None)
        new_momentum, direction = momentum_direction(grad, momentum, options["momentum"], options["nesterov"], out)
        grads, directions = stack.matrices(grad), stack.matrices(direction)
        contexts = []
        for part in stack.parts:
            g, d = (grads, directions) if part.index is None else (grads.index_select(-2, part.index),
                                                                   directions.index_select(-2, part.index))
            state = part.state
            if not stack.batched:
                entry = opt.state[stack.params[0]]
                state = entry if part.number is None else entry.setdefault(part_key(part.number), {})
            suffix = "" if part.number is None else f" [part {part.number}]"
            contexts.append(MatrixContext(stack.view(stack.matrices(weights)), options, part.layout, state,
                                          grad=stack.view(g), direction=stack.view(d),
                                          names=[n + suffix for n in stack.names], batched=stack.batched))
        return _Work(stack, values, weights, views, momentum, new_momentum, contexts)

    def _newton_schulz(self, works: Sequence[_Work]) -> None:
        """ctx.orthogonalized of every context: one coalesced run per fp32 matmul precision. A batch is cut into
        jobs of at most ``bucket_bytes``, or of one matrix each without ``coalesce`` (as emerging_optimizers and Megatron do) and with
        ``batch_matrices=False`` (every matrix's iteration alone, as the per-matrix path runs it)."""
        pairs = [(ctx, part) for work in works for ctx, part in zip(work.contexts, work.stack.parts)]
        batches: dict[tuple[str, bool], list[int]] = {}
        for i, (ctx, _) in enumerate(pairs):
            batches.setdefault((ctx.options["fp32_matmul_prec"], ctx.options["coalesce"]), []).append(i)
        for (precision, coalesce), members in batches.items():
            jobs, pieces = [], []
            for i in members:
                ctx, part = pairs[i]
                layout, x = ctx.layout, ctx.direction
                chunks, alone = [x], ctx.batched and (not coalesce or part.ns.batch is False)
                if alone:  # one 2D job per matrix, in its own memory: exactly the per-matrix path's iteration (a
                    chunks = [m.clone() for m in x.unbind(0)]  # BLAS may round by the address's alignment)
                elif ctx.batched and x.size(0) > 1:
                    per_matrix = max(1, x[0].numel() * x.element_size())
                    chunks = list(x.split(max(1, self.opt.bucket_bytes // per_matrix)))
                pieces.append((len(chunks), alone))
                jobs += [MatrixJob(c, layout.partition_dim, layout.group, list(layout.sizes) if layout.sizes else None,
                                   part.mode, part.ns) for c in chunks]
            with matmul_precision(precision):
                if coalesce:  # with overlap, a pipeline of buckets by shape (bit-identical)
                    results = orthogonalize_many(jobs, self.opt.bucket_bytes, PIPELINE_BUCKETS if self.opt.overlap else 1)
                else:
                    results = [orthogonalize_many([job])[0] for job in jobs]
            start = 0
            for i, (count, alone) in zip(members, pieces):
                done = results[start : start + count]
                pairs[i][0].orthogonalized = torch.stack(done) if alone else done[0] if count == 1 else torch.cat(done)
                start += count

    def _updates(self, works: Sequence[_Work]) -> None:
        """Each stack's update U (its weights' shape), from the members' programs."""
        contexts = [ctx for work in works for ctx in work.contexts]
        results = iter(run_phase(contexts, [self.opt.update(ctx) for ctx in contexts], self.opt.bucket_bytes))
        for work in works:
            stack = work.stack
            parts = []
            for ctx in work.contexts:
                result = next(results)
                if not isinstance(result, torch.Tensor) or result.shape != ctx.direction.shape:
                    got = tuple(result.shape) if isinstance(result, torch.Tensor) else type(result).__name__
                    raise ValueError(
                        f"{type(self.opt).__name__}.update returned {got} for {ctx.name}, expected the direction's "
                        f"shape {tuple(ctx.direction.shape)}"
                        + (": a member written for one matrix must set batched = False" if ctx.batched else "")
                    )
                parts.append(stack.unview(result).to(work.weights.dtype))
            if stack.split:
                update = torch.empty_like(stack.matrices(work.weights))
                for part, piece in zip(stack.parts, parts):
                    update.index_copy_(-2, part.index, piece)
            else:
                update = parts[0]
            if stack.kind == "conv_batched":
                update = update * (update.size(0) ** -0.5)
            work.update = update  # matrices

    def _check(self, works: Sequence[_Work]) -> Verdict:
        """The step's finite check over every update and new state tensor (one reduction): its verdict here."""
        checked = [work for work in works if work.stack.options["nonfinite"] != "ignore"]
        if not checked:
            return Verdict(None)

        def tensors(work: _Work) -> list[torch.Tensor]:  # a non-finite momentum makes the update non-finite
            return [work.update, *(v for ctx in work.contexts for v in ctx.staged.values())]

        ok = all_finite([t for work in checked for t in tensors(work)])
        skips = any(work.stack.options["nonfinite"] == "skip" for work in checked)
        if self.opt.capturable:
            return Verdict(ok, skips=skips)
        if bool(ok):
            return Verdict(True)
        for work in checked:  # the first matrix that is not finite, for the message
            bad = next((b for b in map(first_nonfinite, tensors(work)) if b is not None), None)
            if bad is not None:
                stack = work.stack
                name = stack.names[min(bad // stack.count, len(stack.names) - 1) if stack.batched else 0]
                return Verdict(False, name, stack.options["nonfinite"])
        return Verdict(False, "a matrix", "skip")

    def decide(self, verdict: Verdict, where: str = "") -> torch.Tensor | bool | None:
        """Act on a verdict: raise ("raise"), count and log a skip ("skip"), or go on. Returns what commits take:
        None (write), False (write nothing), or a device bool (capturable: write where true)."""
        if isinstance(verdict.ok, torch.Tensor):
            if verdict.skips:
                self.opt.count_skip(verdict.ok)
            return verdict.ok
        if verdict.ok is not False:
            return None
        name, step = verdict.name or "a matrix", self.opt.step_count
        if verdict.policy == "raise":
            raise FloatingPointError(
                f"{type(self.opt).__name__} step {step}: the update of {name}{where} is not finite (a NaN or Inf in "
                "its gradient or momentum on some rank). Nothing was written. Pass nonfinite='skip' to skip such "
                "steps, or 'ignore' to write them."
            )
        logger.warning("%s step %d: skipped (the update of %s%s is not finite); weights and state untouched",
                       type(self.opt).__name__, step, name, where)
        self.opt.count_skip()
        return False

    def _apply(self, work: _Work, ctx: MatrixContext, update: torch.Tensor) -> Program[None]:
        opt = self.opt
        yield from opt.pre_weight_update(ctx, update)
        descend(ctx.param, update, ctx.options["lr"])
        yield from opt.post_weight_update(ctx)

    def _new_weights(self, works: Sequence[_Work]) -> None:
        """Each stack's new weights in its stacked buffer: weight decay, the pre-hook, W - lr U, the post-hook."""
        contexts, programs = [], []
        for work in works:
            stack = work.stack
            matrices = stack.matrices(work.weights)
            self.opt.apply_weight_decay(matrices, stack.options)
            state = stack.matrix_state if stack.batched else self.opt.state[stack.params[0]]
            whole = MatrixContext(stack.view(matrices), stack.options, stack.layout, state, names=stack.names,
                                  batched=stack.batched)
            contexts.append(whole)
            programs.append(self._apply(work, whole, stack.view(work.update)))
        run_phase(contexts, programs, self.opt.bucket_bytes)

    @staticmethod
    def _write(works: Sequence[_Work], ok: torch.Tensor | None) -> None:
        """Commit: momentum, the members' new state, the weights (only where the device bool ``ok`` is true)."""
        for work in works:
            commit(work.momentum, work.new_momentum, ok)
            for ctx in work.contexts:
                for key, value in ctx.staged.items():
                    commit(ctx.state[key], value, ok)
            if work.views is None:
                continue
            if ok is not None:
                work.weights.copy_(torch.where(ok, work.weights, torch.stack(work.values)))
            torch._foreach_copy_(work.values, work.views)

    def run(self, stacks: Sequence[ParamStack], defer: bool = False) -> Pending | None:
        """The step of ``stacks``. ``defer``: compute the new weights and state and leave them uncommitted, with this
        rank's verdict per owner group (:class:`Pending`), for ranks that decide together (dist_ortho.optim.base)."""
        works = [self._prepare(stack, copy_weights=defer) for stack in stacks]
        if self.opt.uses_newton_schulz:
            self._newton_schulz(works)
        self._updates(works)
        if not defer:
            ok = self.decide(self._check(works))
            if ok is not False:
                self._new_weights(works)
                self._write(works, ok)
            return None
        by_key: dict[tuple[int, ...] | None, list[_Work]] = {}
        for work in works:
            by_key.setdefault(work.stack.owner_key, []).append(work)
        verdicts = {key: self._check(members) for key, members in by_key.items()}
        # a TP group decides alike: all its ranks skip these together
        self._new_weights([w for key, members in by_key.items() if verdicts[key].ok is not False for w in members])
        return Pending(works, verdicts)


@dataclass
class Pending:
    """A step computed on this rank and not yet committed (see GroupStep.run's ``defer``): its verdict about the
    matrices of each owner group (by its ranks; None: those every holder steps)."""

    works: list[_Work]
    verdicts: dict[tuple[int, ...] | None, Verdict]

    def new_values(self) -> dict[torch.Tensor, torch.Tensor]:
        """Each member parameter's new value (its slice of the stack's new weights)."""
        return {p: view for work in self.works for p, view in zip(work.stack.params, work.views or ())}

    def updates(self) -> dict[torch.Tensor, torch.Tensor]:
        """Each member parameter's update U (W <- W - lr U after weight decay), shaped as its value."""
        return {p: u for work in self.works if work.update is not None
                for p, u in zip(work.stack.params, work.update.reshape(work.weights.shape).unbind(0))}

    def flag(self, key: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """What the ranks of owner group ``key`` exchange: this rank's verdict about the group's matrices, and about
        those every holder steps (alike on every rank: a non-finite one there skips or raises the whole step)."""
        flags = [v.flag(device) for k, v in self.verdicts.items() if k in (key, None)]
        return torch.stack(flags).min() if flags else Verdict(True).flag(device)

    def commit(self, ok: torch.Tensor | None, key: tuple[int, ...] | None) -> None:
        """Write the works of owner group ``key``."""
        GroupStep._write([w for w in self.works if w.stack.owner_key == key], ok)
