"""The prepared token store: one folder, memory-mapped, written once and read by every rank.

    DIR/tokens.u32     every document's token ids, concatenated            [total] uint32
    DIR/loss_mask.u8   1 where the token carries loss (is a target)       [total] uint8
    DIR/offsets.npy    document boundaries: doc i is [offsets[i], offsets[i+1])   [N+1] int64
    DIR/origins.npy    (source index, line/row) of each document           [N, 2] int64
    DIR/manifest.json  sources and their hashes, tokenizer hash, render options, counts, token
                       statistics, each array file's dtype, shape and sha256; written last, so a
                       folder without it is incomplete
    DIR/verified.json  which files were verified against the manifest (size, mtime) and their
                       largest token id: the hashing is done once (engine/data/store_check.py)

Opening checks every file against the manifest (engine/data/store_check.py) and maps the arrays
without reading them, so a store of a million conversations opens in milliseconds once verified,
and each rank touches only the pages of the rows it reads. A store is written into a temporary
sibling folder and renamed into place: a crash leaves the old store or none, never half. Two
preparations of one folder at once are serialised by `store_lock`; where the filesystem has no
locks, the one that finishes second uses the first one's store when it holds the same content, and
fails in one line when it does not.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from engine.data.dataset import DataError, Document
from engine.data.store_check import (
    DTYPES,
    FORMAT,
    MANIFEST,
    StoreError,
    check_offsets,
    open_arrays,
    read_manifest,
    remember,
    verify,
)

log = logging.getLogger(__name__)

__all__ = ["FORMAT", "MANIFEST", "StoreError", "StoreWriter", "TokenStore", "store_lock"]


class TokenStore:
    """Read side: `len(store)` documents, `store.document(i)`, `store.lengths` [N] int64.

    Opening raises StoreError when a file disagrees with the manifest or its bytes with their sha256."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not (self.path / MANIFEST).is_file():
            raise DataError(f"{self.path}: not a prepared data store (no {MANIFEST}); "
                            "make one with `python -m engine.data.prepare INPUT... --out DIR`")
        self.manifest = read_manifest(self.path)
        arrays = open_arrays(self.path, self.manifest)
        self.tokens, self.loss_mask = arrays["tokens.u32"], arrays["loss_mask.u8"]  # [total] uint32, uint8
        self.offsets, self.origins = arrays["offsets.npy"], arrays["origins.npy"]  # [N+1], [N, 2] int64
        self.lengths = check_offsets(self.path, self.offsets, self.manifest["tokens"])  # [N] int64
        self.max_token_id = verify(self.path, self.manifest)

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def fingerprint(self) -> str:
        """Names this store's content; a data cursor is only meaningful on the same content."""
        return self.manifest["content_sha256"]

    def check_vocab(self, vocab_size: int) -> "TokenStore":
        """Every token id below `vocab_size` (the tokenizer's), else a StoreError naming the first one."""
        if self.max_token_id >= vocab_size:
            pos = int(np.argmax(self.tokens >= vocab_size))
            doc = int(np.searchsorted(self.offsets, pos, side="right")) - 1
            raise StoreError(self.path, "tokens.u32", f"token id {int(self.tokens[pos])} (position {pos}, document "
                             f"{doc}) is not below the tokenizer's vocabulary of {vocab_size} ids")
        return self

    def document(self, i: int) -> Document:
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        return Document(self.tokens[start:end].astype(np.int64), self.loss_mask[start:end].astype(bool))


class StoreWriter:
    """Append documents, then `finish(manifest)`; the store appears at `path` only when finished."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.is_dir() and not (self.path / MANIFEST).is_file() and any(self.path.iterdir()):
            raise DataError(f"{self.path}: exists and is not a data store; choose another --out / "
                            "data.prepared_dir, or remove it")
        # The store this one replaces, if any; another one found there at the end was written meanwhile.
        self._replaces = _identity(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-", dir=self.path.parent))
        self._tokens = (self.tmp / "tokens.u32").open("wb")
        self._mask = (self.tmp / "loss_mask.u8").open("wb")
        self._lengths: list[np.ndarray] = []
        self._origins: list[np.ndarray] = []
        self._hash = hashlib.sha256()  # the content name: ids, mask and lengths of each chunk in turn
        self._files = {"tokens.u32": hashlib.sha256(), "loss_mask.u8": hashlib.sha256()}
        self._max_id = 0

    def add(self, ids: np.ndarray, mask: np.ndarray, lengths: np.ndarray, origins: np.ndarray) -> None:
        """A chunk of documents: ids [T] and mask [T] concatenated, lengths [n], origins [n, 2]."""
        ids = np.ascontiguousarray(ids, dtype="<u4")
        mask = np.ascontiguousarray(mask, dtype=np.uint8)
        lengths = np.ascontiguousarray(lengths, dtype="<i8")
        assert len(ids) == len(mask) == int(lengths.sum())
        self._tokens.write(ids.data)
        self._mask.write(mask.data)
        for a in (ids, mask, lengths):
            self._hash.update(a.data)
        self._files["tokens.u32"].update(ids.data)
        self._files["loss_mask.u8"].update(mask.data)
        self._max_id = max(self._max_id, int(ids.max())) if ids.size else self._max_id
        self._lengths.append(lengths)
        self._origins.append(np.asarray(origins, dtype=np.int64).reshape(-1, 2))

    def lengths(self) -> np.ndarray:
        """[n] int64, the documents added so far."""
        return np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)

    def finish(self, manifest: dict) -> TokenStore:
        self._tokens.close()
        self._mask.close()
        lengths = self.lengths()
        offsets = np.zeros(len(lengths) + 1, dtype="<i8")
        np.cumsum(lengths, out=offsets[1:])
        origins = np.concatenate(self._origins) if self._origins else np.zeros((0, 2), np.int64)
        for name, array in (("offsets.npy", offsets), ("origins.npy", origins.astype("<i8"))):
            np.save(self.tmp / name, array)
            self._files[name] = hashlib.sha256((self.tmp / name).read_bytes())
        total = int(offsets[-1])
        shapes = {"tokens.u32": [total], "loss_mask.u8": [total], "offsets.npy": [len(offsets)],
                  "origins.npy": [len(lengths), 2]}
        manifest = {"format": FORMAT, **manifest, "content_sha256": self._hash.hexdigest(),
                    "documents": int(len(lengths)), "tokens": total,
                    "files": {n: {"dtype": DTYPES[n], "shape": shapes[n], "sha256": self._files[n].hexdigest()}
                              for n in DTYPES}}
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        # These bytes were hashed as they were written: the new store needs no verification pass.
        remember(self.tmp, manifest, self._max_id)
        return self._install(manifest)

    def abort(self) -> None:
        self._tokens.close()
        self._mask.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _install(self, manifest: dict) -> TokenStore:
        """Rename the finished folder into place: over nothing, or over the store found at the start
        (moved aside first, removed once the new one is in place)."""
        aside: Path | None = None
        while True:
            try:
                os.rename(self.tmp, self.path)  # atomic; fails when a non-empty folder is there
                break
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
            if self._replaces is None or _identity(self.path) != self._replaces:
                if aside is not None:
                    shutil.rmtree(aside, ignore_errors=True)
                return self._lost(manifest)
            aside = self.tmp.with_name(self.tmp.name.replace(".tmp-", ".old-", 1))
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                aside = None  # moved away meanwhile: the rename above now lands on nothing
            self._replaces = None
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        return TokenStore(self.path)

    def _lost(self, manifest: dict) -> TokenStore:
        """Another preparation put its store at `path` while this one ran: use it when it holds this content."""
        shutil.rmtree(self.tmp, ignore_errors=True)
        try:
            theirs = TokenStore(self.path)
        except DataError as exc:
            raise DataError(f"{self.path}: another process wrote this folder while this preparation ran, and what it "
                            f"left cannot be used ({exc}); give each run its own data.prepared_dir (--out)") from None
        if theirs.fingerprint != manifest["content_sha256"]:
            raise DataError(f"{self.path}: another process prepared other data into this folder while this preparation "
                            "ran; give each run its own data.prepared_dir (--out), or the same data and options")
        log.info("data store %s was prepared by another process meanwhile, with the same content; using it", self.path)
        return theirs


def _identity(path: Path) -> tuple[int, int, int] | None:
    """Which store is at `path` (device, inode and mtime of its manifest); None when there is none."""
    try:
        s = os.stat(path / MANIFEST)
    except OSError:
        return None
    return s.st_dev, s.st_ino, s.st_mtime_ns


@contextlib.contextmanager
def store_lock(path: str | Path) -> Iterator[None]:
    """Hold `.NAME.lock` beside the store at `path` exclusively (across processes and threads) while
    checking and preparing it: a second preparer waits, then finds the store current. Where the folder
    cannot hold a lock file or the filesystem has no locks, this does nothing (`_install` stays safe)."""
    path = Path(path)
    lock = path.with_name(f".{path.name}.lock")
    fd = _acquire(lock, path)
    try:
        yield
    finally:
        if fd is not None:  # removed before it is let go: a waiter that locked it sees it gone and retries
            with contextlib.suppress(OSError):
                os.unlink(lock)
            os.close(fd)


def _acquire(lock: Path, store: Path) -> int | None:
    import fcntl

    while True:
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            return None  # a read-only folder: nothing can be prepared there, a store there can still be read
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("waiting for another process preparing %s", store)
                fcntl.flock(fd, fcntl.LOCK_EX)
            held, there = os.fstat(fd), os.stat(lock)
        except FileNotFoundError:  # the holder before us removed it as it let go: lock the new one
            os.close(fd)
            continue
        except OSError:  # a filesystem without locks
            os.close(fd)
            return None
        if (held.st_dev, held.st_ino) == (there.st_dev, there.st_ino):
            return fd
        os.close(fd)
