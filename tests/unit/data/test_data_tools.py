"""The command-line tools and the shipped assets: preview output, regeneration, sample coverage."""

import io
import json
from collections import Counter

from engine.data import make_sample, make_tokenizer
from engine.data.agentic_sample import agentic_sample_paths
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
    # The model goes on by itself after its analysis: `<|start|>assistant` of the answer trains too.
    assert "<|end|>[[<|start|>assistant<|channel|>final<|message|>Hello.<|return|>]]" in text
    assert f"{path}:2: INVALID: nothing to train" in text
    assert trained == len(tokenizer.encode("<|start|>assistant<|channel|>final<|message|>Hello.<|return|>"))
    assert f"{path}:1: {total} tokens, {trained} trained" in text


def test_preview_reports_the_column_pythons_json_parser_reports(tmp_path):
    # The README's pretty-printed example pasted line by line into a .jsonl file, and a trailing comma.
    lines = ['{"messages": [{"role": "developer", "content": "Answer like a robot."},',
             '{"prompt": "Name a prime number.", "completion": "7",}']
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    out = io.StringIO()
    preview(str(path), n=5, tokenizer_path=None, loss_mask="assistant", reasoning_effort="low", current_date=None,
            color=False, out=out)
    for number, line in enumerate(lines, start=1):
        try:
            json.loads(line)
        except json.JSONDecodeError as e:
            expected = f"{path}:{number}: INVALID: invalid JSON: {e.msg} (column {e.colno})"
        assert expected in out.getvalue(), (expected, out.getvalue())
    assert "(column 72)" in out.getvalue()  # at the end of the first line, where Python's parser stops


def test_preview_cli_colors_on_request(capsys):
    preview_main([str(default_sample_paths()[0]), "--n", "1", "--color", "always"])
    out = capsys.readouterr().out
    assert "\x1b[32m" in out and "total:" in out


def test_shipped_assets_are_what_the_scripts_generate(tmp_path):
    make_sample.main(["--out-dir", str(tmp_path)])
    for shipped in (*default_sample_paths(), *agentic_sample_paths()):
        assert (tmp_path / shipped.name).read_bytes() == shipped.read_bytes()
    data = [str(tmp_path / default_sample_paths()[0].name), str(tmp_path / agentic_sample_paths()[0].name)]
    make_tokenizer.main(["--data", *data, "--out", str(tmp_path / "tok")])
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


def test_agentic_sample_covers_tool_traffic():
    from engine.data.records import parse_record

    with agentic_sample_paths()[0].open() as f:
        records = [json.loads(line) for line in f]
    conversations = [parse_record(r) for r in records]  # every record is valid
    calls = Counter(len(m.tool_calls) for c in conversations for m in c.messages if m.tool_calls)
    assert calls[1] > 50 and calls[2] > 10, "single and parallel calls"
    assert sum(c.native for c in conversations) > 5
    assert sum(c.messages[-1].tool_calls != () for c in conversations) > 5, "records ending with a call"
    assert sum(any(m.role == "tool" and m.tool_call_id for m in c.messages) for c in conversations) > 10
    assert sum(any(m.tool_calls and m.content for m in c.messages) for c in conversations) > 10, "preambles"
    assert all(Counter(r.get("reasoning_effort") for r in records)[e] > 30 for e in ("low", "medium", "high", None))


def test_preview_shows_tool_calls_results_and_what_trains(tokenizer):
    out = io.StringIO()
    preview(str(agentic_sample_paths()[0]), n=20, tokenizer_path=None, loss_mask="assistant",
            reasoning_effort="medium", current_date=None, color=False, out=out)
    text = out.getvalue()
    assert "namespace functions {" in text
    # The call's recipient and arguments train, its headers do not; the tool's result never trains.
    assert "<|start|>assistant[[ to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>{" in text
    assert '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{"temp_c"' in text
    assert "[[{\"temp_c\"" not in text


def test_agentic_sample_fits_the_tiny_recipe_with_the_shipped_tokenizer(tokenizer):
    from engine.data.config import DataConfig
    from engine.data.dataset import DocumentEncoder, JsonlFile

    for path in agentic_sample_paths():
        file = JsonlFile(path)
        encoder = DocumentEncoder(DataConfig(max_seq_len=256), tokenizer)  # tiny_sft's max_seq_len
        docs = encoder.encode(file.path, file.read(range(len(file))))
        assert all(d is not None and d.num_targets > 0 for d in docs)
        assert encoder.stats.dropped_overlong == 0 and encoder.stats.skipped_invalid == 0
