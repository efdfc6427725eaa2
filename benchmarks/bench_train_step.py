"""Full training steps (forward, backward, grad clip, AdamW): ours vs transformers (+ peft).

    python benchmarks/bench_train_step.py [--step lora|sft|all] [--layers N]   # GPU, GPT-OSS-20B shapes
    python benchmarks/bench_train_step.py --full-20b-lora-memory                # GPU: peak memory, 24 layers
    python benchmarks/bench_train_step.py --cpu                                 # tiny config, seconds

GPT-OSS-20B layers (hidden 2880, 32 experts top-4, 64 q heads, vocab 201088, embedding and lm_head
included) cut to as many layers as fit one GPU beside the baseline: LoRA 4 (bf16 frozen base), SFT
2 (fp32 master weights and AdamW state are 16 B per parameter), batch x seq 1 x 4096, random
weights made on the GPU, random token ids. The regime is the trainer's: LoRA keeps the base in
bf16 and the adapters (rank 32, alpha 32, on q/k/v/o and both expert projections) and their AdamW
state in fp32; SFT keeps fp32 master weights; both compute under bf16 autocast. Ours runs its
default backends (triton experts, compiled FlexAttention on GPU). transformers gets the same
config and weights (and peft the same adapter targets: target_parameters for the 3-D expert
weights), under each (attention, experts) implementation in --hf-impls, in that order, as long as
--budget-s allows; its fastest is the baseline (which one is recorded).
Figures: tokens/s, ours / transformers, MFU with the LoRA formula (4 x frozen active params + 6 x
LoRA params + attention term; SFT: 6 x active + attention) for the layers benchmarked, against the
GPU's dense bf16 peak (engine.metrics), and peak memory over the timed steps. JSON is rewritten
after every measurement, so a step killed by a timeout still leaves what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

import common
from engine.config import OptimConfig
from engine.metrics import active_lora_params, flops_per_token, peak_flops
from engine.models.gpt_oss import GptOssConfig, GptOssForCausalLM, ModelOptions
from engine.models.gpt_oss.attention import resolve_attn_backend
from engine.moe.backends import experts_backend
from engine.optim import build_optimizer
from engine.peft import LoraConfig, apply_lora

# transformers implementations to try, "attention/experts", cheapest to start first: flex_attention
# compiles for tens of seconds. SFT's fp32 master weights may not suit its grouped_mm (it casts the
# activations to the weights' dtype), hence its eager experts second.
FULL = dict(seq=4096, layers={"lora": 4, "sft": 2}, rank=32, warmup=2, iters=5, hf_warmup=1, hf_iters=3,
            hf_impls={"lora": "eager/grouped_mm,flex_attention/grouped_mm,eager/eager",
                      "sft": "eager/grouped_mm,eager/eager,flex_attention/grouped_mm"}, budget_s=300)
CPU = dict(seq=128, layers={"lora": 2, "sft": 2}, rank=8, warmup=2, iters=10, hf_warmup=2, hf_iters=10,
           hf_impls={"lora": "eager/eager,eager/grouped_mm", "sft": "eager/eager,eager/grouped_mm"}, budget_s=60)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERT_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def arch(args, layers: int) -> GptOssConfig:
    if args.cpu:
        return GptOssConfig.tiny(num_hidden_layers=layers)
    return GptOssConfig.gpt_oss_20b(num_hidden_layers=layers)


def dtypes(args, kind: str) -> tuple[torch.dtype, bool]:
    """(stored weight dtype, autocast to bf16?) as engine.build sets them up."""
    if args.cpu:
        return torch.float32, False
    return (torch.bfloat16 if kind == "lora" else torch.float32), True


def build_ours(cfg: GptOssConfig, kind: str, args, checkpointing: bool = False) -> GptOssForCausalLM:
    param_dtype, _ = dtypes(args, kind)
    with torch.device("meta"):
        model = GptOssForCausalLM(cfg, ModelOptions())
    model.to(param_dtype)  # still on meta: the GPU only ever holds the stored dtype
    model.to_empty(device=args.device)
    common.random_init_(model, seed=0)
    if checkpointing:
        model.set_activation_checkpointing(True)
    if kind == "lora":
        apply_lora(model, LoraConfig(rank=args.rank, alpha=float(args.rank)))
        for p in model.parameters():  # adapters and their AdamW state in fp32, as engine.build does
            if p.requires_grad:
                p.data = p.data.float()
    return model.train()


def build_hf(cfg: GptOssConfig, kind: str, impl: str, args):
    import peft
    from transformers import GptOssConfig as HFConfig
    from transformers import GptOssForCausalLM as HFModel

    attn, experts = impl.split("/")
    param_dtype, _ = dtypes(args, kind)
    hf_cfg = HFConfig(**cfg.to_hf_dict())
    hf_cfg.use_cache = False
    with torch.device(args.device):
        model = HFModel._from_config(hf_cfg, attn_implementation=attn, experts_implementation=experts,
                                     dtype=param_dtype)
    common.random_init_(model, seed=0)  # same names, so the same weights as ours
    if kind == "lora":
        lora = peft.LoraConfig(r=args.rank, lora_alpha=args.rank, lora_dropout=0.0, target_modules=LORA_TARGETS,
                               target_parameters=EXPERT_PARAMS)
        model = peft.get_peft_model(model, lora)  # casts the adapters to fp32 (autocast_adapter_dtype)
    return model.train()


def measure(build, cfg: GptOssConfig, kind: str, args, *, hf: bool, warmup: int, iters: int) -> dict:
    """Build a model, run `warmup` steps (compilation, optimizer state), then time `iters` steps."""
    model = build()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(model, OptimConfig(lr=1e-5))
    _, autocast = dtypes(args, kind)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (1, args.seq), generator=gen).to(args.device)
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]  # ours takes shifted labels; transformers shifts them itself
    last = {}

    def step():
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with ctx:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss if hf else model(ids, labels=labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        last["loss"] = loss.detach()

    # The first steps peak apart (optimizer state appears, compilation and autotuning workspaces):
    # a run must survive them too, so their peak is kept beside the steady one.
    cuda = args.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(args.device)
    for _ in range(warmup):
        step()
    common.sync(args.device)
    warmup_peak = torch.cuda.max_memory_allocated(args.device) if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats(args.device)
    step_ms = common.time_ms(step, args.device, warmup=0, iters=iters)
    tokens_per_s = args.seq / (step_ms / 1e3)
    n_trainable = sum(p.numel() for p in trainable)
    lora_active = active_lora_params(cfg, args.rank, list(LoraConfig().target_modules), False) if kind == "lora" else 0
    fpt = flops_per_token(cfg, args.seq, lora_params=lora_active)
    peak_rate = peak_flops(args.device)
    row = {"step_ms": step_ms, "tokens_per_s": tokens_per_s, "trainable_params": n_trainable, "flops_per_token": fpt,
           "mfu": fpt * tokens_per_s / peak_rate if peak_rate else None, "loss": float(last["loss"])}
    if cuda:
        peak = torch.cuda.max_memory_allocated(args.device)
        row.update(peak_gib=peak / common.GIB, peak_gb=peak / 1e9, warmup_peak_gb=warmup_peak / 1e9)
    if not hf:
        row["backends"] = {"experts": experts_backend(model.options.experts_backend).for_device(args.device).name,
                           "attention": resolve_attn_backend(model.options.attn_backend, args.device)}
    return row


def bench_kind(kind: str, args, report: dict) -> None:
    layers = args.layers or args.shape["layers"][kind]
    cfg = arch(args, layers)
    entry = report.setdefault(kind, {"layers": layers, "seq": args.seq, "rows": []})
    row, err = common.attempt(lambda: measure(lambda: build_ours(cfg, kind, args), cfg, kind, args, hf=False,
                                              warmup=args.shape["warmup"], iters=args.shape["iters"]))
    entry["rows"].append({"impl": "ours", **(row or {"error": err})})
    common.free_memory(args.device)  # the model and optimizer went out of scope with measure()
    common.write_json(args.json_name, args, report, quiet=True)
    start = time.perf_counter()  # the first implementation always runs; the budget decides the others
    for impl in (args.hf_impls or args.shape["hf_impls"][kind]).split(","):
        if time.perf_counter() - start > args.budget_s:
            entry["rows"].append({"impl": f"hf {impl}", "error": f"skipped: --budget-s {args.budget_s} spent"})
            continue
        row, err = common.attempt(lambda: measure(lambda: build_hf(cfg, kind, impl, args), cfg, kind, args, hf=True,
                                                  warmup=args.shape["hf_warmup"], iters=args.shape["hf_iters"]))
        entry["rows"].append({"impl": f"hf {impl}", **(row or {"error": err})})
        common.free_memory(args.device)
        common.write_json(args.json_name, args, report, quiet=True)
    ours = entry["rows"][0]
    hf_rows = [r for r in entry["rows"][1:] if r.get("tokens_per_s")]
    if ours.get("tokens_per_s") and hf_rows:
        best = max(hf_rows, key=lambda r: r["tokens_per_s"])
        entry["hf_best"] = best["impl"]
        entry["x_hf_best"] = ours["tokens_per_s"] / best["tokens_per_s"]
        for r in hf_rows:
            r["ours_x"] = ours["tokens_per_s"] / r["tokens_per_s"]
    common.write_json(args.json_name, args, report, quiet=True)


def bench_20b_memory(args, report: dict) -> None:
    """One GPU, gpt-oss-20b LoRA (all 24 layers), seq 4096, activation checkpointing on."""
    cfg = GptOssConfig.gpt_oss_20b()
    row, err = common.attempt(lambda: measure(lambda: build_ours(cfg, "lora", args, checkpointing=True), cfg, "lora",
                                              args, hf=False, warmup=1, iters=2))
    report["lora_20b"] = {"layers": cfg.num_hidden_layers, "seq": args.seq, "activation_checkpointing": True,
                          "target": "peak < 60 GB", **(row or {"error": err})}
    if row and "peak_gb" in row:
        report["lora_20b"]["meets_target"] = max(row["peak_gb"], row["warmup_peak_gb"]) < 60
    common.write_json(args.json_name, args, report)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--step", choices=("lora", "sft", "all"), default="all")
    parser.add_argument("--layers", type=int, default=None, help="layers of the model (default: LoRA 4, SFT 2)")
    parser.add_argument("--hf-impls", default=None, help="comma list of transformers' attention/experts "
                        "implementations to try, e.g. flex_attention/grouped_mm,eager/eager (default: per step kind)")
    parser.add_argument("--budget-s", type=float, default=None, help="seconds for transformers' implementations "
                        "of a step kind: the first always runs, the next only while the budget lasts")
    parser.add_argument("--full-20b-lora-memory", action="store_true", help="peak memory of a gpt-oss-20b LoRA step")
    args = common.parse_args(parser, argv)
    if args.cpu and args.full_20b_lora_memory:
        parser.error("--full-20b-lora-memory measures a 21B-parameter model on a GPU; it has no --cpu mode")
    args.shape = CPU if args.cpu else FULL
    args.seq, args.rank = args.shape["seq"], args.shape["rank"]
    args.budget_s = args.budget_s if args.budget_s is not None else args.shape["budget_s"]
    report: dict = {"lora_rank": args.rank, "mfu_formula": "LoRA: 4 x frozen active + 6 x LoRA params a token goes through (top-k experts' adapters) + attention; "
                    "SFT: 6 x active + attention (engine.metrics.flops_per_token), no recompute counted",
                    "targets": {"lora x_hf_best": ">= 3", "lora mfu": ">= 0.35", "lora_20b peak_gb": "< 60"}}
    if args.full_20b_lora_memory:
        args.json_name = "train_step_20b_lora_memory"
        bench_20b_memory(args, report)
        print(f"gpt-oss-20b LoRA, 24 layers, 1 x {args.seq}, checkpointing: {report['lora_20b']}")
        return
    args.json_name = "train_step" if args.step == "all" else f"train_step_{args.step}"
    report["partial"] = True  # rewritten after each measurement; the last write is the complete one
    for kind in (("lora", "sft") if args.step == "all" else (args.step,)):
        bench_kind(kind, args, report)
    del report["partial"]
    for kind in ("lora", "sft"):
        if kind in report:
            e = report[kind]
            common.print_table(e["rows"], [
                ("impl", "impl", ""), ("step_ms", "step ms", ".1f"), ("tokens_per_s", "tokens/s", ",.0f"),
                ("ours_x", "ours x", ".2f"), ("mfu", "MFU", ".1%"), ("peak_gib", "peak GiB", ".1f"),
                ("trainable_params", "trainable", ",d"), ("loss", "loss", ".3f")],
                title=f"{kind} step, {e['layers']} layers, 1 x {e['seq']} tokens; ours / best transformers "
                      f"({e.get('hf_best', '-')}): {e.get('x_hf_best') or 0:.2f}x")
            for r in e["rows"]:
                if "error" in r:
                    print(f"{r['impl']}: {r['error']}")
    common.write_json(args.json_name, args, report)


if __name__ == "__main__":
    main()
