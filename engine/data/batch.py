"""What a data loader hands the training step: the `Batch` contract and the `Loader` protocol.

Every tensor of a batch is [B, T] int64 on the CPU (T == data.max_seq_len); `labels` are already shifted
and IGNORE_INDEX where nothing is trained, so the loss never predicts across a document boundary or
from padding. `engine/data/packing.py` builds them from documents; `engine/data/synthetic.py` from a
token stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

IGNORE_INDEX = -100  # a label the loss skips (torch's cross_entropy default)


@dataclass
class Batch:
    input_ids: torch.Tensor
    """[B, T] token ids; padding is the tokenizer's pad id."""
    labels: torch.Tensor
    """[B, T] the target at each position (input_ids[b, t + 1] when trained), else IGNORE_INDEX."""
    position_ids: torch.Tensor
    """[B, T] position inside the token's own document (restarts at 0 per document)."""
    doc_ids: torch.Tensor | None
    """[B, T] 0, 1, 2, ... per document of the row, padding the next integer; None: one document per row."""
    num_target_tokens: int
    """labels != IGNORE_INDEX in this batch (a Python int: no device sync to read it)."""

    def model_inputs(self, device: torch.device) -> dict[str, torch.Tensor | None]:
        """The model's keyword arguments, on `device`."""
        return {
            "input_ids": self.input_ids.to(device),
            "labels": self.labels.to(device),
            "position_ids": self.position_ids.to(device),
            "doc_ids": None if self.doc_ids is None else self.doc_ids.to(device),
        }


class Loader(Protocol):
    """This rank's stream of micro-batches of the global batches, resumable at any world size."""

    report: dict
    """What preparing the data kept, skipped and dropped (`data_*` keys), for the first metrics line."""

    def __next__(self) -> Batch: ...

    def state_dict(self) -> dict:
        """The stream's position, valid at any world size (JSON-serialisable)."""
        ...

    def load_state_dict(self, state: dict) -> None: ...

    def close(self) -> None:
        """Stop any background work."""
        ...
