"""Next-fit packing and the batch tensors: positions, doc ids, shifted labels, no cross-document targets."""

import numpy as np
import torch

from engine.data.dataset import Document
from engine.data.packing import IGNORE_INDEX, collate, pack_rows

PAD = 99


def doc(ids: list[int], trained: list[int]) -> Document:
    return Document(np.asarray(ids, dtype=np.int64), np.asarray(trained, dtype=bool))


A = doc([10, 11, 12, 13], [0, 0, 1, 1])
B = doc([20, 21, 22], [0, 1, 1])
C = doc([30, 31, 32, 33, 34], [0, 0, 0, 1, 1])


def test_next_fit_rows_and_resume_keys():
    rows = list(pack_rows([("a", A), ("b", B), ("c", C)], max_seq_len=8, pack=True))
    assert [[len(d) for d in row] for row, _ in rows] == [[4, 3], [5]]
    # Each row's key is the first document not in it: where a resumed stream must start.
    assert [key for _, key in rows] == ["c", None]


def test_exact_fill_and_unpacked_rows():
    rows = list(pack_rows([(0, A), (1, A), (2, B)], max_seq_len=8, pack=True))
    assert [[len(d) for d in row] for row, _ in rows] == [[4, 4], [3]] and rows[0][1] == 2
    rows = list(pack_rows([(0, A), (1, B)], max_seq_len=8, pack=False))
    assert [[len(d) for d in row] for row, _ in rows] == [[4], [3]] and [k for _, k in rows] == [1, None]


def test_collate_packed_row():
    batch = collate([[A, B], [C]], max_seq_len=9, pad_id=PAD)
    for key in ("input_ids", "labels", "position_ids", "doc_ids"):
        assert batch[key].dtype == torch.int64 and batch[key].shape == (2, 9)
    assert batch["input_ids"][0].tolist() == [10, 11, 12, 13, 20, 21, 22, PAD, PAD]
    # labels[t] = input_ids[t + 1] where that token is trained; -100 at each document's last token.
    x = IGNORE_INDEX
    assert batch["labels"][0].tolist() == [x, 12, 13, x, 21, 22, x, x, x]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1]
    assert batch["doc_ids"][0].tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2]
    assert batch["labels"][1].tolist() == [x, x, 33, 34, x, x, x, x, x]
    assert batch["doc_ids"][1].tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1]
    assert batch["num_target_tokens"] == 6


def test_no_target_crosses_a_document_boundary():
    # Every token trained: the first token of the next document must still not be a target.
    full = doc([1, 2, 3], [1, 1, 1])
    batch = collate([[full, full]], max_seq_len=6, pad_id=PAD)
    assert batch["labels"][0].tolist() == [2, 3, IGNORE_INDEX, 2, 3, IGNORE_INDEX]


def test_empty_row_is_all_padding():
    batch = collate([[]], max_seq_len=4, pad_id=PAD)
    assert batch["input_ids"].tolist() == [[PAD] * 4]
    assert batch["labels"].tolist() == [[IGNORE_INDEX] * 4]
    assert batch["num_target_tokens"] == 0
