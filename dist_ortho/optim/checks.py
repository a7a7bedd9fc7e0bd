"""Construction-time checks of an optimizer's options and parameters, per param group (so that per-group overrides
are checked too): every field check its settings declare (dist_ortho.optim.settings), then those that read several
options or the parameters. A ValueError/TypeError names the option or parameter and what was expected."""

from __future__ import annotations

from typing import Any

import torch

from dist_ortho.math.coefficients import get_coefficients
from dist_ortho.math.precision import check_ns_dtype, log_ns_dtype
from dist_ortho.optim.settings import fields_of
from dist_ortho.parameters.dtensor import local
from dist_ortho.parameters.protocol import unreadable
from dist_ortho.parameters.qkv import check_per_head, head_dim_of, per_head_option


def check_options(opt: Any, group: dict[str, Any]) -> None:
    """The group's options: each declared check, the Newton-Schulz coefficients, capturable's refusals."""
    for field in fields_of(type(opt).settings, "group"):
        check = field.metadata["check"]
        if check is not None and field.name in group:
            check(field.name, group[field.name])
    if check_ns_dtype(group.get("ns_dtype")) is not None:
        log_ns_dtype(group["ns_dtype"])
    if "coefficient_type" in group:  # members that run Newton-Schulz
        get_coefficients(group["coefficient_type"], group["num_ns_steps"], group.get("custom_coefficient_sets"))
    group["per_head"] = per_head_option(group.get("per_head"))
    if opt.capturable:
        check_capturable(opt, group)


def check_optimizer_options(settings: Any) -> None:
    """The optimizer-wide options' declared checks (once, at construction)."""
    for field in fields_of(type(settings), "optimizer"):
        check = field.metadata["check"]
        if check is not None:
            check(field.name, getattr(settings, field.name))
    if settings.overlap_with_backward and not settings.reduce_grads:
        raise ValueError("overlap_with_backward=True needs reduce_grads=True (the step then reduces the gradients; "
                         "without it they arrive averaged, e.g. by DDP, which overlaps its own reduction)")


def check_capturable(opt: Any, group: dict[str, Any]) -> None:
    """capturable=True: refuse what would sync with the host in every step; lr becomes a device tensor."""
    what = None
    if group["nonfinite"] == "raise":
        what = "nonfinite='raise' reads the finite check on the host: pass nonfinite='skip' (on the device) or 'ignore'"
    elif opt.syncs_host:
        what = f"{type(opt).__name__}'s update syncs with the host (an SVD)"
    elif opt.verify_plan == "every_step":
        what = "verify_plan='every_step' reads every rank's plan digest on the host each step: pass 'on_change'"
    if what is not None:
        raise ValueError(f"capturable=True: {what}")
    if not isinstance(group["lr"], torch.Tensor) and group["params"]:
        group["lr"] = torch.tensor(float(group["lr"]), device=local(group["params"][0]).device)


def check_matrix_param(opt: Any, p: torch.Tensor, group: dict[str, Any]) -> None:
    """``p`` is readable (dist_ortho.parameters.protocol.unreadable), splits into its heads where asked, and is a matrix, a
    convolution weight with conv_mode, or an expert stack."""
    name = opt.names.get(p)
    problem = unreadable(p, name)
    if problem is not None:
        raise ValueError(problem)
    head_dim = head_dim_of(p, name, group["per_head"])
    if head_dim is not None:
        check_per_head(p, name, head_dim, fused=opt.is_qkv(p), expert=opt.is_expert_stack(p))
    if p.ndim == 2 or (p.ndim > 2 and group["conv_mode"] is not None) or opt.is_expert_stack(p):
        return
    hint = (
        "pass conv_mode='flatten' or 'batched' for convolution weights, or mark a 3D weight [E, out, in] of "
        "experts with expert_stack=True (names with 'experts' are read so)"
        if p.ndim > 2
        else "route it to AdamW: use dist_ortho.MuonAdamW (automatic routing), or give its group use_fallback=True there"
    )
    raise ValueError(f"{type(opt).__name__} orthogonalizes matrices; got a parameter of shape {tuple(p.shape)}: {hint}")
