"""The record order: deterministic, disjoint across ranks, replayable from a cursor."""

from itertools import islice

import numpy as np
import pytest

from engine.data.sampler import Cursor, ShardedSampler


def sampler(rank: int = 0, world_size: int = 1, *, n: int = 23, shuffle: bool = True, seed: int = 7) -> ShardedSampler:
    return ShardedSampler(n, rank=rank, world_size=world_size, shuffle=shuffle, seed=seed)


def test_same_seed_same_order_other_seed_or_epoch_differs():
    assert np.array_equal(sampler().order(0), sampler().order(0))
    assert not np.array_equal(sampler().order(0), sampler(seed=8).order(0))
    assert not np.array_equal(sampler().order(0), sampler().order(1))
    assert sorted(sampler().order(3).tolist()) == list(range(23))


def test_no_shuffle_is_file_order():
    assert sampler(shuffle=False).order(5).tolist() == list(range(23))
    assert sampler(1, 2, shuffle=False).order(0).tolist() == list(range(1, 22, 2))


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_ranks_are_disjoint_and_equal_sized(world_size):
    for epoch in range(3):
        orders = [sampler(r, world_size).order(epoch) for r in range(world_size)]
        assert len({len(o) for o in orders}) == 1 and len(orders[0]) == 23 // world_size
        flat = np.concatenate(orders)
        assert len(set(flat.tolist())) == len(flat)


def test_iteration_rolls_over_epochs_and_replays_from_any_cursor():
    s = sampler(1, 2)
    stream = list(islice(s.iterate(Cursor()), 30))
    assert stream[0][0] == Cursor(0, 0) and stream[11][0] == Cursor(1, 0)
    assert [i for _, i in stream[:11]] == s.order(0).tolist()
    for k in (0, 5, 11, 17):
        replay = list(islice(s.iterate(stream[k][0]), 30 - k))
        assert replay == stream[k:]
    # A cursor at the end of an epoch is the start of the next one.
    assert next(s.iterate(Cursor(0, 11))) == stream[11]


def test_bad_layout_is_rejected():
    with pytest.raises(ValueError, match="fewer than the world size 8"):
        sampler(n=5, world_size=8)
    with pytest.raises(ValueError, match="rank 2 is not in"):
        sampler(rank=2, world_size=2)
