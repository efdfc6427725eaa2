"""Convert a GPT-OSS checkpoint into the HF BF16 (or FP32) layout that training and transformers read.

    python -m engine.export.convert openai/gpt-oss-20b ./gpt-oss-20b-bf16 [--dtype bf16|fp32]
                             [--max-shard-size 5GB] [--verify] [--overwrite]

SRC is a local directory or a hub id, MXFP4 (the published checkpoints) or BF16/FP32. The conversion
streams tensor by tensor (one shard's worth in memory at most) and writes atomically: DST is either
complete or absent. MXFP4 -> BF16 is lossless (every FP4 value times its power-of-two scale is a
bf16 number) but the expert weights grow from 4.25 to 16 bits per value: gpt-oss-20b goes from about
13 GB to about 42 GB. `--verify` reads DST back and compares every tensor with SRC, bit for bit.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from engine.checkpoint.errors import CheckpointError, CheckpointExistsError
from engine.checkpoint.hf import write_hf
from engine.checkpoint.hf.hub import resolve_checkpoint
from engine.checkpoint.hf.layout import HFCheckpoint
from engine.errors import ConfigError, size_text
from engine.export.writers import DTYPES

DTYPE_FLAGS = {dtype: flag for flag, dtype in DTYPES.items()}


def _stream(ckpt: HFCheckpoint, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    for name in ckpt.shapes:
        yield name, ckpt.read(name, dtype)


def describe(ckpt: HFCheckpoint, dtype: torch.dtype, dst: Path) -> str:
    """What the conversion will do, with sizes; warns when DST's filesystem looks too small."""
    src_bytes = ckpt.tensors.nbytes_on_disk()
    out_bytes = sum(ckpt.nbytes(name, dtype) for name in ckpt.shapes)
    layout = "MXFP4 experts" if ckpt.quantization else "unquantized"
    lines = [
        f"source: {ckpt.directory} ({layout}, {size_text(src_bytes)} on disk)",
        f"output: {dst} ({DTYPE_FLAGS[dtype]}, about {size_text(out_bytes)})",
    ]
    if ckpt.quantization:
        lines.append(
            f"note: MXFP4 -> {DTYPE_FLAGS[dtype]} dequantizes the expert weights (lossless, but 4.25 -> "
            f"{dtype.itemsize * 8} bits per value), so the output is {out_bytes / src_bytes:.1f}x the "
            "size of the input"
        )
    free = shutil.disk_usage(next(p for p in [dst, *dst.parents] if p.exists())).free
    if free < out_bytes:
        lines.append(
            f"warning: only {size_text(free)} free where {dst} goes; the conversion will likely run out of space"
        )
    return "\n".join(lines)


def verify(src: HFCheckpoint, out: HFCheckpoint, dtype: torch.dtype) -> list[str]:
    """Names of the tensors of `out` that differ from `src` read in `dtype` (empty: bit-exact). Both
    were checked against their config.json when opened, so they hold the same names and shapes."""
    bad = []
    for name in tqdm(src.shapes, desc="verifying", unit="tensor", disable=None):
        if not torch.equal(src.read(name, dtype), out.read(name, dtype)):
            bad.append(name)
    return bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.export.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="checkpoint directory or Hugging Face hub id (MXFP4, BF16 or FP32)")
    parser.add_argument("dst", type=Path, help="output directory (must not exist or be empty, unless --overwrite)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="output dtype (default bf16)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest shard file, e.g. 5GB, 500MB (default 5GB)")
    parser.add_argument("--verify", action="store_true", help="read the output back and compare every tensor")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it already holds files")
    args = parser.parse_args(argv)
    dtype = DTYPES[args.dtype]
    try:
        src = HFCheckpoint(resolve_checkpoint(args.src))
        if args.dst.resolve() == src.directory.resolve():
            raise ValueError(f"{args.dst}: the output directory is the source; write somewhere else")
        print(describe(src, dtype, args.dst.resolve()), flush=True)
        write_hf(
            src.config,
            _stream(src, dtype),
            args.dst,
            dtype=dtype,
            max_shard_size=args.max_shard_size,
            source_dir=src.directory,
            progress=True,
            overwrite=args.overwrite,
        )
        print(f"wrote {args.dst}", flush=True)
        if args.verify:
            bad = verify(src, HFCheckpoint(args.dst), dtype)
            if bad:
                print(f"verify FAILED: {len(bad)} tensors differ, e.g. {bad[:5]}", file=sys.stderr)
                return 1
            print(f"verify: all {len(src.shapes)} tensors of {args.dst} equal the source, bit for bit")
    except (CheckpointError, CheckpointExistsError, ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
