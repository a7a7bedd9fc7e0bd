import pytest

from dist_ortho import COEFFICIENT_SETS, COEFFICIENT_TYPES, get_coefficients
from tests.reference import CUSTOM, PUBLISHED, triples


def test_every_published_set_is_offered_with_its_published_values():
    assert set(COEFFICIENT_TYPES) == set(PUBLISHED) | {"custom"}
    for name, published in PUBLISHED.items():
        assert COEFFICIENT_SETS[name] == published, name


STEP_CASES = [(name, steps) for name in sorted(PUBLISHED) for steps in (1, 2, 5, 8, 13) if name != "cubic5" or steps == 5]


@pytest.mark.parametrize("name,steps", STEP_CASES)
def test_step_mapping(name, steps):
    """cubic5 takes exactly 5 steps (its other step counts are errors, tested below)."""
    assert get_coefficients(name, steps) == triples(name, steps)


def test_repeat_last_and_cycle_rules():
    pe = PUBLISHED["polar_express"]
    assert get_coefficients("polar_express", 10)[8:] == [pe[-1], pe[-1]]
    q = PUBLISHED["quintic"]
    assert get_coefficients("quintic", 7)[5:] == [q[0], q[1]]
    assert get_coefficients("deepseekv4", 3) == [(3.4445, -4.7750, 2.0315)] * 3


def test_custom_sets_cycle():
    assert get_coefficients("custom", 3, CUSTOM) == [CUSTOM[0], CUSTOM[1], CUSTOM[0]]


@pytest.mark.parametrize(
    "kwargs,error,needle",
    [
        ({"coefficient_type": "quintic", "steps": 0}, ValueError, "steps"),
        ({"coefficient_type": "quintic", "steps": 2.0}, TypeError, "steps"),
        ({"coefficient_type": "quintic", "steps": True}, TypeError, "steps"),
        ({"coefficient_type": "nope", "steps": 5}, ValueError, "coefficient_type"),
        ({"coefficient_type": "custom", "steps": 5}, ValueError, "custom_coefficient_sets"),
        ({"coefficient_type": "custom", "steps": 5, "custom_coefficient_sets": []}, ValueError, "empty"),
        ({"coefficient_type": "custom", "steps": 5, "custom_coefficient_sets": [(1, 2)]}, ValueError, "triple"),
        ({"coefficient_type": "custom", "steps": 5, "custom_coefficient_sets": [(1, 2, "x")]}, ValueError, "finite"),
        ({"coefficient_type": "custom", "steps": 5, "custom_coefficient_sets": [(1, 2, float("nan"))]}, ValueError, "finite"),
        ({"coefficient_type": "custom", "steps": 5, "custom_coefficient_sets": "abc"}, TypeError, "sequence"),
        ({"coefficient_type": "quintic", "steps": 5, "custom_coefficient_sets": CUSTOM}, ValueError, "custom"),
        ({"coefficient_type": "cubic5", "steps": 4}, ValueError, "exactly 5"),
    ],
)
def test_bad_arguments(kwargs, error, needle):
    with pytest.raises(error, match=needle):
        get_coefficients(**kwargs)
