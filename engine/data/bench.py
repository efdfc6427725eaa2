"""Measure the CPU cost of the data pipeline on this machine.

    python -m engine.data.bench [--file FILE] [--tokenizer PATH] [--max-seq-len N] [--seconds S]
        [--startup-docs N] [--packing-docs N]

Figures: encoding alone in this thread (JSON parse + validate + render + tokenize + mask);
preparation of a store with the worker pool (the file repeated until it holds at least 20k
records); the training stream read from the store (packing + collating into batch tensors, in the
calling thread, no prefetch) with the packing efficiency (share of non-padding tokens in the rows);
and, with --startup-docs, the start-up of a run on an already prepared store of that many
documents (manifest and file checks, mapping, the epoch's global order, the first batch), and the
one-time sha256 verification of its files, timed alone.

`bench_packing` compares next-fit and best-fit packing (data.pack) on document lengths: the
efficiency, rows and padding of one epoch, and the time to order and pack it (what every rank does
at start-up and at each epoch's start), on N documents of each length distribution.

`bench_harmony` measures render + tokenize of tool-calling conversations with the real
o200k_harmony tokenizer, on the shipped agentic sample and on the same records with every message
made unique (so nothing but headers, system prompt and tool schemas repeats). Each pass starts with
an empty piece cache. Besides wall-clock tokens/s it gives tokens per CPU-second (all threads), the
figure that does not depend on what else the machine runs.
"""

import argparse
import json
import multiprocessing
import random
import shutil
import tempfile
import time
from itertools import islice
from pathlib import Path

import numpy as np

from engine.data.agentic_sample import agentic_sample_paths
from engine.data.config import DataConfig
from engine.data.dataset import DocumentEncoder, JsonlFile
from engine.data.harmony import render_segments
from engine.data.loader import build_train_loader
from engine.data.prepare import default_workers, expected_key, prepare
from engine.data.records import parse_record
from engine.data.sampler import GlobalOrder
from engine.data.sources import resolve_sources
from engine.data.store import StoreWriter, TokenStore
from engine.data.store_check import DTYPES, VERIFIED
from engine.data.tokenizer import load_tokenizer


def bench_encode(cfg: DataConfig, seconds: float) -> dict:
    """Encode every record of the file again and again for about `seconds`, in this thread."""
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


def _harmony_records(file: Path | None, unique_words: int) -> list[str]:
    with (file or agentic_sample_paths()[0]).open(encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    if unique_words:
        rng = random.Random(0)
        records = [_unique(r, rng, unique_words) for r in records for _ in range(4)]
    return [json.dumps(r, ensure_ascii=False) for r in records]


def _harmony_loop(tokenizer, raw: list[str], seconds: float, batch: int) -> dict:
    """JSON lines -> parse, validate, render, encode, mask, again and again for about `seconds`."""
    tokens = passes = 0
    start, cpu_start = time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds or passes == 0:
        tokenizer.clear_cache()
        for k in range(0, len(raw), batch):
            docs = [render_segments(parse_record(json.loads(line))) for line in raw[k : k + batch]]
            tokens += sum(len(ids) for ids, _ in tokenizer.encode_segments_batch(docs))
        passes += 1
    end = time.perf_counter()
    return {"tokens": tokens, "passes": passes, "start": start, "end": end, "cpu": time.process_time() - cpu_start}


def _harmony_worker(tokenizer_path, raw, seconds, batch, barrier) -> dict:
    tokenizer = load_tokenizer(tokenizer_path)  # loaded before the clock starts
    barrier.wait()
    return _harmony_loop(tokenizer, raw, seconds, batch)


def bench_harmony(tokenizer_path: str | Path, seconds: float, *, file: Path | None = None, unique_words: int = 0,
                  batch: int = 64, workers: int = 1) -> dict:
    """Render + tokenize (parse, validate, render segments, encode, mask) of tool-calling records.

    With `workers` > 1, that many processes (as `data.prepare_workers` runs them) each do the whole
    loop at once; tokens/s is their sum over the wall-clock span from the common start to the last end."""
    raw = _harmony_records(file, unique_words)
    if workers == 1:
        runs = [_harmony_loop(load_tokenizer(tokenizer_path), raw, seconds, batch)]
    else:
        ctx = multiprocessing.get_context("fork")
        barrier = ctx.Manager().Barrier(workers)
        with ctx.Pool(workers) as pool:
            pending = [pool.apply_async(_harmony_worker, (tokenizer_path, raw, seconds, batch, barrier))
                       for _ in range(workers)]
            runs = [p.get() for p in pending]
    tokens = sum(r["tokens"] for r in runs)
    elapsed = max(r["end"] for r in runs) - min(r["start"] for r in runs)
    return {"workers": workers, "records": len(raw), "tokens_per_record": tokens / sum(r["passes"] * len(raw) for r in runs),
            "tokens_per_s": tokens / elapsed, "tokens_per_cpu_s": tokens / sum(r["cpu"] for r in runs)}


def bench_prepare(cfg: DataConfig, workers: int, min_records: int = 20_000) -> dict:
    """Prepare the file (repeated up to `min_records` records) into a fresh store, timed end to end."""
    tmp = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    try:
        lines = [line for line in Path(cfg.resolved_train_path()).read_bytes().splitlines() if line.strip()]
        big = tmp / "data.jsonl"
        big.write_bytes(b"\n".join(lines * max(1, -(-min_records // len(lines)))) + b"\n")
        start = time.perf_counter()
        store = prepare(big, tmp / "store", cfg, load_tokenizer(cfg.tokenizer), workers=workers)
        elapsed = time.perf_counter() - start
        return {"workers": workers, "examples_per_s": len(store) / elapsed,
                "tokens_per_s": store.manifest["tokens"] / elapsed}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bench_stream(cfg: DataConfig, seconds: float, store_dir: Path) -> dict:
    """Pull micro-batches from the training loader for about `seconds`."""
    loader = build_train_loader(cfg, load_tokenizer(cfg.tokenizer), store_dir=store_dir, seed=0)
    batches = iter(loader)
    rows = real_tokens = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for batch in islice(batches, 16):
            rows += batch["input_ids"].shape[0]
            real_tokens += int((batch["input_ids"] != loader.pad_id).sum())
    elapsed = time.perf_counter() - start
    return {
        "tokens_per_s": real_tokens / elapsed,
        "rows_per_s": rows / elapsed,
        "packing_efficiency": real_tokens / (rows * cfg.max_seq_len),
    }


def bench_startup(cfg: DataConfig, num_docs: int, workdir: Path) -> dict:
    """Start-up of a run on an already prepared store of `num_docs` documents.

    The store holds synthetic token ids with the sample's document lengths (preparing a million
    real conversations would take this machine many minutes and measure preparation, not start-up);
    its manifest matches a real source file, so the start-up does what the trainer's does: check the
    manifest against the sources and the config, map the arrays, order and pack the first epoch,
    and read the first batch."""
    tokenizer = load_tokenizer(cfg.tokenizer)
    source = workdir / "source.jsonl"
    sample = Path(DataConfig().resolved_train_path()).read_bytes()
    source.write_bytes(sample)
    store_dir = workdir / "store"
    sample_store = prepare(source, workdir / "sample_store", cfg, tokenizer, workers=1)
    lengths = np.resize(sample_store.lengths, num_docs)  # [num_docs] the sample's lengths, repeated
    rng = np.random.default_rng(0)
    writer = StoreWriter(store_dir)
    for first in range(0, num_docs, 100_000):
        chunk = lengths[first : first + 100_000]
        total = int(chunk.sum())
        writer.add(rng.integers(0, 256, total, dtype=np.uint32), rng.random(total) < 0.3, chunk,
                   np.zeros((len(chunk), 2), np.int64))
    key = expected_key(resolve_sources(source), cfg, tokenizer)
    counts, stats = sample_store.manifest["counts"], sample_store.manifest["token_stats"]
    writer.finish({**key, "counts": {**counts, "records": num_docs, "documents": num_docs},
                   "token_stats": {**stats, "tokens": int(lengths.sum())}})
    # The writer hashed the files as it wrote them; a store copied or touched since is hashed once more.
    (store_dir / VERIFIED).unlink()
    start = time.perf_counter()
    TokenStore(store_dir)
    verify_s = time.perf_counter() - start
    start = time.perf_counter()
    loader = build_train_loader(DataConfig(**{**vars(cfg), "train_path": str(source)}), tokenizer,
                                store_dir=store_dir, seed=0)
    opened = time.perf_counter()
    next(loader)
    first = time.perf_counter()
    loader.close()
    store_bytes = sum((store_dir / name).stat().st_size for name in DTYPES)
    return {"documents": num_docs, "store_mib": store_bytes / 2**20, "first_verify_s": verify_s,
            "verify_mib_per_s": store_bytes / 2**20 / verify_s, "open_s": opened - start,
            "first_batch_s": first - start}


# Synthetic document lengths in tokens: long tool-calling traces of several shapes.
SYNTHETIC = {
    "uniform 500-3000": lambda rng, n: rng.integers(500, 3001, n),
    "lognormal median 1200 sigma 0.6":
        lambda rng, n: np.maximum(1, rng.lognormal(np.log(1200), 0.6, n).astype(np.int64)),
    "uniform 1500-4096": lambda rng, n: rng.integers(1500, 4097, n),
}


def sample_lengths(tokenizer_path: str | Path, max_seq_len: int = 1 << 20) -> dict[str, np.ndarray]:
    """Document lengths of the shipped chat and agentic samples under this tokenizer."""
    from engine.data.config import default_sample_paths

    tokenizer = load_tokenizer(tokenizer_path)
    cfg = DataConfig(tokenizer=str(tokenizer_path), max_seq_len=max_seq_len)
    out = {}
    with tempfile.TemporaryDirectory(prefix="bench_lengths_") as tmp:
        for name, path in (("shipped chats", default_sample_paths()[0]), ("agentic sample", agentic_sample_paths()[0])):
            out[name] = np.asarray(prepare(path, Path(tmp) / "store", cfg, tokenizer, workers=1).lengths)
    return out


def bench_pack(lengths: np.ndarray, max_seq_len: int, pack: str, window: int = 4096) -> dict:
    """Order and pack one epoch of these documents (longer ones dropped, as data.overlong=drop does)."""
    kept = lengths[lengths <= max_seq_len]
    start = time.perf_counter()
    order = GlobalOrder(kept, max_seq_len=max_seq_len, pack=pack, shuffle=True, seed=0, window=window)
    order.epoch(0)
    elapsed = time.perf_counter() - start
    return {"documents": len(kept), **order.packing_report(0), "pack_s": elapsed}


def bench_packing(tokenizer_path: str | Path, num_docs: int, seq_lens=(1024, 4096),
                  windows=(256, 1024, 4096, 16384)) -> dict:
    """Next fit vs best fit on `num_docs` documents of each length distribution (the samples'
    lengths repeated), at each row length; then best fit's window on uniform 500-3000 at 4096."""
    rng = np.random.default_rng(0)
    lengths = {name: np.resize(x, num_docs) for name, x in sample_lengths(tokenizer_path).items()}
    lengths.update({name: draw(rng, num_docs) for name, draw in SYNTHETIC.items()})
    rows = []
    for name, x in lengths.items():
        for max_seq_len in seq_lens:
            if not (x <= max_seq_len).any():
                continue  # every document is longer than the row: dropped
            for pack in ("next_fit", "best_fit"):
                rows.append({"lengths": name, "max_seq_len": max_seq_len, "pack": pack,
                             **bench_pack(x, max_seq_len, pack)})
    sweep = [{"lengths": "uniform 500-3000", "max_seq_len": 4096, "pack": "best_fit", "pack_window": w,
              **bench_pack(lengths["uniform 500-3000"], 4096, "best_fit", w)} for w in windows]
    return {"documents_per_distribution": num_docs, "rows": rows, "window_sweep": sweep}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", default=None, help="JSONL data (default: the shipped sample)")
    parser.add_argument("--tokenizer", default=None, help="model directory or tokenizer.json (default: shipped)")
    parser.add_argument("--max-seq-len", type=int, default=4096)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=3.0, help="time spent on each measurement")
    parser.add_argument("--startup-docs", type=int, default=0, help="also time a run's start on a store this big")
    parser.add_argument("--packing-docs", type=int, default=0,
                        help="also compare next fit and best fit on this many documents per length distribution")
    args = parser.parse_args(argv)
    results = run(args.file, args.tokenizer, args.max_seq_len, args.micro_batch_size, args.seconds, args.startup_docs)
    if args.packing_docs:
        from engine.data.config import default_tokenizer_path

        results["packing"] = bench_packing(args.tokenizer or default_tokenizer_path(), args.packing_docs)
    print(json.dumps(results, indent=1))


def run(file, tokenizer, max_seq_len: int, micro_batch_size: int, seconds: float, startup_docs: int = 0,
        min_records: int = 20_000) -> dict:
    cfg = DataConfig(train_path=file, tokenizer=tokenizer, max_seq_len=max_seq_len, micro_batch_size=micro_batch_size,
                     global_batch_size=micro_batch_size, prefetch=0).validate()
    tmp = Path(tempfile.mkdtemp(prefix="bench_data_"))
    try:
        results = {
            "encode": bench_encode(cfg, seconds),
            "prepare_1_worker": bench_prepare(cfg, 1, min_records),
            "prepare": bench_prepare(cfg, default_workers(), min_records),
            "pack": bench_stream(cfg, seconds, tmp / "packed"),
            "unpacked": bench_stream(DataConfig(**{**vars(cfg), "pack": False}), seconds, tmp / "unpacked"),
        }
        if startup_docs:
            results["startup"] = bench_startup(cfg, startup_docs, tmp)
        return results
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
