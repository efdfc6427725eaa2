"""Command line of the evaluation (engine/inference/evaluate.py).

python -m engine.evaluate MODEL --data FILE.jsonl [--adapter DIR] [--max-seq-len N] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from engine.inference.evaluate import evaluate_records, format_table, read_records


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m engine.evaluate",
        description="Loss and perplexity of a model on harmony data, split by loss mask and by channel.",
    )
    p.add_argument("model", help="run folder, training checkpoint, or HF checkpoint folder")
    p.add_argument("--data", required=True, help="JSONL of harmony records (the training data format)")
    p.add_argument("--adapter", help="PEFT adapter folder to apply to an HF model")
    p.add_argument(
        "--expert-weights",
        choices=["dense", "mxfp4"],
        default="dense",
        help="mxfp4: keep an MXFP4 HF checkpoint's experts packed (the adapter runs unmerged)",
    )
    p.add_argument("--max-seq-len", type=int, default=4096, help="records are cut to this many tokens")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--out", help="also write the result as JSON here")
    args = p.parse_args(argv)
    from engine.inference.loading import load_for_inference

    try:
        records = read_records(Path(args.data))
        loaded = load_for_inference(
            args.model, adapter=args.adapter, device=args.device, expert_weights=args.expert_weights
        )
        result = evaluate_records(
            loaded.model, loaded.tokenizer, records, max_seq_len=args.max_seq_len, batch_size=args.batch_size
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"evaluate error: {e}", file=sys.stderr)
        return 2
    print(f"{loaded.source}\n{len(records)} records from {args.data}\n{format_table(result)}")
    if args.out:
        Path(args.out).write_text(
            json.dumps({"model": loaded.source, "data": args.data, "groups": result}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
