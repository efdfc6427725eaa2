"""Two preparations of one store folder at once: the second run waits and reuses the first one's store;
two writers whose final renames meet (no lock) leave one store, and the one that finishes second uses
it when it holds the same content, or fails in one line when it does not. Threads meet at barriers,
so the interleaving is the same at every run."""

import json
import logging
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from engine.data.config import DataConfig
from engine.data.prepare import ensure_store
from engine.data.store import StoreWriter, TokenStore
from engine.errors import DataError


def _in_threads(*jobs):
    """Run each job in its own thread; (results, errors) in job order."""
    results, errors = [None] * len(jobs), [None] * len(jobs)

    def run(k):
        try:
            results[k] = jobs[k]()
        except BaseException as exc:  # handed to the test
            errors[k] = exc

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    return results, errors


@pytest.fixture
def renames_meet(monkeypatch):
    """Hold each thread's first rename of its finished folder until both threads are there."""
    barrier = threading.Barrier(2, timeout=30)
    seen: set[int] = set()
    rename = os.rename

    def meeting(src, dst, *args, **kwargs):
        if ".tmp-" in Path(src).name and threading.get_ident() not in seen:
            seen.add(threading.get_ident())
            barrier.wait()
        return rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", meeting)


def _write(path: Path, first_id: int, manifest: dict):
    def job():
        writer = StoreWriter(path)
        lengths = np.array([3, 4])
        writer.add(np.arange(first_id, first_id + 7), np.ones(7, bool), lengths, np.array([[0, 1], [0, 2]]))
        return writer.finish(manifest)
    return job


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def test_writers_finishing_together_with_the_same_content_share_one_store(tmp_path, renames_meet, caplog):
    out = tmp_path / "store"
    caplog.set_level(logging.INFO, logger="engine.data.store")
    stores, errors = _in_threads(_write(out, 5, {"run": 1}), _write(out, 5, {"run": 1}))
    assert errors == [None, None]
    assert stores[0].fingerprint == stores[1].fingerprint == TokenStore(out).fingerprint
    assert np.asarray(TokenStore(out).tokens).tolist() == list(range(5, 12))
    assert "was prepared by another process meanwhile, with the same content; using it" in caplog.text
    assert _leftovers(tmp_path, "store") == []


def test_writers_finishing_together_with_other_content_fail_in_one_line(tmp_path, renames_meet):
    out = tmp_path / "store"
    stores, errors = _in_threads(_write(out, 5, {"run": 1}), _write(out, 50, {"run": 2}))
    (lost,) = [e for e in errors if e is not None]
    (won,) = [s for s in stores if s is not None]
    assert isinstance(lost, DataError) and str(lost) == (
        f"{out}: another process prepared other data into this folder while this preparation ran; give each run "
        "its own data.prepared_dir (--out), or the same data and options")
    assert TokenStore(out).fingerprint == won.fingerprint and len(TokenStore(out)) == 2
    assert _leftovers(tmp_path, "store") == []


def test_two_runs_preparing_one_folder_at_once_prepare_it_once(tmp_path, tokenizer, caplog):
    source = tmp_path / "data.jsonl"
    source.write_text("".join(json.dumps({"prompt": f"Say {i}.", "completion": f"{i}."}) + "\n" for i in range(8)))
    out = tmp_path / "prepared" / "train"
    start = threading.Barrier(2, timeout=30)
    caplog.set_level(logging.INFO, logger="engine.data")

    def run():
        start.wait()
        return ensure_store(source, out, DataConfig(), tokenizer, workers=1)

    stores, errors = _in_threads(run, run)
    assert errors == [None, None]
    assert stores[0].fingerprint == stores[1].fingerprint == TokenStore(out).fingerprint
    messages = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith(f"prepared {source} -> {out}") for m in messages) == 1, messages
    assert sum(m.startswith(f"data store {out} is current") for m in messages) == 1, messages
    assert _leftovers(out.parent, "train") == [], "no lock file or temporary folder left behind"
