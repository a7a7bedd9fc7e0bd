import pytest
import torch

from dist_ortho.parameters.qkv import qkv_parts, qkv_split_shapes
from tests.qkv_reference import split_components


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_parts_are_each_ranks_contiguous_block_of_each_component(tp, gated):
    """Label every global row with its (component, position); shard the rows over tp ranks; each rank's
    parts must be exactly its rows of each component, a contiguous block in the component's order."""
    shapes = qkv_split_shapes(8, 2, 4, gated=gated)  # ng = 2: tp 4 and 8 split groups across ranks
    rows = 2 * sum(shapes)
    labels = torch.arange(rows, dtype=torch.float64)[:, None]
    components = split_components(labels, shapes)
    rank_rows = [rows // tp] * tp
    for rank in range(tp):
        local = labels[rank * rows // tp : (rank + 1) * rows // tp]
        parts = qkv_parts(rank_rows, rank, shapes)
        for c, part in enumerate(parts):
            start = sum(part.sizes[:rank])
            expected = components[c][start : start + part.sizes[rank]]
            assert torch.equal(local[part.index], expected)
            assert part.rows == components[c].size(0) and sum(part.sizes) == part.rows


def test_split_shapes():
    assert qkv_split_shapes(8, 2, 16) == [64, 16, 16]
    assert qkv_split_shapes(8, 2, 16, gated=True) == [64, 64, 16, 16]
    with pytest.raises(ValueError, match="multiple of num_query_groups"):
        qkv_split_shapes(6, 4, 16)


def test_rows_not_divisible_name_the_parameter():
    with pytest.raises(ValueError, match="layer.qkv.*not a multiple"):
        qkv_parts([10], 0, [4, 2, 2], name="layer.qkv")
    with pytest.raises(ValueError, match="positive"):
        qkv_parts([8], 0, [4, 0, 4])
