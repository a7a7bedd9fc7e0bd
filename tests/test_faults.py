"""No hang at any collective of the step: one rank made to fail at every site (issue 31), world 2 and 4, gloo.

The sites are ``dist_ortho.comm.SITES``, checked here against the code's own call sites (a new collective fails
:func:`test_the_registry_lists_every_call_site_of_the_code` until it is listed, and from then on gets its cells).
A census runs every layout and variant of tests/faults.py without a fault and records which collective of which
call each rank issues; from it, every site of the step gets cells on both paths ("blocking": overlap=False;
"overlapped": overlap=True, overlap_with_backward=True, overlap_by_layer) at each world size whose layouts reach
it, one per fault (raise, stall past the timeout, exit) and trigger (tests.faults.triggers). In every cell each
surviving rank must raise a named error (CollectiveError, ValueError, FloatingPointError) within the timeout plus
slack, none may hang, and the call that raised must have written no weight and no optimizer state; a stalled
rank must end in a named error too. Scenarios where ranks issue different numbers of calls (an unused weight on
one replica, a batch dropped after an uneven backward: issue 31's first defect) must continue with the weights of
the run without the fault, or raise the documented error on every rank.

Every wait bounded (issue 31's second item): each of dist_ortho.comm's collectives, blocking and its handle in
flight, with one rank asleep instead of joining, ends in CollectiveError at the timeout on every other rank (world
2 and 4), and a new collective of comm fails :func:`test_every_collective_of_comm_has_a_bare_wait_cell` until it
has its call.

All cells run from one forkserver started for this module (tests.faults.CellRunner), many at once: most of a
cell's time is a timeout. Wall time here: 1 min 45 s (2 cores shared with other tests), 156 tests.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import dist_ortho
from dist_ortho import comm
from tests import faults
from tests.faults import FAULTS, NAMED, PATHS, SLACK_S, CellResult

NAMED_KINDS = {e.__name__ for e in NAMED}
UNBOUNDED = {site.where: site for site in comm.SITES if not site.bounded}


@pytest.fixture(scope="module")
def runner():
    if sys.platform != "linux":
        pytest.skip("the fault cells fork from a forkserver (Linux)")
    return faults.CellRunner()


@pytest.fixture(scope="module")
def census(runner) -> list[CellResult]:
    return runner.run(faults.census_cells())


@pytest.fixture(scope="module")
def results(runner, census) -> list[CellResult]:
    """Every cell of the matrix and every scenario, run together."""
    return runner.run(faults.matrix_cells(census) + faults.scenario_cells())


def test_the_registry_lists_every_call_site_of_the_code():
    """comm.SITES is exactly the functions that issue collectives (through comm, torch.distributed or a coalesced
    request), and a site is marked bounded exactly when it never calls torch.distributed itself."""
    found = faults.call_sites(Path(dist_ortho.__file__).parent)
    listed = {site.where: site for site in comm.SITES}
    assert set(found) - set(listed) == set(), "sites missing from dist_ortho.comm.SITES"
    assert set(listed) - set(found) == set(), "dist_ortho.comm.SITES lists functions that issue no collective"
    wrong = {where: kinds for where, kinds in found.items()
             if listed[where].bounded == any(k.startswith("torch.distributed.") for k in kinds)}
    assert not wrong, f"bounded= does not match how these sites communicate: {wrong}"


def test_comm_lists_its_collectives():
    """Every function of dist_ortho.comm that calls torch.distributed's collectives or another of comm.COLLECTIVES
    is in comm.COLLECTIVES (so the call-site scan sees every way to communicate)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(comm))
    talking = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            for call in ast.walk(node):
                if not isinstance(call, ast.Call):
                    continue
                f = call.func
                if (isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "dist"
                        and f.attr not in faults.TORCH_NOT_COLLECTIVES) or (
                        isinstance(f, ast.Name) and f.id in (*comm.COLLECTIVES, "_all_gather_single", "_reduce_scatter_single")):
                    talking.add(node.name)
    assert talking - {"_on_gloo"} <= set(comm.COLLECTIVES), talking - set(comm.COLLECTIVES)


def test_the_census_reaches_every_site_of_the_step_on_both_paths(census):
    for result in census:
        bad = {r: o.message[-2000:] for r, o in result.outcomes.items() if o.kind != "completed"}
        assert not bad and not result.hung(), (result.cell.label(), bad, result.hung())
    for path in PATHS:
        reached = {hit[3] for r in census if r.cell.path == path for o in r.outcomes.values() for hit in o.hits}
        missing = set(faults.step_sites()) - reached
        assert not missing, f"no layout or variant of tests/faults.py reaches {sorted(missing)} on the {path} path"


def problems(result: CellResult) -> list[str]:
    """What is wrong with a fault cell's result (empty: the survivors raised a named error within the timeout
    plus slack, wrote nothing, none hung; the faulty rank raised, ended in a named error, or exited)."""
    cell, out = result.cell, []
    if result.fault_t is None:
        return [f"the trigger was never reached: {result.outcomes}"]
    if result.hung():
        out.append(f"ranks {result.hung()} hung (killed after {result.wall_s:.0f} s)")
    for rank, o in result.survivors().items():
        if o.kind not in NAMED_KINDS:
            out.append(f"rank {rank}: {o.kind} at {o.at}: {o.message[:300]}")
        elif result.elapsed(rank) > cell.timeout + SLACK_S:
            out.append(f"rank {rank}: {o.kind} after {result.elapsed(rank):.1f} s (timeout {cell.timeout:g} s)")
        if o.written:
            out.append(f"rank {rank}: {o.at} raised after writing {o.written}")
    faulty = result.outcomes.get(cell.faulty)
    expected = {"raise": {"InjectedFault"}, "stall": NAMED_KINDS, "exit": {"exited"}}[cell.fault]
    if faulty is not None and faulty.kind not in expected:
        out.append(f"the faulty rank: {faulty.kind} at {faulty.at}: {faulty.message[:300]}")
    elif faulty is not None and faulty.kind in NAMED_KINDS:
        if result.elapsed(cell.faulty) > cell.stall + cell.timeout + SLACK_S:
            out.append(f"the stalled rank raised {result.elapsed(cell.faulty):.1f} s after its stall began")
        if faulty.written:
            out.append(f"the stalled rank's {faulty.at} raised after writing {faulty.written}")
    return out


def _site_params():
    for site in faults.step_sites():
        marks = ()
        if site in UNBOUNDED:
            marks = pytest.mark.xfail(strict=True, reason=f"{site} calls torch.distributed itself: its waits are bounded "
                                      "by the process group's own timeout only (30 minutes for new_group's groups)")
        yield pytest.param(site, marks=marks, id=site.removeprefix("dist_ortho."))


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("site", list(_site_params()))
def test_a_fault_at_every_collective_site_is_a_named_error_within_the_timeout(results, site, path, fault):
    cells = [r for r in results
             if r.cell.trigger is not None and (r.cell.trigger.site, r.cell.path, r.cell.fault) == (site, path, fault)]
    assert cells, f"no cell: the census found no layout reaching {site} on the {path} path"
    bad = {r.cell.label(): p for r in cells if (p := problems(r))}
    assert not bad, bad


def _scenario(results: list[CellResult], fault: str, world: int, path: str) -> CellResult:
    return next(r for r in results if (r.cell.fault, r.cell.world, r.cell.path) == (fault, world, path))


def _completed_as_reference(result: CellResult) -> None:
    outcomes = {r: (o.kind, o.value, o.message[-1500:]) for r, o in result.outcomes.items()}
    assert not result.hung() and all(kind == "completed" and same is True for kind, same, _ in outcomes.values()), outcomes


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("world", [2, 4])
def test_an_unused_weight_on_one_replica_continues_as_zero_gradients(results, world, path):
    """The last rank's forward leaves layer 0 out in one batch: its backward issues fewer buckets; every rank
    continues, with the weights of a run where that replica's gradients of layer 0 are zeros (bit for bit)."""
    _completed_as_reference(_scenario(results, "unused weight", world, path))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("world", [2, 4])
def test_a_batch_dropped_after_an_uneven_backward_leaves_no_trace(results, world, path):
    """Issue 31's first defect: batch 2 dropped after a backward in which one replica left layer 0 out (it issued
    one bucket, the others two), zero_grad, then batches 3 and 4: the weights of a run on batches 1, 3, 4. Before,
    zero_grad waited only for what each rank had issued, and the next batch's reduce-scatters paired with the
    others' leftover: every rank raised after the timeout (world 2), or two hung (world 4)."""
    _completed_as_reference(_scenario(results, "skipped batch", world, path))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("world", [2, 4])
def test_a_nan_on_one_replica_raises_everywhere_or_skips_everywhere(results, world, path):
    """The finite decision (it rides in the share's first bucket): "raise" gives every rank the same
    FloatingPointError with nothing written by the call that raised it; "skip" continues with the weights of a
    run that never stepped on that batch."""
    raised = _scenario(results, "nan raise", world, path)
    outcomes = {r: (o.kind, o.message, o.written) for r, o in raised.outcomes.items()}
    assert not raised.hung() and len({m for _, m, _ in outcomes.values()}) == 1, outcomes
    assert all(k == "FloatingPointError" and not w for k, _, w in outcomes.values()), outcomes
    _completed_as_reference(_scenario(results, "nan skip", world, path))


@pytest.mark.parametrize("path", PATHS)
def test_a_plan_changed_by_one_rank_alone_is_the_named_error_with_verify_plan(results, path):
    result = _scenario(results, "plan changed alone", 2, path)
    outcomes = {r: (o.kind, o.message) for r, o in result.outcomes.items()}
    assert all(k == "ValueError" and "l0.extra" in m for k, m in outcomes.values()), outcomes


@pytest.mark.parametrize("path", PATHS)
def test_a_rank_asleep_before_its_forward_ends_the_others_reduce_scatter_at_the_timeout(results, path):
    """Issue 31's second defect: reduce_grads=True (blocking, or issued during backward), DIST_ORTHO_TIMEOUT_S=5,
    rank 1 sleeps 30 s before its second forward: rank 0's CollectiveError comes at ~5 s (gloo's reduce-scatter
    ignored the wait's timeout: it came at 30 s, when rank 1 woke)."""
    result = _scenario(results, "sleep before forward", 2, path)
    outcome = result.outcomes[0]
    assert outcome.kind == "CollectiveError" and "reduce_scatter" in outcome.message, outcome
    assert "timeout 5 s" in outcome.message and 4.5 <= result.elapsed(0) <= 5 + SLACK_S, (result.elapsed(0), outcome)
    assert not outcome.written, outcome


def test_every_collective_of_comm_has_a_bare_wait_cell():
    assert set(faults.BARE_CALLS) == set(comm.COLLECTIVES), set(comm.COLLECTIVES) ^ set(faults.BARE_CALLS)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("call", [*faults.BARE_CALLS, *(f"{name} in flight" for name in faults.IN_FLIGHT)])
def test_every_wait_of_comm_ends_at_the_timeout_on_gloo(results, world, call):
    """Item 2 of issue 31: one rank asleep instead of joining the call; every other rank's call (or its handle's
    wait) raises CollectiveError between the timeout and the timeout plus slack (gloo's own reduce-scatter
    ignored the wait's timeout: it ended when the peer woke)."""
    result = next(r for r in results if (r.cell.fault, r.cell.world, r.cell.variant) == ("bare wait", world, call))
    assert set(result.survivors()) == set(range(world)) - {result.cell.faulty}, result.outcomes  # none hung
    for rank, outcome in result.survivors().items():
        assert outcome.kind == "CollectiveError", (rank, outcome)
        assert f"timeout {faults.TIMEOUT_S:g} s" in outcome.message, (rank, outcome.message)
        assert faults.TIMEOUT_S - 0.5 <= result.elapsed(rank) <= faults.TIMEOUT_S + SLACK_S, (rank, result.elapsed(rank))
