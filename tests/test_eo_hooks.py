"""dist_ortho's Muon against Emerging-Optimizers' own Muon, on one device: with no hook, and (EO >= 0.5, which has
``weight_update_hook=``) with each of EO's hooks, given to both as EO's objects, and ours given to both (EO calls
our hooks' EO methods; we read EO's by their arguments).

Runs in the second environment (make test-next). The registry has emerging-optimizers 0.3.0 only (no hooks): there
the hook cases are skipped with the reason printed. To run them against EO HEAD (0.5.0a0) without replacing the
environment's EO: ``git -C <EO checkout> archive HEAD | tar -x -C /tmp/eo-head``, ``.venv-next/bin/pip install
--no-deps --target /tmp/eo-head-site /tmp/eo-head``, then ``PYTHONPATH=/tmp/eo-head-site`` before pytest.

Tolerance: both float32 at fp32_matmul_prec="highest" on the CPU, the same formulas: max |W - W_eo| <= 1e-5 +
1e-4 max |W_eo - W_0| (test_optim's float32 tolerance: the Newton-Schulz implementations round differently; EO's
hooks take float32 norms, ours float64).
Also torch.optim.Muon's names against torch's Muon (tests/test_hooks.py's test, here on torch 2.14, which has
adjust_lr_fn="spectral_unclamped").
"""

from __future__ import annotations

import inspect

import pytest
import torch

from dist_ortho import Muon
from dist_ortho.optim import hooks as ours
from tests import optim_reference

eo = pytest.importorskip("emerging_optimizers", reason="emerging-optimizers is not installed")
from emerging_optimizers.orthogonalized_optimizers import Muon as EOMuon  # noqa: E402

from tests.test_hooks import test_torch_names_match_torch_muon  # noqa: E402, F401  (collected here: torch 2.14)

try:
    from emerging_optimizers import weight_update_hooks as eo_hooks
except ImportError:  # EO < 0.5
    eo_hooks = None
HAS_HOOKS = eo_hooks is not None and "weight_update_hook" in inspect.signature(EOMuon.__init__).parameters
NO_HOOKS = (f"emerging-optimizers {getattr(eo, '__version__', '?')} has no weight_update_hook (EO >= 0.5, not on "
            "the registry): see this module's doc to run these against EO HEAD")

HP = {"lr": 0.02, "momentum": 0.9, "weight_decay": 0.01, "nesterov": True, "fp32_matmul_prec": "highest"}
HOOK_ARGS = {
    "NoOpWeightUpdateHook": {},
    "HyperballHook": {"radius": 3.0},
    "RadialBrakeHook": {"outward_scale": 0.3, "inward_scale": 0.7},
    "RelativeUpdateHook": {},
}
SHAPES = ((8, 6), (8, 6), (5, 12))


def _run(cls, hook_for, steps: int = 3) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(initial, final) weights after ``steps`` steps of ``cls`` with ``weight_update_hook=hook_for()`` (None: none)."""
    gen = torch.Generator().manual_seed(0)
    fulls = [torch.randn(s, generator=gen) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen) for s in SHAPES] for _ in range(steps)]
    for step in grads:
        step[1] += 4 * fulls[1]  # along W: the radial brake's inward branch
    params = [torch.nn.Parameter(f.clone()) for f in fulls]
    opt = cls(params, **HP, **({"weight_update_hook": hook_for()} if hook_for is not None else {}))
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g.clone()
        opt.step()
    return fulls, [p.detach() for p in params]


def _agree(fulls, got, expected) -> None:
    for i, (f, a, b) in enumerate(zip(fulls, got, expected)):
        err, moved = (a - b).abs().max().item(), (b - f).abs().max().item()
        assert optim_reference.weights_agree(err, moved), (i, err, moved)


def test_no_hook_agrees_with_eo_muon():
    fulls, expected = _run(EOMuon, None)
    _agree(fulls, _run(Muon, None)[1], expected)


@pytest.mark.parametrize("name", list(HOOK_ARGS))
def test_each_hook_agrees_with_eo_muon(name):
    if not HAS_HOOKS:
        print("SKIPPED:", NO_HOOKS)
        pytest.skip(NO_HOOKS)
    theirs, mine, args = getattr(eo_hooks, name), getattr(ours, name), HOOK_ARGS[name]
    fulls, expected = _run(EOMuon, lambda: theirs(**args))  # EO's Muon with EO's hook: the reference
    _agree(fulls, _run(Muon, lambda: theirs(**args))[1], expected)  # dist_ortho's Muon, EO's hook object
    _agree(fulls, _run(Muon, lambda: mine(**args))[1], expected)  # dist_ortho's Muon, dist_ortho's hook
    _agree(fulls, _run(EOMuon, lambda: mine(**args))[1], expected)  # EO's Muon calling dist_ortho's hook
    if name != "NoOpWeightUpdateHook":  # the hook changes the step: the comparison can fail
        assert max((a - b).abs().max().item() for a, b in zip(_run(EOMuon, None)[1], expected)) > 1e-3


def test_structural_properties_match_eo():
    if not hasattr(EOMuon, "num_ns_steps"):
        reason = f"emerging-optimizers {getattr(eo, '__version__', '?')}'s Muon has no structural properties"
        print("SKIPPED:", reason)
        pytest.skip(reason)
    kwargs = dict(coefficient_type="polar_express", num_ns_steps=7, scale_mode="unit_rms_norm",
                  extra_scale_factor=0.2, use_syrk=False)
    theirs = EOMuon([torch.nn.Parameter(torch.randn(4, 4))], **kwargs)
    mine = Muon([torch.nn.Parameter(torch.randn(4, 4))], **kwargs)
    for name in kwargs:
        assert getattr(mine, name) == getattr(theirs, name), name
        for opt in (theirs, mine):
            with pytest.raises(AttributeError):
                setattr(opt, name, getattr(opt, name))
