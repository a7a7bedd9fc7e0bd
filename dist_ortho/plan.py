"""The cost model of ``tp_mode="auto"`` (it lives in :mod:`dist_ortho.tp.cost`; this name is kept for users)."""

from dist_ortho.tp.cost import (  # noqa: F401
    AUTO_CANDIDATES,
    DEFAULT_PROFILES,
    CostProfile,
    choose_mode,
    cost_profile,
    format_plan,
    job_costs,
    mode_costs,
    set_cost_profile,
)
