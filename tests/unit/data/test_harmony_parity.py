"""Our harmony rendering equals openai-harmony's, text and token ids, with the real o200k_harmony."""

import re
from pathlib import Path

import pytest
from agentic_cases import CASES
from harmony_oracle import expected_mask, harmony_messages, load_encoding, render_tokens

from engine.data.harmony import render, render_segments
from engine.data.tokenizer import load_tokenizer
from tools.o200k import cached_o200k_harmony


@pytest.fixture(scope="module")
def encoding(tmp_path_factory):
    return load_encoding(tmp_path_factory.mktemp("tiktoken"))


@pytest.fixture(scope="module")
def o200k():
    return load_tokenizer(cached_o200k_harmony())


def test_enough_cases():
    assert len(CASES) >= 30


@pytest.mark.parametrize("name", sorted(CASES))
def test_text_and_ids_equal_openai_harmony(name, encoding, o200k):
    record = CASES[name]
    expected = render_tokens(encoding, harmony_messages(record))
    assert render(record) == encoding.decode_utf8(expected)
    ids, _ = o200k.encode_segments(render_segments(record))
    assert ids.tolist() == expected


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("loss_mask", ["assistant", "final_only", "last_turn"])
def test_trained_tokens_follow_the_mask_rules(name, loss_mask, encoding, o200k):
    record = CASES[name]
    messages = harmony_messages(record)
    tokens = render_tokens(encoding, messages)
    _, trained = o200k.encode_segments(render_segments(record, loss_mask=loss_mask))
    assert trained.tolist() == expected_mask(encoding, messages, tokens, loss_mask)


@pytest.mark.parametrize("effort", ["low", "medium", "high"])
def test_defaults_and_current_date_equal_openai_harmony(effort, encoding, o200k):
    record = CASES["issue_example"]
    expected = render_tokens(encoding, harmony_messages(record, effort, "2025-06-28"))
    segments = render_segments(record, reasoning_effort=effort, current_date="2025-06-28")
    assert "".join(s.text for s in segments) == encoding.decode_utf8(expected)
    assert o200k.encode_segments(segments)[0].tolist() == expected


def test_special_token_ids_are_harmonys(encoding, o200k):
    for text in (
        "<|start|>",
        "<|end|>",
        "<|message|>",
        "<|channel|>",
        "<|return|>",
        "<|call|>",
        "<|constrain|>",
        "<|startoftext|>",
        "<|endoftext|>",
        "<|reserved_200013|>",
        "<|reserved_201087|>",
    ):
        assert o200k.encode(text) == encoding.encode(text, allowed_special="all"), text
    assert o200k.special_ids["<|start|>"] == 200006 and o200k.pad_id == 199999
    assert o200k.vocab_size == 201088


TRICKY = [
    "Hello world!  Two  spaces,\ttab\nnew line\r\n\r\nCRLF   \n  trailing   ",
    "I'LL we'Re they've DON'T it's 1234567 3.14159 -42 1,000,000 ٣٤٥",
    "Zürich naïve über façade — “quotes” ‘single’ … 東京都 日本語のテキスト 한국어 ✓ 😊👍🏽 👨‍👩‍👧",
    "camelCaseWord HTTPServer snake_case_name kebab-case path/to/file.py?x=1&y=2#frag",
    '{"a": [1, 2, {"b": null}], "c": "\\u00e9"}\n```python\nprint(\'x\')\n```',
    "   \n\n\n   leading whitespace and    \u00a0nbsp\u2009thin\u3000ideographic",
    "<| not special |> <|endoftext without close, >|< ",
]


def test_word_cache_encoder_equals_the_tokenizer_and_harmony(encoding, o200k):
    from engine.data.word_cache import WordCacheEncoder

    fast = WordCacheEncoder.for_tokenizer(o200k.backend)
    assert fast is not None, "o200k_harmony must take the fast path"
    texts = TRICKY + [render(record) for record in CASES.values()]
    texts.append((Path(__file__).parents[3] / "README.md").read_text(encoding="utf-8"))
    for text in texts:
        pieces = [p for p in re.split(r"(<\|(?:start|end|message|channel|return|call|constrain)\|>)", text)]
        for k, piece in enumerate(pieces):
            if k % 2 == 0 and piece:
                expected = o200k.backend.encode(piece, add_special_tokens=False).ids
                assert fast.encode(piece) == expected, piece[:80]
                assert encoding.encode(piece, allowed_special=set()) == expected, piece[:80]


def test_tiny_tokenizer_keeps_the_plain_path(tokenizer):
    from engine.data.word_cache import WordCacheEncoder

    assert WordCacheEncoder.for_tokenizer(tokenizer.backend) is None  # its pre-tokenizer splits digits first


@pytest.mark.parametrize("which", ["agentic", "chat"])
def test_every_shipped_sample_record_equals_openai_harmony(which, encoding, o200k):
    import json

    from engine.data.config import default_sample_paths
    from tools.agentic_sample import agentic_sample_paths

    path = (agentic_sample_paths() if which == "agentic" else default_sample_paths())[0]
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    segments = [render_segments(record) for record in records]
    for record, segs, (ids, _) in zip(records, segments, o200k.encode_segments_batch(segments)):
        expected = render_tokens(encoding, harmony_messages(record))
        assert "".join(s.text for s in segs) == encoding.decode_utf8(expected)
        assert ids.tolist() == expected


def test_o200k_build_checks_the_vocabulary_hash(tmp_path):
    from tools.make_tokenizer import main as make_tokenizer_main
    from tools.o200k import read_tiktoken

    bad = tmp_path / "o200k_base.tiktoken"
    bad.write_bytes(b"YQ== 0\n")
    with pytest.raises(SystemExit, match="sha256 [0-9a-f]{64} is not o200k_base's 446a9538"):
        read_tiktoken(bad)
    with pytest.raises(SystemExit, match="--o200k-harmony needs --out DIR"):
        make_tokenizer_main(["--o200k-harmony"])
