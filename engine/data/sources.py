"""Where records come from: JSONL, JSON, Parquet, a `datasets` dataset saved to disk, or a Hub id.

`resolve_sources` turns the user's inputs into `Source`s (or a one-line DataError saying what is
wrong with an input); `Source.records()` yields `(where, payload)` in file order, where `where` is
the number a user finds the record by (the line of a JSONL file, the row of a table, the index of a
JSON list) and `payload` is the raw line (bytes, decoded later by a worker), the decoded record, or
the DataError of a record that cannot be handed out (a .json item with a duplicate key).
`Source.fingerprint()` says whether the bytes changed since a store was prepared from them.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from engine.data.config import is_hub_id
from engine.data.dataset import DataError, unique_keys

KINDS = ("jsonl", "json", "parquet", "arrow", "hub")
_HASH_CHUNK = 1 << 22
# Table rows handed out per read.
_ROW_BATCH = 1024


@dataclass(frozen=True)
class Source:
    name: str  # what error messages and the manifest call it
    kind: str  # one of KINDS
    path: Path | None  # None for a Hub dataset

    @property
    def unit(self) -> str:
        """What `where` counts: JSONL lines (1-based), table rows and JSON list items (0-based)."""
        return {"jsonl": "line", "json": "item", "parquet": "row", "arrow": "row", "hub": "row"}[self.kind]

    def locate(self, where: int) -> str:
        return f"{self.name}:{where}" if self.kind == "jsonl" else f"{self.name}:{self.unit} {where}"

    def records(self) -> Iterator[tuple[int, object]]:
        if self.kind == "jsonl":
            with self.path.open("rb") as f:
                for number, line in enumerate(f, start=1):
                    if line.strip():
                        yield number, line
        elif self.kind == "json":
            yield from enumerate(_read_json(self.path))
        elif self.kind == "parquet":
            import pyarrow.parquet as pq

            index = 0
            for batch in pq.ParquetFile(self.path).iter_batches(batch_size=_ROW_BATCH):
                for row in batch.to_pylist():
                    yield index, _present(row)
                    index += 1
        else:
            dataset = self._dataset()
            for start in range(0, len(dataset), _ROW_BATCH):
                chunk = dataset[start : start + _ROW_BATCH]  # columns -> lists
                keys = list(chunk)
                for k in range(len(chunk[keys[0]]) if keys else 0):
                    yield start + k, _present({key: chunk[key][k] for key in keys})

    def fingerprint(self, previous: dict | None = None) -> dict:
        """{name, kind, size, mtime_ns, sha256}; the hash is taken again only when size or mtime
        moved since `previous` (a touched file whose bytes are unchanged is still the same data)."""
        if self.kind == "hub":
            return {"name": self.name, "kind": self.kind, "sha256": self._dataset()._fingerprint}
        files = sorted(p for p in self.path.rglob("*") if p.is_file()) if self.path.is_dir() else [self.path]
        stats = [p.stat() for p in files]
        size, mtime = sum(s.st_size for s in stats), max(s.st_mtime_ns for s in stats)
        quick = {"name": self.name, "kind": self.kind, "size": size, "mtime_ns": mtime}
        if previous and all(previous.get(k) == v for k, v in quick.items()):
            return {**quick, "sha256": previous["sha256"]}
        digest = hashlib.sha256()
        for p in files:
            digest.update(str(p.relative_to(self.path) if self.path.is_dir() else p.name).encode())
            with p.open("rb") as f:
                while chunk := f.read(_HASH_CHUNK):
                    digest.update(chunk)
        return {**quick, "sha256": digest.hexdigest()}

    def _dataset(self):
        import datasets

        if self.kind == "arrow":
            loaded = datasets.load_from_disk(str(self.path))
            if isinstance(loaded, datasets.DatasetDict):
                raise DataError(f"{self.name}: a DatasetDict with splits {sorted(loaded)}; give one split's "
                                f"folder, e.g. {self.path / sorted(loaded)[0]}")
            return loaded
        repo, _, split = self.name.partition(":")
        try:
            return datasets.load_dataset(repo, split=split or "train")
        except Exception as exc:  # datasets raises many types: network, missing split, missing repo
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DataError(f"{self.name}: cannot load the Hub dataset ({first}); check the id and split, "
                            "the network, or download it and give the local files") from exc


def _present(row: dict) -> dict:
    """A table row has every column; a null column is a key the record does not have (a prompt /
    completion row of a table that also holds `messages` rows has messages = null)."""
    return {k: v for k, v in row.items() if v is not None}


class _Duplicated(dict):
    """An object of a .json file that gives a key twice; `error` says which."""

    error: DataError


def _read_json(path: Path) -> list:
    """The file's records; a record holding an object with a duplicate key is its DataError instead."""
    found: list[DataError] = []

    def mark(pairs: list) -> dict:
        try:
            return unique_keys(pairs)
        except DataError as exc:
            found.append(exc)
            marked = _Duplicated(pairs)
            marked.error = exc
            return marked

    try:
        data = json.loads(path.read_bytes(), object_pairs_hook=mark)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno}); a .json file "
                        "holds one list of records (use .jsonl for one record per line)") from exc
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply to read (Python's limit is about "
                        f"{sys.getrecursionlimit()} levels); no record needs that depth") from None
    if isinstance(data, _Duplicated):
        raise DataError(f"{path}: {data.error}")
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: a .json data file must hold a list of records (or {{\"data\": [...]}}), "
                        f"got a {type(data).__name__}")
    return [_duplicate_in(item) or item for item in data] if found else data


def _duplicate_in(value: object) -> DataError | None:
    stack = [value]
    while stack:
        value = stack.pop()
        if isinstance(value, _Duplicated):
            return value.error
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return None


def resolve_source(spec: str | Path) -> Source:
    path = Path(spec)
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
            return Source(str(path), "arrow", path)
        if (path / "dataset_dict.json").is_file():
            return Source(str(path), "arrow", path)
        raise DataError(f"{path}: a folder that is not a `datasets` dataset saved with save_to_disk "
                        "(no dataset_info.json / dataset_dict.json); give the data files instead")
    if path.is_file():
        suffix = path.suffix.lower()
        kind = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet"}.get(suffix)
        if kind is None:
            raise DataError(f"{path}: unknown data file type {suffix or '(no suffix)'!r}; "
                            "use .jsonl, .json or .parquet")
        if path.stat().st_size == 0:
            raise DataError(f"{path}: no records (the file is empty)")
        return Source(str(path), kind, path)
    if is_hub_id(str(spec)):
        return Source(str(spec), "hub", None)
    raise DataError(f"{spec}: no such file or folder (and not a Hub dataset id like owner/name:split)")


def resolve_sources(inputs) -> list[Source]:
    """A path, a Hub id, or a list of them -> Sources, in the given order."""
    specs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    if not specs:
        raise DataError("no data inputs given")
    return [resolve_source(spec) for spec in specs]
