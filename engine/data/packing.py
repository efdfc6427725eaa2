"""Documents -> rows of max_seq_len tokens -> batch tensors (the batch contract).

Packing needs only the documents' lengths, so every rank computes the same rows of a whole epoch
(about a second for a million documents) and then reads only its own. `pack_order` packs an
epoch's document order one of three ways (data.pack):
- best_fit: the order is cut into windows of data.pack_window documents; each window is packed
  best-fit decreasing (longest document first, each into the open row it leaves the least room in,
  a new row when none has room) and its rows are shuffled with their own seed, so that long and
  short rows mix. A row keeps its documents in the epoch's order.
- next_fit: documents fill a row in order; one that does not fit closes it and opens the next.
- none: one document per row.

Batch contract, every tensor [B, T] on the CPU with T == max_seq_len:
- input_ids  int64, padding = the tokenizer's pad id (<|endoftext|>)
- labels     int64, already shifted: labels[b, t] = input_ids[b, t + 1] when that token is
             trained, else -100; the last token of each document and all padding get -100,
             so nothing is ever predicted across a document boundary
- position_ids int64, position inside the token's own document (restarts at 0 per document)
- doc_ids    int64, 0, 1, 2, ... per document in the row; padding gets the next integer
- num_target_tokens  python int, labels != -100 in this batch
"""

from bisect import bisect_left
from typing import NamedTuple

import numpy as np
import torch

from engine.data.config import packing_mode
from engine.data.dataset import Document

IGNORE_INDEX = -100


def row_starts(lengths: np.ndarray, max_seq_len: int, pack: bool) -> np.ndarray:
    """Next-fit packing of documents of these lengths, in this order: [R + 1] int64 indices into the
    order, row r holding documents [starts[r], starts[r + 1]). Without `pack`, one document per row.
    Documents must already fit max_seq_len (preparation drops or truncates longer ones)."""
    n = len(lengths)
    if not pack:
        return np.arange(n + 1, dtype=np.int64)
    assert n == 0 or int(np.max(lengths)) <= max_seq_len, "documents longer than max_seq_len must be cut first"
    starts = [0]
    used = 0
    for i, length in enumerate(lengths.tolist()):
        if used + length > max_seq_len:
            starts.append(i)
            used = 0
        used += length
    starts.append(n)
    return np.asarray(starts, dtype=np.int64)


def best_fit_rows(lengths: np.ndarray, max_seq_len: int) -> tuple[np.ndarray, int]:
    """Best-fit decreasing of one window: (row of each document [n] int64, number of rows).

    Rows are numbered in the order they are opened. The open rows' free room is kept sorted, so a
    document finds its row by bisection: O(n log n) plus a short list move per document."""
    sizes = lengths.tolist()
    if not sizes:
        return np.zeros(0, dtype=np.int64), 0
    assert max(sizes) <= max_seq_len, "documents longer than max_seq_len must be cut first"
    smallest = min(sizes)
    row_of = [0] * len(sizes)
    room: list[int] = []  # free tokens of the open rows, ascending
    owner: list[int] = []  # the row of each entry of `room`
    rows = 0
    for i in np.argsort(-lengths, kind="stable").tolist():
        size = sizes[i]
        k = bisect_left(room, size)  # the fullest row it fits in
        if k == len(room):
            row, left = rows, max_seq_len - size
            rows += 1
        else:
            row, left = owner.pop(k), room.pop(k) - size
        row_of[i] = row
        if left >= smallest:  # a row no document of the window fits in any more is closed
            j = bisect_left(room, left)
            room.insert(j, left)
            owner.insert(j, row)
    return np.asarray(row_of, dtype=np.int64), rows


class PackedEpoch(NamedTuple):
    """Rows of an epoch: row r holds documents order[starts[r]:starts[r + 1]]; the rows of window w
    are window_rows[w] ... window_rows[w + 1] - 1 (one window for next_fit and none)."""

    order: np.ndarray  # [N] int64 document indices, row after row
    starts: np.ndarray  # [R + 1] int64 indices into `order`
    window_rows: np.ndarray  # [W + 1] int64 row indices


def pack_order(lengths: np.ndarray, order: np.ndarray, max_seq_len: int, pack: object = "best_fit",
               window: int = 4096, seed: tuple[int, ...] | None = None) -> PackedEpoch:
    """Pack the documents `order` [N] (indices into `lengths` [D]) into rows (module docstring).
    `pack` is data.pack; with `seed` (the order's seed and the epoch), window w's rows are shuffled
    by a generator of SeedSequence(seed, spawn_key=(w,)), else they keep the order best fit opened
    them in."""
    order = np.asarray(order, dtype=np.int64)
    n = len(order)
    mode = packing_mode(pack)
    if mode != "best_fit":
        starts = row_starts(lengths[order], max_seq_len, mode == "next_fit")
        return PackedEpoch(order, starts, np.asarray([0, len(starts) - 1], dtype=np.int64))
    row_ids = np.empty(n, dtype=np.int64)  # [N] the epoch row of each position of `order`
    window_rows = [0]
    for w, first in enumerate(range(0, n, window)):
        row_of, rows = best_fit_rows(lengths[order[first : first + window]], max_seq_len)
        if seed is not None:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(seed), spawn_key=(w,))))
            row_of = rng.permutation(rows)[row_of]
        row_ids[first : first + window] = window_rows[-1] + row_of
        window_rows.append(window_rows[-1] + rows)
    starts = np.zeros(window_rows[-1] + 1, dtype=np.int64)
    np.cumsum(np.bincount(row_ids, minlength=window_rows[-1]), out=starts[1:])
    # Stable: a row's documents keep the order they had in `order`.
    return PackedEpoch(order[np.argsort(row_ids, kind="stable")], starts, np.asarray(window_rows, dtype=np.int64))


def document_labels(doc: Document) -> np.ndarray:
    """Shifted targets of one document: [L] int64, the last position always IGNORE_INDEX."""
    labels = np.full(len(doc), IGNORE_INDEX, dtype=np.int64)
    labels[:-1] = np.where(doc.trained[1:], doc.input_ids[1:], IGNORE_INDEX)
    return labels


def collate(rows: list[list[Document]], max_seq_len: int, pad_id: int) -> dict[str, torch.Tensor | int]:
    """Rows of documents -> the batch contract above. An empty row is all padding."""
    shape = (len(rows), max_seq_len)
    input_ids = np.full(shape, pad_id, dtype=np.int64)  # [B, T]
    labels = np.full(shape, IGNORE_INDEX, dtype=np.int64)  # [B, T]
    position_ids = np.zeros(shape, dtype=np.int64)  # [B, T]
    doc_ids = np.zeros(shape, dtype=np.int64)  # [B, T]
    for b, row in enumerate(rows):
        start = 0
        for d, doc in enumerate(row):
            end = start + len(doc)
            input_ids[b, start:end] = doc.input_ids
            labels[b, start:end] = document_labels(doc)
            position_ids[b, start:end] = np.arange(len(doc))
            doc_ids[b, start:end] = d
            start = end
        # Padding is one more "document": it attends only to itself and carries no loss.
        position_ids[b, start:] = np.arange(max_seq_len - start)
        doc_ids[b, start:] = len(row)
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(position_ids),
        "doc_ids": torch.from_numpy(doc_ids),
        "num_target_tokens": int((labels != IGNORE_INDEX).sum()),
    }
