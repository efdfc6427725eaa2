"""Documents -> rows of max_seq_len tokens -> batch tensors (the batch contract).

Packing is next-fit over the global document order of an epoch (sampler.py): documents fill a
row in order and a document that does not fit closes the row and opens the next one. It needs
only the documents' lengths, so every rank computes the same rows of the whole epoch in well under
a second for a million documents, and then reads only its own.

Batch contract, every tensor [B, T] on the CPU with T == max_seq_len:
- input_ids  int64, padding = the tokenizer's pad id (<|endoftext|>)
- labels     int64, already shifted: labels[b, t] = input_ids[b, t + 1] when that token is
             trained, else -100; the last token of each document and all padding get -100,
             so nothing is ever predicted across a document boundary
- position_ids int64, position inside the token's own document (restarts at 0 per document)
- doc_ids    int64, 0, 1, 2, ... per document in the row; padding gets the next integer
- num_target_tokens  python int, labels != -100 in this batch
"""

import numpy as np
import torch

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
