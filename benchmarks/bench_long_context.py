"""Training-step memory against sequence length: bytes per token must stay flat as T grows.

    python benchmarks/bench_long_context.py --cpu                 # tiny model, 1K / 4K / 16K tokens
    python benchmarks/bench_long_context.py --cpu --attn eager    # the same with the T x T reference
    python benchmarks/bench_long_context.py                       # GPU: gpt-oss-20b LoRA, 24 layers,
                                                                  # 32K / 64K / 128K tokens

CPU mode: the tiny model (2 layers, hidden 96, one sliding and one full layer, 8 experts top-2),
full training in fp32 (forward, backward, AdamW step) on one row of T tokens, with the CPU default
attention (`blockwise`) unless --attn says otherwise. Each length runs in its own process: after a
warm-up step at 256 tokens (optimizer state, allocator pools, one-time buffers), the process's
peak resident memory is reset (`/proc/self/clear_refs`), one step at T runs, and the step's memory
is the new peak (VmHWM) minus the resident memory just before the step. Reported: MiB per step,
bytes per token, and each length's bytes per token over the shortest length's (the growth factor;
the target is <= 1.5 from 1K to 16K: memory linear in T).

GPU mode: gpt-oss-20b with LoRA (rank 32 on q/k/v/o and both expert projections, bf16 base, fp32
adapters), activation checkpointing on every layer (and `--offload`: their inputs in host memory),
the attention backend of --attn (default triton), random weights, one row of T tokens. One
untimed step at 4096 tokens compiles every kernel; then per length one step, timed, with
torch.cuda.max_memory_allocated as its peak, tokens/s and MFU (engine.metrics' LoRA formula).
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

import common

CPU_SEQS = [1024, 4096, 16384]
GPU_SEQS = [32768, 65536, 131072]
CPU_ARCH = dict(num_hidden_layers=2, hidden_size=96)
MIB = 2**20


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _reset_peak() -> bool:
    """Reset the kernel's high-water mark of this process's resident memory (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_child(seq: int, attn: str) -> dict:
    """One process, one length: the memory a full training step at `seq` tokens adds."""
    from engine.models.gpt_oss import GptOssConfig, GptOssForCausalLM, ModelOptions

    torch.set_num_threads(1)
    cfg = GptOssConfig.tiny(**CPU_ARCH)
    model = GptOssForCausalLM(cfg, ModelOptions(attn_backend=attn, experts_backend="loop"))
    model.init_weights(0)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)

    def step(t: int) -> float:
        ids = torch.randint(0, cfg.vocab_size, (1, t), generator=gen)
        loss = model(ids, labels=ids.roll(-1, 1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    step(256)
    gc.collect()
    exact = _reset_peak()
    before = _rss_bytes()
    start = time.perf_counter()
    loss = step(seq)
    seconds = time.perf_counter() - start
    added = _peak_bytes() - before
    return {"seq": seq, "attn": attn, "step_mib": added / MIB, "bytes_per_token": added / seq, "step_s": seconds,
            "loss": loss, "peak_reset": exact}


def run_cpu(args) -> dict:
    rows = []
    for seq in args.seqs:
        out = subprocess.run([sys.executable, __file__, "--child", str(seq), "--attn", args.attn], text=True,
                             capture_output=True, timeout=1800)
        if out.returncode:
            rows.append({"seq": seq, "attn": args.attn, "error": out.stderr[-400:]})
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0].get("bytes_per_token")
    for r in rows:
        r["growth"] = common.ratio(r.get("bytes_per_token"), base)
    common.print_table(rows, [("seq", "tokens", ",d"), ("attn", "attention", ""), ("step_mib", "step MiB", ",.1f"),
                              ("bytes_per_token", "B/token", ",.0f"), ("growth", "B/token x first", ".2f"),
                              ("step_s", "step s", ".1f")],
                       title=f"CPU training step memory vs length, tiny model {CPU_ARCH}, fp32, "
                             "target: B/token x first <= 1.5")
    return {"arch": CPU_ARCH, "target": "bytes per token at the longest <= 1.5 x at the shortest", "results": rows}


def run_gpu(args) -> dict:
    from engine.config import OptimConfig
    from engine.metrics import active_lora_params, flops_per_token, peak_flops
    from engine.models.gpt_oss import GptOssConfig, GptOssForCausalLM, ModelOptions
    from engine.optim import build_optimizer
    from engine.peft import LoraConfig, apply_lora

    cfg = GptOssConfig.gpt_oss_20b()
    with torch.device("meta"):
        model = GptOssForCausalLM(cfg, ModelOptions(attn_backend=args.attn, activation_offload=args.offload))
    model.to(torch.bfloat16)
    model.to_empty(device=args.device)
    common.random_init_(model, seed=0)
    model.set_activation_checkpointing(True)
    apply_lora(model, LoraConfig(rank=32, alpha=32.0))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(model, OptimConfig(lr=1e-5))
    lora_active = active_lora_params(cfg, 32, list(LoraConfig().target_modules), False)

    def step(t: int) -> float:
        ids = torch.randint(0, cfg.vocab_size, (1, t), device=args.device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels=ids.roll(-1, 1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    step(4096)  # compiles every kernel; creates the optimizer state
    report = {"model": "gpt-oss-20b", "lora_rank": 32, "attn": args.attn, "offload": args.offload,
              "activation_checkpointing": True, "seqs": args.seqs, "partial": True, "results": []}
    for seq in args.seqs:
        common.free_memory(args.device)
        torch.cuda.reset_peak_memory_stats(args.device)
        row = {"seq": seq}
        try:
            start = time.perf_counter()
            row["loss"] = step(seq)
            torch.cuda.synchronize(args.device)
            seconds = time.perf_counter() - start
            rate = peak_flops(args.device)
            fpt = flops_per_token(cfg, seq, lora_params=lora_active)
            row.update(step_s=seconds, tokens_per_s=seq / seconds,
                       peak_gib=torch.cuda.max_memory_allocated(args.device) / common.GIB,
                       mfu=fpt * seq / seconds / rate if rate else None)
        except Exception as err:  # noqa: BLE001 - an OOM at one length is a result too
            row["error"] = f"{type(err).__name__}: {err}"[:400]
        report["results"].append(row)
        common.write_json("long_context", args, report, quiet=True)
    common.print_table(report["results"], [("seq", "tokens", ",d"), ("peak_gib", "peak GiB", ".1f"),
                                           ("tokens_per_s", "tokens/s", ",.0f"), ("mfu", "MFU", ".1%"),
                                           ("step_s", "step s", ".1f")],
                       title=f"gpt-oss-20b LoRA step, checkpointing, attention {args.attn}, offload {args.offload}")
    return report


def main(argv=None) -> None:
    if argv is None and "--child" in sys.argv:  # one CPU measurement in this fresh process
        i = sys.argv.index("--child")
        attn = sys.argv[sys.argv.index("--attn") + 1] if "--attn" in sys.argv else "blockwise"
        print(json.dumps(cpu_child(int(sys.argv[i + 1]), attn)))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attn", default=None, help="attention backend (default: blockwise on CPU, triton on GPU)")
    parser.add_argument("--seqs", default=None, help="comma list of lengths")
    parser.add_argument("--offload", action="store_true", help="GPU: model.activation_offload")
    args = common.parse_args(parser, argv)
    args.attn = args.attn or ("blockwise" if args.cpu else "triton")
    args.seqs = [int(s) for s in args.seqs.split(",")] if args.seqs else (CPU_SEQS if args.cpu else GPU_SEQS)
    report = run_cpu(args) if args.cpu else run_gpu(args)
    report.pop("partial", None)  # rewritten after each length while it ran; complete now
    common.write_json("long_context", args, report)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
