"""Writes pre_groups_state.pt: optimizer state dicts written by dist_ortho before the grouped step (commit
43e1be0), for tests/test_groups.py::test_state_written_before_groups_loads_and_continues.

    git worktree add /tmp/before 43e1be0 && cd /tmp/before && python /path/to/this/script OUT.pt

For each optimizer: the weights and state_dict() after 2 steps, then the weights after 2 more steps (what the
code of that commit computed), on the parameter set of ``parameters()`` (also imported by the test).
"""

from __future__ import annotations

import copy
import sys

import torch

HP = {"lr": 0.02, "fp32_matmul_prec": "highest", "batch_matrices": False}
KINDS = {"muon": {}, "normuon": {}, "muon_hyperball": {}, "polargrad": {"weight_decay_method": "l2", "weight_decay": 0.1}}


def parameters(seed: int = 0) -> list[torch.nn.Parameter]:
    """Same-shape matrices (two groups), a fused QKV weight split Q/K/V, and a lone matrix."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(12, 8)] * 3 + [(8, 12)] * 2 + [(24, 8), (10, 6)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    params[5].is_qkv, params[5].qkv_split_shapes = True, [4, 2, 2]
    return params


def grads(step: int, params: list[torch.Tensor]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=gen) for p in params]


def main(out: str) -> None:
    from dist_ortho import get_optimizer

    torch.set_float32_matmul_precision("highest")
    saved = {}
    for kind, extra in KINDS.items():
        params = parameters()
        opt = get_optimizer(kind)(params, **HP, **extra)
        for step in range(4):
            for p, g in zip(params, grads(step, params)):
                p.grad = g
            opt.step()
            if step == 1:
                saved[kind] = {"weights": [p.detach().clone() for p in params], "state": copy.deepcopy(opt.state_dict())}
        saved[kind]["final"] = [p.detach().clone() for p in params]
    torch.save(saved, out)


if __name__ == "__main__":
    main(sys.argv[1])
