"""The optimizer family on one process against the float64 references of tests/optim_reference.py.

Tolerance: after 3 steps, max |W - W_ref| <= 1e-5 + 1e-4 * max |W_ref - W_0| (float32 parameters at
"highest" precision against float64: the Newton-Schulz output agrees to ~1e-6 relative, and the update
is lr * scale * that).
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import dist_ortho
from dist_ortho import MOP, AdaptiveMuon, Muon, MuonAdamW, MuonHyperball, PolarGrad, Scion, get_optimizer
from tests import optim_reference

VARIANTS = [
    ("muon", {}),
    ("muon", {"scale_mode": "shape_scaling"}),
    ("muon", {"scale_mode": "unit_rms_norm"}),
    ("muon", {"scale_mode": "rms_to_rms"}),
    ("muon", {"scale_mode": "match_rms_adamw", "extra_scale_factor": 2.0}),
    ("muon", {"nesterov": True}),
    ("muon", {"weight_decay_method": "l2", "weight_decay": 0.1}),
    ("muon", {"weight_decay_method": "independent", "weight_decay": 0.1}),
    ("muon", {"weight_decay_method": "palm", "weight_decay": 0.1}),
    ("muon", {"coefficient_type": "polar_express", "num_ns_steps": 8}),
    ("scion", {"spectral_radius": 2.0}),
    ("mop", {}),
    ("mop", {"scale_mode": "spectral"}),
    ("polargrad", {}),
    ("muon_hyperball", {}),
    ("muon_hyperball", {"hyperball_radius": 5.0}),
    ("adamuon", {}),
    ("normuon", {}),
    ("namo", {}),
]
IDS = [f"{k}-{'-'.join(f'{a}={b}' for a, b in hp.items())}" for k, hp in VARIANTS]


def factory(kind: str):
    return get_optimizer(kind)


def _data(shape, steps=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    W0 = torch.randn(shape, generator=gen)
    grads = [torch.randn(shape, generator=gen) for _ in range(steps)]
    return W0, grads


pytestmark = pytest.mark.usefixtures("highest_precision")


@pytest.mark.parametrize("shape", [(24, 16), (16, 24)], ids=str)
@pytest.mark.parametrize("kind,hp", VARIANTS, ids=IDS)
def test_matches_formula(kind, hp, shape):
    W0, grads = _data(shape)
    hp = {"lr": 0.02, **hp, "fp32_matmul_prec": "highest"}
    W = torch.nn.Parameter(W0.clone())
    opt = factory(kind)([W], **hp)
    for g in grads:
        W.grad = g.clone()
        opt.step()
    expected = optim_reference.run(kind, W0, grads, hp)
    moved = (expected - W0.double()).abs().max().item()
    err = (W.detach().double() - expected).abs().max().item()
    assert optim_reference.weights_agree(err, moved), f"max err {err:.2e}, moved {moved:.2e} (must be > 1e-3)"


@pytest.mark.parametrize("kind,hp", VARIANTS, ids=IDS)
def test_state_dict_round_trip_is_bit_exact(kind, hp):
    W0, grads = _data((20, 12), steps=6)
    hp = {"lr": 0.02, **hp}
    W = torch.nn.Parameter(W0.clone())
    opt = factory(kind)([W], **hp)
    for g in grads[:3]:
        W.grad = g.clone()
        opt.step()
    saved_W, saved_state = W.detach().clone(), copy.deepcopy(opt.state_dict())
    for g in grads[3:]:
        W.grad = g.clone()
        opt.step()
    W2 = torch.nn.Parameter(saved_W)
    opt2 = factory(kind)([W2], **hp)
    opt2.load_state_dict(saved_state)
    for g in grads[3:]:
        W2.grad = g.clone()
        opt2.step()
    assert torch.equal(W.detach(), W2.detach())


def test_closure_is_called_with_grad_enabled_and_its_loss_returned():
    W = torch.nn.Parameter(torch.randn(8, 6))
    opt = Muon([W], lr=0.01)

    def closure():
        assert torch.is_grad_enabled()
        opt.zero_grad()
        loss = (W**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.item() > 0 and W.grad is not None


def test_params_without_grad_are_skipped():
    W, V = torch.nn.Parameter(torch.randn(8, 6)), torch.nn.Parameter(torch.randn(8, 6))
    before = V.detach().clone()
    W.grad = torch.randn(8, 6)
    Muon([W, V], lr=0.01).step()
    assert torch.equal(V.detach(), before)


def _first_step(cls, value):
    W = torch.nn.Parameter(value)
    opt = cls([W])
    W.grad = torch.ones_like(W)
    opt.step()


@pytest.mark.parametrize(
    "make,error,needle",
    [
        (lambda W: Muon([W], lr=-1.0), ValueError, "lr"),
        (lambda W: Muon([W], lr=float("nan")), ValueError, "lr"),
        (lambda W: Muon([W], momentum=1.0), ValueError, "momentum"),
        (lambda W: Muon([W], momentum=-0.1), ValueError, "momentum"),
        (lambda W: Muon([W], weight_decay=-0.1), ValueError, "weight_decay"),
        (lambda W: Muon([W], scale_mode="huge"), ValueError, "scale_mode"),
        (lambda W: Muon([W], weight_decay_method="l3"), ValueError, "weight_decay_method"),
        (lambda W: Muon([W], tp_mode="magic"), ValueError, "tp_mode"),
        (lambda W: Muon([W], fp32_matmul_prec="low"), ValueError, "fp32_matmul_prec"),
        (lambda W: Muon([W], coefficient_type="nope"), ValueError, "coefficient_type"),
        (lambda W: Muon([W], num_ns_steps=0), ValueError, "steps"),
        (lambda W: AdaptiveMuon([W], moment2_method="adam"), ValueError, "moment2_method"),
        (lambda W: AdaptiveMuon([W], eps=-1.0), ValueError, "eps"),
        (lambda W: AdaptiveMuon([W], moment2_method="namo", weight_decay_method="l2"), ValueError, "namo"),
        (lambda W: MOP([W], scale_mode="trace"), ValueError, "scale_mode"),
        (lambda W: _first_step(MuonHyperball, torch.zeros(4, 4)), ValueError, "zero norm"),
        (lambda W: MuonHyperball([W], hyperball_radius=0.0), ValueError, "hyperball_radius"),
        (lambda W: Muon([torch.nn.Parameter(torch.randn(8))]), ValueError, r"shape \(8,\).*AdamW"),
        (lambda W: Muon([torch.nn.Parameter(torch.randn(4, 3, 3, 3))]), ValueError, "conv_mode"),
        (lambda W: AdaptiveMuon([torch.nn.Parameter(torch.randn(4, 3, 3))], conv_mode="flatten"), ValueError, "2D"),
        (lambda W: Muon([W], conv_mode="spread"), ValueError, "conv_mode"),
        (lambda W: dist_ortho.OrthogonalizedOptimizer([W], 0.1, 0.9, 0.0, nesterov=False,
                                                      weight_decay_method="decoupled", fp32_matmul_prec="high"),
         TypeError, "scaled_orthogonalize_fn"),
        (lambda W: Muon([{"params": [W], "lr": -2.0}]), ValueError, "lr"),
        (lambda W: get_optimizer("lion"), ValueError, "unknown optimizer"),
    ],
)
def test_bad_input(make, error, needle):
    with pytest.raises(error, match=needle):
        make(torch.nn.Parameter(torch.randn(8, 6)))


def test_scaled_orthogonalize_fn():
    W0, grads = _data((12, 8))
    W = torch.nn.Parameter(W0.clone())
    opt = dist_ortho.OrthogonalizedOptimizer(
        [W], 0.1, 0.0, 0.0, nesterov=False, weight_decay_method="decoupled", fp32_matmul_prec="highest",
        scaled_orthogonalize_fn=lambda x: 2 * x,
    )
    W.grad = grads[0].clone()
    opt.step()
    torch.testing.assert_close(W.detach(), W0 - 0.1 * 2 * grads[0])


@pytest.mark.parametrize("conv_mode", ["flatten", "batched"])
def test_conv_weights(conv_mode):
    W0 = torch.randn(8, 4, 3, 3)
    g = torch.randn(8, 4, 3, 3)
    W = torch.nn.Parameter(W0.clone())
    opt = Muon([W], lr=0.1, momentum=0.0, weight_decay=0.0, scale_mode="shape_scaling", conv_mode=conv_mode,
               fp32_matmul_prec="highest")
    W.grad = g.clone()
    opt.step()
    if conv_mode == "flatten":
        O = optim_reference.newton_schulz_ref(g.reshape(8, 36), "quintic", 5).reshape(8, 4, 3, 3)
    else:  # one (8, 4) matrix per spatial position, scaled by 9^-0.5
        O = optim_reference.newton_schulz_ref(g.permute(2, 3, 0, 1), "quintic", 5).permute(2, 3, 0, 1) / 3.0
    expected = W0.double() - 0.1 * O * optim_reference.scale("shape_scaling", 8, 4 if conv_mode == "batched" else 36)
    assert (W.detach().double() - expected).abs().max().item() < 1e-5


def test_routing_in_the_hybrid(caplog):
    emb = torch.nn.Embedding(100, 16)
    emb.weight.is_embedding_or_output_parameter = True
    model = torch.nn.ModuleDict({
        "emb": emb,
        "fc": torch.nn.Linear(16, 32),
        "norm": torch.nn.LayerNorm(32),
        "head_vector": torch.nn.Linear(32, 1, bias=False),
        "thin": torch.nn.Linear(2, 32, bias=False),
        "very_wide": torch.nn.Linear(16 * 130, 16, bias=False),
        "conv": torch.nn.Conv2d(4, 8, 3),
    })
    with caplog.at_level(logging.INFO, logger="dist_ortho.optim.routing"):
        opt = MuonAdamW(model.named_parameters(), lr=0.02, adamw_lr=1e-3, verbose=True)
    muon = {id(p) for g in opt.param_groups if g["use_muon"] for p in g["params"]}
    expected_muon = {id(model["fc"].weight), id(model["conv"].weight)}
    assert muon == expected_muon
    log = caplog.text
    for name in ["emb.weight", "fc.bias", "norm.weight", "head_vector.weight", "thin.weight", "very_wide.weight"]:
        assert f"{name} " in log and "-> adamw" in log
    assert "embedding or output layer" in log and "aspect ratio" in log and "smallest dim" in log


def test_hybrid_group_flags_override():
    a, b = torch.nn.Parameter(torch.randn(16, 16)), torch.nn.Parameter(torch.randn(16))
    opt = MuonAdamW([{"params": [a], "use_fallback": True}, {"params": [b]}])
    assert all(not g["use_muon"] for g in opt.param_groups)
    opt = MuonAdamW([{"params": [a], "use_muon": False}])
    assert not opt.param_groups[0]["use_muon"]


def test_hybrid_steps_both_sides_like_its_parts_and_works_with_schedulers():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    twin = copy.deepcopy(model)
    opt = MuonAdamW(model.parameters(), lr=0.02, adamw_lr=1e-3, weight_decay=0.0)
    muon = Muon([twin[0].weight, twin[2].weight], lr=0.02, weight_decay=0.0)
    adamw = torch.optim.AdamW([twin[0].bias, twin[2].bias], lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    x = torch.randn(4, 8)
    for _ in range(3):
        for m, o in ((model, opt), (twin, None)):
            m.zero_grad()
            m(x).square().sum().backward()
        opt.step()
        muon.step()
        adamw.step()
        sched.step()
        for o in (muon, adamw):
            for g in o.param_groups:
                g["lr"] *= 0.5
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, atol=0, rtol=0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.02 * 0.125)
    state = copy.deepcopy(opt.state_dict())
    opt2 = MuonAdamW(copy.deepcopy(model).parameters(), lr=0.02, adamw_lr=1e-3, weight_decay=0.0)
    opt2.load_state_dict(state)
    assert opt2.param_groups[1]["lr"] == opt.param_groups[1]["lr"]


def test_registry_names_build_optimizers():
    W = torch.nn.Parameter(torch.randn(8, 6))
    for name, cls in [("muon", Muon), ("scion", Scion), ("mop", MOP), ("polargrad", PolarGrad),
                      ("muon_hyperball", MuonHyperball), ("normuon", AdaptiveMuon)]:
        assert isinstance(get_optimizer(name)([W]), cls)
    assert get_optimizer("normuon")([W]).param_groups[0]["moment2_method"] == "normuon"
    with pytest.raises(ValueError, match="already registered"):
        dist_ortho.register_optimizer("muon", Muon)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoupled_gradients_are_read_by_the_step_and_by_clipping(dtype):
    """Gradients in ``.decoupled_grad`` (Megatron-FSDP's use_decoupled_grad=True; ``.grad`` None) are the step's
    and clipping's as if they were ``.grad`` (cast to the weight's dtype): the same norm, clipped in place (in
    decoupled_grad), the same weights after the step; ``.grad`` is None again after each."""
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(12, 8, generator=gen), torch.randn(6, generator=gen)]
    grads = [torch.randn(w.shape, generator=gen).to(dtype) * 10 for w in weights]
    runs = []
    for decoupled in (False, True):
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        for p, g in zip(params, grads):
            if decoupled:
                p.decoupled_grad = g.clone()
            else:
                p.grad = g.clone().to(p.dtype)
        opt = MuonAdamW([("w", params[0]), ("b", params[1])], "muon", lr=0.02, adamw_lr=0.01)
        norm = opt.clip_grad_norm_(1.0)
        clipped = [(p.decoupled_grad if decoupled else p.grad).float() for p in params]
        opt.step()
        if decoupled:
            assert all(p.grad is None for p in params)
        runs.append((norm, clipped, [p.detach().clone() for p in params]))
    (norm, clipped, after), (norm_d, clipped_d, after_d) = runs
    tolerance = 0 if dtype == torch.float32 else 1e-2  # bf16 gradients scaled and rounded back to bf16 in place
    assert torch.allclose(norm, norm_d) and norm > 1.0
    assert all(torch.allclose(a, b, atol=tolerance, rtol=tolerance) for a, b in zip(clipped, clipped_d))
    assert all(torch.allclose(a, b, atol=1e-6 if dtype == torch.float32 else 1e-3) for a, b in zip(after, after_d))
