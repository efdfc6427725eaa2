"""Records JSON can express but no conversation is: nesting deeper than Python reads, a lone surrogate
(`\\ud800`, half a UTF-16 pair), a key given twice in one object. Each is an error at file:line (skipped
and counted under data.on_error=skip), never a traceback and never a silent choice of one value."""

import json
import re

import pytest

from engine.data.config import DataConfig
from engine.data.dataset import DataError, DocumentEncoder
from engine.data.prepare import prepare
from engine.data.records import RecordError

GOOD = {"prompt": "What is 1 + 1?", "completion": "2."}
CHAT = ('{"messages": [{"role": "user", "content": "Hi"}, '
        '{"role": "assistant", "content": "Hello.", "thinking": "Greet."}]}')
TOOLS = ('{"messages": [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": null, "tool_calls": '
         '[{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}], '
         '"tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather now"}}]}')

# (case, the second line of the file, what its error says after `file:2: `)
LINES = [
    ("nested 5000 deep", "[" * 5000 + "]" * 5000, "JSON nested too deeply to read (Python's limit is about "),
    ("nested inside a message", CHAT.replace('"Hi"', "[" * 3000 + "]" * 3000), "JSON nested too deeply to read"),
    ("lone surrogate in a prompt", '{"prompt": "a\\ud800b", "completion": "c"}',
     "'prompt' holds a lone surrogate '\\ud800' at character 1 (half of a UTF-16 pair, not a character)"),
    ("lone surrogate in content", CHAT.replace('"Hello."', '"Hello \\udfff"'),
     "messages[1].content holds a lone surrogate '\\udfff' at character 6"),
    ("lone surrogate in thinking", CHAT.replace('"Greet."', '"\\ud83d"'),
     "messages[1].thinking holds a lone surrogate"),
    ("lone surrogate in a tool description", TOOLS.replace("Weather now", "Weather \\ud800"),
     "tools[0].function.description holds a lone surrogate"),
    ("lone surrogate in tool arguments", TOOLS.replace('"Paris"', '"Par\\udc00is"'),
     "messages[1].tool_calls[0].function.arguments holds a lone surrogate"),
    ("a surrogate encoded as bytes", b'{"prompt": "a\xed\xa0\x80", "completion": "c"}', "not valid UTF-8"),
    ("duplicate top-level key", '{"prompt": "a", "completion": "b", "prompt": "c"}',
     "duplicate key 'prompt' in one JSON object (a parser would keep only its last value); keep one"),
    ("duplicate key in a message", CHAT.replace('"content": "Hello."', '"content": "Hello.", "content": "Bye."'),
     "duplicate key 'content' in one JSON object"),
]


def _file(tmp_path, line) -> object:
    path = tmp_path / "data.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + (line if isinstance(line, bytes) else line.encode()) + b"\n")
    return path


@pytest.mark.parametrize("line, says", [c[1:] for c in LINES], ids=[c[0] for c in LINES])
def test_a_bad_line_is_named_by_file_and_line(tmp_path, tokenizer, line, says):
    path = _file(tmp_path, line)
    with pytest.raises(DataError) as err:
        prepare(path, tmp_path / "store", DataConfig(), tokenizer, workers=1)
    listed = str(err.value).splitlines()
    assert listed[0].startswith(f"1 invalid record(s) of 2 in {path}") and len(listed) == 2
    assert listed[1].startswith(f"  {path}:2: {says}"), listed[1]


@pytest.mark.parametrize("line, says", [c[1:] for c in LINES], ids=[c[0] for c in LINES])
def test_a_bad_line_is_skipped_and_counted_under_skip(tmp_path, tokenizer, line, says):
    path = _file(tmp_path, line)
    store = prepare(path, tmp_path / "store", DataConfig(on_error="skip"), tokenizer, workers=1)
    counts = store.manifest["counts"]
    assert (counts["records"], counts["documents"], counts["skipped_invalid"]) == (2, 1, 1)
    assert counts["skipped_examples"][0].startswith(f"{path}:2: {says}")


def test_duplicate_keys_in_a_json_file_name_the_item(tmp_path, tokenizer):
    path = tmp_path / "data.json"
    path.write_text('[{"prompt": "a", "completion": "b"},\n {"prompt": "a", "completion": "b", "completion": "c"},\n'
                    ' {"messages": [{"role": "user", "role": "user", "content": "Hi"}, '
                    '{"role": "assistant", "content": "Hello."}]}]')
    store = prepare(path, tmp_path / "store", DataConfig(on_error="skip"), tokenizer, workers=1)
    assert store.manifest["counts"]["skipped_examples"] == [
        f"{path}:item 1: duplicate key 'completion' in one JSON object (a parser would keep only its last value); "
        "keep one", f"{path}:item 2: duplicate key 'role' in one JSON object (a parser would keep only its last "
        "value); keep one"]
    with pytest.raises(DataError, match=re.escape(f"{path}:item 1: duplicate key 'completion'")):
        prepare(path, tmp_path / "store2", DataConfig(), tokenizer, workers=1)


def test_a_json_file_nested_too_deeply_is_one_error(tmp_path, tokenizer):
    path = tmp_path / "data.json"
    path.write_text("[" + json.dumps(GOOD) + ", " + "[" * 5000 + "]" * 5000 + "]")
    with pytest.raises(DataError, match=re.escape(f"{path}: JSON nested too deeply to read")):
        prepare(path, tmp_path / "store", DataConfig(), tokenizer, workers=1)


def test_a_record_too_deep_to_validate_is_a_record_error(tokenizer):
    # A decoded record (a table row, a .json item) can be deeper than validating it can recurse.
    schema: dict = {"type": "string"}
    for _ in range(3000):
        schema = {"type": "object", "properties": {"x": schema}}
    record = json.loads(TOOLS)
    record["tools"][0]["function"]["parameters"] = schema
    with pytest.raises(RecordError, match=r"the record is nested too deeply to read \(Python's limit is about \d+"):
        DocumentEncoder(DataConfig(), tokenizer).render_record(record)
