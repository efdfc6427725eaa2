"""Command line of the run report (engine/training/report.py).

python -m engine.report RUN_DIR [RUN_DIR ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys

from engine.training.report import write_report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m engine.report",
        description="A run report: one self-contained HTML page plus PNG plots, from a run's metrics.jsonl.",
    )
    p.add_argument("runs", nargs="+", help="run output folder(s) (with metrics.jsonl)")
    p.add_argument("--out", help="output folder (default RUN_DIR/report for one run)")
    args = p.parse_args(argv)
    try:
        out = write_report(args.runs, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"report error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out / 'index.html'} and {len(list(out.glob('*.png')))} PNGs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
