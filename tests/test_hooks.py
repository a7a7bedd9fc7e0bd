"""Weight-update hooks (dist_ortho.optim.hooks, Emerging-Optimizers' protocol), Muon's read-only structural
properties, and torch.optim.Muon's argument names.

Reference: Muon's step and each hook's math as EO HEAD (0.5.0a0, emerging_optimizers/weight_update_hooks/) defines
it, written here in float64 on whole matrices (:func:`reference`); nothing here calls a hook of dist_ortho for the
expected values.

- one device, float64 parameters: max |W - W_ref| <= 1e-10 (1 + max |W_ref|): the same float64 arithmetic up to
  summation order (measured <= 5e-16);
- TP 2, TP 4 and DP 2 x TP 2 at world 4, float32 at "highest": tests/optim_reference.weights_agree (max |W - W_ref|
  <= 1e-5 + 1e-4 max |W_ref - W_0|, test_optim's float32 tolerance); each hook adds 2 coalesced collectives per
  step whatever the number of matrices;
- torch.optim.Muon with the same keyword arguments: its bfloat16 Newton-Schulz swapped for the same iteration in
  float64 (monkeypatched: every other line of its step is torch's), max |W - W_torch| <= 1e-6 max |W_torch - W_0|
  (torch's X / max(||X||, eps) against X / (||X|| + eps), eps 1e-7: measured 1.5e-7); its own bfloat16 iteration
  within 5% of the distance moved (bfloat16's 8-bit mantissa over 5 iterations; measured <= 1.8%).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from dist_ortho import Muon, count_collectives
from dist_ortho.optim.hooks import (
    HyperballHook,
    NoOpWeightUpdateHook,
    RadialBrakeHook,
    RelativeUpdateHook,
)
from tests import optim_reference
from tests.harness import started_world
from tests.reference import newton_schulz_ref
from tests.test_optim_tp import block, sharded

HOOKS = {
    "noop": (NoOpWeightUpdateHook, {}),
    "hyperball": (HyperballHook, {"radius": 3.0}),
    "radial_brake": (RadialBrakeHook, {"outward_scale": 0.3, "inward_scale": 0.7}),
    "relative": (RelativeUpdateHook, {}),
}
HP = {"lr": 0.02, "momentum": 0.9, "weight_decay": 0.01, "nesterov": True}


# -- EO's math, float64, whole matrices --
def hook_pre(kind: str, args: dict, W: torch.Tensor, U: torch.Tensor, seen: dict | None = None):
    """(U after the pre-hook, its state)."""
    eps = args.get("eps", 1e-15)
    if kind == "hyperball":
        n = U.norm()
        return (torch.zeros_like(U) if n < eps else U * (args["radius"] / n)), None
    if kind == "relative":
        w, u = W.norm(), U.norm()
        return (torch.zeros_like(U) if w < eps or u < eps else U * (w / u)), None
    if kind == "radial_brake":
        n = W.norm()
        return U, (0.0 if n < eps else n)
    return U, None


def hook_post(kind: str, args: dict, W: torch.Tensor, state, seen: dict | None = None) -> torch.Tensor:
    eps = args.get("eps", 1e-15)
    if kind == "hyperball":
        n = W.norm()
        return torch.zeros_like(W) if n < eps else W * (args["radius"] / n)
    if kind == "radial_brake":
        before = state
        after = W.norm()
        after = 0.0 if after < eps else after
        delta = after - before
        if delta >= eps:
            k, branch = args.get("outward_scale", 0.5), "outward"
        elif delta <= -eps:
            k, branch = args.get("inward_scale", 1.0), "inward"
        else:
            k, branch = 0.0, "none"
        if seen is not None:
            seen[branch] = seen.get(branch, 0) + 1
        return torch.zeros_like(W) if after < eps else W * ((before + k * delta) / after)
    return W


def reference(W0: torch.Tensor, grads: list[torch.Tensor], hook: str, hp: dict = HP, seen: dict | None = None,
              coefficient_type: str = "quintic", steps: int = 5) -> torch.Tensor:
    """W0 after Muon's steps (EO's: decoupled decay, EMA momentum, Nesterov, NS, spectral scale) and the hook."""
    kind, args = hook, HOOKS[hook][1]
    W, M = W0.double().clone(), torch.zeros_like(W0, dtype=torch.float64)
    lr, beta, wd = hp["lr"], hp["momentum"], hp["weight_decay"]
    rows, cols = W.shape
    for g in grads:
        g = g.double()
        W = W * (1 - lr * wd)
        M = beta * M + (1 - beta) * g
        D = g + beta * (M - g) if hp["nesterov"] else M
        U = newton_schulz_ref(D, coefficient_type, steps) * math.sqrt(max(rows, cols))
        U, state = hook_pre(kind, args, W, U, seen)
        W = hook_post(kind, args, W - lr * U, state, seen)
    return W


def make_hook(name: str):
    cls, args = HOOKS[name]
    return cls(**args)


# -- one device --
SHAPES = ((8, 6), (8, 6), (5, 12), (7, 7))  # a same-shape pair (one batched stack), a wide one, a still one


def _one_device_case(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    fulls = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    grads = []
    for _ in range(3):
        step = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
        step[1] = step[1] + 4 * fulls[1]  # along W: shrinks it (the radial brake's inward branch)
        step[3] = torch.zeros(SHAPES[3], dtype=torch.float64)  # U = 0: the hooks' numerical-zero branch
        grads.append(step)
    return fulls, grads


@pytest.mark.parametrize("name", list(HOOKS))
def test_each_hook_matches_eo_math_on_one_device(name):
    fulls, grads = _one_device_case()
    params = [torch.nn.Parameter(f.clone()) for f in fulls]
    opt = Muon(params, weight_update_hook=make_hook(name), fp32_matmul_prec="highest", **HP)
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g.clone()
        opt.step()
    seen: dict = {}
    for i, (p, f) in enumerate(zip(params, fulls)):
        expected = reference(f, [s[i] for s in grads], name, seen=seen)
        err = (p.detach() - expected).abs().max().item()
        assert err <= 1e-10 * (1 + expected.abs().max().item()), (name, i, err)
    if name == "radial_brake":
        assert seen.get("outward") and seen.get("inward"), seen  # both branches taken
    if name == "hyperball":
        assert all(abs(p.detach().norm().item() - 3.0) < 1e-12 for p in params)


@pytest.mark.parametrize("name", list(HOOKS))
def test_eo_methods_on_a_whole_tensor_are_the_same_math(name):
    """The hooks' EO form (pre_weight_update_inplace / post_weight_update_inplace on one tensor, as EO's optimizers
    call them): the same as the reference's."""
    gen = torch.Generator().manual_seed(3)
    W, U = torch.randn(6, 9, generator=gen, dtype=torch.float64), torch.randn(6, 9, generator=gen, dtype=torch.float64)
    hook, args = make_hook(name), HOOKS[name][1]
    U_ref, state_ref = hook_pre(name, args, W, U.clone())
    got_U, W_got = U.clone(), W.clone()
    state = hook.pre_weight_update_inplace(W_got, got_U)
    torch.testing.assert_close(got_U, U_ref, rtol=1e-12, atol=0)
    W_got.add_(got_U, alpha=-0.1)
    hook.post_weight_update_inplace(W_got, state)
    torch.testing.assert_close(W_got, hook_post(name, args, W - 0.1 * U_ref, state_ref), rtol=1e-12, atol=0)


def test_the_base_optimizer_takes_a_hook_too():
    """EO's OrthogonalizedOptimizer takes weight_update_hook=; so does ours (a member written for one matrix)."""
    from dist_ortho import OrthogonalizedOptimizer
    params = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in ((6, 4), (6, 4))]
    opt = OrthogonalizedOptimizer(params, 0.1, 0.9, 0.0, nesterov=False, weight_decay_method="decoupled",
                                  fp32_matmul_prec="highest", scaled_orthogonalize_fn=lambda x: x * 7.0,
                                  weight_update_hook=HyperballHook(2.0))
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert all(abs(p.detach().norm().item() - 2.0) < 1e-12 for p in params)


def test_zero_inputs_give_zero_not_nan():
    W, U = torch.zeros(4, 4), torch.zeros(4, 4)
    for name in HOOKS:
        hook = make_hook(name)
        state = hook.pre_weight_update_inplace(W, U)
        hook.post_weight_update_inplace(W, state)
        assert torch.equal(W, torch.zeros(4, 4)) and torch.equal(U, torch.zeros(4, 4)), name


class _HalfStep:
    """A hook of another class (EO's protocol, duck-typed): halves the update, records what it was called on."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []

    def pre_weight_update_inplace(self, p: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(p.shape))
        update.mul_(0.5)
        return p.norm()

    def post_weight_update_inplace(self, p: torch.Tensor, pre_update_state: torch.Tensor) -> None:
        p.mul_(pre_update_state / p.norm())  # keeps the norm: the same as a hyperball at the pre-update norm


def _half_step_reference(W0, grads, hp=HP):
    W, M = W0.double().clone(), torch.zeros_like(W0, dtype=torch.float64)
    for g in grads:
        g = g.double()
        W = W * (1 - hp["lr"] * hp["weight_decay"])
        M = hp["momentum"] * M + (1 - hp["momentum"]) * g
        D = g + hp["momentum"] * (M - g)
        U = 0.5 * newton_schulz_ref(D, "quintic", 5) * math.sqrt(max(W.shape))
        before = W.norm()
        W = W - hp["lr"] * U
        W = W * (before / W.norm())
    return W


def test_a_foreign_hook_runs_per_whole_matrix():
    fulls, grads = _one_device_case(1)
    fulls, grads = fulls[:3], [s[:3] for s in grads]
    params = [torch.nn.Parameter(f.clone()) for f in fulls]
    hook = _HalfStep()
    opt = Muon(params, weight_update_hook=hook, fp32_matmul_prec="highest", **HP)
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g.clone()
        opt.step()
    assert sorted(hook.shapes) == sorted(SHAPES[:3] * 3)  # each matrix, whole, each step (the pair too)
    for i, (p, f) in enumerate(zip(params, fulls)):
        expected = _half_step_reference(f, [s[i] for s in grads])
        assert (p.detach() - expected).abs().max().item() <= 1e-10 * (1 + expected.abs().max().item())


def test_bad_hooks_and_arguments_are_named():
    W = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(TypeError, match="weight_update_hook"):
        Muon([W], weight_update_hook=object())
    with pytest.raises(ValueError, match="radius"):
        HyperballHook(0.0)
    with pytest.raises(ValueError, match="outward_scale"):
        RadialBrakeHook(outward_scale=1.5)
    with pytest.raises(ValueError, match="eps"):
        RelativeUpdateHook(eps=0.0)
    from dist_ortho import MuonHyperball
    with pytest.raises(TypeError, match="weight_update_hook"):
        MuonHyperball([W], weight_update_hook=HyperballHook(1.0))


# -- properties --
def test_structural_properties_are_read_only():
    W = torch.nn.Parameter(torch.randn(4, 4))
    opt = Muon([{"params": [W], "num_ns_steps": 3}], coefficient_type="polar_express", num_ns_steps=7,
               scale_mode="unit_rms_norm", extra_scale_factor=0.2, use_syrk=False)
    assert (opt.num_ns_steps, opt.coefficient_type, opt.scale_mode, opt.extra_scale_factor, opt.use_syrk) == (
        7, "polar_express", "unit_rms_norm", 0.2, False)  # the constructor's; a group may override its own
    for name in ("num_ns_steps", "coefficient_type", "scale_mode", "extra_scale_factor", "use_syrk"):
        with pytest.raises(AttributeError, match=name):
            setattr(opt, name, getattr(opt, name))
    assert opt.param_groups[0]["num_ns_steps"] == 3


# -- torch.optim.Muon's names --
def _torch_float64_ns(grad, ns_coefficients, ns_steps, eps):
    """torch.optim._muon._zeropower_via_newtonschulz's iteration (torch 2.13/2.14), in float64 instead of bf16."""
    a, b, c = ns_coefficients
    X = grad.double()
    if grad.size(0) > grad.size(1):
        X = X.T
    X = X / X.norm().clamp(min=eps)
    for _ in range(ns_steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if grad.size(0) > grad.size(1) else X


def _adjust_lr_fns() -> list:
    fns = [None, "original", "match_rms_adamw"]
    try:
        torch.optim.Muon([torch.nn.Parameter(torch.zeros(2, 2))], adjust_lr_fn="spectral_unclamped")
        fns.append("spectral_unclamped")
    except ValueError:
        print("SKIPPED: adjust_lr_fn='spectral_unclamped' against torch: torch", torch.__version__, "has no such option")
    return fns


def _torch_kwargs(adjust_lr_fn):
    return dict(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True, ns_coefficients=(3.4445, -4.7750, 2.0315),
                eps=1e-7, ns_steps=5, adjust_lr_fn=adjust_lr_fn)


def _against_torch(adjust_lr_fn, dtype):
    gen = torch.Generator().manual_seed(5)
    fulls = [torch.randn(s, generator=gen, dtype=dtype) for s in ((12, 5), (5, 12), (6, 6))]
    grads = [[torch.randn(f.shape, generator=gen, dtype=dtype) for f in fulls] for _ in range(3)]
    ours = [torch.nn.Parameter(f.clone()) for f in fulls]
    theirs = [torch.nn.Parameter(f.clone()) for f in fulls]
    kwargs = _torch_kwargs(adjust_lr_fn)
    opt = Muon(ours, fp32_matmul_prec="highest", **({**kwargs, "adjust_lr_fn": adjust_lr_fn or "original"}))
    ref = torch.optim.Muon(theirs, **kwargs)
    for step in grads:
        for p, q, g in zip(ours, theirs, step):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    return [((p.detach() - q.detach()).abs().max().item(), (q.detach() - f).abs().max().item())
            for p, q, f in zip(ours, theirs, fulls)]


@pytest.mark.parametrize("adjust_lr_fn", _adjust_lr_fns())
def test_torch_names_match_torch_muon(adjust_lr_fn, monkeypatch):
    """The same keyword arguments to torch.optim.Muon and to dist_ortho's Muon (adjust_lr_fn=None is torch's
    "original"; here None keeps scale_mode, so it is passed as "original")."""
    import torch.optim._muon as torch_muon
    for err, moved in _against_torch(adjust_lr_fn, torch.float32):  # torch's own bfloat16 iteration
        assert moved > 1e-3 and err <= 0.05 * moved, (err, moved)
    monkeypatch.setattr(torch_muon, "_zeropower_via_newtonschulz", _torch_float64_ns)
    for err, moved in _against_torch(adjust_lr_fn, torch.float64):
        assert moved > 1e-3 and err <= 1e-6 * moved, (err, moved)


def test_torch_names_map_to_eo_options_and_conflicts_are_named():
    W = torch.nn.Parameter(torch.randn(4, 4))
    opt = Muon([W], ns_steps=3, ns_coefficients=(3.0, -3.2, 1.2), adjust_lr_fn="spectral_unclamped", eps=1e-7)
    group = opt.param_groups[0]
    assert (group["num_ns_steps"], group["coefficient_type"], group["custom_coefficient_sets"], group["scale_mode"],
            group["ns_eps"]) == (3, "custom", [(3.0, -3.2, 1.2)], "unit_rms_norm", 1e-7)
    for bad in ({"ns_steps": 3, "num_ns_steps": 4}, {"adjust_lr_fn": "original", "scale_mode": "unit_rms_norm"},
                {"ns_coefficients": (1.0, 2.0, 3.0), "coefficient_type": "simple"}, {"adjust_lr_fn": "spectral"},
                {"ns_coefficients": (1.0, 2.0)}):
        with pytest.raises(ValueError, match="|".join(k for k in bad if k != "num_ns_steps")):
            Muon([W], **bad)
    from dist_ortho import AdaptiveMuon
    adaptive = AdaptiveMuon([torch.nn.Parameter(torch.randn(4, 4))], eps=1e-6)  # its own eps (moment2's)
    assert adaptive.param_groups[0]["eps"] == 1e-6 and "ns_eps" not in adaptive.param_groups[0]


# -- TP and the DP x TP grid, world 4 --
@pytest.fixture(scope="module")
def world():
    with started_world(4) as w:
        yield w


DIST_SHAPES = (((48, 20), 0), ((20, 36), 1), ((24, 16), 0), ((24, 16), 0), ((16, 16), None))  # None: replicated


def _groups(ctx, tp: int, dp: int):
    """(tp group, dp group or None, tp rank): TP groups of consecutive ranks, DP across them."""
    tp_groups = [dist.new_group(list(range(s, s + tp))) for s in range(0, ctx.world_size, tp)]
    dp_groups = [dist.new_group(list(range(t, ctx.world_size, tp))) for t in range(tp)]
    return tp_groups[ctx.rank // tp], dp_groups[ctx.rank % tp] if dp > 1 else None, ctx.rank % tp


def _hooked(ctx, tp: int, dp: int, names: list[str], mode: str):
    tp_group, dp_group, tp_rank = _groups(ctx, tp, dp)
    out = {}
    for name in names:
        gen = torch.Generator().manual_seed(7)
        fulls = [torch.randn(s, generator=gen) for s, _ in DIST_SHAPES]
        grads = [[torch.randn(f.shape, generator=gen) for f in fulls] for _ in range(3)]

        def mine(t, pd):
            return sharded(block(t, pd, tp_rank, tp), pd) if pd is not None else torch.nn.Parameter(t.clone())
        params = [mine(f, pd) for f, (_, pd) in zip(fulls, DIST_SHAPES)]
        opt = Muon(params, weight_update_hook=make_hook(name), tp_group=tp_group, dp_group=dp_group, tp_mode=mode,
                   fp32_matmul_prec="highest", **HP)
        for step in grads:
            for p, g, (_, pd) in zip(params, step, DIST_SHAPES):
                p.grad = block(g, pd, tp_rank, tp) if pd is not None else g.clone()
            with count_collectives() as calls:
                opt.step()
        bad = []
        for i, (p, f, (_, pd)) in enumerate(zip(params, fulls, DIST_SHAPES)):
            expected = reference(f, [s[i] for s in grads], name).float()
            expected = block(expected, pd, tp_rank, tp) if pd is not None else expected
            start = block(f, pd, tp_rank, tp) if pd is not None else f
            err, moved = (p.detach() - expected).abs().max().item(), (expected - start).abs().max().item()
            if not optim_reference.weights_agree(err, moved):
                bad.append((i, err, moved))
        out[name] = (bad, calls.total_calls)
    return out


@pytest.mark.parametrize("tp, dp, mode", [(2, 1, "distributed"), (4, 1, "gram"), (2, 2, "home")],
                         ids=["tp2", "tp4", "dp2xtp2"])
def test_hooked_step_under_tp_and_the_grid_equals_one_process(world, tp, dp, mode):
    results = world.run(_hooked, tp, dp, list(HOOKS), mode)
    for rank, out in enumerate(results):
        for name, (bad, _) in out.items():
            assert not bad, (rank, name, bad)
        for name in ("hyperball", "radial_brake", "relative"):  # two rounds each, every matrix in them
            assert out[name][1] == out["noop"][1] + 2, (rank, name, out[name][1], out["noop"][1])


def _foreign(ctx, tp: int, dp: int):
    tp_group, dp_group, tp_rank = _groups(ctx, tp, dp)
    gen = torch.Generator().manual_seed(9)
    full = torch.randn(16, 12, generator=gen)
    p = sharded(block(full, 0, tp_rank, tp), 0) if tp > 1 else torch.nn.Parameter(full.clone())
    opt = Muon([p], weight_update_hook=_HalfStep(), tp_group=tp_group if tp > 1 else None, dp_group=dp_group,
               fp32_matmul_prec="highest", **HP)
    grads = [torch.randn(16, 12, generator=gen) for _ in range(2)]
    try:
        for g in grads:
            p.grad = block(g, 0, tp_rank, tp) if tp > 1 else g.clone()
            opt.step()
    except ValueError as e:
        return str(e)
    expected = _half_step_reference(full, grads).float()
    return (p.detach() - (block(expected, 0, tp_rank, tp) if tp > 1 else expected)).abs().max().item()


def test_a_foreign_hook_is_refused_on_shards_and_runs_on_the_grid_without_tp(world):
    messages = world.run(_foreign, 2, 1)
    assert len(set(messages)) == 1 and "weight_update_hook" in messages[0] and "tensor-parallel shards" in messages[0]
    errors = world.run(_foreign, 1, 4)  # DP 4 x TP 1: each matrix whole on its owner
    assert max(errors) <= 1e-5, errors
