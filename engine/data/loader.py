"""Training and validation loaders: prepared store -> global row order -> this rank's batches.

The training loader is an endless iterator of micro-batches (`next(loader)`; epochs roll over by
themselves, so every rank always has a next batch and no rank waits on another at an epoch end);
the trainer stops after max_steps and calls `close()`. Micro-round k of the run covers rows
[k * W * B, (k + 1) * W * B) of the global stream (sampler.py; W ranks, B rows per micro-batch), and
rank r reads rows r * B ... r * B + B - 1 of it. A global batch is then always the same rows in the
same order, whatever W and B, and the trainer's loss (summed over the global batch, divided by its
target-token count) is the same number at any layout, up to the order of fp32 sums.

The state is the global position of the next micro-round, a `Cursor` (epoch, row), saved as a
small JSON-able dict with the options the order depends on; at a step boundary it names the first
row of the next global batch, so a checkpoint resumes at any world size. A background thread
(`prefetch`) reads and collates ahead into a bounded queue; the state reported is that of the last
batch handed out.
"""

import logging
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np

from engine.data.config import DataConfig
from engine.data.dataset import DataError, Document
from engine.data.packing import collate, pack_order
from engine.data.sampler import Cursor, GlobalOrder, describe_packing, packing_report
from engine.data.store import MANIFEST, TokenStore
from engine.data.tokenizer import HarmonyTokenizer

log = logging.getLogger(__name__)

T = TypeVar("T")
Batch = dict
# What a cursor is only meaningful with: the same stored data, packed and ordered the same way.
_ORDER_KEYS = ("store", "seed", "shuffle", "pack", "pack_window", "max_seq_len")


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
    """Endless, resumable micro-batches of one rank's share of the global batches."""

    def __init__(self, store: TokenStore, cfg: DataConfig, pad_id: int, *, rank: int, world_size: int,
                 micro_batch_size: int, seed: int) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size = {world_size})")
        self.store, self.cfg, self.pad_id = store, cfg, pad_id
        self.rank, self.world_size, self.micro_batch_size, self.seed = rank, world_size, micro_batch_size, seed
        self.order = GlobalOrder(store.lengths, max_seq_len=cfg.max_seq_len, pack=cfg.pack, shuffle=cfg.shuffle,
                                 seed=seed, window=cfg.pack_window)
        self._cursor = Cursor()
        # (batch, cursor after it) pairs, opened lazily at the cursor by the first next().
        self._stream: Iterator[tuple[Batch, Cursor]] | None = None

    @property
    def cursor(self) -> Cursor:
        return self._cursor

    def _order_state(self) -> dict:
        mode = self.cfg.packing
        return {"store": self.store.fingerprint, "seed": self.seed, "shuffle": self.cfg.shuffle,
                "pack": False if mode == "none" else mode, "pack_window": self.cfg.pack_window,
                "max_seq_len": self.cfg.max_seq_len}

    def state_dict(self) -> dict:
        """JSON-able and the same on every rank: the global position plus what it depends on."""
        return {"epoch": self._cursor.epoch, "row": self._cursor.row, **self._order_state()}

    def load_state_dict(self, state: dict) -> None:
        now = self._order_state()
        if state.get("pack") is True:  # written before best-fit packing existed: packed next-fit
            state = {**state, "pack": "next_fit"}
        for key in _ORDER_KEYS:
            if key == "pack_window" and now["pack"] != "best_fit":
                continue  # only best fit packs in windows
            if state.get(key) != now[key]:
                option = (f" (data.{key}={str(state.get(key)).lower()})"
                          if key in ("shuffle", "pack", "pack_window", "max_seq_len") else "")
                raise DataError(
                    f"cannot resume the data order: the checkpoint has data {key} = {state.get(key)!r}, this run "
                    f"has {now[key]!r} ({self.store.path}); resume with the same data and data options{option}"
                )
        self.close()
        self._cursor = Cursor(int(state["epoch"]), int(state["row"]))

    @property
    def report(self) -> dict:
        """Counts of the prepared data, for the first line of metrics.jsonl."""
        return data_report(self.store, "data", self.order.packing_report(0))

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

    def rows_at(self, cursor: Cursor) -> list[list[Document]]:
        """This rank's rows of the micro-round that starts at `cursor`."""
        first = self.order.advance(cursor, self.rank * self.micro_batch_size)
        rows = []
        for k in range(self.micro_batch_size):
            docs = self.order.docs(self.order.advance(first, k))
            rows.append([self.store.document(int(i)) for i in docs])
        return rows

    def _batches(self, start: Cursor) -> Iterator[tuple[Batch, Cursor]]:
        cursor = start
        while True:
            batch = collate(self.rows_at(cursor), self.cfg.max_seq_len, self.pad_id)
            cursor = self.order.advance(cursor, self.world_size * self.micro_batch_size)
            yield batch, cursor


class ValLoader:
    """One pass over the validation store in store order, the same number of batches on every rank.

    Rows are packed as data.pack says from the store order (best-fit windows keep their rows in the
    order they were opened) and dealt out round-robin; the last round is topped up
    with all-padding rows (no targets), so that collective ops per batch stay matched across ranks;
    sum losses and target counts, then divide once.
    """

    def __init__(self, store: TokenStore, cfg: DataConfig, pad_id: int, *, rank: int, world_size: int,
                 micro_batch_size: int) -> None:
        self.store, self.cfg, self.pad_id = store, cfg, pad_id
        self.rank, self.world_size, self.micro_batch_size = rank, world_size, micro_batch_size
        packed = pack_order(store.lengths, np.arange(len(store)), cfg.max_seq_len, cfg.pack, cfg.pack_window)
        self.order, self.starts = packed.order, packed.starts  # [N], [R + 1]

    @property
    def report(self) -> dict:
        return data_report(self.store, "val_data", packing_report(self.store.lengths, len(self.starts) - 1,
                                                                  self.cfg.max_seq_len))

    def __len__(self) -> int:
        per_round = self.micro_batch_size * self.world_size
        return -(-(len(self.starts) - 1) // per_round)

    def _row(self, r: int) -> list[Document]:
        if r >= len(self.starts) - 1:
            return []
        return [self.store.document(int(i)) for i in self.order[self.starts[r] : self.starts[r + 1]]]

    def __iter__(self) -> Iterator[Batch]:
        mb = self.micro_batch_size
        for j in range(len(self)):
            first = (j * self.world_size + self.rank) * mb
            yield collate([self._row(first + k) for k in range(mb)], self.cfg.max_seq_len, self.pad_id)


def data_report(store: TokenStore, prefix: str, packing: dict) -> dict:
    """The store's counts and `packing` (sampler.packing_report of the first epoch), keys `{prefix}_*`."""
    c = store.manifest["counts"]
    out = {f"{prefix}_{k}": c[k] for k in ("records", "documents", "skipped_invalid", "dropped_overlong", "truncated")}
    out[f"{prefix}_tokens"] = store.manifest["token_stats"]["tokens"]
    for key in ("packing_efficiency", "rows", "padding_tokens"):
        out[f"{prefix}_{key}"] = packing[key]
    return out


def open_store(inputs, store_dir: str | Path, cfg: DataConfig, tokenizer: HarmonyTokenizer, *, rank: int = 0,
               world_size: int = 1) -> TokenStore:
    """The prepared store of `inputs`: a prepared folder given as the input is used as it is; else the
    store at `store_dir` is made or reused. Rank 0 does it (validating every record, verifying every
    file once) while the other ranks wait, then every rank maps the same files."""
    from engine.data.prepare import check_prepared, ensure_store, summary

    prepared = isinstance(inputs, (str, Path)) and (Path(inputs) / MANIFEST).is_file()
    path = Path(inputs) if prepared else Path(store_dir)
    outcome: list = [None, None]  # [error message, store fingerprint] from rank 0
    error: BaseException | None = None
    if rank == 0:
        try:
            store = (check_prepared(TokenStore(path), cfg, tokenizer) if prepared
                     else ensure_store(inputs, path, cfg, tokenizer, workers=cfg.prepare_workers))
            outcome[1] = store.fingerprint
        except (ValueError, OSError) as exc:  # DataError, TokenizerError, unreadable files
            error, outcome[0] = exc, f"{type(exc).__name__}: {exc}"
    if world_size > 1:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.broadcast_object_list(outcome, src=0)
    if error is not None:
        raise error
    if outcome[0] is not None:
        raise DataError(f"rank 0 could not prepare the data: {outcome[0]}")
    if rank == 0:
        return store
    # Rank 0 verified the files and recorded it: opening them here costs O(files).
    store = check_prepared(TokenStore(path), cfg, tokenizer) if prepared else TokenStore(path)
    if outcome[1] is not None and store.fingerprint != outcome[1]:
        raise DataError(f"rank {rank} reads another store at {path} than rank 0 wrote; data.prepared_dir "
                        "must be a folder every rank sees (a shared filesystem)")
    log.info("data store %s: %s", path, summary(store.manifest))  # rank 0 logged it while preparing
    return store.check_vocab(tokenizer.vocab_size)


def build_train_loader(cfg: DataConfig, tokenizer: HarmonyTokenizer, *, store_dir: str | Path | None = None,
                       rank: int = 0, world_size: int = 1, micro_batch_size: int | None = None,
                       seed: int | None = None) -> TrainLoader:
    """This rank's training stream. The store goes to `store_dir` (default data.prepared_dir/train);
    `micro_batch_size` defaults to the config's; the order seed is data.seed, else `seed`, else 0."""
    cfg.validate()
    root = store_dir or (Path(cfg.prepared_dir) / "train" if cfg.prepared_dir else None)
    if root is None:
        raise ValueError("no folder for the prepared data: set data.prepared_dir")
    store = open_store(cfg.resolved_train_path(), root, cfg, tokenizer, rank=rank, world_size=world_size)
    order_seed = cfg.seed if cfg.seed is not None else (seed if seed is not None else 0)
    loader = TrainLoader(store, cfg, tokenizer.pad_id, rank=rank, world_size=world_size,
                         micro_batch_size=micro_batch_size or cfg.micro_batch_size, seed=order_seed)
    if rank == 0:
        log.info("data order: %s", describe_packing(loader.order.packing_report(0), cfg, order_seed))
    return loader


def build_val_loader(cfg: DataConfig, tokenizer: HarmonyTokenizer, *, store_dir: str | Path | None = None,
                     rank: int = 0, world_size: int = 1, micro_batch_size: int | None = None) -> ValLoader | None:
    """The validation pass of this rank (prepared and validated like the training data), or None
    when the config has no validation data."""
    cfg.validate()
    inputs = cfg.resolved_val_path()
    if inputs is None:
        return None
    root = store_dir or (Path(cfg.prepared_dir) / "val" if cfg.prepared_dir else None)
    if root is None:
        raise ValueError("no folder for the prepared data: set data.prepared_dir")
    store = open_store(inputs, root, cfg, tokenizer, rank=rank, world_size=world_size)
    return ValLoader(store, cfg, tokenizer.pad_id, rank=rank, world_size=world_size,
                     micro_batch_size=micro_batch_size or cfg.micro_batch_size)
