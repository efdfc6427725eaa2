"""One global order of packed rows, the same for every layout; a Cursor is a position in it.

Epoch e's documents are permuted by a generator seeded with (seed, e) (or kept in store order
without shuffle) and packed into rows (packing.pack_order: best fit within windows of
data.pack_window documents, each window's rows shuffled with (seed, e, window); or next fit; or
one document per row). The epochs follow one another into one endless stream of rows, so the
stream, and with it every global batch, is a function of the prepared data, the data options and
the seed only: it knows nothing of ranks. A global batch is the next `global_batch_size` rows of
the stream; each rank reads its share of them (loader.py).

`Cursor(epoch, row)` is the whole state of the stream, and it is layout-free: a cursor saved by a
run on 2 ranks is the same position for a run on 4 ranks or on one. An epoch's rows are computed
again from its seed when a cursor needs them (about a second for a million documents), so a cursor
in the middle of a window resumes exactly.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from engine.data.config import DataConfig, packing_mode
from engine.data.packing import PackedEpoch, pack_order


@dataclass(frozen=True, order=True)
class Cursor:
    epoch: int = 0
    row: int = 0


class GlobalOrder:
    """Rows of the endless stream: `docs(cursor)` is the document indices of the row at `cursor`.
    `pack` is data.pack (best_fit, next_fit, or a bool: true = best_fit, false = unpacked)."""

    def __init__(self, lengths: np.ndarray, *, max_seq_len: int, pack: object, shuffle: bool, seed: int,
                 window: int = 4096) -> None:
        if len(lengths) == 0:
            raise ValueError("no documents to order")
        self.lengths = np.asarray(lengths)
        self.max_seq_len, self.pack, self.shuffle, self.seed = max_seq_len, packing_mode(pack), shuffle, seed
        self.window = window
        self._epochs: OrderedDict[int, PackedEpoch] = OrderedDict()

    def epoch(self, e: int) -> PackedEpoch:
        """The rows of epoch e (packing.PackedEpoch: document order, row starts, window rows)."""
        if e not in self._epochs:
            if self.shuffle:
                rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, e])))
                order = rng.permutation(len(self.lengths))
            else:
                order = np.arange(len(self.lengths))
            self._epochs[e] = pack_order(self.lengths, order, self.max_seq_len, self.pack, self.window,
                                         seed=(self.seed, e) if self.shuffle else None)
            # A batch spans at most two epochs; keep a few for cursors that look back.
            while len(self._epochs) > 3:
                self._epochs.popitem(last=False)
        return self._epochs[e]

    def rows_in(self, e: int) -> int:
        return len(self.epoch(e).starts) - 1

    def advance(self, cursor: Cursor, n: int) -> Cursor:
        """The cursor n rows further on, across epoch ends."""
        epoch, row = cursor.epoch, cursor.row + n
        while row >= self.rows_in(epoch):
            row -= self.rows_in(epoch)
            epoch += 1
        return Cursor(epoch, row)

    def docs(self, cursor: Cursor) -> np.ndarray:
        order, starts, _ = self.epoch(cursor.epoch)
        return order[starts[cursor.row] : starts[cursor.row + 1]]

    def packing_efficiency(self, e: int = 0) -> float:
        """Share of the rows' token slots that hold tokens (not padding) in epoch e."""
        return float(self.lengths.sum()) / (self.rows_in(e) * self.max_seq_len)

    def packing_report(self, e: int = 0) -> dict:
        """Rows of epoch e, their padding tokens and packing efficiency."""
        return packing_report(self.lengths, self.rows_in(e), self.max_seq_len)


def packing_report(lengths: np.ndarray, rows: int, max_seq_len: int) -> dict:
    slots = rows * max_seq_len
    tokens = int(np.sum(lengths))
    return {"rows": rows, "padding_tokens": slots - tokens, "packing_efficiency": tokens / slots}


def describe_packing(report: dict, cfg: DataConfig, seed: int) -> str:
    """One line for the logs: how the first epoch of `seed` packs under cfg."""
    how = {"best_fit": f"best_fit in windows of {cfg.pack_window} documents", "next_fit": "next_fit",
           "none": "one document per row"}[cfg.packing]
    return (f"packing ({how}, data seed {seed}, first epoch): {report['rows']} rows of {cfg.max_seq_len} tokens, "
            f"{report['padding_tokens']} padding tokens, packing efficiency {report['packing_efficiency']:.1%}")
