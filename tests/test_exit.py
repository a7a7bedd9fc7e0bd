"""A process that used the optimizer exits 0 (issue 31, item 4): short world-2 gloo runs of scripts/check_exit.py
(every tp_mode over TP 2, then DP 2 with reduce_grads; the loop of 20 full runs is ``python scripts/check_exit.py``).

With overlap the last step's share is still in flight when the script returns; the library's exit hook
(dist_ortho.comm.complete_in_flight) completes it before the interpreter's teardown, where a gloo thread
completing it would release its tensors under a finalizing interpreter and abort the process.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "check_exit.py"


def _check_exit():
    spec = importlib.util.spec_from_file_location("check_exit", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(sys.platform != "linux", reason="gloo over TCP on Linux")
def test_short_runs_exit_zero_with_nothing_in_flight_at_exit():
    check_exit = _check_exit()
    combos = [(True, True), (False, True), (False, False)]  # (destroy_process_group, overlap)
    with ThreadPoolExecutor(len(combos)) as pool:
        runs = list(pool.map(lambda c: check_exit.one_run(*c, quick=True, timeout=300), combos))
    failed = {c: why for c, (passed, why, _) in zip(combos, runs) if not passed}
    assert not failed, failed
    for (destroy, overlap), (_, _, outs) in zip(combos, runs):
        left = [int(re.search(r"(\d+) collectives in flight after the last step", out).group(1)) for out in outs]
        if overlap:  # the hook had something to complete: the last share was in flight on every rank
            assert all(n > 0 for n in left), (destroy, left)
        else:
            assert left == [0, 0], (destroy, left)
