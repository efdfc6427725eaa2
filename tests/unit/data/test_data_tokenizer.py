"""The shipped tokenizer, the load-time special-token check, and masks on token ids."""

import json

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from engine.data.config import default_sample_paths, default_tokenizer_path
from engine.data.harmony import HARMONY_SPECIAL_TOKENS, render, render_segments
from engine.data.tokenizer import TokenizerError, load_tokenizer

RECORD = {
    "messages": [
        {"role": "user", "content": "What is 3 + 4?"},
        {"role": "assistant", "content": "3 + 4 = 7.", "thinking": "Add 3 and 4."},
        {"role": "user", "content": "And times 2?"},
        {"role": "assistant", "content": "7 * 2 = 14.", "thinking": "Double 7."},
    ]
}


def test_shipped_tokenizer_fits_the_tiny_models(tokenizer):
    assert tokenizer.vocab_size <= 1024
    ids = list(tokenizer.special_ids.values())
    assert len(set(ids)) == len(HARMONY_SPECIAL_TOKENS)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.pad_id == tokenizer.special_ids["<|endoftext|>"]
    for token, token_id in tokenizer.special_ids.items():
        assert tokenizer.encode(token) == [token_id]


def test_load_from_model_directory(tokenizer):
    from_dir = load_tokenizer(default_tokenizer_path().parent)
    assert from_dir.special_ids == tokenizer.special_ids


def test_sample_data_round_trips_and_segments_match_whole_text(tokenizer):
    with default_sample_paths()[0].open() as f:
        records = [json.loads(line) for line in f][:100]
    for record in records:
        text = render(record)
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        seg_ids, _ = tokenizer.encode_segments(render_segments(record))
        assert seg_ids.tolist() == ids


@pytest.mark.parametrize(
    "loss_mask, trained_pieces",
    [
        # Trained messages train what the model writes: the header after `<|start|>assistant`, and
        # `<|start|>assistant` itself where it follows the model's own `<|end|>`.
        (
            "assistant",
            [
                "<|channel|>final<|message|>3 + 4 = 7.<|end|>",
                "<|channel|>analysis<|message|>Double 7.<|end|>",
                "<|start|>assistant<|channel|>final<|message|>7 * 2 = 14.<|return|>",
            ],
        ),
        (
            "final_only",
            [
                "<|channel|>final<|message|>3 + 4 = 7.<|end|>",
                "<|start|>assistant<|channel|>final<|message|>7 * 2 = 14.<|return|>",
            ],
        ),
        (
            "last_turn",
            [
                "<|channel|>analysis<|message|>Double 7.<|end|>",
                "<|start|>assistant<|channel|>final<|message|>7 * 2 = 14.<|return|>",
            ],
        ),
    ],
)
def test_mask_covers_exactly_the_intended_token_ids(tokenizer, loss_mask, trained_pieces):
    ids, trained = tokenizer.encode_segments(render_segments(RECORD, loss_mask=loss_mask))
    expected = [i for piece in trained_pieces for i in tokenizer.encode(piece)]
    assert ids[trained].tolist() == expected
    # Everything else (system, developer, user messages, the caller's `<|start|>assistant`) is untrained.
    assert len(ids) == len(tokenizer.encode(render(RECORD)))
    sid = tokenizer.special_ids
    assert not trained[0] and trained[ids == sid["<|return|>"]].all()
    # A trained <|start|> only where the model itself goes on after an <|end|>.
    for k in np.flatnonzero(trained & (ids == sid["<|start|>"])):
        assert ids[k - 1] == sid["<|end|>"]
    # Every trained message trains its own <|message|> (its header).
    assert trained[ids == sid["<|message|>"]].sum() == len(trained_pieces)


def test_missing_special_token_is_named_with_the_file(tmp_path):
    backend = Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens([t for t in HARMONY_SPECIAL_TOKENS if t != "<|return|>"])
    path = tmp_path / "tokenizer.json"
    backend.save(str(path))
    with pytest.raises(TokenizerError, match=rf"{path}: harmony special token '<\|return\|>' encodes as \d+ ids"):
        load_tokenizer(path)


def test_missing_or_invalid_file_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer file not found: .*tokenizer.json"):
        load_tokenizer(tmp_path)
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match=f"{bad}: not a valid HF tokenizers file"):
        load_tokenizer(bad)


def test_find_special_spots_control_tokens_in_text(tokenizer):
    assert tokenizer.find_special("plain text <| not a token") is None
    assert tokenizer.find_special("say <|end|> now") == "<|end|>"


def test_trained_flags_are_bool_and_ids_int64(tokenizer):
    ids, trained = tokenizer.encode_segments(render_segments(RECORD))
    assert ids.dtype == np.int64 and trained.dtype == bool and ids.shape == trained.shape
