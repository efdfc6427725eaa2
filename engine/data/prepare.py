"""Prepare a dataset once: validate every record, render, tokenize, write a memory-mapped store.

    python -m engine.data.prepare INPUT... --out DIR [--tokenizer PATH] [--max-seq-len N]
        [--on-error raise|skip] [--overlong drop|truncate] [--loss-mask ...] [--workers N]
        [--pack best_fit|next_fit|false] [--pack-window N]

INPUT is a .jsonl / .json / .parquet file, a folder written by `datasets`' save_to_disk, or a Hub
dataset id `owner/name[:split]`. Every record is validated before anything trains: with
`on_error=raise` all bad records are listed (`file:line`, the first 20, then a count) and nothing
is written; with `on_error=skip` they are left out and counted. Over-long records follow
`overlong` (drop, or truncate) and are counted per record. Rendering and tokenizing run in a pool
of worker processes; the store (engine/data/store.py) keeps a manifest of what it was made from,
and a store whose manifest does not match the sources, the tokenizer, the render options or the
rendering code is made again, never silently reused. The trainer calls `ensure_store` itself.
The summary ends with how the documents pack into rows of --max-seq-len tokens under --pack (the
first epoch of seed 0): rows, padding tokens and the packing efficiency a run will report.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import multiprocessing
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from engine.data.config import LOSS_MASKS, ON_ERROR, OVERLONG, REASONING_EFFORTS, DataConfig
from engine.data.dataset import DataError, DataStats, Document, DocumentEncoder, decode_json_line
from engine.data.records import RecordError
from engine.data.sampler import GlobalOrder, describe_packing
from engine.data.sources import Source, resolve_sources
from engine.data.store import MANIFEST, StoreError, StoreWriter, TokenStore, store_lock
from engine.data.store_check import check_prepared_fields, read_manifest
from engine.data.tokenizer import HarmonyTokenizer, load_tokenizer

log = logging.getLogger(__name__)

LISTED = 20  # bad records named one by one; the rest are counted
_CHUNK = 256  # records per task handed to a worker
_SMALL_INPUT = 4 << 20  # bytes; smaller inputs are prepared in this process
# The code that turns a record into tokens: a store made by other code is made again.
_RENDER_CODE = ("records.py", "harmony.py", "tools.py", "tokenizer.py", "word_cache.py", "dataset.py")


def render_options(cfg: DataConfig) -> dict:
    return {"loss_mask": cfg.loss_mask, "reasoning_effort": cfg.reasoning_effort,
            "current_date": cfg.current_date, "max_seq_len": cfg.max_seq_len, "overlong": cfg.overlong,
            "on_error": cfg.on_error}


def _sha256_file(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _code_sha256() -> str:
    here = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for name in _RENDER_CODE:
        digest.update((here / name).read_bytes())
    return digest.hexdigest()


def expected_key(sources: list[Source], cfg: DataConfig, tokenizer: HarmonyTokenizer,
                 previous: dict | None = None) -> dict:
    """What a store's manifest must say to be reused for these inputs and this config."""
    old = {s.get("name"): s for s in (previous or {}).get("sources", [])}
    return {"sources": [s.fingerprint(old.get(s.name)) for s in sources],
            "tokenizer_sha256": _sha256_file(tokenizer.source), "render": render_options(cfg),
            "code_sha256": _code_sha256()}


def why_stale(manifest: dict, key: dict) -> str | None:
    """None when the manifest (of this format, every field present) matches `key`, else what changed, for the log."""
    if [s["name"] for s in manifest.get("sources", [])] != [s["name"] for s in key["sources"]]:
        return "other input files"
    for old, new in zip(manifest["sources"], key["sources"]):
        if old.get("sha256") != new["sha256"]:
            return f"{new['name']} changed"
    if manifest.get("tokenizer_sha256") != key["tokenizer_sha256"]:
        return "another tokenizer"
    # on_error matters only when the store left records out: a store without skips serves both.
    skipped = manifest.get("counts", {}).get("skipped_invalid", 1)
    changed = [f"{k} {manifest.get('render', {}).get(k)!r} -> {v!r}" for k, v in key["render"].items()
               if manifest.get("render", {}).get(k) != v and (k != "on_error" or skipped)]
    if changed:
        return "render options changed: " + ", ".join(changed)
    if manifest.get("code_sha256") != key["code_sha256"]:
        return "the rendering code changed"
    return None


# --- the work of one chunk of records, in a worker process (or in this one) -----------------------

_ENCODER: DocumentEncoder | None = None


def _init_worker(cfg: DataConfig, tokenizer_path: str, pooled: bool = True) -> None:
    global _ENCODER
    if pooled:  # one process per core already; the tokenizer's own threads would only oversubscribe
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _ENCODER = DocumentEncoder(cfg, load_tokenizer(tokenizer_path))


def _encode_chunk(chunk: list[tuple[int, int, object]]) -> dict:
    """(source index, line/row, raw line or record) -> concatenated tokens, counts and errors."""
    enc = _ENCODER
    enc.stats = DataStats()
    segments, kept, errors = [], [], []
    for source, where, payload in chunk:
        try:
            if isinstance(payload, Exception):  # a record its source could not hand out (sources.py)
                raise payload
            record = decode_json_line(payload) if isinstance(payload, bytes) else payload
            segments.append(enc.render_record(record))
            kept.append((source, where))
        except (DataError, RecordError) as exc:
            errors.append((source, where, str(exc)))
    ids, masks, lengths, origins, overlong = [], [], [], [], []
    for (source, where), (tokens, trained) in zip(kept, enc.tokenizer.encode_segments_batch(segments)):
        doc = enc.fit(Document(tokens, trained))
        if doc is None:
            overlong.append((source, where, len(tokens)))
            continue
        ids.append(doc.input_ids)
        masks.append(doc.trained)
        lengths.append(len(doc))
        origins.append((source, where))
    return {"ids": np.concatenate(ids).astype(np.uint32) if ids else np.zeros(0, np.uint32),
            "mask": np.concatenate(masks).astype(np.uint8) if masks else np.zeros(0, np.uint8),
            "lengths": np.asarray(lengths, dtype=np.int64), "origins": np.asarray(origins, dtype=np.int64),
            "errors": errors, "overlong": overlong, "records": len(chunk), "truncated": enc.stats.truncated,
            "target_tokens": enc.stats.target_tokens}


def _chunks(sources: list[Source]) -> Iterator[list[tuple[int, int, object]]]:
    chunk = []
    for s, source in enumerate(sources):
        for where, payload in source.records():
            chunk.append((s, where, payload))
            if len(chunk) == _CHUNK:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def _results(sources, cfg: DataConfig, tokenizer_path: str, workers: int) -> Iterator[dict]:
    """Chunk results in source order; at most 2 chunks per worker in flight (bounded memory)."""
    if workers <= 1:
        _init_worker(cfg, tokenizer_path, pooled=False)
        yield from map(_encode_chunk, _chunks(sources))
        return
    # fork: workers start in milliseconds and need nothing from the parent but the config.
    with multiprocessing.get_context("fork").Pool(workers, _init_worker, (cfg, tokenizer_path)) as pool:
        pending: deque = deque()
        for chunk in _chunks(sources):
            pending.append(pool.apply_async(_encode_chunk, (chunk,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def default_workers() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()))


def prepare(inputs, out: str | Path, cfg: DataConfig, tokenizer: HarmonyTokenizer, *, workers: int = 0,
            key: dict | None = None) -> TokenStore:
    """Validate, render and tokenize every record of `inputs` into a new store at `out`."""
    with store_lock(out):
        return _prepare(inputs, out, cfg, tokenizer, workers=workers, key=key)


def _prepare(inputs, out: str | Path, cfg: DataConfig, tokenizer: HarmonyTokenizer, *, workers: int,
             key: dict | None) -> TokenStore:
    sources = resolve_sources(inputs)
    key = key or expected_key(sources, cfg, tokenizer)
    if not workers:  # auto: one per core, but a small input is done before a pool would start
        small = all(s.path is not None and s.path.is_file() and s.path.stat().st_size < _SMALL_INPUT for s in sources)
        workers = 1 if small else default_workers()
    start = time.perf_counter()
    writer = StoreWriter(out)
    errors: list[str] = []
    overlong: list[str] = []
    n_errors = n_overlong = records = truncated = target_tokens = 0
    try:
        for r in _results(sources, cfg, tokenizer.source, workers):
            records += r["records"]
            n_errors += len(r["errors"])
            errors += [f"{sources[s].locate(w)}: {msg}" for s, w, msg in r["errors"][: LISTED - len(errors)]]
            n_overlong += len(r["overlong"])
            overlong += [f"{sources[s].locate(w)} ({n} tokens)" for s, w, n in r["overlong"][: LISTED - len(overlong)]]
            truncated += r["truncated"]
            target_tokens += r["target_tokens"]
            if r["lengths"].size:
                writer.add(r["ids"], r["mask"], r["lengths"], r["origins"])
        names = ", ".join(s.name for s in sources)
        if n_errors and cfg.on_error == "raise":
            more = f"\n  ... and {n_errors - len(errors)} more" if n_errors > len(errors) else ""
            raise DataError(f"{n_errors} invalid record(s) of {records} in {names}; fix them, or set "
                            "data.on_error=skip (--on-error skip) to leave them out:\n  "
                            + "\n  ".join(errors) + more)
        lengths = writer.lengths()
        kept = len(lengths)
        if kept == 0:
            raise DataError(f"{names}: no usable record among {records} ({n_errors} invalid, {n_overlong} "
                            f"longer than data.max_seq_len = {cfg.max_seq_len} under overlong={cfg.overlong})")
        seconds = time.perf_counter() - start
        manifest = {**key, "counts": {
            "records": records, "documents": kept, "skipped_invalid": n_errors, "dropped_overlong": n_overlong,
            "truncated": truncated, "skipped_examples": errors, "overlong_examples": overlong},
            "token_stats": {"tokens": int(lengths.sum()), "target_tokens": target_tokens,
                            "min_len": int(lengths.min()), "mean_len": float(lengths.mean()),
                            "p50_len": float(np.percentile(lengths, 50)),
                            "p95_len": float(np.percentile(lengths, 95)), "max_len": int(lengths.max())},
            "prepare": {"seconds": seconds, "workers": workers, "tokens_per_s": float(lengths.sum()) / seconds}}
        store = writer.finish(manifest)
    except BaseException:
        writer.abort()
        raise
    log.info("prepared %s -> %s: %s (%.1f s, %d workers, %.0f tokens/s)", names, store.path,
             summary(store.manifest), seconds, workers, float(lengths.sum()) / seconds)
    report_skips(store.manifest)
    return store


def summary(manifest: dict) -> str:
    c, t = manifest["counts"], manifest["token_stats"]
    return (f"{c['documents']} documents of {c['records']} records, {t['tokens']} tokens ({t['target_tokens']} "
            f"trained, length mean {t['mean_len']:.0f} max {t['max_len']}); skipped {c['skipped_invalid']} "
            f"invalid, dropped {c['dropped_overlong']} over-long, truncated {c['truncated']}")


def packing_summary(store: TokenStore, cfg: DataConfig, seed: int = 0) -> str:
    """How the store's documents pack under cfg: the first epoch of `seed`, as a run reports it."""
    order = GlobalOrder(store.lengths, max_seq_len=cfg.max_seq_len, pack=cfg.pack, shuffle=cfg.shuffle, seed=seed,
                        window=cfg.pack_window)
    return describe_packing(order.packing_report(0), cfg, seed)


def report_skips(manifest: dict) -> None:
    """Warn about every skipped or dropped record group: how many, and the first ones by file:line."""
    c = manifest["counts"]
    if c["skipped_invalid"]:
        log.warning("skipped %d invalid record(s) (data.on_error=skip); first %d:\n  %s", c["skipped_invalid"],
                    len(c["skipped_examples"]), "\n  ".join(c["skipped_examples"]))
    if c["dropped_overlong"]:
        log.warning("dropped %d record(s) longer than data.max_seq_len = %d (data.overlong=drop); first %d:\n  %s",
                    c["dropped_overlong"], manifest["render"]["max_seq_len"], len(c["overlong_examples"]),
                    "\n  ".join(c["overlong_examples"]))


def ensure_store(inputs, out: str | Path, cfg: DataConfig, tokenizer: HarmonyTokenizer, *,
                 workers: int = 0) -> TokenStore:
    """The store at `out` when its manifest matches inputs and config and its files pass their checks,
    else a freshly made one. The store is a function of its sources, so one that fails a check is made
    again (and said so in one line) rather than refused: the sources are at hand, nothing is lost."""
    out = Path(out)
    sources = resolve_sources(inputs)
    with store_lock(out):  # a second run preparing the same folder waits here, then finds it current
        previous = None
        if (out / MANIFEST).is_file():
            try:
                previous = check_prepared_fields(out, read_manifest(out))
            except StoreError as exc:
                log.warning("data store %s cannot be used (%s); preparing it again", out, exc.detail)
        key = expected_key(sources, cfg, tokenizer, previous)
        if previous is not None:
            reason = why_stale(previous, key)
            if reason is None:
                try:
                    store = TokenStore(out).check_vocab(tokenizer.vocab_size)
                except StoreError as exc:
                    log.warning("data store %s fails its check (%s); preparing it again", out, exc.detail)
                else:
                    log.info("data store %s is current: %s", out, summary(store.manifest))
                    report_skips(store.manifest)
                    return store
            else:
                log.info("data store %s is stale (%s); preparing it again", out, reason)
        return _prepare(inputs, out, cfg, tokenizer, workers=workers, key=key)


def check_prepared(store: TokenStore, cfg: DataConfig, tokenizer: HarmonyTokenizer) -> TokenStore:
    """A store given as the data path itself: it must have been made for this tokenizer and config, and
    is refused (StoreError, one line) when a file fails its check: there are no sources to make it again."""
    m = check_prepared_fields(store.path, store.manifest)
    if m["tokenizer_sha256"] != _sha256_file(tokenizer.source):
        raise DataError(f"{store.path}: prepared with another tokenizer than {tokenizer.source}; prepare it again "
                        "with --tokenizer, or give the source files as the data path")
    changed = [f"{k}={m['render'].get(k)!r} (config: {v!r})" for k, v in render_options(cfg).items()
               if k != "on_error" and m["render"].get(k) != v]
    if changed:
        raise DataError(f"{store.path}: prepared with {', '.join(changed)}; prepare it again with these options, "
                        "or give the source files as the data path")
    return store.check_vocab(tokenizer.vocab_size)


def main(argv: list[str] | None = None) -> int:
    defaults = DataConfig()
    p = argparse.ArgumentParser(prog="python -m engine.data.prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", metavar="INPUT", help=".jsonl/.json/.parquet file, save_to_disk folder, "
                   "or Hub id owner/name[:split]")
    p.add_argument("--out", required=True, help="the store folder to write")
    p.add_argument("--tokenizer", default=None, help="model folder or tokenizer.json (default: the shipped one)")
    p.add_argument("--max-seq-len", type=int, default=defaults.max_seq_len)
    p.add_argument("--loss-mask", choices=LOSS_MASKS, default=defaults.loss_mask)
    p.add_argument("--reasoning-effort", choices=REASONING_EFFORTS, default=defaults.reasoning_effort)
    p.add_argument("--current-date", default=None)
    p.add_argument("--on-error", choices=ON_ERROR, default=defaults.on_error)
    p.add_argument("--overlong", choices=OVERLONG, default=defaults.overlong)
    p.add_argument("--workers", type=int, default=0, help="worker processes (default: one per core, at most 8)")
    p.add_argument("--pack", choices=("best_fit", "next_fit", "false"), default=defaults.pack,
                   help="packing the summary reports (data.pack; the store does not depend on it)")
    p.add_argument("--pack-window", type=int, default=defaults.pack_window, help="data.pack_window for best_fit")
    p.add_argument("--force", action="store_true", help="prepare again even when the store is current")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    try:
        cfg = DataConfig(tokenizer=args.tokenizer, max_seq_len=args.max_seq_len, loss_mask=args.loss_mask,
                         reasoning_effort=args.reasoning_effort, current_date=args.current_date,
                         on_error=args.on_error, overlong=args.overlong,
                         pack=False if args.pack == "false" else args.pack, pack_window=args.pack_window).validate()
        tokenizer = load_tokenizer(args.tokenizer)
        if args.force:
            store = prepare(args.inputs, args.out, cfg, tokenizer, workers=args.workers)
        else:
            store = ensure_store(args.inputs, args.out, cfg, tokenizer, workers=args.workers)
        log.info("%s", packing_summary(store, cfg))
    except ValueError as exc:  # DataError, TokenizerError, config errors: the user's to fix
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
