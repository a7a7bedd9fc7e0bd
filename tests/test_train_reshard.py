"""A TP=2 checkpoint resumes at TP=4 (4 gloo ranks): the two TP=2 runs (ranks 0-1 and 2-3) stop at
step 6; all four ranks resume from one of their checkpoints at TP=4 and must follow the unstopped TP=2
loss curve (1e-4). NorMuon's per-component second moments of the split fused QKV are resharded too."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from tests.harness import started_world
from tests.test_train import _args, _run


@pytest.fixture(scope="module")
def world():
    with started_world(4) as w:
        yield w


def _tp2_to_tp4(ctx, out: str, optimizer: str):
    pair, index = ctx.new_groups(2)
    model = ["--optimizer", optimizer, "--groups", "4"]  # TP=4 needs whole query groups per rank here
    whole = _run(_args("--out", f"{out}/whole{index}", *model), pair)
    _run(_args("--out", f"{out}/stopped{index}", *model, "--stop-after", "6"), pair)
    dist.barrier()
    resumed = _run(_args("--out", f"{out}/stopped0", *model, "--resume"), ctx.group)
    return {step: abs(resumed[step] - whole[step]) for step in resumed}


@pytest.mark.parametrize("optimizer", ["muon", "normuon"])
def test_tp2_checkpoint_resumes_at_tp4(world, tmp_path, optimizer):
    for diffs in world.run(_tp2_to_tp4, str(tmp_path), optimizer):
        assert sorted(diffs) == list(range(7, 13)) and max(diffs.values()) <= 1e-4, diffs
