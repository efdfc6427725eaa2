"""Bad data through engine/train.py: a bad last record (training or validation) stops the run before
step 1 naming its line; data.on_error=skip trains and reports exactly how many records it skipped,
on the console (the engine.* loggers survive Hydra's logging set-up), in the rank log and in the
first line of metrics.jsonl."""

import json
import subprocess
import sys

import pytest

from engine.data.config import default_sample_paths
from engine.train import REPO

# Each test tokenizes the shipped chats in a run of engine/train.py.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

NO_ASSISTANT = json.dumps({"messages": [{"role": "user", "content": "Hi"}]})
ONE_STEP = [
    "recipe=tiny_sft",
    "trainer.max_steps=1",
    "optim.warmup_steps=1",
    "data.max_seq_len=256",
    "data.global_batch_size=2",
    "data.micro_batch_size=2",
    "trainer.progress=false",
]


def _train(*overrides):
    return subprocess.run(
        [sys.executable, str(REPO / "engine" / "train.py"), *overrides],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )


def _sample_with(path, *bad):
    train, val = default_sample_paths()
    source = val if "val" in path.name else train
    path.write_bytes(source.read_bytes() + "".join(line + "\n" for line in bad).encode())
    return path


def test_bad_last_record_stops_before_step_one(tmp_path):
    data = _sample_with(tmp_path / "chats.jsonl", NO_ASSISTANT)
    proc = _train(*ONE_STEP, f"data.train_path={data}", f"trainer.output_dir={tmp_path / 'out'}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{data}:401: nothing to train: the conversation has no assistant message" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "metrics.jsonl").exists() and "step 1/" not in proc.stdout


def test_bad_last_validation_record_stops_before_step_one(tmp_path):
    val = _sample_with(tmp_path / "val.jsonl", '{"broken')
    proc = _train(
        *ONE_STEP,
        f"data.train_path={default_sample_paths()[0]}",
        f"data.val_path={val}",
        "trainer.val_every=1",
        f"trainer.output_dir={tmp_path / 'out'}",
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{val}:49: invalid JSON" in proc.stderr
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_skip_reports_how_many_everywhere(tmp_path):
    data = _sample_with(tmp_path / "chats.jsonl", NO_ASSISTANT, '{"broken', "[]")
    out = tmp_path / "out"
    proc = _train(*ONE_STEP, f"data.train_path={data}", "data.on_error=skip", f"trainer.output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for text in (proc.stdout, (out / "logs" / "rank0.log").read_text()):
        assert "skipped 3 invalid record(s) (data.on_error=skip)" in text
        assert f"{data}:402: invalid JSON" in text
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and first["data_skipped_invalid"] == 3
    assert (first["data_records"], first["data_documents"], first["data_dropped_overlong"]) == (403, 400, 0)
    # How the rows pack (data.pack=best_fit, the default): every row slot is a token or padding.
    assert first["data_rows"] * 256 - first["data_padding_tokens"] == first["data_tokens"]
    assert first["data_packing_efficiency"] == first["data_tokens"] / (first["data_rows"] * 256)
