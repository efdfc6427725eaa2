"""Greedy generation throughput: engine.inference.generate with the KV cache, without it, and transformers'.

    python benchmarks/bench_generate.py          # GPU: GPT-OSS-20B shapes (24 layers, random weights), bf16,
                                                 # prompts of 1024 tokens, 128 new tokens, batch 1 and 8
    python benchmarks/bench_generate.py --cpu    # a small config, prompts of 128, 32 new tokens, fp32

New tokens per second (batch x new tokens / wall time, prefill included) for: `cache` (the KV cache,
a 128-slot ring on sliding layers), `no_cache` (the full forward of the whole sequence at every step,
what generation costs without a cache) and `hf` (transformers' GptOssForCausalLM.generate with its
own cache, eager attention, same weights). The cached and uncached runs must produce the same tokens;
the JSON records whether they did.
"""

from __future__ import annotations

import argparse
import time

import common
import torch

from engine.inference.generate import generate
from engine.models.gpt_oss import GptOssConfig, GptOssForCausalLM

FULL = dict(arch=dict(), dtype=torch.bfloat16, prompt=1024, new=128, batches=(1, 8), hf_batches=(1,))
SMALL = dict(
    arch=dict(
        vocab_size=4096,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
        num_local_experts=8,
        num_experts_per_tok=2,
        intermediate_size=256,
        sliding_window=32,
    ),
    dtype=torch.float32,
    prompt=128,
    new=32,
    batches=(1, 4),
    hf_batches=(1, 4),
)


def build(shape: dict, device: torch.device) -> GptOssForCausalLM:
    cfg = GptOssConfig.gpt_oss_20b(**shape["arch"]) if shape is FULL else GptOssConfig.tiny(**shape["arch"])
    with torch.device("meta"):  # shapes first, then memory in the final dtype: no fp32 copy of 20B
        model = GptOssForCausalLM(cfg, experts_backend="auto", attn_backend="eager").to(shape["dtype"])
    model.to_empty(device=device)
    common.random_init_(model, seed=0, std=0.05)
    return model.eval()


def hf_twin(model: GptOssForCausalLM, device: torch.device, dtype: torch.dtype):
    from transformers import GptOssConfig as HFConfig
    from transformers import GptOssForCausalLM as HFModel

    cfg = HFConfig(**model.config.to_hf_dict())
    with torch.device(device):  # built where it runs: a 20B model initialised on the host takes minutes
        hf = HFModel._from_config(cfg, attn_implementation="eager", dtype=dtype).eval()
    hf.load_state_dict(model.state_dict(), strict=True)
    return hf


def timed(fn, device: torch.device) -> tuple[torch.Tensor, float]:
    fn()  # warm-up (allocator, kernels, autotuning)
    common.sync(device)
    t0 = time.perf_counter()
    out = fn()
    common.sync(device)
    return out, time.perf_counter() - t0


def main(argv=None) -> None:
    args = common.parse_args(argparse.ArgumentParser(prog="bench_generate.py"), argv)
    shape = SMALL if args.cpu else FULL
    device = args.device
    model = build(shape, device)
    cfg = model.config
    rows = []
    for batch in shape["batches"]:
        ids = torch.randint(0, cfg.vocab_size, (batch, shape["prompt"]), generator=torch.Generator().manual_seed(batch))
        ids = ids.to(device)
        new = shape["new"]
        row = {"batch": batch, "prompt": shape["prompt"], "new_tokens": new}
        with torch.no_grad():
            cached, t_cache = timed(lambda: generate(model, ids, new), device)
            plain, t_plain = timed(lambda: generate(model, ids, new, use_cache=False), device)
        row.update(
            cache_tokens_per_s=batch * new / t_cache,
            no_cache_tokens_per_s=batch * new / t_plain,
            same_tokens=bool(torch.equal(cached, plain)),
        )
        if batch in shape["hf_batches"]:

            def run_hf():
                hf = hf_twin(model, device, shape["dtype"])
                out, t = timed(
                    lambda: hf.generate(
                        input_ids=ids,
                        attention_mask=torch.ones_like(ids),
                        max_new_tokens=new,
                        min_new_tokens=new,
                        do_sample=False,
                        pad_token_id=0,
                        eos_token_id=None,
                    ),
                    device,
                )
                return batch * new / t, bool(torch.equal(out, cached))

            hf_result, error = common.attempt(run_hf)
            if error:
                row["error"] = f"transformers: {error}"
            else:
                row["hf_tokens_per_s"], row["same_tokens_as_hf"] = hf_result
        row["cache_x_no_cache"] = common.ratio(row["cache_tokens_per_s"], row["no_cache_tokens_per_s"])
        row["cache_x_hf"] = common.ratio(row["cache_tokens_per_s"], row.get("hf_tokens_per_s"))
        rows.append(row)
        common.free_memory(device)
    common.print_table(
        rows,
        [
            ("batch", "batch", ""),
            ("prompt", "prompt", ""),
            ("new_tokens", "new", ""),
            ("cache_tokens_per_s", "cache tok/s", ".1f"),
            ("no_cache_tokens_per_s", "no-cache tok/s", ".1f"),
            ("hf_tokens_per_s", "hf tok/s", ".1f"),
            ("cache_x_no_cache", "x no-cache", ".2f"),
            ("cache_x_hf", "x hf", ".2f"),
            ("same_tokens", "same", ""),
        ],
        title=f"greedy generation, {cfg.num_hidden_layers} layers, window {cfg.sliding_window}",
    )
    common.write_json("generate", args, {"shape": {k: str(v) for k, v in shape.items()}, "results": rows})


if __name__ == "__main__":
    main()
