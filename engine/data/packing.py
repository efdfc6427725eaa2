"""Documents -> rows of max_seq_len tokens -> batch tensors (the batch contract).

Packing is next-fit: documents fill a row in stream order and a document that does not fit
closes the row and opens the next one. Unlike first-fit over a buffer, a row then depends only on
the documents from its first one onward, so the key of "the first document not yet in a row" is
an exact resume point (see loader.py).

Batch contract, every tensor [B, T] on the CPU with T == max_seq_len:
- input_ids  int64, padding = the tokenizer's pad id (<|endoftext|>)
- labels     int64, already shifted: labels[b, t] = input_ids[b, t + 1] when that token is
             trained, else -100; the last token of each document and all padding get -100,
             so nothing is ever predicted across a document boundary
- position_ids int64, position inside the token's own document (restarts at 0 per document)
- doc_ids    int64, 0, 1, 2, ... per document in the row; padding gets the next integer
- num_target_tokens  python int, labels != -100 in this batch
"""

from collections.abc import Iterable, Iterator
from typing import TypeVar

import numpy as np
import torch

from engine.data.dataset import Document

IGNORE_INDEX = -100

K = TypeVar("K")


def pack_rows(
    documents: Iterable[tuple[K, Document]], max_seq_len: int, pack: bool
) -> Iterator[tuple[list[Document], K | None]]:
    """Yield (row, key of the first document after it); the key is None after the last row.

    A row is emitted only when the next document arrives, so its key is known; documents must
    already fit max_seq_len (the encoder drops or truncates longer ones).
    """
    row: list[Document] = []
    used = 0
    for key, doc in documents:
        assert len(doc) <= max_seq_len, "documents longer than max_seq_len must be dropped or truncated first"
        if row and (not pack or used + len(doc) > max_seq_len):
            yield row, key
            row, used = [], 0
        row.append(doc)
        used += len(doc)
    if row:
        yield row, None


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
