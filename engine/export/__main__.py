"""`python -m engine.export`: the command line of the exports (engine/export/).

python -m engine.export CHECKPOINT_DIR --out DIR [--format peft|hf|merged] [--attention-only]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.checkpoint.dcp import state as ckpt
from engine.errors import EngineError
from engine.export import DTYPES, export, run_dtype


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.export", description="Export a training checkpoint.")
    p.add_argument("checkpoint", help="a checkpoints/step_XXXXXXX directory of a run")
    p.add_argument("--out", required=True, help="output directory (created atomically)")
    p.add_argument(
        "--format",
        choices=["peft", "hf", "merged"],
        default=None,
        help="default: peft for LoRA runs, hf for full fine-tuning",
    )
    p.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="dtype of hf/merged exports (default: the dtype the run trained in)",
    )
    p.add_argument(
        "--attention-only",
        action="store_true",
        help="peft format without the expert adapters (for servers that take none)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    args = p.parse_args(argv)
    from engine.checkpoint.errors import CheckpointExistsError

    try:
        out = export(
            args.checkpoint,
            args.out,
            args.format,
            dtype=args.dtype,
            attention_only=args.attention_only,
            overwrite=args.overwrite,
        )
    except CheckpointExistsError:
        print(
            f"export error: {args.out} already exists; pass another --out, or --overwrite to replace it",
            file=sys.stderr,
        )
        return 2
    except (FileNotFoundError, FileExistsError, PermissionError, ValueError, EngineError) as e:
        print(f"export error: {e}", file=sys.stderr)
        return 2
    fmt = args.format or ("peft" if (out / "adapter_config.json").is_file() else "hf")
    said = (
        ""
        if fmt == "peft"
        else (
            f" in {args.dtype}"
            if args.dtype
            else f" in {run_dtype(ckpt.read_meta(Path(args.checkpoint)))} (the run's dtype; --dtype to choose)"
        )
    )
    meta_config = ckpt.read_meta(Path(args.checkpoint))["config"]
    if fmt == "merged" and meta_config.get("model", {}).get("expert_weights") == "mxfp4":
        said += (
            "; the run's MXFP4 experts are written dense (about 3.8x their packed size in bf16), "
            "dequantized one layer's projection at a time"
        )
    print(f"exported {args.checkpoint} -> {out} ({fmt}{said})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
