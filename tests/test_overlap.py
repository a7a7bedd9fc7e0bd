"""Overlap on the DP x TP grid (dist_ortho.optim.overlap, dist_ortho.parameters.backward), world 4.

``overlap=True`` leaves a step's share over DP in flight; each layer's forward pre-hook (``overlap_by_layer``)
waits for its own bucket (and its state-dict and load-state-dict pre-hooks). The weights every forward reads, a
``model.state_dict()`` right after a step, the final weights and the optimizer state equal ``overlap=False`` bit for
bit (same arithmetic, same order), in every TP mode and member, at DP 2 x TP 2 and
DP 4, also when one rank issues its share late (a forward never reads stale weights). ``overlap_with_backward``
reduces gradients into their owners as backward makes them final: bit-identical to the blocking reduction
(DP 2), with gradient accumulation through ``no_sync``.
"""

from __future__ import annotations

import time

import pytest
import torch

from dist_ortho import get_optimizer
from dist_ortho.optim.registry import OPTIMIZERS
from tests.harness import started_world
from tests.test_grid import _gpt_like, _grid, _params
from tests.test_optim_tp import block, sharded

MEMBERS = sorted(k for k in OPTIMIZERS if k not in ("adamw", "muon_adamw"))


@pytest.fixture(scope="module")
def world():
    with started_world(4) as w:
        yield w


class Layer(torch.nn.Module):
    """A layer holding some matrices; its forward records the weights it reads."""

    def __init__(self, params: list[torch.nn.Parameter], seen: list) -> None:
        super().__init__()
        self.weights = torch.nn.ParameterList(params)
        self.seen = seen

    def forward(self) -> None:
        self.seen.append([w.detach().clone() for w in self.weights])


def _trajectory(ctx, kind: str, mode: str, tp: int, overlap: bool, late_rank: int | None = None, dp: bool = True):
    """Three steps of ``kind`` on a small GPT's matrices as two layers; (what every forward and then a
    ``model.state_dict()`` right after the last step read, the final weights, the optimizer state's tensors).
    ``dp=False``: the TP groups alone (a pipelined step, no share)."""
    tp_group, dp_group, tp_rank = _grid(ctx, tp)
    dp_group = dp_group if dp else None
    spec = _gpt_like()
    _, params = _params(spec, tp_rank, tp)
    seen: list = []
    layers = [Layer(params[i : i + 4], seen) for i in range(0, len(params), 4)]
    extra = {"momentum": 0.9} if kind == "mop" else {}
    opt = get_optimizer(kind)(params, lr=0.02, tp_group=tp_group, dp_group=dp_group, tp_mode=mode,
                              fp32_matmul_prec="highest", overlap=overlap, **extra)
    if overlap and dp:
        opt.overlap_by_layer(layers)
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        for layer in layers:
            layer()
        for p, (_, shape, pd, _) in zip(params, spec):
            p.grad = block(torch.randn(shape, generator=gen), pd, tp_rank, tp)
        if ctx.rank == late_rank:
            time.sleep(0.3)  # this rank issues its share late: the others' forwards must wait for it
        opt.step()
        assert (opt.grid.in_flight is not None) == (overlap and dp)  # the share is left in flight
        opt.zero_grad(set_to_none=False)  # in place, before the share is decided: it must not read gradients
    seen.append([t.clone() for t in torch.nn.ModuleList(layers).state_dict().values()])  # a checkpoint's read
    with torch.no_grad():  # an evaluation's forward
        for layer in layers:
            layer()
    state = opt.state_dict()["state"]
    tensors = [t for entry in state.values() for t in entry.values() if isinstance(t, torch.Tensor)]
    return seen, [p.detach().clone() for p in params], tensors


def _same(ctx, kind: str, mode: str, tp: int, late_rank: int | None = None, dp: bool = True) -> bool:
    plain = _trajectory(ctx, kind, mode, tp, False, dp=dp)
    overlapped = _trajectory(ctx, kind, mode, tp, True, late_rank, dp)
    seen = all(torch.equal(a, b) for xs, ys in zip(plain[0], overlapped[0]) for a, b in zip(xs, ys))
    weights = all(torch.equal(a, b) for a, b in zip(plain[1], overlapped[1]))
    state = len(plain[2]) == len(overlapped[2]) and all(torch.equal(a, b) for a, b in zip(plain[2], overlapped[2]))
    return len(plain[0]) == len(overlapped[0]) == 9 and seen and weights and state


@pytest.mark.parametrize("mode", ["home", "gram", "duplicated", "distributed"])
@pytest.mark.parametrize("tp", [2, 1], ids=["dp2xtp2", "dp4"])
def test_overlap_is_bit_identical_in_every_mode(world, mode, tp):
    assert all(world.run(_same, "muon", mode, tp))


@pytest.mark.parametrize("kind", MEMBERS)
def test_overlap_is_bit_identical_for_every_member(world, kind):
    assert all(world.run(_same, kind, "home", 2))


@pytest.mark.parametrize("mode", ["home", "gram", "duplicated", "distributed", "auto"])
@pytest.mark.parametrize("tp", [2, 4], ids=["tp2", "tp4"])
def test_the_pipelined_step_is_bit_identical_under_tp_alone(world, mode, tp):
    """Without dp_group, overlap=True pipelines Newton-Schulz by buckets of shapes (tp.orthogonalize_many)."""
    assert all(world.run(_same, "muon", mode, tp, None, False))


@pytest.mark.parametrize("kind", MEMBERS)
def test_the_pipelined_step_is_bit_identical_for_every_member_at_tp4(world, kind):
    assert all(world.run(_same, kind, "home", 4, None, False))


def test_a_forward_waits_for_a_share_issued_late(world):
    """Rank 0 sleeps before each step: the other replicas' layers wait in their pre-hooks and read the new weights."""
    assert all(world.run(_same, "muon", "home", 2, 0))


def _loaded_and_uncovered(ctx):
    """A model.load_state_dict() right after a step (its share in flight) is not overwritten by the share landing
    after it; overlap_by_layer with a layer left out names its parameters."""
    tp_group, dp_group, tp_rank = _grid(ctx, 2)
    spec = _gpt_like()
    _, params = _params(spec, tp_rank, 2)
    names = [name for name, *_ in spec]
    layers = [Layer(params[i : i + 4], []) for i in range(0, len(params), 4)]
    model = torch.nn.ModuleList(layers)
    opt = get_optimizer("muon")(list(zip(names, params)), lr=0.02, tp_group=tp_group, dp_group=dp_group,
                                tp_mode="home", overlap=True)
    try:
        opt.overlap_by_layer(layers[:1])
        uncovered = "no error"
    except ValueError as e:
        uncovered = str(e)
    opt.overlap_by_layer(layers)
    saved = {k: t.clone() for k, t in model.state_dict().items()}
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()  # returns: its share in flight
    model.load_state_dict(saved)
    opt.finish()
    loaded = all(torch.equal(t, saved[k]) for k, t in model.state_dict().items())
    late = torch.nn.Parameter(torch.randn(6, 4))
    late.grad = torch.ones_like(late)
    opt.add_param_group({"params": [("late.weight", late)]})
    try:
        opt.step()
        added = "no error"
    except ValueError as e:
        added = str(e)
    return uncovered, loaded, added


def test_a_loaded_model_is_not_overwritten_and_every_shared_weight_needs_a_layer(world):
    results = world.run(_loaded_and_uncovered)
    assert all(loaded for _, loaded, _ in results), results
    assert all(message.startswith("overlap_by_layer: in none of the layers: l1.qkv, l1.proj, l1.fc1, l1.fc2.")
               for message, _, _ in results), results
    # a parameter group added after overlap_by_layer: found when the step makes its new plan
    assert all(added.startswith("overlap_by_layer: in none of the layers: late.weight.")
               for _, _, added in results), results


def _nonfinite_at_the_wait(ctx):
    tp_group, dp_group, tp_rank = _grid(ctx, 2)
    spec = _gpt_like()
    _, params = _params(spec, tp_rank, 2)
    layers = [Layer(params[i : i + 4], []) for i in range(0, len(params), 4)]
    opt = get_optimizer("muon")(params, lr=0.02, tp_group=tp_group, dp_group=dp_group, tp_mode="home", overlap=True)
    opt.overlap_by_layer(layers)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    opt.finish()  # step 1's share written
    before = [p.detach().clone() for p in params]
    params[5].grad[0, 0] = float("nan")
    opt.step()  # returns: the verdicts are in flight with the share
    try:
        layers[0]()
        return "no error", False
    except FloatingPointError as e:
        untouched = all(torch.equal(p.detach(), b) for p, b in zip(params, before))
        opt.finish()  # nothing left in flight: a no-op
        return str(e), untouched


def test_a_nonfinite_step_raises_at_the_first_wait_on_every_rank(world):
    results = world.run(_nonfinite_at_the_wait)
    assert len({message for message, _ in results}) == 1, results
    assert all("not finite" in message and untouched for message, untouched in results), results


def _backward(ctx, overlap: bool, micro_batches: int, bucket_bytes: int, verify_plan: str = "on_change",
              skipped: str | None = None, kind: str = "muon"):
    """A two-layer model of TE-attribute shards; each DP replica its own inputs; reduce_grads=True. Returns the
    weights after three steps, and how many buckets the last backward issued before the step. ``skipped``: before
    step 2's batch, a batch whose step is skipped (backward, its gradients' norm read ("read": reduced into the
    owners) or not ("unread"), then zero_grad): the weights must be those of no such batch."""
    tp_group, dp_group, tp_rank = _grid(ctx, 2)
    dp_rank = ctx.rank // 2
    gen = torch.Generator().manual_seed(3)
    fulls = [torch.randn(16, 12, generator=gen), torch.randn(12, 16, generator=gen)]
    params = [sharded(block(fulls[0], 0, tp_rank, 2), 0), sharded(block(fulls[1], 1, tp_rank, 2), 1)]
    named = list(zip(["fc1.weight", "fc2.weight"], params)) if kind == "muon_adamw" else params
    opt = get_optimizer(kind)(named, lr=0.02, tp_group=tp_group, dp_group=dp_group, reduce_grads=True,
                              tp_mode="home", fp32_matmul_prec="highest", overlap_with_backward=overlap,
                              backward_bucket_bytes=bucket_bytes, verify_plan=verify_plan)
    reducer = getattr(opt, "matrix_optimizer", opt)
    issued = 0
    for step in range(3):
        if skipped and step == 1:
            x = torch.randn(4, 12, generator=torch.Generator().manual_seed(999 + dp_rank))
            (x @ params[0].T @ params[1].T).square().sum().backward()
            if skipped == "read":
                opt.clip_grad_norm_(1e9) if kind == "muon_adamw" else opt.grad_sum_of_squares()
            opt.zero_grad()
        for micro in range(micro_batches):
            x = torch.randn(4, 12, generator=torch.Generator().manual_seed(100 * step + 10 * micro + dp_rank))
            hidden = x @ params[0].T  # column-parallel: this rank's rows of the hidden layer
            out = hidden @ params[1].T  # row-parallel: partial sums (the model's all-reduce is not needed here)
            context = opt.no_sync() if micro < micro_batches - 1 else torch.enable_grad()
            with context:
                out.square().sum().backward()
        issued = reducer.grid.backward.issued if reducer.grid.backward is not None else 0
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in params], issued


def _backward_pair(ctx, micro_batches: int, verify_plan: str = "on_change"):
    plain, _ = _backward(ctx, False, micro_batches, 2**20)
    overlapped, issued = _backward(ctx, True, micro_batches, 1, verify_plan)
    return all(torch.equal(a, b) for a, b in zip(plain, overlapped)), issued


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_reductions_during_backward_equal_the_blocking_ones(world, micro_batches):
    """Buckets of one matrix each: both were issued by backward's hooks before step() (none left for it)."""
    for same, issued in world.run(_backward_pair, micro_batches):
        assert same and issued == 2, (same, issued)


def _skipped_pair(ctx, skipped: str, kind: str):
    reference, _ = _backward(ctx, False, 1, 2**20, kind=kind)
    runs = [_backward(ctx, overlap, 1, 1, skipped=skipped, kind=kind)[0] for overlap in (False, True)]
    return [all(torch.equal(a, b) for a, b in zip(reference, weights)) for weights in runs]


@pytest.mark.parametrize("skipped,kind", [("read", "muon"), ("unread", "muon"), ("read", "muon_adamw")])
def test_a_batch_skipped_after_backward_leaves_no_trace(world, skipped, kind):
    """Backward, (the norm read: gradients reduced into owners,) zero_grad, then the next batch: the same weights
    as without that batch, blocking and with reductions during backward. Before, a norm read left the next
    step's gradients unreduced (silently), and the reductions a skipped backward issued made the next backward
    raise."""
    for same in world.run(_skipped_pair, skipped, kind):
        assert same == [True, True], same


def test_the_every_step_plan_check_runs_behind_reductions_in_flight(world):
    """verify_plan="every_step" with the reductions issued by backward still in flight over DP when its check
    (an all-gather over TP, then DP) runs: the same order on every rank, the same weights."""
    for same, issued in world.run(_backward_pair, 2, "every_step"):
        assert same and issued == 2, (same, issued)


def _accumulated_without_no_sync(ctx):
    tp_group, dp_group, tp_rank = _grid(ctx, 2)
    p = sharded(torch.randn(8, 6, generator=torch.Generator().manual_seed(0)), 0)
    opt = get_optimizer("muon")([p], lr=0.02, tp_group=tp_group, dp_group=dp_group, reduce_grads=True,
                                overlap_with_backward=True)
    p.sum().backward()
    opt.step()  # the first step's reduction is blocking; the hooks exist from now on
    p.sum().backward()
    try:
        p.sum().backward()
    except RuntimeError as e:
        opt.step()  # the first micro-batch's reduction was issued on every rank: complete it
        return str(e)
    return "no error"


def test_accumulating_after_the_reduction_started_is_an_error(world):
    for message in world.run(_accumulated_without_no_sync):
        assert "accumulated again" in message and "no_sync" in message, message


def test_overlap_options_are_checked():
    p = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match="overlap_with_backward=True needs reduce_grads=True"):
        get_optimizer("muon")([p], overlap_with_backward=True)
    with pytest.raises(TypeError, match="overlap must be True or False"):
        get_optimizer("muon")([p], overlap="yes")
    with pytest.raises(ValueError, match="overlap_by_layer needs overlap=True"):
        get_optimizer("muon")([p]).overlap_by_layer([torch.nn.Linear(2, 2)])
    with pytest.raises(TypeError, match=r"layers\[0\] must be a torch.nn.Module"):
        get_optimizer("muon")([p], overlap=True).overlap_by_layer([p])


def _one_rank_stops_before_the_share(ctx, overlap: bool):
    from dist_ortho import comm

    comm.set_timeout(3)
    try:
        p = torch.nn.Parameter(torch.randn(8, 6, generator=torch.Generator().manual_seed(0)))
        layer = Layer([p], [])
        opt = get_optimizer("muon")([p], lr=0.02, dp_group=ctx.group, overlap=overlap)
        if overlap:
            opt.overlap_by_layer([layer])
        p.grad = torch.ones_like(p)
        opt.step()
        layer()
        if ctx.rank == 1:  # this rank raises elsewhere and never reaches step 2
            return ("stopped", 0.0)
        began = time.perf_counter()
        try:
            opt.step()  # with overlap: returns, its share in flight
            layer()
        except comm.CollectiveError as e:
            return (str(e), time.perf_counter() - began)
        return ("no error", 0.0)
    finally:
        comm.set_timeout(None)


@pytest.mark.parametrize("overlap,where", [(True, "waited for before Layer's forward"), (False, "waited for")])
def test_a_share_that_never_completes_fails_naming_the_step(overlap, where):
    """With a 3 s timeout, the replica left alone raises CollectiveError (from its layer's pre-hook with overlap,
    else from step()) naming the optimizer and the step once, the share and the collective (not the process
    group's 30 minutes)."""
    with started_world(2) as pair:
        (message, waited), stopped = pair.run(_one_rank_stops_before_the_share, overlap)
    assert stopped[0] == "stopped"
    assert message.startswith(f"Muon step 2: the share over DP ({where}): all_gather"), message
    assert "timeout 3 s" in message and waited < 30, (message, waited)


def _calls_per_step(ctx, overlap: bool, mode: str):
    from dist_ortho import count_collectives

    tp_group, _, tp_rank = _grid(ctx, 2)
    spec = _gpt_like()
    _, params = _params(spec, tp_rank, 2)
    opt = get_optimizer("muon")(params, lr=0.02, tp_group=tp_group, tp_mode=mode, overlap=overlap)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    with count_collectives() as calls:
        opt.step()
    return dict(calls.calls)


@pytest.mark.parametrize("mode,kind,rounds", [("duplicated", "all_gather", 1), ("home", "all_to_all", 2)])
def test_the_pipelined_step_issues_a_round_per_bucket_of_shapes(world, mode, kind, rounds):
    """The GPT-like set has 4 matrix shapes (QKV's parts 3 more): 4 buckets, each its own coalesced calls."""
    plain, pipelined = world.run(_calls_per_step, False, mode)[0], world.run(_calls_per_step, True, mode)[0]
    assert plain == {kind: rounds} and pipelined == {kind: 4 * rounds}, (plain, pipelined)
