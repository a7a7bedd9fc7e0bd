"""Published Newton-Schulz coefficient sets and the rule that maps them onto a number of steps.

Each set is a list of (a, b, c) for the odd polynomial  X <- a X + b (X X^T) X + c (X X^T)^2 X.
Sets tuned per step (``polar_express``, ``polar_express_safer``, ``cans``, ``deepseekv4``) repeat
their last triple when more steps are asked for; the others cycle. Fewer steps truncate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, get_args

CoefficientType = Literal[
    "simple",
    "quintic",
    "polar_express",
    "polar_express_safer",
    "cans",
    "aol",
    "deepseekv4",
    "cubic5",
    "custom",
]
COEFFICIENT_TYPES: tuple[str, ...] = get_args(CoefficientType)

Triple = tuple[float, float, float]

COEFFICIENT_SETS: dict[str, list[Triple]] = {
    # Keller Jordan, Muon.
    "simple": [(3.4445, -4.7750, 2.0315)],
    "quintic": [
        (4.0848, -6.8946, 2.9270),
        (3.9505, -6.3029, 2.6377),
        (3.7418, -5.5913, 2.3037),
        (2.8769, -3.1427, 1.2046),
        (2.8366, -3.0525, 1.2012),
    ],
    # Amsel et al., "The Polar Express", arXiv 2505.16932; safety factor 1.01 folded in.
    "polar_express": [
        (8.2051, -22.9019, 16.4607),
        (4.0664, -2.8612, 0.5184),
        (3.9096, -2.8234, 0.5250),
        (3.2856, -2.4153, 0.4853),
        (2.2779, -1.6198, 0.3985),
        (1.8726, -1.2307, 0.3585),
        (1.8564, -1.2132, 0.3568),
        (1.8750, -1.2500, 0.3750),
    ],
    # Polar Express with safety 2e-2, as used in modded-nanogpt.
    "polar_express_safer": [
        (8.156554524902461, -22.48329292557795, 15.878769915207462),
        (4.0429299351667245, -2.808917465908704, 0.5000178451051299),
        (3.8916678022926563, -2.7724841532176825, 0.5060648178503389),
        (3.285753657755658, -2.3681294933425394, 0.46449024233003117),
        (2.3005307116270983, -1.6111665557258408, 0.3833374427545273),
        (1.8631210546382593, -1.2042160621002727, 0.3421879560523383),
        (1.8382572152247512, -1.1779263289537742, 0.3396513038637379),
        (1.8749999923301852, -1.2499999836060613, 0.374999991275876),
    ],
    "cans": [
        (8.4703, -25.1081, 18.6293),
        (4.1828, -3.1087, 0.5806),
        (3.9619, -2.9541, 0.5630),
        (3.2866, -2.4647, 0.5074),
        (2.2737, -1.6447, 0.4162),
    ],
    "aol": [
        (4.0098, -7.0585, 2.4635),
        (3.4585, -5.5479, 2.5959),
        (2.7573, -3.2939, 1.4254),
        (2.7215, -3.0494, 1.3169),
    ],
    "deepseekv4": [(3.4445, -4.7750, 2.0315)] * 8 + [(2.0, -1.5, 0.5)] * 2,
    # Cubic (c = 0), tuned for exactly five steps.
    "cubic5": [
        (3.3656576, -3.3420992, 0.0),
        (2.5744352, -1.4957376, 0.0),
        (2.5368962, -1.4312570, 0.0),
        (2.4418906, -1.2764040, 0.0),
        (2.2230472, -0.9630650, 0.0),
    ],
}

REPEAT_LAST: frozenset[str] = frozenset({"polar_express", "polar_express_safer", "cans", "deepseekv4"})
EXACT_STEPS: dict[str, int] = {"cubic5": 5}


def validate_steps(steps: object) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"steps must be an int >= 1, got {type(steps).__name__} {steps!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return steps


def _validate_custom(custom_coefficient_sets: object) -> list[Triple]:
    if custom_coefficient_sets is None:
        raise ValueError('coefficient_type="custom" needs custom_coefficient_sets, a non-empty list of (a, b, c)')
    if isinstance(custom_coefficient_sets, (str, bytes)) or not isinstance(custom_coefficient_sets, Sequence):
        raise TypeError(
            "custom_coefficient_sets must be a sequence of (a, b, c) triples, "
            f"got {type(custom_coefficient_sets).__name__}"
        )
    if len(custom_coefficient_sets) == 0:
        raise ValueError("custom_coefficient_sets must hold at least one (a, b, c) triple, got an empty sequence")
    triples: list[Triple] = []
    for i, triple in enumerate(custom_coefficient_sets):
        if isinstance(triple, (str, bytes)) or not isinstance(triple, Sequence) or len(triple) != 3:
            raise ValueError(f"custom_coefficient_sets[{i}] must be an (a, b, c) triple, got {triple!r}")
        for value in triple:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"custom_coefficient_sets[{i}] must hold three finite numbers, got {triple!r}")
        triples.append((float(triple[0]), float(triple[1]), float(triple[2])))
    return triples


def get_coefficients(
    coefficient_type: str,
    steps: int,
    custom_coefficient_sets: Sequence[Sequence[float]] | None = None,
) -> list[Triple]:
    """The ``steps`` triples that ``coefficient_type`` gives, after validating every argument."""
    steps = validate_steps(steps)
    if coefficient_type not in COEFFICIENT_TYPES:
        raise ValueError(f"coefficient_type must be one of {COEFFICIENT_TYPES}, got {coefficient_type!r}")
    if coefficient_type == "custom":
        base = _validate_custom(custom_coefficient_sets)
    else:
        if custom_coefficient_sets is not None:
            raise ValueError(
                f'custom_coefficient_sets is only read with coefficient_type="custom", got {coefficient_type!r}'
            )
        base = COEFFICIENT_SETS[coefficient_type]
    required = EXACT_STEPS.get(coefficient_type)
    if required is not None and steps != required:
        raise ValueError(f"coefficient_type={coefficient_type!r} is tuned for exactly {required} steps, got steps={steps}")
    if coefficient_type in REPEAT_LAST:
        return [base[min(i, len(base) - 1)] for i in range(steps)]
    return [base[i % len(base)] for i in range(steps)]
