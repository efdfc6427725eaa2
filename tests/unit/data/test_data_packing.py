"""Next-fit packing (row boundaries) and the batch tensors: positions, doc ids, shifted labels, no
cross-document targets."""

import numpy as np
import torch

from engine.data.batch import IGNORE_INDEX
from engine.data.dataset import Document
from engine.data.packing import collate, row_starts

PAD = 99


def doc(ids: list[int], trained: list[int]) -> Document:
    return Document(np.asarray(ids, dtype=np.int64), np.asarray(trained, dtype=bool))


A = doc([10, 11, 12, 13], [0, 0, 1, 1])
B = doc([20, 21, 22], [0, 1, 1])
C = doc([30, 31, 32, 33, 34], [0, 0, 0, 1, 1])


def test_next_fit_row_starts():
    # Lengths 4, 3, 5 into rows of 8: [A B] [C]; an exact fill closes the row; unpacked: one per row.
    assert row_starts(np.array([4, 3, 5]), max_seq_len=8, pack=True).tolist() == [0, 2, 3]
    assert row_starts(np.array([4, 4, 3]), max_seq_len=8, pack=True).tolist() == [0, 2, 3]
    assert row_starts(np.array([8, 1, 7, 2]), max_seq_len=8, pack=True).tolist() == [0, 1, 3, 4]
    assert row_starts(np.array([4, 3]), max_seq_len=8, pack=False).tolist() == [0, 1, 2]


def test_next_fit_against_a_plain_reference():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 65, size=500)
    rows, row = [], []
    for i, n in enumerate(lengths):  # the textbook next-fit, one document at a time
        if row and sum(lengths[row]) + n > 64:
            rows.append(row)
            row = []
        row.append(i)
    rows.append(row)
    starts = row_starts(lengths, max_seq_len=64, pack=True)
    assert [list(range(a, b)) for a, b in zip(starts[:-1], starts[1:])] == rows


def test_collate_packed_row():
    batch = collate([[A, B], [C]], max_seq_len=9, pad_id=PAD)
    for key in ("input_ids", "labels", "position_ids", "doc_ids"):
        assert getattr(batch, key).dtype == torch.int64 and getattr(batch, key).shape == (2, 9)
    assert batch.input_ids[0].tolist() == [10, 11, 12, 13, 20, 21, 22, PAD, PAD]
    # labels[t] = input_ids[t + 1] where that token is trained; -100 at each document's last token.
    x = IGNORE_INDEX
    assert batch.labels[0].tolist() == [x, 12, 13, x, 21, 22, x, x, x]
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1]
    assert batch.doc_ids[0].tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2]
    assert batch.labels[1].tolist() == [x, x, 33, 34, x, x, x, x, x]
    assert batch.doc_ids[1].tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1]
    assert batch.num_target_tokens == 6


def test_no_target_crosses_a_document_boundary():
    # Every token trained: the first token of the next document must still not be a target.
    full = doc([1, 2, 3], [1, 1, 1])
    batch = collate([[full, full]], max_seq_len=6, pad_id=PAD)
    assert batch.labels[0].tolist() == [2, 3, IGNORE_INDEX, 2, 3, IGNORE_INDEX]


def test_empty_row_is_all_padding():
    batch = collate([[]], max_seq_len=4, pad_id=PAD)
    assert batch.input_ids.tolist() == [[PAD] * 4]
    assert batch.labels.tolist() == [[IGNORE_INDEX] * 4]
    assert batch.num_target_tokens == 0
