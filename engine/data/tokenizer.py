"""HF `tokenizers` wrapper that guarantees the harmony control tokens are single ids.

Loads `tokenizer.json` from a model directory (the GPT-OSS o200k_harmony one, or the small BPE
shipped in engine/data/assets for the tiny models) and checks at load time that every harmony
special token encodes as exactly one id: a tokenizer that splits `<|return|>` into pieces would
train the model on a format it can never emit.

Encoding splits each segment at the harmony special tokens (the tokenizer would split there too,
so the ids are the same) and remembers the ids of each text piece: the system message, the tool
schemas and the role/channel headers repeat in every record and are tokenized once.
"""

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from engine.data.config import default_tokenizer_path
from engine.data.harmony import ENDOFTEXT, HARMONY_SPECIAL_TOKENS, Segment
from engine.data.word_cache import WordCacheEncoder
from engine.errors import DataError

# Characters of text pieces whose ids are remembered before the memory is cleared (~tens of MB).
_CACHE_CHARS = 8_000_000


class TokenizerError(DataError):
    """A tokenizer file that is missing, unreadable or unfit for harmony."""


class HarmonyTokenizer:
    """Text <-> ids, plus segment encoding that keeps a per-token loss flag."""

    def __init__(self, backend: Tokenizer, source: str) -> None:
        self.backend = backend
        self.source = source
        self.special_ids = {token: self._single_id(token) for token in HARMONY_SPECIAL_TOKENS}
        # <|endoftext|> pads: it never appears inside a harmony conversation.
        self.pad_id = self.special_ids[ENDOFTEXT]
        # What an embedding table needs: one past the largest id (ids may have gaps).
        self.vocab_size = max(backend.get_vocab(with_added_tokens=True).values()) + 1
        specials = sorted(
            (t.content for t in backend.get_added_tokens_decoder().values() if t.special), key=len, reverse=True
        )
        self._special_pattern = re.compile("|".join(map(re.escape, specials)))
        self._split = re.compile("(" + "|".join(map(re.escape, HARMONY_SPECIAL_TOKENS)) + ")").split
        self._pieces: dict[str, list[int]] = {}
        self._cached_chars = 0
        self._words = WordCacheEncoder.for_tokenizer(backend)

    def _single_id(self, token: str) -> int:
        ids = self.backend.encode(token, add_special_tokens=False).ids
        if len(ids) != 1:
            raise TokenizerError(
                f"{self.source}: harmony special token {token!r} encodes as {len(ids)} ids {ids}, "
                "it must be exactly one; add it to the tokenizer's added_tokens with special=true"
            )
        return ids[0]

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def find_special(self, text: str) -> str | None:
        """The first special-token string inside `text`, if any.

        Message content holding e.g. a literal `<|end|>` would be read as a control token and
        corrupt the conversation structure, so the dataset refuses such records.
        """
        if "<|" not in text:
            return None
        match = self._special_pattern.search(text)
        return match.group(0) if match else None

    def encode_segments(self, segments: Sequence[Segment]) -> tuple[np.ndarray, np.ndarray]:
        return self.encode_segments_batch([segments])[0]

    def encode_segments_batch(self, documents: Sequence[Sequence[Segment]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per document: (ids [L] int64, trained [L] bool), trained marking loss-carrying tokens.

        Pieces not seen before go to the word-cache encoder when the tokenizer allows it
        (engine/data/word_cache.py), else to the tokenizer in one call, which runs in Rust with
        the GIL released.
        """
        pieces = self._pieces
        split = self._split
        new_chars = 0
        if self._words is None:
            new = {
                part: None
                for doc in documents
                for segment in doc
                for part in split(segment.text)[::2]
                if part and part not in pieces
            }
            if new:
                texts = list(new)
                for text, encoding in zip(texts, self.backend.encode_batch_fast(texts, add_special_tokens=False)):
                    pieces[text] = encoding.ids
                new_chars = sum(map(len, texts))
        special_ids = self.special_ids
        out = []
        for doc in documents:
            ids: list[int] = []
            lengths, flags = [], []
            for segment in doc:
                before = len(ids)
                for k, part in enumerate(split(segment.text)):
                    if k % 2:
                        ids.append(special_ids[part])
                    elif part:
                        part_ids = pieces.get(part)
                        if part_ids is None:
                            part_ids = pieces[part] = self._encode_piece(part)
                            new_chars += len(part)
                        ids += part_ids
                lengths.append(len(ids) - before)
                flags.append(segment.trained)
            out.append((np.asarray(ids, dtype=np.int64), np.repeat(np.asarray(flags, dtype=bool), lengths)))
        self._remember(new_chars)
        return out

    def _encode_piece(self, text: str) -> list[int]:
        # Text with "<|" may hold another added token: leave those to the tokenizer.
        if self._words is None or "<|" in text:
            return self.encode(text)
        return self._words.encode(text)

    def clear_cache(self) -> None:
        """Forget the remembered text pieces and words (benchmarks start each pass from nothing)."""
        self._pieces.clear()
        self._cached_chars = 0
        if self._words is not None:
            self._words.clear()

    def _remember(self, chars: int) -> None:
        # Message contents rarely repeat: bound the memory instead of tracking what is worth keeping.
        self._cached_chars += chars
        if self._cached_chars > _CACHE_CHARS:
            self.clear_cache()


def load_tokenizer(path: str | Path | None = None) -> HarmonyTokenizer:
    """Load a tokenizer from a model directory, a tokenizer.json file, or (None) the shipped one."""
    file = Path(path) if path is not None else default_tokenizer_path()
    if file.is_dir():
        file = file / "tokenizer.json"
    if not file.is_file():
        raise TokenizerError(f"tokenizer file not found: {file} (give a model directory or a tokenizer.json path)")
    try:
        backend = Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed files
        raise TokenizerError(f"{file}: not a valid HF tokenizers file: {exc}") from exc
    return HarmonyTokenizer(backend, str(file))
