"""Measure the CPU cost of the data pipeline on this machine.

    python -m engine.data.bench [--file FILE] [--tokenizer PATH] [--max-seq-len N] [--seconds S]

Two figures: encoding alone (JSON parse + validate + render + tokenize + mask), and the whole
training stream (encoding + packing + collating into batch tensors, in the calling thread, no
prefetch), with the packing efficiency (share of non-padding tokens in the rows).

`bench_harmony` measures render + tokenize of tool-calling conversations with the real
o200k_harmony tokenizer, on the shipped agentic sample and on the same records with every message
made unique (so nothing but headers, system prompt and tool schemas repeats). Each pass starts with
an empty piece cache. Besides wall-clock tokens/s it gives tokens per CPU-second (all threads), the
figure that does not depend on what else the machine runs.
"""

import argparse
import json
import random
import time
from itertools import islice
from pathlib import Path

from engine.data.agentic_sample import agentic_sample_paths
from engine.data.config import DataConfig
from engine.data.dataset import DocumentEncoder, JsonlFile
from engine.data.harmony import render_segments
from engine.data.records import parse_record
from engine.data.loader import build_train_loader
from engine.data.tokenizer import load_tokenizer


def bench_encode(cfg: DataConfig, seconds: float) -> dict:
    """Encode every record of the file again and again for about `seconds`."""
    tokenizer = load_tokenizer(cfg.tokenizer)
    file = JsonlFile(cfg.resolved_train_path())
    lines = file.read(range(len(file)))
    examples = tokens = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        tokenizer.clear_cache()
        encoder = DocumentEncoder(cfg, tokenizer)
        for k in range(0, len(lines), 64):
            encoder.encode(file.path, lines[k : k + 64])
        examples += encoder.stats.documents
        tokens += encoder.stats.tokens
    elapsed = time.perf_counter() - start
    return {"examples_per_s": examples / elapsed, "tokens_per_s": tokens / elapsed}


def _unique(record: dict, rng: random.Random, words: int) -> dict:
    """The record with `words` random words appended to every message's text."""
    vocab = ("river", "stone", "cloud", "tiger", "piano", "garden", "window", "silver", "planet", "7", "42",
             "bridge", "candle", "forest", "rocket", "Zürich", "naïve", "über", "東京", "ok,", "then.")

    def noise() -> str:
        return " " + " ".join(rng.choice(vocab) + str(rng.randint(0, 999)) for _ in range(words))

    messages = []
    for m in record["messages"]:
        m = dict(m)
        for key in ("content", "thinking"):
            if isinstance(m.get(key), str):
                m[key] += noise()
        messages.append(m)
    return {**record, "messages": messages}


def bench_harmony(tokenizer_path: str | Path, seconds: float, *, file: Path | None = None, unique_words: int = 0,
                  batch: int = 64) -> dict:
    """Render + tokenize (parse, validate, render segments, encode, mask) of tool-calling records."""
    tokenizer = load_tokenizer(tokenizer_path)
    with (file or agentic_sample_paths()[0]).open(encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    if unique_words:
        rng = random.Random(0)
        records = [_unique(r, rng, unique_words) for r in records for _ in range(4)]
    raw = [json.dumps(r, ensure_ascii=False) for r in records]
    tokens = passes = 0
    start, cpu_start = time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds or passes == 0:
        tokenizer.clear_cache()
        for k in range(0, len(raw), batch):
            docs = [render_segments(parse_record(json.loads(line))) for line in raw[k : k + batch]]
            tokens += sum(len(ids) for ids, _ in tokenizer.encode_segments_batch(docs))
        passes += 1
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {"records": len(raw), "tokens_per_record": tokens / (passes * len(raw)),
            "tokens_per_s": tokens / elapsed, "tokens_per_cpu_s": tokens / cpu}


def bench_stream(cfg: DataConfig, seconds: float) -> dict:
    """Pull micro-batches from the training loader for about `seconds`."""
    loader = build_train_loader(cfg, load_tokenizer(cfg.tokenizer), seed=0)
    batches = iter(loader)
    rows = real_tokens = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for batch in islice(batches, 16):
            rows += batch["input_ids"].shape[0]
            real_tokens += int((batch["input_ids"] != loader.pad_id).sum())
    elapsed = time.perf_counter() - start
    return {
        "examples_per_s": loader.stats.documents / elapsed,
        "tokens_per_s": real_tokens / elapsed,
        "rows_per_s": rows / elapsed,
        "packing_efficiency": real_tokens / (rows * cfg.max_seq_len),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", default=None, help="JSONL data (default: the shipped sample)")
    parser.add_argument("--tokenizer", default=None, help="model directory or tokenizer.json (default: shipped)")
    parser.add_argument("--max-seq-len", type=int, default=4096)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=3.0, help="time spent on each measurement")
    args = parser.parse_args(argv)
    cfg = DataConfig(
        train_path=args.file, tokenizer=args.tokenizer, max_seq_len=args.max_seq_len,
        micro_batch_size=args.micro_batch_size, global_batch_size=args.micro_batch_size, prefetch=0,
    ).validate()
    results = {
        "encode": bench_encode(cfg, args.seconds),
        "pack": bench_stream(cfg, args.seconds),
        "unpacked": bench_stream(DataConfig(**{**vars(cfg), "pack": False}), args.seconds),
    }
    for name, figures in results.items():
        print(f"{name:>9}: " + ", ".join(f"{key} {value:,.2f}" for key, value in figures.items()))
    print(json.dumps({"max_seq_len": args.max_seq_len, **results}))


if __name__ == "__main__":
    main()
