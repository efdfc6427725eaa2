"""The prepared token store: one folder, memory-mapped, written once and read by every rank.

    DIR/tokens.u32     every document's token ids, concatenated            [total] uint32
    DIR/loss_mask.u8   1 where the token carries loss (is a target)       [total] uint8
    DIR/offsets.npy    document boundaries: doc i is [offsets[i], offsets[i+1])   [N+1] int64
    DIR/origins.npy    (source index, line/row) of each document           [N, 2] int64
    DIR/manifest.json  sources and their hashes, tokenizer hash, render options, counts, token
                       statistics; written last, so a folder without it is incomplete

Opening maps the arrays without reading them, so a store of a million conversations opens in
milliseconds and each rank touches only the pages of the rows it reads. A store is written into a
temporary sibling folder and renamed into place: a crash leaves the old store or none, never half.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from engine.data.dataset import DataError, Document

FORMAT = 1
MANIFEST = "manifest.json"


class TokenStore:
    """Read side: `len(store)` documents, `store.document(i)`, `store.lengths` [N] int64."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        manifest = self.path / MANIFEST
        if not manifest.is_file():
            raise DataError(f"{self.path}: not a prepared data store (no {MANIFEST}); "
                            "make one with `python -m engine.data.prepare INPUT... --out DIR`")
        self.manifest = json.loads(manifest.read_text())
        if self.manifest.get("format") != FORMAT:
            raise DataError(f"{self.path}: store format {self.manifest.get('format')!r}, this engine reads "
                            f"format {FORMAT}; prepare it again")
        self.offsets = np.load(self.path / "offsets.npy", mmap_mode="r")  # [N+1] int64
        self.origins = np.load(self.path / "origins.npy", mmap_mode="r")  # [N, 2] int64
        total = int(self.offsets[-1])
        # np.memmap refuses empty files; a store always holds at least one token per document.
        self.tokens = np.memmap(self.path / "tokens.u32", dtype=np.uint32, mode="r", shape=(total,))
        self.loss_mask = np.memmap(self.path / "loss_mask.u8", dtype=np.uint8, mode="r", shape=(total,))
        self.lengths = np.diff(self.offsets)  # [N] int64

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def fingerprint(self) -> str:
        """Names this store's content; a data cursor is only meaningful on the same content."""
        return self.manifest["content_sha256"]

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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-", dir=self.path.parent))
        self._tokens = (self.tmp / "tokens.u32").open("wb")
        self._mask = (self.tmp / "loss_mask.u8").open("wb")
        self._lengths: list[np.ndarray] = []
        self._origins: list[np.ndarray] = []
        self._hash = _Sha256()

    def add(self, ids: np.ndarray, mask: np.ndarray, lengths: np.ndarray, origins: np.ndarray) -> None:
        """A chunk of documents: ids [T] and mask [T] concatenated, lengths [n], origins [n, 2]."""
        ids = np.ascontiguousarray(ids, dtype=np.uint32)
        mask = np.ascontiguousarray(mask, dtype=np.uint8)
        lengths = np.asarray(lengths, dtype=np.int64)
        assert len(ids) == len(mask) == int(lengths.sum())
        self._tokens.write(ids.tobytes())
        self._mask.write(mask.tobytes())
        self._hash.update(ids, mask, lengths)
        self._lengths.append(lengths)
        self._origins.append(np.asarray(origins, dtype=np.int64).reshape(-1, 2))

    def lengths(self) -> np.ndarray:
        """[n] int64, the documents added so far."""
        return np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)

    def finish(self, manifest: dict) -> TokenStore:
        self._tokens.close()
        self._mask.close()
        lengths = self.lengths()
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        np.save(self.tmp / "offsets.npy", offsets)
        np.save(self.tmp / "origins.npy",
                np.concatenate(self._origins) if self._origins else np.zeros((0, 2), np.int64))
        manifest = {"format": FORMAT, **manifest, "content_sha256": self._hash.hexdigest(),
                    "documents": int(len(lengths)), "tokens": int(offsets[-1])}
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        _replace_dir(self.tmp, self.path)
        return TokenStore(self.path)

    def abort(self) -> None:
        self._tokens.close()
        self._mask.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


class _Sha256:
    def __init__(self) -> None:
        import hashlib

        self._h = hashlib.sha256()

    def update(self, *arrays: np.ndarray) -> None:
        for a in arrays:
            self._h.update(a.tobytes())

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def _replace_dir(new: Path, target: Path) -> None:
    """Put `new` at `target`, replacing an old store there; a crash leaves one or the other whole."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
        new.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(target)
