import pytest

from dist_ortho.tp.newton_schulz import matmul_precision
from tests.harness import started_world

WORLD_SIZES = (1, 2, 4)


@pytest.fixture
def highest_precision():
    """float32 matmuls at "highest" precision for the test (the previous setting restored after)."""
    with matmul_precision("highest"):
        yield


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda n: f"world{n}")
def world(request):
    """Worker processes for this module at one world size (started once per module and size)."""
    with started_world(request.param) as w:
        yield w


def pytest_collection_modifyitems(config, items):
    """Tests marked slow run only with DIST_ORTHO_SLOW=1; elsewhere they are skipped with the reason printed."""
    import os

    if os.environ.get("DIST_ORTHO_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow (world 8 on 2 cores): run with DIST_ORTHO_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def pytest_runtest_setup(item):
    """Tests marked gpu are skipped, with the reason printed, where CUDA is not available."""
    if "gpu" in item.keywords:
        import torch

        if not torch.cuda.is_available():
            pytest.skip("gpu test: torch.cuda.is_available() is False (scripts/gpu_check.sh runs them on a GPU)")
