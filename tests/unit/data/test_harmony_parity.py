"""Our harmony rendering equals openai-harmony's, text and token ids, with the real o200k_harmony."""

import pytest

from agentic_cases import CASES
from engine.data.harmony import render, render_segments
from engine.data.o200k import cached_o200k_harmony
from engine.data.tokenizer import load_tokenizer
from harmony_oracle import expected_mask, harmony_messages, load_encoding, render_tokens


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
    for text in ("<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>", "<|call|>", "<|constrain|>",
                 "<|startoftext|>", "<|endoftext|>", "<|reserved_200013|>", "<|reserved_201087|>"):
        assert o200k.encode(text) == encoding.encode(text, allowed_special="all"), text
    assert o200k.special_ids["<|start|>"] == 200006 and o200k.pad_id == 199999
    assert o200k.vocab_size == 201088
