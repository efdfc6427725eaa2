"""FSDP2 sharding and checkpoints by the clock and by the byte, through the real trainer.

    python benchmarks/bench_sharding.py --cpu [--steps 8]

Runs `engine.training.trainer.run` on 4 gloo processes at EP2 x expert-DP2 (a tiny GPT-OSS widened to hidden
128 / intermediate 256, synthetic data, fp32) and reports:
1. the median step time of parallel.shard = none / optimizer / full (steps after the first two);
2. checkpoint bytes on disk (all `.distcp` files) against the bytes of the model's weights and AdamW
   moments (each tensor once: the ratio is near 1, the rest is per-tensor headers);
3. the training stall of a save (the time the save takes on the training thread, `checkpoint_s` in
   metrics.jsonl), synchronous vs `checkpoint.async=true`.
The full mode (GPT-OSS shapes) needs several GPUs under torchrun and is not part of the one-GPU suite.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

WIDE = {"hidden_size": 128, "intermediate_size": 256}


def _config(out: str, shard: str, steps: int, every: int, asynchronous: bool) -> dict:
    return {
        "recipe": "bench_sharding",
        "model": {"preset": "tiny", "dtype": "float32", "overrides": WIDE},
        "data": {"source": "synthetic", "max_seq_len": 64, "global_batch_size": 8, "micro_batch_size": 2},
        "parallel": {"ep": 2, "shard": shard, "timeout_s": 300},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "trainer": {"max_steps": steps, "output_dir": out, "log_every": 1, "progress": False, "seed": 0},
        "checkpoint": {"every": every, "keep": 1, "async": asynchronous},
    }


def worker(values: dict) -> None:
    import torch

    from engine.config.load import build_config
    from engine.training.trainer import run

    torch.set_num_threads(1)
    run(build_config(values))


def _launch(values: dict, nproc: int) -> list[dict]:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(Path(__file__).resolve()),
        "--worker",
        json.dumps(values),
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"run failed:\n{proc.stderr[-3000:]}")
    out = Path(values["trainer"]["output_dir"])
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="bench_sharding.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--cpu", action="store_true", help="4 gloo processes on the CPU (the only mode)")
    args = p.parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))
    if not args.cpu:
        sys.exit(
            "bench_sharding.py: only --cpu is implemented here; on GPUs run the recipes under torchrun and "
            "read step_time_s / checkpoint_s from metrics.jsonl"
        )
    import torch

    from benchmarks.common import environment, out_dir
    from engine.models.gpt_oss import GptOssConfig, GptOssForCausalLM

    with torch.device("meta"):
        n_params = GptOssForCausalLM(GptOssConfig.tiny(**WIDE)).num_parameters()
    state_bytes = 3 * 4 * n_params  # fp32 weights + two fp32 AdamW moments
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for shard in ("none", "optimizer", "full"):
            m = _launch(_config(f"{tmp}/{shard}", shard, args.steps, 0, False), args.nproc)
            rows.append(
                {
                    "what": f"step time, shard={shard}",
                    "value": statistics.median(r["step_time_s"] for r in m[2:]),
                    "unit": "s",
                }
            )
        for asynchronous in (False, True):
            out = f"{tmp}/ckpt_{asynchronous}"
            m = _launch(_config(out, "full", args.steps, 2, asynchronous), args.nproc)
            stalls = [r["checkpoint_s"] for r in m if "checkpoint_s" in r]
            rows.append(
                {
                    "what": f"save stall, {'async' if asynchronous else 'sync'}",
                    "value": statistics.median(stalls),
                    "unit": "s",
                }
            )
            final = sorted((Path(out) / "checkpoints").glob("step_*"))[-1]
            written = sum(f.stat().st_size for f in final.glob("*.distcp"))
            rows.append(
                {
                    "what": f"checkpoint bytes / state bytes ({'async' if asynchronous else 'sync'})",
                    "value": written / state_bytes,
                    "unit": "x",
                }
            )
    for r in rows:
        print(f"  {r['what']:<48}{r['value']:10.4f} {r['unit']}")
    report = {
        "benchmark": "sharding",
        "mode": "cpu",
        **environment(torch.device("cpu")),
        "nproc": args.nproc,
        "layout": "EP2 x expert-DP2, gloo",
        "state_bytes": state_bytes,
        "results": rows,
    }
    path = out_dir() / "sharding_cpu.json"
    path.write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
