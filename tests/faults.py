"""The fault injector of tests/test_faults.py: one rank made to fail at one collective site of the step.

A *site* is a function of the library that issues collectives (``dist_ortho.comm.SITES``; :func:`call_sites` reads
the code's own). In a cell's processes an :class:`Injector` wraps dist_ortho.comm's collectives (and torch's, where
a library module calls them itself) and tags each coalesced request with the function that made it, so that every
collective this rank issues is attributed to its sites, counted per (variant, step, call, site), and, at the one
chosen hit, made to fail on the faulty rank:

- ``raise``: the rank raises :class:`InjectedFault` instead of issuing the collective (and stays alive);
- ``stall``: it sleeps ``STALL_S`` (past the timeout), then goes on;
- ``exit``: the process ends there (``os._exit``).

A *cell* is one run of a small training loop (forward layer by layer, backward, optionally clipping, step, a
checkpoint read after step 2, zero_grad; 3 iterations) on fresh processes: each cell's ranks are forked from one
forkserver (torch and dist_ortho imported once for the whole module) and join a process group of their own over
a store the test process holds, so that a broken group, a stalled rank or an exited one never touches another
cell, and many cells wait at once (a cell spends most of its time waiting for a timeout: they run
``CONCURRENCY`` at a time). Every library call of the loop is made on a snapshot of the weights and the
optimizer state, so that the outcome says what that call wrote when it raised.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import datetime
import inspect
import logging
import multiprocessing as mp
import os
import pickle
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dist_ortho import comm, get_optimizer
from dist_ortho.comm import coalesce
from dist_ortho.tp import batching

TIMEOUT_S = 4.0
"""DIST_ORTHO_TIMEOUT_S of the fault cells."""
SLACK_S = 4.0
"""What a rank may take beyond the timeout to raise (scheduling on a loaded 2-core machine)."""
STALL_S = 2 * TIMEOUT_S + 2
"""How long a stalled rank sleeps: past every survivor's timeout, also of one that started waiting late."""
QUIET_TIMEOUT_S = 60.0
"""DIST_ORTHO_TIMEOUT_S where no rank is meant to wait for a failed one (the census, the scenarios that continue)."""
PG_TIMEOUT_S = 15.0
"""The cells' process-group timeout (groups made by new_group keep torch's 30 minutes)."""
CONCURRENCY = int(os.environ.get("DIST_ORTHO_FAULT_CONCURRENCY", "32"))
"""Cells running at once (most of them asleep in a timeout)."""
WARMING = int(os.environ.get("DIST_ORTHO_FAULT_WARMING", "2"))
"""Cells running at once whose fault has not fired yet (computing: more would starve each other's collectives
past the timeout on two cores)."""
ITERATIONS = 3
FAULTS = ("raise", "stall", "exit")
PATHS = ("blocking", "overlapped")
NAMED = (comm.CollectiveError, ValueError, FloatingPointError)
LAYOUTS = {2: ("tp2", "dp2", "fsdp2", "experts2"), 4: ("dp2xtp2", "fsdp2xtp2")}
"""The layouts each world size runs: TP 2, DP 2, DP 2 of DTensor pieces (FSDP2's placements), DP 2 of expert stacks
(DTensors [E, out, in], Shard(0) over DP: each DP rank steps its own experts, so the step shares nothing but its
finite verdict); DP 2 x TP 2 of TE-attribute shards and of DTensors on a (dp, tp) mesh."""
VARIANTS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "muon/home": ("muon", "home", {}),
    "muon/duplicated": ("muon", "duplicated", {}),
    "muon/distributed": ("muon", "distributed", {}),
    "muon/gram": ("muon", "gram", {}),
    "polargrad/home": ("polargrad", "home", {}),
    "normuon/home": ("normuon", "home", {}),
    "muon_hyperball/home": ("muon_hyperball", "home", {}),
    "mop/home": ("mop", "home", {"momentum": 0.9}),
    "muon_adamw/home": ("muon_adamw", "home", {"verify_plan": "every_step"}),
}
"""Member and TP mode of each variant, in the order a site's cell is looked for (the first that reaches it)."""
LAYOUT_VARIANTS = {
    "tp2": tuple(VARIANTS), "dp2xtp2": tuple(VARIANTS), "dp2": ("muon/home", "muon_adamw/home"),
    "fsdp2": ("muon/home",), "fsdp2xtp2": ("muon/home",), "experts2": ("muon/home",),
}
TRANSPORT = ("dist_ortho.comm", "dist_ortho.comm.coalesce")
"""Modules that carry collectives for others: a collective's site is the first function outside them."""
AGREE_BATCHING = "dist_ortho.optim.agreement.agree_batching"
FIRST_AND_LAST = ("dist_ortho.parameters.grid.share_program", "dist_ortho.parameters.pieces.scatter_program", "dist_ortho.tp.home.program")
"""Sites whose first and last collective of a step differ in kind: the share's first bucket carries the finite
verdicts and its last lands after the step was decided; home's all-to-all in, and back."""
_SCOPE_NOISE = {"<locals>", "<listcomp>", "<genexpr>", "<dictcomp>", "<setcomp>", "<lambda>"}


class InjectedFault(RuntimeError):
    """The fault itself, raised on the faulty rank in place of a collective."""


# -- the code's own call sites --

TORCH_NOT_COLLECTIVES = frozenset({
    "is_available", "is_initialized", "get_rank", "get_world_size", "get_backend", "get_process_group_ranks",
    "new_group", "init_process_group", "destroy_process_group", "ReduceOp", "ProcessGroup", "group",
    "get_global_rank", "get_group_rank", "TCPStore", "PrefixStore", "FileStore", "Work",
    "init_device_mesh", "DeviceMesh", "DTensor", "from_local", "Shard", "Replicate", "Partial", "_StridedShard",
    "compute_local_shape_and_global_offset", "fully_shard", "FileSystemReader", "FileSystemWriter", "ColwiseParallel",
    "RowwiseParallel",
})
"""torch.distributed functions and classes that only read or make local objects (groups are made by every rank
alike, outside the step); every other torch.distributed call counts as a collective."""
DTENSOR_COLLECTIVES = frozenset({"full_tensor", "redistribute"})
"""DTensor methods that communicate (through torch's own collectives)."""
REQUESTS = ("AllReduce", "AllGather", "AllToAll")


def site_name(module: str, qualname: str) -> str:
    """A site's name: module and qualified name, without the scopes of nested functions, lambdas, comprehensions."""
    return ".".join([module, *(part for part in qualname.split(".") if part not in _SCOPE_NOISE)])


class _CallSites(ast.NodeVisitor):
    """The collectives one module issues: calls of dist_ortho.comm's collectives, of anything of torch.distributed
    (its submodules included) that communicates, of DTensor's communicating methods, and coalesced requests, under
    whatever names the module imported them."""

    def __init__(self, module: str) -> None:
        self.module, self.scopes = module, []
        self.aliases: dict[str, str] = {}  # a name bound by an import: what it is ("torch.distributed", ...)
        self.found: dict[str, set[str]] = {}

    def _scope(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> None:
        self.scopes.append(node.name)
        self.generic_visit(node)
        self.scopes.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _scope

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.asname:
                self.aliases[alias.asname] = alias.name
            else:
                self.aliases[alias.name.split(".")[0]] = alias.name.split(".")[0]

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.module and node.level == 0:
            for alias in node.names:
                self.aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"

    def _dotted(self, func: ast.expr) -> str | None:
        """The called name, its first part resolved through the module's imports ("torch.distributed.barrier"),
        or None when the callee is not a dotted name."""
        parts = []
        while isinstance(func, ast.Attribute):
            parts.append(func.attr)
            func = func.value
        if not isinstance(func, ast.Name):
            return None
        return ".".join([self.aliases.get(func.id, func.id), *reversed(parts)])

    def _kind(self, node: ast.Call) -> str | None:
        dotted = self._dotted(node.func)
        if dotted is not None:
            last = dotted.rsplit(".", 1)[-1]
            if dotted.startswith("dist_ortho.comm.") and last in comm.COLLECTIVES:
                return f"comm.{last}"
            if dotted.startswith("torch.distributed.") and not TORCH_NOT_COLLECTIVES & set(dotted.split(".")[2:]):
                return dotted
            if dotted.startswith("dist_ortho.comm.coalesce.") and last in REQUESTS:
                return last
        if isinstance(node.func, ast.Attribute) and node.func.attr in DTENSOR_COLLECTIVES:
            return f"torch.distributed.tensor.DTensor.{node.func.attr}"
        return None

    def visit_Call(self, node: ast.Call) -> None:
        kind = self._kind(node)
        if kind is not None:
            self.found.setdefault(site_name(self.module, ".".join(self.scopes)), set()).add(kind)
        self.generic_visit(node)


def call_sites(root: Path) -> dict[str, set[str]]:
    """Every function of the package under ``root`` (outside the transport modules) that issues collectives, with
    how: ``comm.<collective>``, ``torch.distributed.<...>`` or a request class of dist_ortho.comm.coalesce. Imports are
    read before the calls (a module's imports at its top, or a function's before its use)."""
    found: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        module = ".".join(path.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__")
        if module in TRANSPORT:
            continue
        tree = ast.parse(path.read_text(), str(path))
        visitor = _CallSites(module)
        for node in ast.walk(tree):  # every import first, wherever it is (a function's own imports included)
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                visitor.visit(node)
        visitor.visit(tree)
        for site, kinds in visitor.found.items():
            found.setdefault(site, set()).update(kinds)
    return found


# -- cells --

@dataclasses.dataclass(frozen=True)
class Trigger:
    """Where the fault fires: the ``index``-th collective of ``site`` that the faulty rank issues during ``call``
    (e.g. "step", "backward") of iteration ``step`` of ``variant``."""

    variant: str
    site: str
    step: int
    call: str
    index: int


@dataclasses.dataclass(frozen=True)
class Cell:
    """One run: ``world`` ranks in ``layout`` on ``path``; ``fault`` one of FAULTS at ``trigger`` (the faulty rank
    is the last), "census" (every variant of the layout, no fault: the sites each reaches), or a named scenario
    of :data:`SCENARIOS`."""

    world: int
    layout: str
    path: str
    fault: str
    trigger: Trigger | None = None
    variant: str = "muon/home"
    timeout: float = QUIET_TIMEOUT_S
    stall: float = STALL_S
    survivors_only: bool = False  # end the cell once the other ranks reported (the faulty one may sleep on)

    @property
    def faulty(self) -> int:
        return self.world - 1

    def label(self) -> str:
        where = f"{self.trigger.site} #{self.trigger.index} in {self.trigger.call} {self.trigger.step} " \
                f"({self.trigger.variant})" if self.trigger else self.variant
        return f"world{self.world} {self.layout} {self.path} {self.fault} at {where}"


@dataclasses.dataclass
class Outcome:
    """What one rank did: ``kind`` "completed", "exited", or the exception's class name, ``message``, where it was
    raised (``at``: the call and iteration), when (``t``: time.time()), the weights and state tensors that call
    changed (``written``), and what the scenario returns (``value``); ``hits``: (variant, step, call, site) of
    every collective this rank issued (census)."""

    kind: str
    message: str = ""
    at: str = ""
    t: float = 0.0
    written: list[str] = dataclasses.field(default_factory=list)
    value: Any = None
    hits: list[tuple[str, int, str, str]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class CellResult:
    """Every rank's outcome (a rank missing from it hung and was killed at the deadline), when the fault fired
    (``fault_t``; None: the trigger was never reached) and the cell's wall time."""

    cell: Cell
    outcomes: dict[int, Outcome]
    fault_t: float | None
    wall_s: float

    def survivors(self) -> dict[int, Outcome]:
        return {r: o for r, o in self.outcomes.items() if r != self.cell.faulty}

    def hung(self) -> list[int]:
        return [r for r in range(self.cell.world) if r not in self.outcomes]

    def elapsed(self, rank: int) -> float:
        """Seconds from the fault to this rank's outcome."""
        return self.outcomes[rank].t - (self.fault_t or 0.0)


# -- the injector (in a cell's processes) --

class Injector:
    """Counts this rank's collectives by site and fires the cell's fault at its trigger (see the module doc)."""

    def __init__(self, cell: Cell, rank: int, store: dist.Store) -> None:
        self.cell, self.rank, self.store = cell, rank, store
        self.variant, self.step, self.call = "", 0, ""
        self.hits: list[tuple[str, int, str, str]] = []
        self._counts: Counter = Counter()
        self.fired = False

    def install(self) -> None:
        for name in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all"):
            setattr(comm, name, self._wrap(getattr(comm, name), library=True))
        for name in ("all_gather_object", "barrier", "all_reduce", "broadcast", "all_gather"):
            setattr(dist, name, self._wrap(getattr(dist, name), library=False))
        for cls in (coalesce.AllReduce, coalesce.AllGather, coalesce.AllToAll):
            cls.__init__ = _tagging(cls.__init__)

    def _wrap(self, real: Callable[..., Any], library: bool) -> Callable[..., Any]:
        signature = inspect.signature(real)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            caller = sys._getframe(1)
            module = caller.f_globals.get("__name__", "")
            if library or (module.startswith("dist_ortho") and module not in TRANSPORT):
                group = signature.bind(*args, **kwargs).arguments.get("group")
                size = comm.group_size(group) if library or group is not None else dist.get_world_size()
                if size > 1:
                    self._hit(_sites_of(caller))
            return real(*args, **kwargs)

        return wrapped

    def _hit(self, sites: list[str]) -> None:
        trigger = self.cell.trigger
        for site in sites:
            key = (self.variant, site, self.step, self.call)
            index = self._counts[key]
            self._counts[key] += 1
            self.hits.append((self.variant, self.step, self.call, site))
            if (self.rank == self.cell.faulty and trigger is not None and not self.fired
                    and (trigger.variant, trigger.site, trigger.step, trigger.call, trigger.index) == (*key, index)):
                self.fired = True
                self._fire(f"{site} (collective #{index} of {self.call} {self.step})")

    def _fire(self, where: str) -> None:
        self.store.set("fault_t", repr(time.time()))
        fault = self.cell.fault
        if fault == "raise":
            raise InjectedFault(f"injected at {where}")
        if fault == "stall":
            time.sleep(self.cell.stall)
            return
        if fault == "exit":
            _report(self.store, self.rank, Outcome("exited", where, t=time.time()))
            os._exit(17)
        raise AssertionError(f"unknown fault {fault!r}")


def _tagging(init: Callable[..., None]) -> Callable[..., None]:
    """A request class's __init__ that also records the site that made the request."""

    def tagged(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        maker = sys._getframe(1)
        self._site = site_name(maker.f_globals.get("__name__", ""), maker.f_code.co_qualname)

    return tagged


def _sites_of(frame: Any) -> list[str]:
    """The sites of the collective being issued from ``frame``: the first function outside the transport
    modules, or, for a coalesced bucket, the functions that made its requests."""
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module == "dist_ortho.comm.coalesce" and frame.f_code.co_name == "_issue":
            return sorted({getattr(request, "_site", "?") for _, request in frame.f_locals["bucket"]})
        if module not in TRANSPORT:
            return [site_name(module, frame.f_code.co_qualname)]
        frame = frame.f_back
    return ["?"]


def _report(store: dist.Store, rank: int, outcome: Outcome) -> None:
    store.set(f"result{rank}", pickle.dumps(outcome))
    store.add("done", 1)


# -- the training loop of a cell --

class Layer(torch.nn.Module):
    """One block: x @ fc1^T @ fc2^T (fc1 column-parallel, fc2 row-parallel), then @ extra^T where it holds a
    replicated extra weight and ``use_extra``, then + bias where it holds one (MuonAdamW's AdamW side). Holding
    DTensors, its forward only reads its weights (their gradients are set as FSDP2 leaves them)."""

    def __init__(self, fc1: torch.nn.Parameter, fc2: torch.nn.Parameter, bias: torch.nn.Parameter | None = None,
                 extra: torch.nn.Parameter | None = None) -> None:
        super().__init__()
        self.fc1, self.fc2, self.bias, self.extra = fc1, fc2, bias, extra
        self.use_extra = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor import DTensor

        if isinstance(self.fc1, DTensor):
            return x + sum(w.to_local().sum() for w in self.parameters()).detach()
        out = x @ self.fc1.T @ self.fc2.T
        if self.extra is not None and self.use_extra:
            out = out @ self.extra.T
        return out + self.bias if self.bias is not None else out


SHAPES = ((8, 12, 0), (12, 8, 1))  # global (rows, cols, partition_dim) of fc1, fc2: NorMuon means along the sharded dims


@dataclasses.dataclass
class Run:
    """One training run of a cell: model, optimizer and how to make each library call on a snapshot."""

    opt: Any
    params: list[torch.nn.Parameter]
    names: list[str]
    layers: list[Layer]
    dp_rank: int
    dtensor: bool
    clip: bool
    injector: Injector
    iteration: int = 0

    def snapshot(self) -> dict[str, torch.Tensor]:
        """Every weight's local tensor and every optimizer state tensor, copied."""
        from dist_ortho.parameters.dtensor import local

        out = {name: local(p).detach().clone() for name, p in zip(self.names, self.params)}
        for name, p in zip(self.names, self.params):
            for key, value in (self.opt.state[p] if p in self.opt.state else {}).items():
                if torch.is_tensor(value):
                    out[f"state {name} {key}"] = local(value).detach().clone()
        return out

    def call(self, name: str, fn: Callable[[], Any]) -> Any:
        """``fn()``, or :class:`Stopped` with this rank's outcome when it raises."""
        before = self.snapshot()
        self.injector.call = name
        try:
            return fn()
        except (*NAMED, InjectedFault) as e:
            written = _written(before, self.snapshot())
            raise Stopped(Outcome(type(e).__name__, str(e), f"{name} of iteration {self.iteration}", time.time(),
                                  sorted(written))) from e

    def iterate(self, k: int, *, skip_layer0: bool = False, zero_layer0: bool = False, nan: bool = False,
                step: bool = True) -> None:
        """Iteration ``k`` (its data seeded by k and the DP rank): each layer's forward, backward, clipping (MuonAdamW),
        the step, after step 2 a checkpoint's reads (model and optimizer state dicts), zero_grad. ``skip_layer0``:
        this rank's forward leaves layer 0 out (its weights unused); ``zero_layer0``: their gradients are set to
        zeros before the step (the run an unused weight must equal); ``nan``: a NaN in this rank's input (every
        gradient of this replica);
        ``step=False``: the batch is dropped after backward (zero_grad, no step)."""
        self.iteration = self.injector.step = k
        gen = torch.Generator().manual_seed(100 * k + self.dp_rank)
        h = torch.randn(4, 12, generator=gen)
        if nan:
            h[0, 0] = float("nan")
        for i, layer in enumerate(self.layers):
            if not (skip_layer0 and i == 0):
                h = self.call(f"forward {i}", lambda: layer(h))
        if self.dtensor:
            self._dtensor_grads(k)
        else:
            self.call("backward", lambda: h.square().mean().backward())
        if zero_layer0:
            for p in (self.layers[0].fc1, self.layers[0].fc2):
                p.grad = torch.zeros_like(p)
        if self.clip:
            self.call("clip_grad_norm_", lambda: self.opt.clip_grad_norm_(1e9))
        if step:
            self.call("step", self.opt.step)
        if k == 2:  # a checkpoint's reads, layer by layer (each waits for its bucket of the share in flight)
            for i, layer in enumerate(self.layers):
                self.call(f"checkpoint {i}", layer.state_dict)
            self.call("checkpoint optimizer", self.opt.state_dict)
        self.call("zero_grad", self.opt.zero_grad)

    def end(self) -> None:
        """The end of training: the last step's share completed (``finish()``, as before reading the weights)."""
        self.call("finish", self.opt.finish)

    def _dtensor_grads(self, k: int) -> None:
        """Each DTensor's gradient as FSDP2 leaves it: this rank's piece of the DP-reduced gradient."""
        from torch.distributed.tensor import DTensor

        from dist_ortho.parameters.dtensor import piece_of

        gen = torch.Generator().manual_seed(1000 + k)
        for p in self.params:
            full = torch.randn(p.shape, generator=gen)
            p.grad = DTensor.from_local(piece_of(full, p.device_mesh, p.placements).clone(), p.device_mesh, p.placements,
                                        shape=full.shape, stride=full.stride())

    def weights(self) -> list[torch.Tensor]:
        """The final weights (the last step's share completed first)."""
        from dist_ortho.parameters.dtensor import local

        self.opt.finish()
        return [local(p).detach().clone() for p in self.params]


def _written(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> list[str]:
    """What changed between two snapshots: tensors changed or gone, and new state that is not all zeros (a
    parameter's first step creates its state, zeros, before its collectives; that is no write of the step)."""
    changed = [k for k in before if k not in after or not torch.equal(before[k], after[k])]
    return sorted([*changed, *(k for k in after if k not in before and bool(after[k].any()))])


class Stopped(Exception):
    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.kind)
        self.outcome = outcome


def _groups(layout: str, rank: int) -> tuple[Any, Any, int, int, Any]:
    """(tp_group, dp_group, tp_rank, tp_size, device_mesh) of ``layout``."""
    world = dist.group.WORLD
    if layout == "world":
        return None, None, 0, 1, None
    if layout == "tp2":
        return world, None, rank, 2, None
    if layout == "dp2":
        return None, world, 0, 1, None
    if layout == "dp2xtp2":
        tp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        dp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
        return tp_groups[rank // 2], dp_groups[rank % 2], rank % 2, 2, None
    from torch.distributed.device_mesh import init_device_mesh

    if layout in ("fsdp2", "experts2"):
        return None, None, 0, 1, init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
    return None, None, 0, 1, init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))


def _dtensor_params(mesh: Any, fulls: list[torch.Tensor]) -> list[torch.nn.Parameter]:
    """FSDP2's placements: Shard(0) over DP (its strided shard where TP shards dim 0 too; of a stack of experts
    [E, out, in], whole experts per DP rank), and over TP fc1's rows, fc2's columns."""
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    from dist_ortho.parameters.dtensor import piece_of

    out = []
    for full, (_, _, pd) in zip(fulls, SHAPES * (len(fulls) // 2)):
        if mesh.mesh_dim_names == ("dp",):
            placements: tuple = (Shard(0),)
        else:
            placements = (_StridedShard(0, split_factor=2) if pd == 0 else Shard(0), Shard(pd))
        piece = piece_of(full, mesh, placements).clone()
        out.append(torch.nn.Parameter(DTensor.from_local(piece, mesh, placements, shape=full.shape, stride=full.stride())))
    return out


def make_run(cell: Cell, rank: int, injector: Injector, path: str, variant: str, groups: tuple,
             extra_weight: bool = False, **options: Any) -> Run:
    """A fresh model and optimizer of ``variant`` on ``path`` (``options`` override the optimizer's).
    ``extra_weight``: layer 0 holds one more weight, without TP attributes (replicated over TP)."""
    tp_group, dp_group, tp_rank, tp, mesh = groups
    member, mode, member_options = VARIANTS[variant]
    gen = torch.Generator().manual_seed(0)
    experts = (2,) if cell.layout == "experts2" else ()  # a stack of 2 experts, named as Megatron's
    fulls = [torch.randn(*experts, r, c, generator=gen) / c**0.5 for _ in range(2) for r, c, _ in SHAPES]
    names = [f"l{i}.{'experts.' if experts else ''}{n}" for i in range(2) for n in ("fc1", "fc2")]
    if mesh is not None:
        params = _dtensor_params(mesh, fulls)
    else:
        params = []
        for full, (_, _, pd) in zip(fulls, SHAPES * 2):
            p = torch.nn.Parameter(torch.tensor_split(full, tp, dim=pd)[tp_rank].clone())
            if tp > 1:
                p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, pd, 1
            params.append(p)
    biases: list[torch.nn.Parameter | None] = [None, None]
    if member == "muon_adamw":
        biases = [torch.nn.Parameter(torch.zeros(12)) for _ in range(2)]
        params, names = [*params, *biases], [*names, "l0.bias", "l1.bias"]
    extra = torch.nn.Parameter(torch.randn(12, 12, generator=gen)) if extra_weight else None
    if extra is not None:
        params, names = [*params, extra], [*names, "l0.extra"]
    layers = [Layer(params[0], params[1], biases[0], extra), Layer(params[2], params[3], biases[1])]
    overlapped = path == "overlapped"
    reduce_grads = dp_group is not None
    kwargs = dict(lr=0.02, tp_mode=mode, fp32_matmul_prec="highest", overlap=overlapped, **member_options)
    if mesh is not None:
        kwargs["device_mesh"] = mesh
    else:
        kwargs.update(tp_group=tp_group, dp_group=dp_group, reduce_grads=reduce_grads,
                      overlap_with_backward=overlapped and reduce_grads)
    opt = get_optimizer(member)(list(zip(names, params)), **{**kwargs, **options})
    if overlapped:
        opt.overlap_by_layer(layers)
    dp_rank = comm.group_rank(dp_group) if mesh is None else mesh.get_local_rank("dp")
    return Run(opt, params, names, layers, dp_rank, mesh is not None, member == "muon_adamw", injector)


def _census(cell: Cell, rank: int, injector: Injector, groups: tuple) -> Outcome:
    for variant in LAYOUT_VARIANTS[cell.layout]:
        injector.variant = variant
        run = make_run(cell, rank, injector, cell.path, variant, groups)
        for k in range(1, ITERATIONS + 1):
            run.iterate(k)
        run.end()
    return Outcome("completed", hits=injector.hits)


def _faulted(cell: Cell, rank: int, injector: Injector, groups: tuple) -> Outcome:
    assert cell.trigger is not None
    injector.variant = cell.trigger.variant
    run = make_run(cell, rank, injector, cell.path, cell.trigger.variant, groups)
    for k in range(1, ITERATIONS + 1):
        run.iterate(k)
    run.end()
    return Outcome("completed", "the fault's trigger was not reached" if not injector.fired else "")


def _same(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _unused_weight(cell: Cell, rank: int, injector: Injector, groups: tuple) -> Outcome:
    """The faulty rank's forward leaves layer 0 out in iteration 2 (its weights unused there): the weights must equal
    a blocking run in which that rank's gradients of layer 0 are zeros (a missing gradient counts as zeros)."""
    faulty = rank == cell.faulty
    reference = make_run(cell, rank, injector, "blocking", cell.variant, groups)
    for k in range(1, ITERATIONS + 1):
        reference.iterate(k, skip_layer0=faulty and k == 2, zero_layer0=faulty and k == 2)
    run = make_run(cell, rank, injector, cell.path, cell.variant, groups)
    for k in range(1, ITERATIONS + 1):
        run.iterate(k, skip_layer0=faulty and k == 2)
    return Outcome("completed", value=_same(reference.weights(), run.weights()))


def _skipped_batch(cell: Cell, rank: int, injector: Injector, groups: tuple) -> Outcome:
    """Issue 31's first defect: iteration 2's batch is dropped after backward (zero_grad, no step), and in it the
    faulty rank's forward leaves layer 0 out, so its backward issued fewer buckets than the others'. The weights
    must equal a blocking run that never saw that batch (iterations 1, 3, 4)."""
    reference = make_run(cell, rank, injector, "blocking", cell.variant, groups)
    for k in (1, 3, 4):
        reference.iterate(k)
    run = make_run(cell, rank, injector, cell.path, cell.variant, groups)
    for k in (1, 2, 3, 4):
        run.iterate(k, skip_layer0=rank == cell.faulty and k == 2, step=k != 2)
    return Outcome("completed", value=_same(reference.weights(), run.weights()))


def _nonfinite(cell: Cell, rank: int, injector: Injector, groups: tuple, policy: str) -> Outcome:
    """A NaN in the faulty rank's gradient at iteration 2 (the finite decision, riding in the share's first
    bucket): "raise" must raise the same FloatingPointError everywhere, nothing written (run.call says what was);
    "skip" must equal a blocking run that never stepped on that batch."""
    reference = make_run(cell, rank, injector, "blocking", cell.variant, groups)
    for k in (1, 3):
        reference.iterate(k)
    run = make_run(cell, rank, injector, cell.path, cell.variant, groups, nonfinite=policy)
    for k in (1, 2, 3):
        run.iterate(k, nan=rank == cell.faulty and k == 2)
    return Outcome("completed", value=_same(reference.weights(), run.weights()))


def _plan_changed_alone(cell: Cell, rank: int, injector: Injector, groups: tuple) -> Outcome:
    """verify_plan="every_step", TP 2: a weight without TP attributes (replicated over TP) unused on the faulty rank
    at iteration 2, so that its plan changes alone (outside the grid such a weight is left alone, as torch.optim
    does): every rank must raise the ValueError naming it, before any other collective of the step."""
    run = make_run(cell, rank, injector, cell.path, cell.variant, groups, extra_weight=True, verify_plan="every_step")
    for k in range(1, ITERATIONS + 1):
        run.layers[0].use_extra = not (rank == cell.faulty and k == 2)
        run.iterate(k)
    return Outcome("completed")


def _sleep_before_forward(cell: Cell, rank: int, injector: Injector, groups: tuple) -> Outcome:
    """Issue 31's second defect: the faulty rank sleeps 30 s before its second forward; the others' reduce-scatter
    (blocking in the step, or issued during backward) must end in a CollectiveError at the timeout."""
    run = make_run(cell, rank, injector, cell.path, cell.variant, groups)
    for k in range(1, ITERATIONS + 1):
        if k == 2 and rank == cell.faulty:
            injector.store.set("fault_t", repr(time.time()))
            time.sleep(cell.stall)
        run.iterate(k)
    return Outcome("completed")


BARE_CALLS: dict[str, Callable[[Any, bool], Any]] = {
    "all_reduce": lambda group, in_flight: comm.all_reduce(torch.ones(8), group, async_op=in_flight),
    "all_gather": lambda group, in_flight: comm.all_gather(torch.ones(8), group, async_op=in_flight),
    "reduce_scatter": lambda group, in_flight: comm.reduce_scatter(torch.ones(8), group, async_op=in_flight),
    "all_to_all": lambda group, in_flight: comm.all_to_all(torch.ones(8), *[[8 // comm.group_size(group)] *
                                                                           comm.group_size(group)] * 2,
                                                          group, async_op=in_flight),
    "all_gather_object": lambda group, in_flight: comm.all_gather_object({"x": 1}, group),
    "agree": lambda group, in_flight: comm.agree([(1,)], ["x"], group, "x"),
    "agree_over": lambda group, in_flight: comm.agree_over([(1,)], ["x"], [group], "x"),
}
"""One call of each of dist_ortho.comm's collectives (tests/test_faults.py checks that every one has its call)."""
IN_FLIGHT = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")
"""Those that also return a handle in flight (``async_op=True``), waited for at once."""


def _bare_wait(cell: Cell, rank: int, injector: Injector, groups: tuple) -> Outcome:
    """Every wait bounded on the backend: the faulty rank sleeps (past the timeout) instead of joining the call;
    every other rank's ``variant`` ("<collective>" or "<collective> in flight") must raise CollectiveError at the
    timeout, as with a blocking call so with a handle's wait."""
    if rank == cell.faulty:
        injector.store.set("fault_t", repr(time.time()))
        time.sleep(cell.stall)
        return Outcome("completed")
    name, _, in_flight = cell.variant.partition(" ")
    try:
        result = BARE_CALLS[name](dist.group.WORLD, bool(in_flight))
        if in_flight:
            result.wait()
    except (*NAMED, InjectedFault) as e:
        return Outcome(type(e).__name__, str(e), cell.variant, time.time())
    return Outcome("completed", "the call returned without its peer", cell.variant, time.time())


SCENARIOS: dict[str, Callable[..., Outcome]] = {
    "bare wait": _bare_wait,
    "census": _census,
    "unused weight": _unused_weight,
    "skipped batch": _skipped_batch,
    "nan raise": lambda *a: _nonfinite(*a, policy="raise"),
    "nan skip": lambda *a: _nonfinite(*a, policy="skip"),
    "plan changed alone": _plan_changed_alone,
    "sleep before forward": _sleep_before_forward,
}


def _child(cell: Cell, number: int, rank: int, port: int, deadline: float) -> None:
    """A cell's rank: join the cell's group, run its scenario under the injector, report, wait for the others."""
    torch.set_num_threads(1)
    logging.getLogger("dist_ortho").setLevel(logging.CRITICAL)  # the skips and non-finite updates the cells cause
    os.environ["DIST_ORTHO_TIMEOUT_S"] = repr(cell.timeout)
    client = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=60))
    store = dist.PrefixStore(f"cell{number}", client)
    outcome: Outcome
    try:
        dist.init_process_group("gloo", store=dist.PrefixStore("pg", store), rank=rank, world_size=cell.world,
                                timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
        comm.set_timeout(cell.timeout)
        if cell.fault != "census" and (cell.trigger is None or cell.trigger.site != AGREE_BATCHING):
            batching.set_batching("never")  # no per-shape timing (agree_batching's vote): the collectives are the same
        injector = Injector(cell, rank, store)
        injector.install()
        groups = _groups(cell.layout, rank)
        scenario = SCENARIOS.get(cell.fault, _faulted)
        try:
            outcome = scenario(cell, rank, injector, groups)
        except Stopped as stopped:
            outcome = stopped.outcome
        outcome.t = outcome.t or time.time()
        if cell.fault == "census":
            outcome.hits = injector.hits
    except BaseException as e:  # noqa: BLE001 - every failure goes back to the test
        outcome = Outcome("other", f"{type(e).__name__}: {e}\n{traceback.format_exc()}", t=time.time())
    _report(store, rank, outcome)
    while store.add("done", 0) < cell.world and time.time() < deadline:
        time.sleep(0.05)
    os._exit(0)


# -- the test process's side --

class CellRunner:
    """Runs cells in processes forked from one forkserver over one store: up to ``concurrency`` at once, of which
    at most ``warming`` before their fault fired (see :data:`WARMING`)."""

    def __init__(self, concurrency: int = CONCURRENCY, warming: int = WARMING) -> None:
        self.concurrency, self.warming = concurrency, warming
        self._ctx = mp.get_context("forkserver")
        self._ctx.set_forkserver_preload(["tests.faults"])
        self._store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                                    timeout=datetime.timedelta(seconds=60))
        self._number = 0

    @staticmethod
    def deadline_s(cell: Cell) -> float:
        """How long a cell may run before its missing ranks count as hung: past any bound the test asserts (a
        site the library does not bound: a little past the bound, the group's own timeout being 30 minutes)."""
        if cell.trigger is None:
            return 300.0
        site = next((s for s in comm.SITES if s.where == cell.trigger.site), None)
        if site is not None and not site.bounded:
            return 20.0 + cell.timeout + SLACK_S
        return 60.0 + cell.stall + 3 * cell.timeout + PG_TIMEOUT_S

    def run(self, cells: Sequence[Cell]) -> list[CellResult]:
        """Every cell's result, in the order given."""
        pending = list(enumerate(cells))
        running: dict[int, tuple[int, Cell, list[Any], float]] = {}
        results: dict[int, CellResult] = {}
        while pending or running:
            warming = sum(1 for number in running if not self._fired(number))
            while pending and len(running) < self.concurrency and warming < self.warming:
                index, cell = pending.pop(0)
                self._number += 1
                began = time.time()
                deadline = began + self.deadline_s(cell)
                procs = [self._ctx.Process(target=_child, args=(cell, self._number, r, self._store.port, deadline),
                                           daemon=True) for r in range(cell.world)]
                for p in procs:
                    p.start()
                running[self._number] = (index, cell, procs, began)
                warming += 1
            time.sleep(0.05)
            for number, (index, cell, procs, began) in list(running.items()):
                result = self._collect(number, cell, procs, began)
                if result is not None:
                    results[index] = result
                    del running[number]
        return [results[i] for i in range(len(cells))]

    def _fired(self, number: int) -> bool:
        return self._store.check([f"cell{number}/fault_t"])

    def _collect(self, number: int, cell: Cell, procs: list[Any], began: float) -> CellResult | None:
        keys = {r: f"cell{number}/result{r}" for r in range(cell.world)}
        reported = {r for r, key in keys.items() if self._store.check([key])}
        expected = set(range(cell.world)) - ({cell.faulty} if cell.survivors_only else set())
        over = time.time() > began + self.deadline_s(cell)
        if not (expected <= reported or over or all(not p.is_alive() for p in procs)):
            return None
        if not over and not cell.survivors_only:  # the ranks leave together once all reported: give them a moment
            for p in procs:
                p.join(timeout=5)
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
        reported = {r for r, key in keys.items() if self._store.check([key])}
        outcomes = {r: pickle.loads(self._store.get(keys[r])) for r in sorted(reported)}
        fault_key = f"cell{number}/fault_t"
        fault_t = float(self._store.get(fault_key).decode()) if self._store.check([fault_key]) else None
        return CellResult(cell, outcomes, fault_t, time.time() - began)


# -- the matrix: cells derived from the registry and the census --

def census_cells() -> list[Cell]:
    return [Cell(world, layout, path, "census") for world, layouts in LAYOUTS.items() for layout in layouts
            for path in PATHS]


def triggers(site: str, hits: Sequence[tuple[str, int, str, str]], variants: Sequence[str]) -> list[Trigger]:
    """Where to fire at ``site`` among the faulty rank's census ``hits``: in the first variant that reaches it, for
    each call it is reached in (e.g. the step and backward), at the first of its hits in step 2 (else in the first
    step), and at the last as well during backward (its first and last bucket) and at :data:`FIRST_AND_LAST` sites."""
    for variant in variants:
        mine = [(step, call) for v, step, call, s in hits if v == variant and s == site]
        if not mine:
            continue
        out = []
        for call in dict.fromkeys(call for _, call in mine):
            steps = sorted({step for step, c in mine if c == call})
            step = 2 if 2 in steps else steps[0]
            count = sum(1 for s, c in mine if (s, c) == (step, call))
            last = count - 1 if call == "backward" or site in FIRST_AND_LAST else 0
            out += [Trigger(variant, site, step, call, index) for index in sorted({0, last})]
        return out
    return []


def step_sites() -> list[str]:
    return [site.where for site in comm.SITES if site.step]


def matrix_cells(census: Sequence[CellResult]) -> list[Cell]:
    """For every world size, path and site of the step: a cell per trigger and fault (see :func:`triggers`)."""
    cells = []
    for world, layouts in LAYOUTS.items():
        for path in PATHS:
            for site in step_sites():
                for layout in layouts:
                    result = next(r for r in census if (r.cell.world, r.cell.layout, r.cell.path) == (world, layout, path))
                    found = triggers(site, result.outcomes[world - 1].hits if world - 1 in result.outcomes else [],
                                     LAYOUT_VARIANTS[layout])
                    if found:
                        cells += [Cell(world, layout, path, fault, t, timeout=TIMEOUT_S) for t in found for fault in FAULTS]
                        break
    return cells


def scenario_cells() -> list[Cell]:
    """The named scenarios (issue 31's defects among them) on both paths."""
    grids = {2: "dp2", 4: "dp2xtp2"}
    cells = [Cell(world, layout, path, fault) for world, layout in grids.items() for path in PATHS
             for fault in ("unused weight", "skipped batch", "nan raise", "nan skip")]
    cells += [Cell(2, "tp2", path, "plan changed alone") for path in PATHS]
    cells += [Cell(2, "dp2", path, "sleep before forward", timeout=5.0, stall=30.0, survivors_only=True) for path in PATHS]
    return cells + bare_wait_cells()


def bare_wait_cells() -> list[Cell]:
    """Each of dist_ortho.comm's collectives, blocking and (where it has one) its handle in flight, with one rank
    asleep: world 2 and 4 (the path is not used)."""
    calls = [*BARE_CALLS, *(f"{name} in flight" for name in IN_FLIGHT)]
    return [Cell(world, "world", "blocking", "bare wait", variant=call, timeout=TIMEOUT_S, stall=3 * TIMEOUT_S + 2,
                 survivors_only=True) for world in (2, 4) for call in calls]


@contextlib.contextmanager
def runner() -> Iterator[CellRunner]:
    yield CellRunner()
