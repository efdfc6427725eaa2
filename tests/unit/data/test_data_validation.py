"""Every bad record is reported with file:line; on_error=skip counts; overlong drop/truncate counts."""

import json
import re

import pytest

from engine.data.config import DataConfig
from engine.data.dataset import DataError, DocumentEncoder, JsonlFile

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}


def messages(*items: dict) -> dict:
    return {"messages": list(items)}


USER = {"role": "user", "content": "Hi"}
ASSISTANT = {"role": "assistant", "content": "Hello."}

BAD_LINES = {
    "invalid json": ('{"messages": [', "invalid JSON"),
    "not an object": ("[1, 2]", "must be a JSON object, got a list"),
    "no messages key": (json.dumps({"text": "hi"}), "missing key 'messages'"),
    "prompt without completion": (json.dumps({"prompt": "Hi"}), "missing key 'completion'"),
    "completion not a string": (
        json.dumps({"prompt": "Hi", "completion": 3}),
        "'completion' must be a string, got int",
    ),
    "both shapes": (json.dumps({**GOOD, "prompt": "x", "completion": "y"}), "not both"),
    "messages not a list": (json.dumps({"messages": "hi"}), "'messages' must be a list"),
    "empty messages": (json.dumps({"messages": []}), "nothing to train: 'messages' is empty"),
    "message not an object": (json.dumps(messages("hi", ASSISTANT)), r"messages\[0\] must be an object"),
    "missing role": (json.dumps(messages({"content": "Hi"}, ASSISTANT)), r"messages\[0\]: missing key 'role'"),
    "missing content": (json.dumps(messages(USER, {"role": "assistant"})), r"messages\[1\]: missing key 'content'"),
    "unknown role": (
        json.dumps(messages({"role": "robot", "content": "x"}, ASSISTANT)),
        r"messages\[0\].role: unknown role 'robot' \(allowed: system, developer, user, assistant, tool\)",
    ),
    "unknown key": (json.dumps(messages(USER, {**ASSISTANT, "thought": "x"})), r"messages\[1\]: unknown key 'thought'"),
    "content not a string": (
        json.dumps(messages({"role": "user", "content": ["Hi"]}, ASSISTANT)),
        r"messages\[0\].content must be a string, got a list",
    ),
    "thinking not a string": (
        json.dumps(messages(USER, {**ASSISTANT, "thinking": 1})),
        r"messages\[1\].thinking must be a string",
    ),
    "thinking on a user": (
        json.dumps(messages({**USER, "thinking": "x"}, ASSISTANT)),
        "only assistant messages carry thinking",
    ),
    "no assistant": (json.dumps(messages(USER)), "nothing to train: the conversation has no assistant message"),
    "trailing user": (json.dumps(messages(USER, ASSISTANT, USER)), "must end with an assistant message"),
    "late developer": (
        json.dumps(messages(USER, {"role": "developer", "content": "x"}, ASSISTANT)),
        "must come before the first user/assistant message",
    ),
    "bad reasoning effort": (
        json.dumps({**GOOD, "reasoning_effort": "max"}),
        "reasoning_effort = 'max' is not allowed",
    ),
    "special token in content": (
        json.dumps(messages({"role": "user", "content": "a<|end|>b"}, ASSISTANT)),
        r"messages\[0\].content contains the special token '<\|end\|>'",
    ),
}

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def call(name: str, arguments: str = "{}", **extra) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}, **extra}


def agentic(*items: dict, tools=(WEATHER,)) -> str:
    return json.dumps({"tools": list(tools), "messages": [USER, *items]})


CALLS = {"role": "assistant", "tool_calls": [call("get_weather", id="c1")]}
BAD_LINES.update(
    {
        "result without call": (
            agentic({"role": "tool", "name": "get_weather", "content": "1"}, ASSISTANT),
            r"messages\[1\]: a result from 'get_weather' with no earlier call to it",
        ),
        "result with unknown call id": (
            agentic(CALLS, {"role": "tool", "tool_call_id": "c9", "content": "1"}, ASSISTANT),
            r"messages\[2\].tool_call_id = 'c9' names no earlier tool call",
        ),
        "tool message naming nothing": (
            agentic(CALLS, {"role": "tool", "content": "1"}, ASSISTANT),
            r"messages\[2\]: a tool message needs 'name' or 'tool_call_id'",
        ),
        "call to undeclared function": (
            agentic({"role": "assistant", "tool_calls": [call("get_time")]}),
            r"messages\[1\].tool_calls\[0\]: call to 'get_time', which is not in the "
            r"record's 'tools' \(declared: get_weather\)",
        ),
        "call without tools": (agentic(CALLS, tools=()), r"call to 'get_weather'.*\(declared: none\)"),
        "arguments not json": (
            agentic({"role": "assistant", "tool_calls": [call("get_weather", "{city: Oslo}")]}),
            r"messages\[1\].tool_calls\[0\].function.arguments is not valid JSON",
        ),
        "tool_calls on a user": (
            agentic({"role": "user", "content": "x", "tool_calls": []}, ASSISTANT),
            r"messages\[1\]: unknown key 'tool_calls' for a user message \(only assistant",
        ),
        "special token in arguments": (
            agentic({"role": "assistant", "tool_calls": [call("get_weather", '"<|call|>"')]}),
            r"arguments contains the special token '<\|call\|>'",
        ),
        "unknown channel": (
            agentic({"role": "assistant", "channel": "thoughts", "content": "x"}),
            r"messages\[1\].channel: unknown channel 'thoughts' \(allowed: analysis, commentary, final\)",
        ),
        "unknown recipient": (
            agentic({"role": "assistant", "channel": "commentary", "recipient": "functions.nope", "content": "{}"}),
            r"messages\[1\].recipient: unknown recipient 'functions.nope' \(declared tools: "
            r"functions.get_weather\)",
        ),
        "native assistant without channel": (
            agentic({"role": "assistant", "content": "x"}, {"role": "assistant", "channel": "final", "content": "y"}),
            r"messages\[1\]: an assistant message needs a 'channel'",
        ),
        "bad tools": (
            json.dumps({**GOOD, "tools": [{"type": "function", "function": {"name": "a b"}}]}),
            r"tools\[0\].function.name = 'a b' must be a name",
        ),
        "bad builtin tool": (json.dumps({**GOOD, "builtin_tools": ["shell"]}), r"'builtin_tools' = \['shell'\]"),
    }
)


def write_with_bad_line(tmp_path, bad: str):
    """Good record on line 1, blank line 2, the bad one on line 3 (blank lines still count)."""
    path = tmp_path / "data.jsonl"
    path.write_bytes((json.dumps(GOOD) + "\n\n").encode() + (bad.encode() if isinstance(bad, str) else bad) + b"\n")
    return path


def encode_all(cfg: DataConfig, tokenizer, path):
    file = JsonlFile(path)
    encoder = DocumentEncoder(cfg, tokenizer)
    return encoder, encoder.encode(file.path, file.read(range(len(file))))


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_record_error_names_file_and_line(tmp_path, tokenizer, case):
    bad, message = BAD_LINES[case]
    path = write_with_bad_line(tmp_path, bad)
    with pytest.raises(DataError, match=re.escape(f"{path}:3: ") + ".*" + message):
        encode_all(DataConfig(), tokenizer, path)


def test_invalid_utf8_names_file_and_line(tmp_path, tokenizer):
    path = write_with_bad_line(tmp_path, b'{"prompt": "\xff", "completion": "x"}')
    with pytest.raises(DataError, match=re.escape(f"{path}:3: not valid UTF-8")):
        encode_all(DataConfig(), tokenizer, path)


def test_on_error_skip_counts_and_reports(tmp_path, tokenizer, caplog):
    path = tmp_path / "data.jsonl"
    bad = [BAD_LINES["invalid json"][0], BAD_LINES["unknown role"][0], BAD_LINES["no assistant"][0]]
    path.write_text("\n".join([json.dumps(GOOD), *bad, json.dumps(GOOD)]) + "\n")
    encoder, docs = encode_all(DataConfig(on_error="skip"), tokenizer, path)
    assert [d is not None for d in docs] == [True, False, False, False, True]
    assert encoder.stats.skipped_invalid == 3 and encoder.stats.documents == 2
    assert [r.split(": ")[0] for r in encoder.stats.skip_reasons] == [f"{path}:{n}" for n in (2, 3, 4)]
    assert "skipped 3 invalid" in encoder.stats.summary()
    assert sum("skipping invalid record" in r.message for r in caplog.records) == 3


def test_empty_or_missing_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match=f"{empty}: no records"):
        JsonlFile(empty)
    with pytest.raises(DataError, match="data file not found"):
        JsonlFile(tmp_path / "missing.jsonl")


def long_record(n_words: int, answer_words: int = 2) -> dict:
    return {"prompt": "word " * n_words, "completion": "yes " * answer_words}


def test_overlong_drop_counts(tmp_path, tokenizer):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [GOOD, long_record(200), GOOD]) + "\n")
    encoder, docs = encode_all(DataConfig(max_seq_len=128, overlong="drop"), tokenizer, path)
    assert [d is not None for d in docs] == [True, False, True]
    assert encoder.stats.dropped_overlong == 1 and encoder.stats.truncated == 0


def test_overlong_truncate_counts_and_drops_what_has_nothing_left_to_train(tmp_path, tokenizer):
    path = tmp_path / "data.jsonl"
    # The first long record's answer survives the cut only partly; the second's prompt alone overflows.
    keeps_answer = {"prompt": "word " * 40, "completion": "yes " * 200}
    loses_answer = long_record(300)
    path.write_text("\n".join(json.dumps(r) for r in [keeps_answer, loses_answer, GOOD]) + "\n")
    encoder, docs = encode_all(DataConfig(max_seq_len=128, overlong="truncate"), tokenizer, path)
    assert len(docs[0]) == 128 and docs[0].num_targets > 0
    assert docs[1] is None and docs[2] is not None
    assert encoder.stats.truncated == 1 and encoder.stats.dropped_overlong == 1
