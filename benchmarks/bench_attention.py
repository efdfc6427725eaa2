"""GPT-OSS attention layers (GQA with sinks): the eager, flex, blockwise and triton backends, time and peak memory.

    python benchmarks/bench_attention.py          # GPU: GPT-OSS-20B attention (64 q heads, 8 kv heads,
                                                  # head 64), 1 x 4096 tokens, bf16, all four backends
    python benchmarks/bench_attention.py --long   # GPU: 1 x 32K and 1 x 128K tokens, flex vs triton
                                                  # (eager needs T x T memory; blockwise is a CPU path)
    python benchmarks/bench_attention.py --cpu    # a small config, 1 x 128 tokens, fp32, seconds
                                                  # (triton under the interpreter: correctness, not speed)

The whole attention layer (q/k/v/o projections with biases, YaRN rotary, attention with the learned
sinks), for a sliding-window layer (128 keys) and a full causal layer, forward and forward+backward
(gradients for the input and every weight). `eager` materialises the [T, T] scores; `flex` is
FlexAttention with block masks, compiled on GPU by the model itself; `blockwise` is the plain-torch
flash schedule with its own backward; `triton` our flash-attention kernel. Before timing, each
backend's output and input gradient are compared with the first backend's (`max_err_*` columns,
relative to the largest reference value); one off by more than the tolerance is not timed and is
reported with `check_error`. The compiled backend comes last (triton before flex: flex compiles
for its first call), and the JSON is rewritten after each backend, so a step stopped by its time
limit keeps every backend it measured (`planned` lists them all).
Peak memory is torch.cuda.max_memory_allocated during one call, and the part of it above what was
allocated before (weights and input). On CPU PyTorch has no FlexAttention backward, so flex runs
its forward only, under no_grad, and CPU has no allocator statistics (memory columns empty).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch

import common

if "--cpu" in sys.argv:  # before triton is first imported: the triton backend runs interpreted on CPU
    os.environ["TRITON_INTERPRET"] = "1"

from engine.models.gpt_oss import GptOssConfig  # noqa: E402
from engine.models.gpt_oss.attention import AttentionContext, GptOssAttention  # noqa: E402
from engine.models.gpt_oss.rope import cos_sin  # noqa: E402

FULL = dict(seqs=[4096], arch=dict(), dtype=torch.bfloat16, warmup=3, iters=10,
            backends=("eager", "triton", "blockwise", "flex"))
LONG = dict(seqs=[32768, 131072], arch=dict(), dtype=torch.bfloat16, warmup=1, iters=2, backends=("flex", "triton"))
SMALL = dict(seqs=[128], arch=dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                                   sliding_window=32), dtype=torch.float32, warmup=1, iters=3,
             backends=("eager", "triton", "blockwise", "flex"))
CHECK_TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}  # max |out - first backend's| / max |first backend's|
LAYERS = {"sliding_attention": 0, "full_attention": 1}  # GPT-OSS alternates, sliding first


def build(cfg: GptOssConfig, layer_idx: int, device: torch.device, dtype: torch.dtype) -> GptOssAttention:
    with torch.device(device):
        attn = GptOssAttention(cfg, layer_idx).to(dtype)
    common.random_init_(attn, seed=layer_idx)
    with torch.no_grad():
        attn.sinks.normal_(0.0, 1.0)  # sinks of the order of the scores, so they matter
    return attn.train()


def measure_backend(attn, cfg, x, backend: str, shape: dict, device: torch.device, base: dict) -> dict:
    """One backend's row; `base` holds the first backend's output and input gradient (filled by the
    first call) that every later backend is checked against before it is timed."""
    cos, sin = cos_sin(cfg, torch.arange(x.shape[1], device=device).expand(x.shape[0], -1))
    ctx = AttentionContext(cos=cos, sin=sin, doc_ids=None, window=cfg.sliding_window, backend=backend)
    grad_ok = not (backend == "flex" and device.type == "cpu")
    inputs = [x, *attn.parameters()]
    g = torch.randn(x.shape, generator=torch.Generator(x.device).manual_seed(2), device=x.device, dtype=x.dtype)

    def fwd():
        if grad_ok:
            return attn(x, ctx)
        with torch.no_grad():
            return attn(x, ctx)

    def fwd_bwd():
        torch.autograd.grad(attn(x, ctx), inputs, g)

    row = {"fwd_with_grad": grad_ok}
    if grad_ok:
        out = attn(x, ctx)
        got = {"out": out.detach(), "dx": torch.autograd.grad(out, x, g)[0]}
        del out
    else:
        got = {"out": fwd().detach()}
    ok = check(row, got, base, shape["dtype"])
    del got  # the first backend's stay in `base`
    if not ok:
        return row
    passes = [("fwd", fwd)] + ([("fwd_bwd", fwd_bwd)] if grad_ok else [])
    for name, fn in passes:
        ms, err = common.attempt(lambda: common.time_ms(fn, device, warmup=shape["warmup"], iters=shape["iters"]))
        row[f"{name}_ms"] = ms
        if err:
            row[f"{name}_error"] = err
            continue
        mem, err = common.attempt(lambda: common.peak_memory_gib(fn, device))
        if mem:
            row[f"{name}_peak_gib"], row[f"{name}_above_start_gib"] = mem["peak_gib"], mem["above_start_gib"]
        common.free_memory(device)
    return row


def check(row: dict, got: dict, base: dict, dtype) -> bool:
    """The first backend's tensors become `base`; a later backend's are compared with them
    (max_err_out / max_err_dx relative to max |base|). False: off by more than the tolerance."""
    if not base:
        base.update(got)
        return True
    for key, value in got.items():
        if key in base:
            ref = base[key].float()
            row[f"max_err_{key}"] = float((value.float() - ref).abs().max() / ref.abs().max().clamp(min=1e-12))
    worst = max((v for k, v in row.items() if k.startswith("max_err_")), default=0.0)
    if not worst <= CHECK_TOL[dtype]:  # NaN fails too
        row["check_error"] = f"off by {worst:.2e} of the first backend's largest value: not timed"
        return False
    return True


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--long", action="store_true", help="32K and 128K tokens, flex vs triton (GPU)")
    args = common.parse_args(parser, argv)
    shape = SMALL if args.cpu else LONG if args.long else FULL
    if args.long:
        args.mode = "long"
    if args.cpu:  # uncompiled flex (CPU) warns that it materialises the scores: known, and said below
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    cfg = GptOssConfig.gpt_oss_20b(num_hidden_layers=2, **shape["arch"])
    planned = [[seq, layer, backend] for seq in shape["seqs"] for layer in LAYERS for backend in shape["backends"]]
    rows = common.LiveRows("attention", args, planned=planned)  # the JSON is rewritten after each backend
    for seq in shape["seqs"]:
        for layer_type, idx in LAYERS.items():
            attn = build(cfg, idx, args.device, shape["dtype"])
            torch.manual_seed(1)
            x = torch.randn(1, seq, cfg.hidden_size, device=args.device, dtype=shape["dtype"], requires_grad=True)
            base_tensors, first = {}, None
            for backend in shape["backends"]:
                row = dict(seq=seq, layer=layer_type, backend=backend)
                result, err = common.attempt(lambda: measure_backend(attn, cfg, x, backend, shape, args.device,
                                                                     base_tensors))
                row.update(result or {"error": err})
                first = first or row
                same_work = first.get("fwd_with_grad") == row.get("fwd_with_grad")  # no_grad saves nothing
                for key in ("fwd_ms", "fwd_bwd_ms"):
                    if row is not first:
                        row[f"x_base_{key[:-3]}"] = common.ratio(first.get(key), row.get(key)) if same_work else None
                rows.append(row)
            del attn, x, base_tensors
            common.free_memory(args.device)
    common.print_table(rows, [
        ("seq", "seq", "d"), ("layer", "layer", ""), ("backend", "backend", ""), ("fwd_ms", "fwd ms", ".3f"),
        ("fwd_bwd_ms", "fwd+bwd ms", ".3f"), ("x_base_fwd", f"x {shape['backends'][0]} fwd", ".2f"),
        ("x_base_fwd_bwd", f"x {shape['backends'][0]} f+b", ".2f"),
        ("max_err_out", "rel err out", ".1e"), ("max_err_dx", "rel err dx", ".1e"),
        ("fwd_peak_gib", "fwd peak GiB", ".2f"), ("fwd_bwd_peak_gib", "f+b peak GiB", ".2f"),
        ("fwd_bwd_above_start_gib", "f+b above start GiB", ".2f")],
        title=f"attention layer, 1 x {shape['seqs']} tokens, {cfg.num_attention_heads} q heads / "
              f"{cfg.num_key_value_heads} kv heads x {cfg.head_dim}, window {cfg.sliding_window}, "
              f"{str(shape['dtype']).replace('torch.', '')}; ratios and errors against {shape['backends'][0]}")
    for r in rows:
        for key in [k for k in r if k.endswith("error")]:
            print(f"{r['seq']} {r['layer']} {r['backend']} {key}: {r[key]}")
    if args.cpu:
        print("flex on CPU: forward only, under no_grad (PyTorch has no CPU FlexAttention backward); "
              "triton on CPU: the interpreter")
    common.write_json("attention", args, {
        "shapes": {"batch": 1, "seqs": shape["seqs"], "hidden": cfg.hidden_size, "q_heads": cfg.num_attention_heads,
                   "kv_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim, "window": cfg.sliding_window,
                   "dtype": str(shape["dtype"])},
        "planned": planned, "results": list(rows)})


if __name__ == "__main__":
    main()
