"""Checks of a prepared store before use: the manifest, then every file against it, then the bytes.

`read_manifest` parses manifest.json and checks that the store's fields are there with their types
(`check_prepared_fields` does the same for what prepare.py adds: sources, counts, render options).
`open_arrays` checks each array file's dtype, shape and size against the manifest (the .npy headers
are read as text: an object array, which only a pickle could load, is refused, never loaded) and
maps the arrays; `check_offsets` proves the document boundaries increase from 0 to the token count
(one vectorised pass over [N+1] int64). `verify` hashes every array file against the manifest's
sha256 and finds the largest token id in the same pass, once: verified.json, beside the files,
keeps each file's size and mtime with the hash it matched, and a later start re-reads only a file
whose size or mtime moved (a start on a verified store costs O(files)). Every failure is a
`StoreError` naming the file and the field.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

from engine.errors import DataError

log = logging.getLogger(__name__)

FORMAT = 2
MANIFEST = "manifest.json"
VERIFIED = "verified.json"
DTYPES = {"tokens.u32": "uint32", "loss_mask.u8": "uint8", "offsets.npy": "int64", "origins.npy": "int64"}
_INT, _NUMBER = (int,), (int, float)
# Field -> type, or -> {sub-field: type}. The store's own (written by StoreWriter) ...
STORE_FIELDS = {"format": _INT, "content_sha256": (str,), "documents": _INT, "tokens": _INT, "files": (dict,)}
# ... and prepare.py's, read by every run that trains on the store.
PREPARED_FIELDS = {
    "sources": (list,), "tokenizer_sha256": (str,), "code_sha256": (str,), "render": {"max_seq_len": _INT},
    "counts": {k: _INT for k in ("records", "documents", "skipped_invalid", "dropped_overlong", "truncated")}
    | {"skipped_examples": (list,), "overlong_examples": (list,)},
    "token_stats": {"tokens": _INT, "target_tokens": _INT, "min_len": _INT, "max_len": _INT,
                    "mean_len": _NUMBER, "p50_len": _NUMBER, "p95_len": _NUMBER},
}
_WANT = {str: "a string", list: "a list", dict: "an object"}
_CHUNK = 16 << 20  # bytes hashed per read (a multiple of 4: whole token ids)


class StoreError(DataError):
    """A prepared store that cannot be used as it is (damaged, edited, half copied, or of another format)."""

    def __init__(self, store: Path, file: str, problem: str) -> None:
        self.store, self.file, self.detail = Path(store), file, f"{Path(store) / file}: {problem}"
        super().__init__(f"{self.detail}; prepare the store again: python -m engine.data.prepare INPUT... "
                         f"--out {store}")


def _kind(value: object) -> str:
    return {bool: "a boolean", str: "a string", list: "a list", dict: "an object", type(None): "null",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


def _check_type(store: Path, field: str, value: object, types: tuple) -> None:
    if not isinstance(value, types) or isinstance(value, bool):
        want = {_INT: "an integer", _NUMBER: "a number"}.get(types) or _WANT[types[0]]
        raise StoreError(store, MANIFEST, f"field {field!r} = {value!r:.60} is {_kind(value)}, not {want}")


def read_manifest(store: Path) -> dict:
    """manifest.json as a dict of this format with the store's own fields (STORE_FIELDS) present, typed
    and consistent with each other, or a StoreError saying which is not."""
    store = Path(store)
    try:
        manifest = json.loads((store / MANIFEST).read_bytes())
    except OSError as exc:
        raise StoreError(store, MANIFEST, f"cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise StoreError(store, MANIFEST, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        where = f"at line {exc.lineno} column {exc.colno}"
        raise StoreError(store, MANIFEST, f"not valid JSON ({exc.msg} {where})") from None
    if not isinstance(manifest, dict):
        raise StoreError(store, MANIFEST, f"holds {_kind(manifest)}, not an object")
    if "format" not in manifest:
        raise StoreError(store, MANIFEST, "field 'format' is missing")
    if manifest.get("format") != FORMAT:
        raise StoreError(store, MANIFEST, f"store format {manifest.get('format')!r}, this engine reads format {FORMAT}")
    _check_fields(store, manifest, STORE_FIELDS)
    n, t = manifest["documents"], manifest["tokens"]
    if n < 1 or t < n:
        raise StoreError(store, MANIFEST, f"'documents' = {n} and 'tokens' = {t}: a store holds at least one "
                         "document of at least one token each")
    shapes = {"tokens.u32": [t], "loss_mask.u8": [t], "offsets.npy": [n + 1], "origins.npy": [n, 2]}
    for name, dtype in DTYPES.items():
        entry = manifest["files"].get(name)
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise StoreError(store, MANIFEST, f"field 'files.{name}' is missing or has no 'sha256'")
        if entry.get("dtype") != dtype:
            raise StoreError(store, MANIFEST, f"field 'files.{name}.dtype' = {entry.get('dtype')!r}, the store "
                             f"format has {dtype!r}")
        if entry.get("shape") != shapes[name]:
            raise StoreError(store, MANIFEST, f"field 'files.{name}.shape' = {entry.get('shape')!r} disagrees with "
                             f"'documents' = {n} and 'tokens' = {t} (expected {shapes[name]})")
    return manifest


def check_prepared_fields(store: Path, manifest: dict) -> dict:
    """The fields prepare.py writes (PREPARED_FIELDS), present, typed and agreeing with the store's counts."""
    _check_fields(store, manifest, PREPARED_FIELDS)
    for i, source in enumerate(manifest["sources"]):
        if not (isinstance(source, dict) and all(isinstance(source.get(k), str) for k in ("name", "sha256"))):
            raise StoreError(store, MANIFEST, f"field 'sources[{i}]' = {source!r:.60} is not an object with "
                             "'name' and 'sha256'")
    counted, summed = manifest["counts"]["documents"], manifest["token_stats"]["tokens"]
    if (counted, summed) != (manifest["documents"], manifest["tokens"]):
        raise StoreError(store, MANIFEST, f"'counts.documents' = {counted} and 'token_stats.tokens' = {summed} "
                         f"disagree with 'documents' = {manifest['documents']} and 'tokens' = {manifest['tokens']}")
    return manifest


def _check_fields(store: Path, manifest: dict, fields: dict) -> None:
    for field, types in fields.items():
        if field not in manifest:
            raise StoreError(store, MANIFEST, f"field {field!r} is missing")
        if isinstance(types, dict):
            _check_type(store, field, manifest[field], (dict,))
            for sub, sub_types in types.items():
                if sub not in manifest[field]:
                    raise StoreError(store, MANIFEST, f"field '{field}.{sub}' is missing")
                _check_type(store, f"{field}.{sub}", manifest[field][sub], sub_types)
        else:
            _check_type(store, field, manifest[field], types)


def _npy_header(store: Path, name: str, f) -> tuple[tuple, np.dtype, int]:
    """(shape, dtype, data offset) from a .npy header, parsed as a literal: nothing is unpickled."""
    try:
        version = np.lib.format.read_magic(f)
        read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read is None:
            raise ValueError(f"version {version}")
        shape, fortran, dtype = read(f)
    except (ValueError, SyntaxError) as exc:
        raise StoreError(store, name, f"not a .npy array file ({exc})") from None
    if dtype.hasobject:
        raise StoreError(store, name, "holds an array of Python objects (a pickle), which is never loaded")
    if fortran and len(shape) > 1:
        raise StoreError(store, name, "is in Fortran order; the store format writes C order")
    return shape, dtype, f.tell()


def open_arrays(store: Path, manifest: dict) -> dict[str, np.ndarray]:
    """Every array file checked against the manifest (dtype, shape, size), then memory-mapped read-only."""
    arrays = {}
    for name, dtype in DTYPES.items():
        path = store / name
        shape = tuple(manifest["files"][name]["shape"])
        try:
            size = path.stat().st_size
            offset = 0
            if name.endswith(".npy"):
                with path.open("rb") as f:
                    found, found_dtype, offset = _npy_header(store, name, f)
                if found_dtype != np.dtype(dtype).newbyteorder("<"):
                    raise StoreError(store, name, f"dtype {found_dtype}, the store format has {dtype}")
                if found != shape:
                    raise StoreError(store, name, f"shape {list(found)}, the manifest says {list(shape)}")
            expected = offset + int(np.prod(shape)) * np.dtype(dtype).itemsize
            if size != expected:
                raise StoreError(store, name, f"{size} bytes, but {list(shape)} {dtype} needs {expected} "
                                 f"({'truncated' if size < expected else 'extended'})")
            arrays[name] = np.memmap(path, dtype=np.dtype(dtype).newbyteorder("<"), mode="r", offset=offset,
                                     shape=shape)
        except FileNotFoundError:
            raise StoreError(store, name, "missing") from None
        except OSError as exc:
            raise StoreError(store, name, f"cannot be read ({exc.strerror or exc})") from None
    return arrays


def check_offsets(store: Path, offsets: np.ndarray, tokens: int) -> np.ndarray:
    """[N] int64 document lengths from [N+1] offsets that rise from 0 to `tokens`; StoreError otherwise."""
    if offsets[0] != 0:
        raise StoreError(store, "offsets.npy", f"the first offset is {int(offsets[0])}, not 0")
    if offsets[-1] != tokens:
        where = "past the end of" if offsets[-1] > tokens else "short of the end of"
        raise StoreError(store, "offsets.npy", f"the last offset {int(offsets[-1])} is {where} tokens.u32 "
                         f"({tokens} tokens)")
    lengths = np.diff(offsets)  # [N]
    bad = np.flatnonzero(lengths <= 0)
    if bad.size:
        i = int(bad[0])
        raise StoreError(store, "offsets.npy", f"the offsets do not increase at document {i} (offsets[{i}] = "
                         f"{int(offsets[i])}, offsets[{i + 1}] = {int(offsets[i + 1])})")
    return lengths


def _stats(store: Path) -> dict[str, list[int]]:
    return {name: [(s := os.stat(store / name)).st_size, s.st_mtime_ns] for name in DTYPES}


def _remembered(store: Path, manifest: dict, stats: dict) -> tuple[set[str], int | None]:
    """The files verified.json vouches for (the size, mtime and sha256 they have now) and the largest
    token id it found in tokens.u32 (None when it does not vouch for that file)."""
    try:
        seen = json.loads((store / VERIFIED).read_bytes())
        done = {n for n, e in seen["files"].items()
                if n in DTYPES and e["stat"] == stats[n] and e["sha256"] == manifest["files"][n]["sha256"]}
        max_id = seen["max_token_id"]
        return done, max_id if "tokens.u32" in done and isinstance(max_id, int) else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set(), None  # no record, or an unreadable one: hash again


def remember(store: Path, manifest: dict, max_token_id: int, stats: dict | None = None) -> None:
    """Write verified.json (atomically); a store in a read-only folder is verified at every start instead."""
    stats = stats or _stats(store)
    record = {"max_token_id": int(max_token_id),
              "files": {n: {"stat": stats[n], "sha256": manifest["files"][n]["sha256"]} for n in DTYPES}}
    tmp = store / f".{VERIFIED}.{os.getpid()}-{id(record)}"
    try:
        tmp.write_text(json.dumps(record) + "\n")
        os.replace(tmp, store / VERIFIED)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        log.warning("cannot record the verification of %s (%s); its files will be hashed again at every start",
                    store, exc.strerror or exc)


def _hash(path: Path, tokens: bool) -> tuple[str, int]:
    """(sha256, largest uint32 when `tokens`) of a file, read once in chunks."""
    digest, max_id = hashlib.sha256(), 0
    buffer = bytearray(_CHUNK)
    with path.open("rb") as f:  # buffered: readinto fills the buffer up to the end of the file
        while n := f.readinto(buffer):
            view = memoryview(buffer)[:n]
            digest.update(view)
            if tokens:
                max_id = max(max_id, int(np.frombuffer(view, dtype="<u4").max()))
    return digest.hexdigest(), max_id


def verify(store: Path, manifest: dict) -> int:
    """Every array file's sha256 against the manifest, each file once while its size and mtime stay;
    returns the largest token id."""
    stats = _stats(store)
    done, max_id = _remembered(store, manifest, stats)
    if len(done) == len(DTYPES) and max_id is not None:
        return max_id
    for name in DTYPES:
        if name in done and (name != "tokens.u32" or max_id is not None):
            continue
        digest, found = _hash(store / name, tokens=name == "tokens.u32")
        expected = manifest["files"][name]["sha256"]
        if digest != expected:
            raise StoreError(store, name, f"sha256 {digest[:12]}... differs from the manifest's {expected[:12]}...: "
                             "its bytes changed after it was prepared")
        max_id = found if name == "tokens.u32" else max_id
    remember(store, manifest, max_id, stats)
    return max_id
