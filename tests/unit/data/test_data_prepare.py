"""Preparation: every record validated up front, bad records listed or counted, over-long ones counted,
the same store from every input format and worker count, stale stores made again, a clear error
for a Hub id that cannot be reached."""

import json
import logging
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from engine.data.config import DataConfig, default_sample_paths
from engine.data.dataset import DataError
from engine.data.loader import build_train_loader
from engine.data.prepare import LISTED, ensure_store, main, prepare
from engine.data.store import FORMAT, MANIFEST, TokenStore
from engine.data.tokenizer import load_tokenizer

GOOD = {"messages": [{"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": "Hello.", "thinking": "Greet."}]}
NO_ASSISTANT = {"messages": [{"role": "user", "content": "Hi"}]}


def records(n: int) -> list[dict]:
    """Distinct records of both shapes."""
    out = []
    for i in range(n):
        if i % 3 == 2:
            out.append({"prompt": f"What is {i} + 1?", "completion": f"{i + 1}."})
        else:
            out.append({"messages": [{"role": "user", "content": f"Say {i}."},
                                     {"role": "assistant", "content": f"{i}.", "thinking": f"It is {i}."}]})
    return out


def sample_with(tmp_path, *bad: str):
    """The 400 shipped chats, then the given bad lines (line 401 on)."""
    path = tmp_path / "chats.jsonl"
    path.write_bytes(default_sample_paths()[0].read_bytes() + "".join(line + "\n" for line in bad).encode())
    return path


def test_bad_last_line_stops_before_anything_is_written(tmp_path, tokenizer):
    path = sample_with(tmp_path, json.dumps(NO_ASSISTANT))
    with pytest.raises(DataError, match=re.escape(f"1 invalid record(s) of 401 in {path}") + r"(.|\n)*"
                       + re.escape(f"{path}:401: nothing to train")):
        prepare(path, tmp_path / "store", DataConfig(), tokenizer, workers=1)
    assert not (tmp_path / "store").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["chats.jsonl"], "no temporary folder left behind"


def test_first_errors_listed_then_counted(tmp_path, tokenizer):
    bad = ['{"broken'] * 5 + [json.dumps(NO_ASSISTANT)] * 20
    path = sample_with(tmp_path, *bad)
    with pytest.raises(DataError) as err:
        prepare(path, tmp_path / "store", DataConfig(), tokenizer, workers=2)
    message = str(err.value)
    assert message.startswith(f"25 invalid record(s) of 425 in {path}")
    listed = re.findall(rf"{re.escape(str(path))}:(\d+): ", message)
    assert listed == [str(n) for n in range(401, 401 + LISTED)]
    assert message.endswith(f"... and {25 - LISTED} more")


def test_skip_counts_every_bad_record_once_and_reports_them(tmp_path, tokenizer, caplog):
    path = sample_with(tmp_path, '{"broken', json.dumps(NO_ASSISTANT), "[1, 2]")
    with caplog.at_level(logging.WARNING, logger="engine.data.prepare"):
        store = prepare(path, tmp_path / "store", DataConfig(on_error="skip"), tokenizer, workers=2)
    counts = store.manifest["counts"]
    assert (counts["records"], counts["documents"], counts["skipped_invalid"]) == (403, 400, 3)
    assert [e.split(": ")[0] for e in counts["skipped_examples"]] == [f"{path}:{n}" for n in (401, 402, 403)]
    assert len(store) == 400
    warning = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(warning) == 1 and warning[0].startswith("skipped 3 invalid record(s)") and f"{path}:402" in warning[0]


@pytest.mark.parametrize("overlong", ["drop", "truncate"])
def test_overlong_records_are_counted_per_record(tmp_path, tokenizer, write_jsonl, overlong):
    long_answer = {"prompt": "word " * 20, "completion": "yes " * 300}
    long_prompt = {"prompt": "word " * 300, "completion": "yes"}  # truncation would leave nothing to train
    path = write_jsonl([GOOD, long_answer, long_prompt, GOOD])
    store = prepare(path, tmp_path / "store", DataConfig(max_seq_len=128, overlong=overlong), tokenizer, workers=1)
    counts = store.manifest["counts"]
    if overlong == "drop":
        assert (counts["documents"], counts["dropped_overlong"], counts["truncated"]) == (2, 2, 0)
        assert counts["overlong_examples"][0].startswith(f"{path}:2 (")
    else:
        assert (counts["documents"], counts["dropped_overlong"], counts["truncated"]) == (3, 1, 1)
        assert store.lengths.tolist()[1] == 128 and store.document(1).num_targets > 0
    assert store.lengths.max() <= 128 and store.origins[:, 1].tolist()[0] == 1


def _write_formats(tmp_path, rows: list[dict]) -> dict:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = {"jsonl": tmp_path / "d.jsonl", "json": tmp_path / "d.json", "parquet": tmp_path / "d.parquet",
             "arrow": tmp_path / "d_saved"}
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths["json"].write_text(json.dumps(rows))
    # One column per key of any record (from_pylist / from_list take the first row's keys only).
    columns = {k: [r.get(k) for r in rows] for k in sorted({k for r in rows for k in r})}
    pq.write_table(pa.table(columns), paths["parquet"])
    datasets.Dataset.from_dict(columns).save_to_disk(str(paths["arrow"]))
    return paths


def test_every_input_format_gives_the_same_store(tmp_path, tokenizer):
    paths = _write_formats(tmp_path, records(30))
    stores = {kind: prepare(path, tmp_path / f"store_{kind}", DataConfig(), tokenizer, workers=1)
              for kind, path in paths.items()}
    reference = stores["jsonl"]
    assert len(reference) == 30 and reference.manifest["counts"]["skipped_invalid"] == 0
    for kind, store in stores.items():
        assert store.fingerprint == reference.fingerprint, kind
        assert np.array_equal(np.asarray(store.tokens), np.asarray(reference.tokens)), kind
    # The first record, tokenized independently of the store.
    from engine.data.harmony import render

    assert reference.document(0).input_ids.tolist() == tokenizer.encode(render(records(1)[0]))


def test_errors_in_tables_name_the_row(tmp_path, tokenizer):
    paths = _write_formats(tmp_path, records(3))
    import pyarrow as pa
    import pyarrow.parquet as pq

    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "a", "completion": "b"}, {"prompt": "c"}]), bad)
    with pytest.raises(DataError, match=re.escape(f"{bad}:row 1: missing key 'completion'")):
        prepare(bad, tmp_path / "s1", DataConfig(), tokenizer, workers=1)
    broken = tmp_path / "bad.json"
    broken.write_text(json.dumps([GOOD, NO_ASSISTANT]))
    with pytest.raises(DataError, match=re.escape(f"{broken}:item 1: nothing to train")):
        prepare(broken, tmp_path / "s2", DataConfig(), tokenizer, workers=1)
    assert len(prepare([paths["parquet"], paths["jsonl"]], tmp_path / "s3", DataConfig(), tokenizer, workers=1)) == 6


def test_worker_pool_gives_the_same_store_as_one_process(tmp_path, tokenizer):
    path = sample_with(tmp_path)
    one = prepare(path, tmp_path / "one", DataConfig(), tokenizer, workers=1)
    pool = prepare(path, tmp_path / "pool", DataConfig(), tokenizer, workers=2)
    assert one.fingerprint == pool.fingerprint and one.manifest["token_stats"] == pool.manifest["token_stats"]


def test_stale_stores_are_made_again_never_reused(tmp_path, tokenizer, write_jsonl, caplog):
    path = write_jsonl(records(12))
    out = tmp_path / "store"
    caplog.set_level(logging.INFO, logger="engine.data.prepare")
    first = ensure_store(path, out, DataConfig(), tokenizer)

    def again(cfg=DataConfig(), tok=tokenizer) -> tuple[str, str]:
        caplog.clear()
        store = ensure_store(path, out, cfg, tok)
        return store.fingerprint, " ".join(r.getMessage() for r in caplog.records)

    fingerprint, logged = again()
    assert fingerprint == first.fingerprint and "is current" in logged
    os.utime(path, ns=(1, 1))  # touched, same bytes: hashed again, still current
    assert "is current" in again()[1]
    assert "is current" in again(DataConfig(on_error="skip"))[1], "nothing was skipped: the store serves both"
    assert "loss_mask 'assistant' -> 'last_turn'" in again(DataConfig(loss_mask="last_turn"))[1]
    path.write_text(path.read_text() + json.dumps(GOOD) + "\n")
    fingerprint, logged = again()
    assert f"{path} changed" in logged and fingerprint != first.fingerprint
    assert len(TokenStore(out)) == 13
    manifest = json.loads((out / MANIFEST).read_text())
    (out / MANIFEST).write_text(json.dumps({**manifest, "format": 0}))
    assert "store format 0" in again()[1]
    (out / MANIFEST).write_text("{not json")
    assert "not valid JSON" in again()[1] and TokenStore(out).manifest["format"] == FORMAT
    other = tmp_path / "tokenizer.json"  # the same tokenizer in other bytes: another hash
    other.write_text(json.dumps(json.loads(load_tokenizer().backend.to_str()), indent=1))
    assert "another tokenizer" in again(tok=load_tokenizer(other))[1]


def test_a_prepared_folder_is_a_data_path(tmp_path, tokenizer):
    path = sample_with(tmp_path)
    assert main([str(path), "--out", str(tmp_path / "prepared"), "--max-seq-len", "256", "--workers", "1"]) == 0
    assert (tmp_path / "prepared" / MANIFEST).is_file()
    cfg = DataConfig(train_path=str(tmp_path / "prepared"), max_seq_len=256)
    loader = build_train_loader(cfg, tokenizer, store_dir=tmp_path / "unused", seed=0)
    assert next(loader)["input_ids"].shape == (1, 256) and not (tmp_path / "unused").exists()
    loader.close()
    with pytest.raises(DataError, match=r"prepared with max_seq_len=256 \(config: 512\)"):
        build_train_loader(DataConfig(train_path=cfg.train_path, max_seq_len=512), tokenizer, store_dir=tmp_path)


def test_cli_errors_are_one_message_and_exit_2(tmp_path, capsys):
    assert main([str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "s")]) == 2
    assert "missing.jsonl: no such file or folder" in capsys.readouterr().err


def test_unreachable_hub_id_is_a_clear_error(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run([sys.executable, "-m", "engine.data.prepare", "no-such-owner/no-such-dataset:train",
                           "--out", str(tmp_path / "s")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "no-such-owner/no-such-dataset:train: cannot load the Hub dataset" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_store_that_skipped_records_is_not_reused_under_raise(tmp_path, tokenizer, write_jsonl):
    path = write_jsonl([*records(3), NO_ASSISTANT])
    assert len(ensure_store(path, tmp_path / "store", DataConfig(on_error="skip"), tokenizer, workers=1)) == 3
    with pytest.raises(DataError, match=re.escape(f"{path}:4: nothing to train")):
        ensure_store(path, tmp_path / "store", DataConfig(on_error="raise"), tokenizer, workers=1)
