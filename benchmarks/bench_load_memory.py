"""Peak host memory of `load_hf`: it should track the model slice being built, not the checkpoint size.

    python benchmarks/bench_load_memory.py [--workdir DIR] [--keep]

Writes a synthetic ~2.2 GB GPT-OSS checkpoint (a wide config, BF16, 500 MB shards) and its MXFP4
twin (random expert blocks/scales), then loads each in a fresh child process, fully and as one
8-way expert-parallel rank, into BF16 on CPU. Each child resets its peak-RSS counter after the
imports (`/proc/self/clear_refs`) and reports VmHWM after the load, so the figure is the load's
own peak: the parameters it allocates plus whatever transient buffers the loader holds.
The files' page cache does not show up in it (checked: RssFile stays flat while reading).
Not a test: it needs ~3 GB of disk and memory and a minute of CPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.checkpoint.hf import write_hf  # noqa: E402
from engine.checkpoint.hf.layout import QUANTIZED_SUFFIXES, full_shapes  # noqa: E402
from engine.checkpoint.hf.safetensors_io import ShardWriter  # noqa: E402
from engine.models.gpt_oss import GptOssConfig  # noqa: E402

CONFIG = GptOssConfig(
    vocab_size=32000,
    hidden_size=1024,
    num_hidden_layers=10,
    num_attention_heads=16,
    num_key_value_heads=4,
    head_dim=64,
    num_local_experts=32,
    num_experts_per_tok=4,
    intermediate_size=1024,
    max_position_embeddings=4096,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
SHARD = "500MB"
EP = 8
RUNS = [("bf16", 1, 0), ("bf16", EP, 3), ("mxfp4", 1, 0), ("mxfp4", EP, 3)]


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _random(shape, dtype, gen):
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
    return torch.randn(shape, generator=gen).mul_(0.02).to(dtype)


def write_bf16(directory: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = ((name, _random(shape, torch.bfloat16, gen)) for name, shape in full_shapes(CONFIG).items())
    write_hf(CONFIG, tensors, directory, dtype=torch.bfloat16, max_shard_size=SHARD, progress=True)


def write_mxfp4(directory: Path) -> None:
    """The published layout: expert weights as uint8 blocks [E, out, in/32, 16] + scales [E, out, in/32]."""
    gen = torch.Generator().manual_seed(1)
    directory.mkdir(parents=True)
    writer = ShardWriter(directory, SHARD)
    for name, shape in full_shapes(CONFIG).items():
        if name.endswith(QUANTIZED_SUFFIXES):
            e, fan_in, fan_out = shape
            writer.add(f"{name}_blocks", _random((e, fan_out, fan_in // 32, 16), torch.uint8, gen))
            writer.add(f"{name}_scales", torch.randint(118, 127, (e, fan_out, fan_in // 32), dtype=torch.uint8))
        else:
            writer.add(name, _random(shape, torch.bfloat16, gen))
    writer.finish()
    config = {**CONFIG.to_hf_dict(), "quantization_config": {"quant_method": "mxfp4"}}
    (directory / "config.json").write_text(json.dumps(config))


def child(directory: str, ep_size: int, ep_rank: int) -> None:
    """One measurement, in a fresh process: prints a JSON line."""
    from engine.checkpoint import load_hf

    # Building any model under torch.device("meta") first imports ~180 MB of torch's lazy modules
    # (sympy, dynamo); pay that before the reset so the figure is the load's data, not library code.
    full_shapes(GptOssConfig.tiny())
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
    before = _status("VmRSS")
    start = time.perf_counter()
    model = load_hf(directory, dtype=torch.bfloat16, ep_size=ep_size, ep_rank=ep_rank)
    seconds = time.perf_counter() - start
    built = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    print(json.dumps({"before": before, "peak": _status("VmHWM"), "built": built, "seconds": seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the checkpoints (default: /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints afterwards")
    parser.add_argument("--child", nargs=3, metavar=("DIR", "EP_SIZE", "EP_RANK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), int(args.child[2]))
        return
    root = Path(tempfile.mkdtemp(prefix="bench_load_memory-", dir=args.workdir))
    try:
        dirs = {"bf16": root / "bf16", "mxfp4": root / "mxfp4"}
        write_bf16(dirs["bf16"])
        write_mxfp4(dirs["mxfp4"])
        print(
            f"{'checkpoint':<10} {'file size':>10} {'ep':>5} {'built':>10} {'peak - before':>14} "
            f"{'peak/built':>10} {'load s':>7}"
        )
        for kind, ep_size, ep_rank in RUNS:
            size = sum(f.stat().st_size for f in dirs[kind].glob("*.safetensors"))
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(dirs[kind]), str(ep_size), str(ep_rank)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            r = json.loads(out.strip().splitlines()[-1])
            extra = r["peak"] - r["before"]
            print(
                f"{kind:<10} {size / 1e9:>8.2f}GB {f'{ep_rank}/{ep_size}':>5} {r['built'] / 1e9:>8.2f}GB "
                f"{extra / 1e9:>12.2f}GB {extra / r['built']:>10.2f} {r['seconds']:>7.1f}",
                flush=True,
            )
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
