"""Deterministic, distributed, resumable order of record indices.

Epoch e's global order is a permutation seeded by (seed, e), or the file order without shuffle.
Rank r takes every world_size-th record of it, after cutting the tail so that every rank gets
the same count: the ranks are disjoint and their epochs stay aligned. The tail that is cut
changes from epoch to epoch when shuffling, so no record is left out for good.

A `Cursor` (epoch, position in this rank's order) is the whole state: the order is a pure
function of (seed, epoch, rank, world_size), so iteration from a cursor replays exactly.
"""

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, order=True)
class Cursor:
    epoch: int = 0
    position: int = 0


class ShardedSampler:
    def __init__(self, num_records: int, *, rank: int, world_size: int, shuffle: bool, seed: int) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size = {world_size})")
        if num_records < world_size:
            raise ValueError(
                f"the data has {num_records} records, fewer than the world size {world_size}: "
                "every rank needs at least one"
            )
        self.num_records = num_records
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.seed = seed
        self.per_rank = num_records // world_size

    def order(self, epoch: int) -> np.ndarray:
        """This rank's record indices for `epoch`: [per_rank] int64."""
        if self.shuffle:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
            everything = rng.permutation(self.num_records)
        else:
            everything = np.arange(self.num_records)
        return everything[: self.per_rank * self.world_size][self.rank :: self.world_size]

    def iterate(self, start: Cursor) -> Iterator[tuple[Cursor, int]]:
        """(cursor of the record, record index), forever, from `start` on."""
        epoch, position = start.epoch, start.position
        while True:
            if position >= self.per_rank:
                epoch, position = epoch + 1, 0
            order = self.order(epoch)
            for p in range(position, self.per_rank):
                yield Cursor(epoch, p), int(order[p])
            position = self.per_rank
