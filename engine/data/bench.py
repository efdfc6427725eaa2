"""Measure the CPU cost of the data pipeline on this machine.

    python -m engine.data.bench [--file FILE] [--tokenizer PATH] [--max-seq-len N] [--seconds S]

Two figures: encoding alone (JSON parse + validate + render + tokenize + mask), and the whole
training stream (encoding + packing + collating into batch tensors, in the calling thread, no
prefetch), with the packing efficiency (share of non-padding tokens in the rows).
"""

import argparse
import json
import time
from itertools import islice

from engine.data.config import DataConfig
from engine.data.dataset import DocumentEncoder, JsonlFile
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
        encoder = DocumentEncoder(cfg, tokenizer)
        for k in range(0, len(lines), 64):
            encoder.encode(file.path, lines[k : k + 64])
        examples += encoder.stats.documents
        tokens += encoder.stats.tokens
    elapsed = time.perf_counter() - start
    return {"examples_per_s": examples / elapsed, "tokens_per_s": tokens / elapsed}


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
