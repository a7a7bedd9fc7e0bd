"""Scale factors of an orthogonalized update, from the GLOBAL matrix shape (size_out = rows, size_in = cols).

- shape_scaling:   sqrt(max(1, out/in))       Jordan et al., Muon
- spectral:        sqrt(max(out, in))
- unit_rms_norm:   sqrt(out/in)               Scion (Pethick et al.), Bernstein & Newhouse
- rms_to_rms:      alias of unit_rms_norm     (sqrt(out/in) NS(D) has RMS -> RMS norm ~1)
- match_rms_adamw: 0.2 sqrt(max(out, in))     Moonlight (Liu et al.): matches AdamW's update RMS
Under tensor parallelism the shape is the gathered one (see :func:`dist_ortho.parameters.protocol.global_shape`).

torch.optim.Muon names these by ``adjust_lr_fn`` (:data:`TORCH_ADJUST_LR`): "original" (its default, also None) is
shape_scaling, "match_rms_adamw" is match_rms_adamw, and "spectral_unclamped" (torch >= 2.14) is unit_rms_norm;
torch multiplies lr by the factor, which is the same step W - lr (s U).
"""

from __future__ import annotations

import math
from typing import Literal, get_args

ScaleMode = Literal["shape_scaling", "spectral", "unit_rms_norm", "rms_to_rms", "match_rms_adamw"]
SCALE_MODES: tuple[str, ...] = get_args(ScaleMode)
TorchAdjustLr = Literal["original", "match_rms_adamw", "spectral_unclamped"]
TORCH_ADJUST_LR: dict[str, ScaleMode] = {
    "original": "shape_scaling", "match_rms_adamw": "match_rms_adamw", "spectral_unclamped": "unit_rms_norm",
}


def check_scale_mode(scale_mode: object, allowed: tuple[str, ...] = SCALE_MODES) -> str:
    if scale_mode not in allowed:
        raise ValueError(f"scale_mode must be one of {allowed}, got {scale_mode!r}")
    return scale_mode  # type: ignore[return-value]


def muon_scale(scale_mode: str, size_out: int, size_in: int) -> float:
    if scale_mode == "shape_scaling":
        return math.sqrt(max(1.0, size_out / size_in))
    if scale_mode == "spectral":
        return math.sqrt(max(size_out, size_in))
    if scale_mode in ("unit_rms_norm", "rms_to_rms"):
        return math.sqrt(size_out / size_in)
    if scale_mode == "match_rms_adamw":
        return 0.2 * math.sqrt(max(size_out, size_in))
    raise ValueError(f"scale_mode must be one of {SCALE_MODES}, got {scale_mode!r}")
