"""A step with no host sync (``capturable=True``), one host sync at most otherwise, and torch.compile.

On the CPU a host sync is an op that reads a tensor's value on the host: ``aten._local_scalar_dense`` (``.item()``,
``bool(t)``, ``.tolist()``), ``aten.is_nonzero``, and the ops with data-dependent shapes (``nonzero``,
``masked_select``, ``unique``). They are counted with a TorchDispatchMode over a steady-state step (after the
first steps, which make and agree on the plan). CUDA graph capture itself is tested on a GPU (the ``gpu``
marker; scripts/gpu_check.sh).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dist_ortho import MOP, Muon, get_optimizer
from dist_ortho.math.coefficients import get_coefficients
from dist_ortho.math.iteration import orthogonalize
from dist_ortho.optim.step import descend, momentum_direction

SYNCS = {"_local_scalar_dense", "is_nonzero", "nonzero", "masked_select", "unique", "_unique2", "equal"}
KINDS = ["muon", "scion", "polargrad", "muon_hyperball", "adamuon", "normuon", "namo"]


class HostSyncs(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNCS:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def _params(rank: int = 0, world: int = 1, seed: int = 0) -> list[torch.nn.Parameter]:
    """Same-shape weights (a group), a wide one (one-device Gram recursion in float32), a fused QKV weight;
    rows sharded over ``world`` ranks."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(16, 8)] * 3 + [(8, 40), (24, 8)]
    params = []
    for i, shape in enumerate(shapes):
        full = torch.randn(shape, generator=gen)
        p = torch.nn.Parameter(full.tensor_split(world)[rank].clone())
        if world > 1:
            p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, 0, 1
        params.append(p)
    params[-1].is_qkv, params[-1].qkv_split_shapes = True, [4, 2, 2]
    return params


def _feed(params, step: int, nan: bool = False) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    if nan:
        params[1].grad[0, 0] = float("nan")


def _syncs_of_a_step(opt, params, step: int = 3) -> list[str]:
    for warm in range(2):
        _feed(params, warm)
        opt.step()
    _feed(params, step)
    with HostSyncs() as mode:
        opt.step()
    return mode.seen


def _count_syncs(ctx, kind: str, mode: str, capturable: bool, nonfinite: str | None):
    params = _params(ctx.rank, ctx.world_size)
    opt = get_optimizer(kind)(params, lr=0.02, tp_group=ctx.group, tp_mode=mode, capturable=capturable,
                              nonfinite=nonfinite, fp32_matmul_prec="highest")
    return _syncs_of_a_step(opt, params)


CASES = [("muon", mode) for mode in ("duplicated", "distributed", "gram", "home")] + [(k, "home") for k in KINDS[1:]]


@pytest.mark.parametrize("kind,mode", CASES, ids=[f"{k}-{m}" for k, m in CASES])
def test_capturable_steady_state_step_makes_no_host_sync(world, kind, mode):
    """Every mode (Muon), every member (home): no host-sync op in a steady-state step."""
    for seen in world.run(_count_syncs, kind, mode, True, None):
        assert seen == [], seen


@pytest.mark.parametrize("nonfinite,syncs", [("raise", 1), ("skip", 1), ("ignore", 0)])
def test_a_plain_step_syncs_once_at_most(world, nonfinite, syncs):
    for seen in world.run(_count_syncs, "normuon", "home", False, nonfinite):
        assert len(seen) == syncs, seen


def test_capturable_lr_is_a_device_tensor_that_schedulers_set():
    params, twins = _params(), _params()
    opt = Muon(params, lr=0.02, capturable=True, fp32_matmul_prec="highest")
    ref = Muon(twins, lr=0.02, fp32_matmul_prec="highest")
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda step: 0.5**step) for o in (opt, ref)]
    for step in range(3):
        for ps, o in ((params, opt), (twins, ref)):
            _feed(ps, step)
            o.step()
        for s in schedulers:
            s.step()
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.02 * 0.125)
    for p, q in zip(params, twins):
        torch.testing.assert_close(p.detach(), q.detach(), atol=1e-6, rtol=0)


def test_capturable_skip_commits_nothing_on_the_device():
    params = _params()
    opt = get_optimizer("adamuon")(params, lr=0.02, capturable=True, fp32_matmul_prec="highest")
    for step in range(2):
        _feed(params, step)
        opt.step()
    weights = [p.detach().clone() for p in params]
    state = {(i, k): v.clone() for i, p in enumerate(params) for k, v in opt.state[p].items() if torch.is_tensor(v)}
    _feed(params, 2, nan=True)
    with HostSyncs() as mode:
        opt.step()
    assert mode.seen == []
    assert all(torch.equal(p.detach(), w) for p, w in zip(params, weights))
    assert all(torch.equal(v, state[i, k]) for i, p in enumerate(params) for k, v in opt.state[p].items()
               if torch.is_tensor(v))
    assert opt.skipped_steps == 1


@pytest.mark.parametrize("make,needle", [
    (lambda ps: Muon(ps, capturable=True, nonfinite="raise"), "nonfinite='raise'"),
    (lambda ps: MOP(ps, capturable=True), "MOP's update syncs"),
    (lambda ps: Muon(ps, capturable=True, verify_plan="every_step"), "verify_plan='every_step'"),
])
def test_capturable_refuses_what_must_sync(make, needle):
    with pytest.raises(ValueError, match=needle):
        make(_params())


def _inductor_reason() -> str | None:
    try:
        torch.compile(lambda x: x + 1, fullgraph=True)(torch.ones(2))
    except Exception as e:  # noqa: BLE001 - any failure means inductor does not run here
        return f"torch.compile (inductor) does not run here: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return None


def test_torch_compile_takes_the_iteration_and_the_group_update():
    """fullgraph compiles of the one-device iteration (a batch of matrices) and of the group's elementwise
    update (momentum, Nesterov direction, descent with a tensor lr) equal eager to rounding."""
    reason = _inductor_reason()
    if reason:
        pytest.skip(reason)
    gen = torch.Generator().manual_seed(0)
    x, grad, momentum, weights = (torch.randn(6, 8, 24, generator=gen) for _ in range(4))
    coefficients = get_coefficients("quintic", 5)
    from dist_ortho.math.precision import matmul_precision

    with matmul_precision("highest"):
        compiled = torch.compile(lambda t: orthogonalize(t, coefficients), fullgraph=True)(x)
        torch.testing.assert_close(compiled, orthogonalize(x, coefficients), atol=1e-5, rtol=0)

    def group_update(g, m, w, lr):
        new_momentum, direction = momentum_direction(g, m, 0.95, True)
        descend(w, direction, lr)
        return new_momentum, w

    lr = torch.tensor(0.02)
    got = torch.compile(group_update, fullgraph=True)(grad, momentum, weights.clone(), lr)
    expected = group_update(grad, momentum, weights.clone(), lr)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.gpu
def test_cuda_graph_captures_the_step():
    """The capturable step captured in a CUDA graph and replayed equals eager steps (GPU only)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA: torch.cuda.is_available() is False")
    params = [torch.nn.Parameter(p.detach().cuda()) for p in _params()]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = Muon(params, lr=0.02, capturable=True, fp32_matmul_prec="highest")
    ref = Muon(twins, lr=0.02, capturable=True, fp32_matmul_prec="highest")
    static = [torch.zeros_like(p) for p in params]
    for p, g in zip(params, static):
        p.grad = g
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for step in range(3):  # warm up outside the graph (plan, state, scratch buffers)
            _feed_static(static, twins, step)
            opt.step()
            ref.step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for step in range(3, 6):
        _feed_static(static, twins, step)
        graph.replay()
        ref.step()
    torch.cuda.synchronize()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p.detach(), q.detach(), atol=1e-5, rtol=0)


def _feed_static(static, twins, step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for g, q in zip(static, twins):
        value = torch.randn(g.shape, generator=gen).to(g.device)
        g.copy_(value)
        q.grad = value.clone()
