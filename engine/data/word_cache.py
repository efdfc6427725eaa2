"""Exact, faster encoding for byte-level BPE tokenizers that split text with one regex (o200k).

HF `tokenizers` spends most of its time on o200k's split pattern. For a tokenizer whose whole
pipeline is `Split(pattern) -> ByteLevel -> BPE` (no normalizer; GPT-OSS's o200k_harmony is one),
this does the split with the `regex` package, which is several times faster on that pattern, and
remembers the ids of every word: natural text repeats its words, so the BPE model is asked only
about words not seen before. Each step is the one HF runs, so the ids are the same (tested on
large texts against HF and against openai-harmony's tokenizer).
"""

import json

from tokenizers import Tokenizer

# Distinct words remembered before the memory is cleared.
_MAX_WORDS = 500_000


def byte_symbols() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by the ByteLevel pre-tokenizer."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + extra)
            extra += 1
    return symbols


class WordCacheEncoder:
    """text -> ids for text holding no added token; build with `for_tokenizer`."""

    def __init__(self, backend: Tokenizer, pattern: str) -> None:
        import regex

        self._findall = regex.compile(pattern).findall
        self._tokenize = backend.model.tokenize
        self._bytes_to_symbols = byte_symbols()
        self._words: dict[str, list[int]] = {}

    @classmethod
    def for_tokenizer(cls, backend: Tokenizer) -> "WordCacheEncoder | None":
        """An encoder when the tokenizer's pipeline is exactly split + byte-level + BPE, else None."""
        try:
            import regex  # noqa: F401  (a dependency of transformers)
        except ModuleNotFoundError as e:  # absent: the plain tokenizer path; installed but broken: its error
            if e.name != "regex":
                raise
            return None
        if backend.normalizer is not None or backend.pre_tokenizer is None:
            return None
        if type(backend.model).__name__ != "BPE" or any(
            not t.content.startswith("<|") for t in backend.get_added_tokens_decoder().values()
        ):
            return None
        state = json.loads(backend.pre_tokenizer.__getstate__())
        steps = state.get("pretokenizers", [])
        if state.get("type") != "Sequence" or len(steps) != 2:
            return None
        split, byte_level = steps
        if (split.get("type") != "Split" or split.get("behavior") != "Isolated" or split.get("invert")
                or "Regex" not in split.get("pattern", {})):
            return None
        if byte_level != {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}:
            return None
        return cls(backend, split["pattern"]["Regex"])

    def clear(self) -> None:
        self._words.clear()

    def encode(self, text: str) -> list[int]:
        words = self._words
        if len(words) > _MAX_WORDS:
            words.clear()
        ids: list[int] = []
        for word in self._findall(text):
            word_ids = words.get(word)
            if word_ids is None:
                symbols = "".join(self._bytes_to_symbols[b] for b in word.encode("utf-8"))
                word_ids = words[word] = [token.id for token in self._tokenize(symbols)]
            ids += word_ids
        return ids
