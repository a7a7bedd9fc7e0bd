import pytest

from tests.harness import World, unavailable_reason

WORLD_SIZES = (1, 2, 4)


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda n: f"world{n}")
def world(request):
    """Worker processes for this module at one world size (started once per module and size)."""
    reason = unavailable_reason(request.param)
    if reason:
        pytest.skip(reason)
    w = World(request.param)
    yield w
    w.close()
