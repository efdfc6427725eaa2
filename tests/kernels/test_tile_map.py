"""The device-built tile list matches a per-expert Python loop, without reading counts on the host."""

import pytest
import torch
from kernel_cases import GROUP_CASES, counts_of

from gptoss_kernels.reference import tile_map_reference
from gptoss_kernels.tile_map import build_layout, choose_block_m


def _check(counts, num_rows, block_m):
    layout = build_layout(counts, num_rows, block_m)
    offsets, tiles = tile_map_reference(counts.cpu(), num_rows, block_m)
    assert layout.offsets.tolist() == offsets
    expert, row = layout.tile_expert.tolist(), layout.tile_row.tolist()
    n = len(tiles)
    assert list(zip(expert[:n], row[:n])) == tiles
    assert all(e == -1 for e in expert[n:]), "tiles past the real count must be padding"
    assert layout.num_tiles.tolist() == [n], "the persistent grid loops over exactly the real tiles"


@pytest.mark.parametrize("case", sorted(GROUP_CASES))
@pytest.mark.parametrize("block_m", [16, 32])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_tile_map_matches_reference(case, block_m, dtype):
    sizes = GROUP_CASES[case]
    _check(counts_of(sizes, dtype), sum(sizes), block_m)


def test_tile_map_many_experts_and_chunks():
    # 40 experts (BLOCK_E 64) and more tiles than one 128-tile chunk of the kernel's loop.
    g = torch.Generator().manual_seed(0)
    sizes = torch.randint(0, 60, (40,), generator=g)
    sizes[::7] = 0
    _check(counts_of(sizes.tolist()), int(sizes.sum()), 16)


def test_counts_beyond_rows_are_clamped():
    # sum(counts) > rows is a caller bug; it must not make the kernels index out of bounds.
    layout = build_layout(counts_of([10, 10, 10]), 25, 16)
    assert layout.offsets.tolist() == [0, 10, 20, 25]
    _check(counts_of([10, 10, 10]), 25, 16)


def test_block_m_follows_rows_per_expert():
    assert choose_block_m(32 * 8, 32) == 16
    assert choose_block_m(32 * 64, 32) == 64
    assert choose_block_m(65536, 32) == 128


def test_bad_counts_raise():
    with pytest.raises(ValueError, match="int32/int64"):
        build_layout(counts_of([1, 2]).float(), 3, 16)
    with pytest.raises(ValueError, match="at least one expert"):
        build_layout(counts_of([]), 0, 16)
