"""Training and validation loaders: sampler -> encoder -> packer -> batches (see packing.py).

The training loader is an endless iterator of micro-batches (`next(loader)`; epochs roll over by
themselves, so every rank always has a next batch and no rank waits on another at an epoch end);
the trainer stops after max_steps and calls `close()`. Its state is one Cursor per rank: the first
record not yet in a yielded batch.
Because packing is next-fit and the record order is a pure function of (seed, epoch, rank), the
batches that follow a cursor are always the same, so `load_state_dict` resumes exactly.

A background thread (`prefetch`) renders, tokenizes and packs ahead into a bounded queue, so the
training step does not wait on the CPU; the state reported is that of the last batch handed out,
not of the batches waiting in the queue.
"""

import logging
import queue
import threading
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import TypeVar

from engine.data.config import DataConfig
from engine.data.dataset import DataError, DataStats, Document, DocumentEncoder, JsonlFile
from engine.data.packing import collate, pack_rows
from engine.data.sampler import Cursor, ShardedSampler
from engine.data.tokenizer import HarmonyTokenizer

log = logging.getLogger(__name__)

# Records handed to the tokenizer per call: large enough to amortise the call, small enough that
# the first batch comes quickly.
_CHUNK = 64

T = TypeVar("T")
Batch = dict


def prefetch(items: Iterator[T], depth: int) -> Iterator[T]:
    """Run `items` in a daemon thread, at most `depth` ahead; re-raise its errors here."""
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: tuple) -> bool:
        while not stop.is_set():
            try:
                buffer.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put(("item", item)):
                    return
        except BaseException as exc:  # handed to the consumer, which re-raises it
            put(("error", exc))
            return
        put(("done", None))

    thread = threading.Thread(target=work, name="data-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, payload = buffer.get()
            if kind == "done":
                return
            if kind == "error":
                raise payload
            yield payload
    finally:
        stop.set()
        thread.join()


class TrainLoader:
    """Endless, sharded, resumable micro-batches for one rank: an iterator (`next(loader)`)."""

    def __init__(
        self,
        cfg: DataConfig,
        tokenizer: HarmonyTokenizer,
        *,
        rank: int,
        world_size: int,
        micro_batch_size: int,
        seed: int,
    ) -> None:
        self.cfg = cfg
        self.pad_id = tokenizer.pad_id
        self.micro_batch_size = micro_batch_size
        self.path = cfg.resolved_train_path()
        self.file = JsonlFile(self.path)
        self.sampler = ShardedSampler(len(self.file), rank=rank, world_size=world_size, shuffle=cfg.shuffle, seed=seed)
        self.encoder = DocumentEncoder(cfg, tokenizer)
        self._cursor = Cursor()
        # (batch, cursor after it) pairs, opened lazily at the cursor by the first next().
        self._stream: Iterator[tuple[Batch, Cursor]] | None = None

    @property
    def stats(self) -> DataStats:
        return self.encoder.stats

    def state_dict(self) -> dict:
        """JSON-serialisable; one per rank (ranks pack different documents, so cursors differ)."""
        s = self.sampler
        return {
            "epoch": self._cursor.epoch,
            "position": self._cursor.position,
            "rank": s.rank,
            "world_size": s.world_size,
            "seed": s.seed,
            "shuffle": s.shuffle,
            "num_records": s.num_records,
        }

    def load_state_dict(self, state: dict) -> None:
        s = self.sampler
        for key, now in (("rank", s.rank), ("world_size", s.world_size), ("seed", s.seed),
                         ("shuffle", s.shuffle), ("num_records", s.num_records)):
            if state.get(key) != now:
                raise ValueError(
                    f"cannot resume the data order exactly: the checkpoint has {key} = {state.get(key)!r}, "
                    f"this run has {now!r} ({self.path})"
                )
        self.close()
        self._cursor = Cursor(int(state["epoch"]), int(state["position"]))

    def __iter__(self) -> "TrainLoader":
        return self

    def __next__(self) -> Batch:
        if self._stream is None:
            self._stream = self._batches(self._cursor)
            if self.cfg.prefetch > 0:
                self._stream = prefetch(self._stream, self.cfg.prefetch)
        try:
            batch, self._cursor = next(self._stream)
        except BaseException:
            # A failed stream is finished; the next call reopens it at the last good cursor.
            self.close()
            raise
        return batch

    def close(self) -> None:
        """Stop the prefetch thread; the next `next()` restarts from the current state."""
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def _documents(self, start: Cursor) -> Iterator[tuple[Cursor, Document]]:
        records = self.sampler.iterate(start)
        reported = False
        since_last_kept = 0
        while True:
            chunk = list(islice(records, _CHUNK))
            lines = self.file.read([index for _, index in chunk])
            for (cursor, _), doc in zip(chunk, self.encoder.encode(self.path, lines)):
                if cursor.epoch > start.epoch and not reported:
                    log.info("data rank %d, end of epoch %d: %s", self.sampler.rank, start.epoch, self.stats.summary())
                    reported = True
                if doc is None:
                    since_last_kept += 1
                    if since_last_kept >= self.sampler.per_rank:
                        raise DataError(f"{self.path}: a whole epoch without a usable record: {self.stats.summary()}")
                    continue
                since_last_kept = 0
                yield cursor, doc

    def _batches(self, start: Cursor) -> Iterator[tuple[Batch, Cursor]]:
        rows = pack_rows(self._documents(start), self.cfg.max_seq_len, self.cfg.pack)
        while True:
            group = list(islice(rows, self.micro_batch_size))
            batch = collate([row for row, _ in group], self.cfg.max_seq_len, self.pad_id)
            yield batch, group[-1][1]


class ValLoader:
    """One pass over a validation file in file order, the same number of batches on every rank.

    Rows are built once and cached (validation sets are small). They are dealt out round-robin and
    the last round is topped up with all-padding rows (no targets), so that collective ops per
    batch stay matched across ranks; sum losses and target counts, then divide once.
    """

    def __init__(
        self,
        cfg: DataConfig,
        tokenizer: HarmonyTokenizer,
        path: Path,
        *,
        rank: int,
        world_size: int,
        micro_batch_size: int,
    ) -> None:
        self.cfg = cfg
        self.pad_id = tokenizer.pad_id
        self.path = Path(path)
        self.rank = rank
        self.world_size = world_size
        self.micro_batch_size = micro_batch_size
        self.file = JsonlFile(self.path)
        self.encoder = DocumentEncoder(cfg, tokenizer)
        self._rows: list[list[Document]] | None = None

    @property
    def stats(self) -> DataStats:
        return self.encoder.stats

    def _all_rows(self) -> list[list[Document]]:
        if self._rows is None:
            indices = range(len(self.file))
            docs = self.encoder.encode(self.path, self.file.read(indices))
            kept = ((i, doc) for i, doc in zip(indices, docs) if doc is not None)
            self._rows = [row for row, _ in pack_rows(kept, self.cfg.max_seq_len, self.cfg.pack)]
            log.info("validation data %s: %s", self.path, self.stats.summary())
        return self._rows

    def __len__(self) -> int:
        per_round = self.micro_batch_size * self.world_size
        return -(-len(self._all_rows()) // per_round)

    def __iter__(self) -> Iterator[Batch]:
        rows = self._all_rows()
        mb = self.micro_batch_size
        for j in range(len(self)):
            start = (j * self.world_size + self.rank) * mb
            group = rows[start : start + mb]
            yield collate(group + [[] for _ in range(mb - len(group))], self.cfg.max_seq_len, self.pad_id)


def build_train_loader(
    cfg: DataConfig,
    tokenizer: HarmonyTokenizer,
    *,
    rank: int = 0,
    world_size: int = 1,
    micro_batch_size: int | None = None,
    seed: int | None = None,
) -> TrainLoader:
    """The training stream of this rank. `micro_batch_size` defaults to the config's; the data
    order seed is `cfg.seed` when set, else `seed` (the trainer's), else 0."""
    cfg.validate()
    order_seed = cfg.seed if cfg.seed is not None else (seed if seed is not None else 0)
    return TrainLoader(cfg, tokenizer, rank=rank, world_size=world_size,
                       micro_batch_size=micro_batch_size or cfg.micro_batch_size, seed=order_seed)


def build_val_loader(
    cfg: DataConfig,
    tokenizer: HarmonyTokenizer,
    *,
    rank: int = 0,
    world_size: int = 1,
    micro_batch_size: int | None = None,
) -> ValLoader | None:
    """The validation pass of this rank, or None when the config has no validation file."""
    cfg.validate()
    path = cfg.resolved_val_path()
    if path is None:
        return None
    return ValLoader(cfg, tokenizer, path, rank=rank, world_size=world_size,
                     micro_batch_size=micro_batch_size or cfg.micro_batch_size)
