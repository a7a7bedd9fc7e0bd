"""Plan Newton-Schulz under TP x DP before launching: ``python -m dist_ortho.plan --help``.

The cost model of ``tp_mode="auto"`` lives in :mod:`dist_ortho.tp.cost` and is re-exported here; the
planner (:func:`estimate`) adds it up over a whole model with the real home and owner assignments.
"""

from dist_ortho.plan.devices import PROFILES, DeviceProfile, load_profile
from dist_ortho.plan.estimate import ANCHORS, MODES, Estimate, Layout, Settings, estimate
from dist_ortho.plan.models import PRESETS, ModelSpec, Weight, from_hf_config, from_megatron_args, preset
from dist_ortho.tp.cost import (
    AUTO_CANDIDATES,
    DEFAULT_PROFILES,
    CostProfile,
    Counts,
    choose_mode,
    cost_profile,
    format_plan,
    job_costs,
    matrix_counts,
    mode_costs,
    set_cost_profile,
)

__all__ = [
    "ANCHORS", "AUTO_CANDIDATES", "DEFAULT_PROFILES", "MODES", "PRESETS", "PROFILES", "CostProfile", "Counts",
    "DeviceProfile", "Estimate", "Layout", "ModelSpec", "Settings", "Weight", "choose_mode", "cost_profile",
    "estimate", "format_plan", "from_hf_config", "from_megatron_args", "job_costs", "load_profile",
    "matrix_counts", "mode_costs", "preset", "set_cost_profile",
]
