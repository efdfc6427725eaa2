"""The command-line tools and the shipped assets: preview output, regeneration, sample coverage."""

import io
import json
from collections import Counter

from engine.data import make_sample, make_tokenizer
from engine.data.config import default_sample_paths, default_tokenizer_path
from engine.data.preview import main as preview_main
from engine.data.preview import preview


def test_preview_marks_trained_spans_and_counts_tokens(write_jsonl, tokenizer):
    record = {"messages": [{"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Hello.", "thinking": "Greet back."}]}
    path = write_jsonl([record, {"messages": []}])
    out = io.StringIO()
    total, trained = preview(str(path), n=5, tokenizer_path=None, loss_mask="final_only",
                             reasoning_effort="low", current_date=None, color=False, out=out)
    text = out.getvalue()
    assert "<|channel|>analysis<|message|>Greet back.<|end|>" in text
    assert "<|channel|>final<|message|>[[Hello.<|return|>]]" in text
    assert f"{path}:2: INVALID: nothing to train" in text
    assert trained == len(tokenizer.encode("Hello.<|return|>"))
    assert f"{path}:1: {total} tokens, {trained} trained" in text


def test_preview_cli_colors_on_request(capsys):
    preview_main([str(default_sample_paths()[0]), "--n", "1", "--color", "always"])
    out = capsys.readouterr().out
    assert "\x1b[32m" in out and "total:" in out


def test_shipped_assets_are_what_the_scripts_generate(tmp_path):
    make_sample.main(["--out-dir", str(tmp_path)])
    for shipped in default_sample_paths():
        assert (tmp_path / shipped.name).read_bytes() == shipped.read_bytes()
    make_tokenizer.main(["--data", str(tmp_path / default_sample_paths()[0].name), "--out", str(tmp_path / "tok")])
    assert (tmp_path / "tok" / "tokenizer.json").read_bytes() == default_tokenizer_path().read_bytes()


def test_sample_data_covers_every_path():
    with default_sample_paths()[0].open() as f:
        records = [json.loads(line) for line in f]
    chats = [r for r in records if "messages" in r]
    efforts = Counter(r.get("reasoning_effort") for r in records)
    assert 300 <= len(records) <= 1000
    assert all(efforts[level] > 30 for level in ("low", "medium", "high", None))
    assert len(chats) < len(records), "some prompt/completion records"
    roles = Counter(m["role"] for r in chats for m in r["messages"])
    assert roles["developer"] > 30 and roles["system"] > 10
    assert sum(any("thinking" in m for m in r["messages"]) for r in chats) > 100
    assert sum(sum(m["role"] == "user" for m in r["messages"]) > 1 for r in chats) > 50
