"""A learnable synthetic token stream for smoke runs that need no files.

Each row is an arithmetic progression modulo a small sub-vocabulary (the first `SUBVOCAB` ids),
with a random start and a stride from a small set: after a few tokens the next one is fully
predictable, so the loss visibly falls within a few dozen steps.
Sample i of the stream depends only on (seed, i), which makes resume exact.
"""

from __future__ import annotations

import torch

from engine.data.batch import Batch

STRIDES = (1, 2, 3, 5, 7)
SUBVOCAB = 64


class SyntheticLoader:
    """A Loader (engine/data/batch.py) of the synthetic stream: rank `rank` of `world_size` data ranks."""

    report: dict = {}  # no files: nothing prepared, skipped or dropped

    def __init__(
        self, vocab_size: int, seq_len: int, micro_batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ):
        self.vocab_size, self.seq_len, self.micro_batch_size = vocab_size, seq_len, micro_batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.next_micro_batch = 0  # per-rank micro-batches already handed out

    def _row(self, index: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        modulus = min(SUBVOCAB, self.vocab_size)
        start = int(torch.randint(0, modulus, (1,), generator=g))
        stride = STRIDES[int(torch.randint(0, len(STRIDES), (1,), generator=g))]
        return (start + stride * torch.arange(self.seq_len + 1)) % modulus

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        # Global micro-batch m covers rows [m*B*world, (m+1)*B*world); this rank takes its slice.
        m, b = self.next_micro_batch, self.micro_batch_size
        first = (m * self.world_size + self.rank) * b
        rows = torch.stack([self._row(first + i) for i in range(b)])  # [B, T+1]
        self.next_micro_batch += 1
        t = self.seq_len
        return Batch(
            input_ids=rows[:, :-1].contiguous(),
            labels=rows[:, 1:].contiguous(),
            position_ids=torch.arange(t).expand(b, t).contiguous(),
            doc_ids=None,
            num_target_tokens=b * t,
        )

    def close(self) -> None:
        pass

    def state_dict(self) -> dict:
        # The global row count is what is layout-free: a resume on another number of ranks continues
        # the same stream from it.
        return {
            "next_micro_batch": self.next_micro_batch,
            "rows_consumed": self.next_micro_batch * self.micro_batch_size * self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        if "rows_consumed" not in state:
            self.next_micro_batch = int(state["next_micro_batch"])
            return
        rows, per_micro_batch = int(state["rows_consumed"]), self.micro_batch_size * self.world_size
        if rows % per_micro_batch:
            raise ValueError(
                f"cannot continue the synthetic stream: {rows} rows were consumed, not a multiple of "
                f"data.micro_batch_size x world size = {per_micro_batch}"
            )
        self.next_micro_batch = rows // per_micro_batch
