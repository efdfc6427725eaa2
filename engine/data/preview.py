"""Show what the model will be trained on: rendered records with the trained spans marked.

    python -m engine.data.preview FILE [--n N] [--tokenizer PATH] [--loss-mask MASK]
                                       [--reasoning-effort LEVEL] [--current-date YYYY-MM-DD]
                                       [--color auto|always|never]

Trained text is green on a terminal and wrapped in [[...]] otherwise. Each record gets its token
counts (total / trained, trained = tokens that carry loss) and its tool traffic (calls, results);
invalid records show their error and the preview goes on. Tool calls show which parts train (the
recipient, the arguments, `<|call|>`); tool results never do.
"""

import argparse
import sys
from collections.abc import Sequence
from typing import TextIO

from engine.data.config import LOSS_MASKS, REASONING_EFFORTS, DataConfig
from engine.data.dataset import DataError, DocumentEncoder, JsonlFile
from engine.data.harmony import CALL, CHANNEL, Segment
from engine.data.records import RecordError
from engine.data.tokenizer import load_tokenizer

GREEN, RESET = "\x1b[32m", "\x1b[0m"


def mark(segments: Sequence[Segment], color: bool) -> str:
    """The rendered text with trained segments highlighted."""
    opened, closed = (GREEN, RESET) if color else ("[[", "]]")
    return "".join(f"{opened}{s.text}{closed}" if s.trained else s.text for s in segments)


def preview(
    path: str,
    *,
    n: int,
    tokenizer_path: str | None,
    loss_mask: str,
    reasoning_effort: str,
    current_date: str | None,
    color: bool,
    out: TextIO,
) -> tuple[int, int]:
    """Print the first `n` records of `path`; return (total tokens, trained tokens) shown."""
    cfg = DataConfig(
        train_path=path,
        tokenizer=tokenizer_path,
        loss_mask=loss_mask,
        reasoning_effort=reasoning_effort,
        current_date=current_date,
    ).validate()
    tokenizer = load_tokenizer(tokenizer_path)
    encoder = DocumentEncoder(cfg, tokenizer)
    file = JsonlFile(path)
    total = trained = 0
    for line_number, raw in file.read(range(min(n, len(file)))):
        try:
            segments = encoder.render_line(raw)
        except (DataError, RecordError) as exc:
            print(f"=== {path}:{line_number}: INVALID: {exc}\n", file=out)
            continue
        ids, flags = tokenizer.encode_segments(segments)
        # Counted as the batches count them: a trained token is a target of the token before it.
        targets = int(flags[1:].sum())
        total += len(ids)
        trained += targets
        text = "".join(s.text for s in segments)
        calls, results = text.count(CALL), text.count(" to=assistant" + CHANNEL)
        print(
            f"=== {path}:{line_number}: {len(ids)} tokens, {targets} trained, {calls} tool calls, "
            f"{results} tool results",
            file=out,
        )
        print(mark(segments, color) + "\n", file=out)
    print(f"total: {total} tokens, {trained} trained ({100 * trained / max(total, 1):.1f}%)", file=out)
    return total, trained


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", help="JSONL data file")
    parser.add_argument("--n", type=int, default=3, help="number of records to show (default 3)")
    parser.add_argument("--tokenizer", default=None, help="model directory or tokenizer.json (default: shipped)")
    parser.add_argument("--loss-mask", default="assistant", choices=LOSS_MASKS)
    parser.add_argument("--reasoning-effort", default="medium", choices=REASONING_EFFORTS)
    parser.add_argument("--current-date", default=None, help="YYYY-MM-DD for the system message")
    parser.add_argument("--color", default="auto", choices=("auto", "always", "never"))
    args = parser.parse_args(argv)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    try:
        preview(
            args.file,
            n=args.n,
            tokenizer_path=args.tokenizer,
            loss_mask=args.loss_mask,
            reasoning_effort=args.reasoning_effort,
            current_date=args.current_date,
            color=color,
            out=sys.stdout,
        )
    except ValueError as exc:  # bad paths, bad tokenizer: a message, not a traceback
        raise SystemExit(f"error: {exc}") from exc


if __name__ == "__main__":
    main()
