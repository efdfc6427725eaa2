"""Every file of a prepared store is checked against its manifest before use: each tampering is one
line naming the file and the field; a store the trainer prepares itself is made again, a prepared
folder given as the data path is refused. The bytes are verified against their sha256 once, and the
verification is remembered by each file's size and mtime."""

import json
import logging
import os
import re
import shutil

import numpy as np
import pytest

from engine.data.config import DataConfig
from engine.data.loader import build_train_loader
from engine.data.prepare import ensure_store, prepare
from engine.data.store import StoreWriter, TokenStore
from engine.errors import DataError

RECORDS = [{"prompt": f"What is {i} + 1?", "completion": f"{i + 1}."} for i in range(6)]
CFG = DataConfig(max_seq_len=256)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tokenizer):
    """(source file, a store prepared from it): 6 documents of the shipped tokenizer."""
    root = tmp_path_factory.mktemp("prepared")
    source = root / "data.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    prepare(source, root / "store", CFG, tokenizer, workers=1)
    return source, root / "store"


def _manifest(store, **changes):
    m = json.loads((store / "manifest.json").read_text())
    for dotted, value in changes.items():
        *parents, last = dotted.split("/")
        target = m
        for key in parents:
            target = target[key]
        if value is KeyError:
            del target[last]
        else:
            target[last] = value
    (store / "manifest.json").write_text(json.dumps(m))


def _resave(name, change):
    def tamper(store):
        array = np.load(store / name)
        np.save(store / name, change(array))
    return tamper


def _rewrite(name, change):
    def tamper(store):
        (store / name).write_bytes(change((store / name).read_bytes()))
    return tamper


def _swap(a):
    a[2], a[3] = a[3], a[2]
    return a


def _add(i, n):
    def change(a):
        a[i] += n
        return a
    return change


def _edit_token(raw):
    ids = np.frombuffer(raw, np.uint32).copy()
    ids[3] ^= 1
    return ids.tobytes()


def _pickled(store):
    np.save(store / "offsets.npy", np.array([0, "os.system", None], dtype=object), allow_pickle=True)


# (case, tampering, file named, what the message says): the tamperings a review found.
TAMPERINGS = [
    ("tokens truncated", _rewrite("tokens.u32", lambda b: b[:-4]), "tokens.u32",
     r"\d+ bytes, but \[\d+\] uint32 needs \d+ \(truncated\)"),
    ("tokens extended", _rewrite("tokens.u32", lambda b: b + bytes(8)), "tokens.u32",
     r"\d+ bytes, but \[\d+\] uint32 needs \d+ \(extended\)"),
    ("loss mask truncated", _rewrite("loss_mask.u8", lambda b: b[:-1]), "loss_mask.u8",
     r"\d+ bytes, but \[\d+\] uint8 needs \d+ \(truncated\)"),
    ("loss mask extended", _rewrite("loss_mask.u8", lambda b: b + b"\x01"), "loss_mask.u8",
     r"\d+ bytes, but \[\d+\] uint8 needs \d+ \(extended\)"),
    ("offsets truncated", _rewrite("offsets.npy", lambda b: b[:-8]), "offsets.npy",
     r"176 bytes, but \[7\] int64 needs 184 \(truncated\)"),
    ("origins extended", _rewrite("origins.npy", lambda b: b + bytes(16)), "origins.npy",
     r"240 bytes, but \[6, 2\] int64 needs 224 \(extended\)"),
    ("offsets of another dtype", _resave("offsets.npy", lambda a: a.astype(np.float64)), "offsets.npy",
     "dtype float64, the store format has int64"),
    ("offsets of fewer documents", _resave("offsets.npy", lambda a: a[:-1]), "offsets.npy",
     r"shape \[6\], the manifest says \[7\]"),
    ("origins of another shape", _resave("origins.npy", lambda a: np.zeros((6, 3), np.int64)), "origins.npy",
     r"shape \[6, 3\], the manifest says \[6, 2\]"),
    ("offsets decreasing", _resave("offsets.npy", _swap), "offsets.npy",
     r"the offsets do not increase at document 2 \(offsets\[2\] = \d+, offsets\[3\] = \d+\)"),
    ("offsets past the end", _resave("offsets.npy", _add(-1, 10)), "offsets.npy",
     r"the last offset \d+ is past the end of tokens.u32 \(\d+ tokens\)"),
    ("offsets not from 0", _resave("offsets.npy", _add(0, 1)), "offsets.npy", "the first offset is 1, not 0"),
    ("a pickled object array", _pickled, "offsets.npy",
     r"holds an array of Python objects \(a pickle\), which is never loaded"),
    ("a file missing", lambda s: (s / "loss_mask.u8").unlink(), "loss_mask.u8", "missing"),
    ("token ids edited, same size", _rewrite("tokens.u32", _edit_token), "tokens.u32",
     r"sha256 \w+\.\.\. differs from the manifest's \w+\.\.\.: its bytes changed after it was prepared"),
    ("manifest not JSON", _rewrite("manifest.json", lambda b: b[:-9]), "manifest.json",
     r"not valid JSON \(.* at line \d+ column \d+\)"),
    ("manifest not an object", _rewrite("manifest.json", lambda b: b"[" + b + b"]"), "manifest.json",
     "holds a list, not an object"),
    ("manifest of another format", lambda s: _manifest(s, format=1), "manifest.json",
     "store format 1, this engine reads format 2"),
    ("manifest dtype", lambda s: _manifest(s, **{"files/tokens.u32/dtype": "uint16"}), "manifest.json",
     r"field 'files.tokens.u32.dtype' = 'uint16', the store format has 'uint32'"),
    ("manifest shape", lambda s: _manifest(s, **{"files/loss_mask.u8/shape": [3]}), "manifest.json",
     r"field 'files.loss_mask.u8.shape' = \[3\] disagrees with 'documents' = 6 and 'tokens' = \d+ "
     r"\(expected \[\d+\]\)"),
    ("manifest count of another type", lambda s: _manifest(s, documents="six"), "manifest.json",
     "field 'documents' = 'six' is a string, not an integer"),
    ("manifest counts disagree", lambda s: _manifest(s, **{"counts/documents": 5}), "manifest.json",
     r"'counts.documents' = 5 and 'token_stats.tokens' = (\d+) disagree with 'documents' = 6 and 'tokens' = \1"),
]
FIELDS = ["format", "content_sha256", "documents", "tokens", "files", "sources", "tokenizer_sha256", "code_sha256",
          "render", "counts", "token_stats", "render/max_seq_len", "counts/documents", "counts/skipped_examples",
          "token_stats/tokens", "files/origins.npy"]


def _case(tmp_path, prepared, tamper):
    store = tmp_path / "store"
    shutil.copytree(prepared[1], store)
    tamper(store)
    return store


def _refused(store, tokenizer) -> str:
    """The error a run given the prepared folder as its data path stops with."""
    cfg = DataConfig(train_path=str(store), max_seq_len=CFG.max_seq_len)
    with pytest.raises(DataError) as err:
        build_train_loader(cfg, tokenizer, store_dir=store.parent / "unused")
    return str(err.value)


@pytest.mark.parametrize("tamper, file, says", [t[1:] for t in TAMPERINGS], ids=[t[0] for t in TAMPERINGS])
def test_each_tampering_is_one_line_naming_the_file_and_the_field(tmp_path, prepared, tokenizer, tamper, file, says):
    store = _case(tmp_path, prepared, tamper)
    message = _refused(store, tokenizer)
    assert re.fullmatch(re.escape(f"{store / file}: ") + says + re.escape("; prepare the store again: python -m "
                        f"engine.data.prepare INPUT... --out {store}"), message), message


@pytest.mark.parametrize("field", FIELDS)
def test_every_manifest_field_is_required(tmp_path, prepared, tokenizer, field):
    store = _case(tmp_path, prepared, lambda s: _manifest(s, **{field: KeyError}))
    dotted = field.replace("/", ".")
    assert _refused(store, tokenizer).startswith(f"{store / 'manifest.json'}: field {dotted!r} is missing")


def test_token_ids_beyond_the_vocabulary_are_refused_before_the_model_sees_them(tmp_path, prepared, tokenizer):
    base = TokenStore(prepared[1])
    ids = np.asarray(base.tokens).copy()
    ids[5] = tokenizer.vocab_size + 7
    writer = StoreWriter(tmp_path / "store")
    writer.add(ids, np.asarray(base.loss_mask), base.lengths, np.asarray(base.origins))
    keep = ("sources", "tokenizer_sha256", "render", "code_sha256", "counts", "token_stats")
    writer.finish({k: base.manifest[k] for k in keep})
    message = _refused(tmp_path / "store", tokenizer)
    assert message.startswith(f"{tmp_path / 'store' / 'tokens.u32'}: token id {tokenizer.vocab_size + 7} "
                              f"(position 5, document 0) is not below the tokenizer's vocabulary of "
                              f"{tokenizer.vocab_size} ids; prepare the store again")


def test_a_damaged_store_the_trainer_prepared_is_made_again_in_one_line(tmp_path, prepared, tokenizer, caplog):
    source, reference = prepared
    store = _case(tmp_path, prepared, _rewrite("tokens.u32", _edit_token))
    caplog.set_level(logging.INFO, logger="engine.data.prepare")
    again = ensure_store(source, store, CFG, tokenizer)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert warnings[0].startswith(f"data store {store} fails its check ({store / 'tokens.u32'}: sha256 ")
    assert warnings[0].endswith("its bytes changed after it was prepared); preparing it again")
    assert again.fingerprint == TokenStore(reference).fingerprint
    assert (store / "tokens.u32").read_bytes() == (reference / "tokens.u32").read_bytes()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".store.")], "the old store is removed"
    # A manifest that is not JSON at all: the same, one line, made again.
    (store / "manifest.json").write_text("{")
    caplog.clear()
    assert ensure_store(source, store, CFG, tokenizer).fingerprint == again.fingerprint
    assert "manifest.json: not valid JSON" in caplog.text and "preparing it again" in caplog.text


class _CountingSha256:
    """hashlib stand-in for store_check: counts the files hashed."""

    def __init__(self):
        import hashlib

        self.calls, self._sha256 = 0, hashlib.sha256

    def sha256(self, *args):
        self.calls += 1
        return self._sha256(*args)


def test_the_verification_is_done_once_and_redone_only_for_files_that_moved(tmp_path, prepared, monkeypatch):
    import engine.data.store_check as store_check

    counting = _CountingSha256()
    monkeypatch.setattr(store_check, "hashlib", counting)
    store = _case(tmp_path, prepared, lambda s: None)
    TokenStore(store)
    assert counting.calls == 0, "the writer hashed the bytes as it wrote them: nothing to hash again"
    (store / "verified.json").unlink()
    assert TokenStore(store).max_token_id == int(np.asarray(TokenStore(store).tokens).max())
    assert counting.calls == 4, "four array files, each hashed once"
    os.utime(store / "origins.npy")  # touched: that file alone is read again
    TokenStore(store)
    assert counting.calls == 5
    for _ in range(3):
        TokenStore(store)
    assert counting.calls == 5
    (store / "tokens.u32").write_bytes(_edit_token((store / "tokens.u32").read_bytes()))
    with pytest.raises(DataError, match="tokens.u32: sha256 .* differs from the manifest's"):
        TokenStore(store)


def test_a_store_whose_folder_cannot_be_written_is_verified_without_recording_it(tmp_path, prepared, monkeypatch,
                                                                               caplog):
    store = _case(tmp_path, prepared, lambda s: None)
    (store / "verified.json").unlink()

    def read_only(src, dst):
        raise OSError(30, "Read-only file system", str(dst))

    monkeypatch.setattr(os, "replace", read_only)
    with caplog.at_level(logging.WARNING):
        assert len(TokenStore(store)) == len(RECORDS)
    assert f"cannot record the verification of {store} (Read-only file system)" in caplog.text
    assert sorted(p.name for p in store.iterdir()) == ["loss_mask.u8", "manifest.json", "offsets.npy",
                                                       "origins.npy", "tokens.u32"]
