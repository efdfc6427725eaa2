"""Activation memory: bytes saved for backward per token, per MoE layer and per attention layer,
ours vs transformers' GptOssMLP / GptOssAttention with the same config, weights and input.

    python benchmarks/bench_memory.py --cpu    # fp32, GPT-OSS-shaped small config, 1 x 512 tokens (CI proxy)
    python benchmarks/bench_memory.py          # GPU: GPT-OSS-20B shapes, bf16, 1 x 4096 tokens

One training-mode forward (every weight trainable, the input requiring grad) runs under
torch.autograd.graph.saved_tensors_hooks; the pack hook sees each tensor autograd keeps for the
backward. Their storages are summed once each (deduplicated by data_ptr: views and repeated saves
of one buffer count once), parameters' storages skipped. That is what a layer holds between its
forward and its backward. Each saved tensor is also tagged with the line of code that saved it,
and the largest are listed, so the report says what to shrink. Not seen by the hook: tensors a
custom autograd Function stashes on ctx as attributes (ours: the Triton tile maps, a few KB).
On GPU the allocator gives a second figure that needs no hook (and so also covers compiled
FlexAttention): memory still allocated after the forward, minus the output.
Target: ours <= half of transformers' bytes per token for the MoE layer.
"""

from __future__ import annotations

import argparse
import os
import traceback
from pathlib import Path

import common
import torch

CPU_ARCH = dict(
    hidden_size=256,
    intermediate_size=256,
    num_local_experts=8,
    num_experts_per_tok=4,
    num_attention_heads=16,
    num_key_value_heads=2,
    head_dim=16,
    sliding_window=128,
)
INTERPRETER_TOKENS = 128
MODES = {
    "cpu": dict(tokens=512, arch=CPU_ARCH, dtype=torch.float32),
    "full": dict(tokens=4096, arch=dict(), dtype=torch.bfloat16),
}
_SKIP_FRAMES = (os.sep + "torch" + os.sep, "contextlib", "bench_memory.py")


def _site() -> str:
    """The innermost frame outside torch and this file: the code that asked to save the tensor."""
    for frame in reversed(traceback.extract_stack()):
        if not any(s in frame.filename for s in _SKIP_FRAMES):
            path = Path(frame.filename)
            return f"{path.parent.name}/{path.name}:{frame.lineno} {frame.name}"
    return "?"


def saved_for_backward(fn, params) -> tuple[int, list[dict]]:
    """Run fn (a forward) under the hooks: (unique saved bytes, saved tensors largest first)."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, dict] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in skip and ptr not in seen:
            seen[ptr] = {
                "bytes": storage.nbytes(),
                "shape": list(t.shape),
                "dtype": str(t.dtype).replace("torch.", ""),
                "site": _site(),
            }
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    entries = sorted(seen.values(), key=lambda e: -e["bytes"])
    return sum(e["bytes"] for e in entries), entries


def retained_bytes(fn, device: torch.device) -> int | None:
    """GPU only: bytes the forward leaves allocated (its graph's saved tensors) minus its output."""
    if device.type != "cuda":
        return None
    common.free_memory(device)
    common.sync(device)
    before = torch.cuda.memory_allocated(device)
    out = fn()
    common.sync(device)
    held = torch.cuda.memory_allocated(device) - before - out.untyped_storage().nbytes()
    del out
    return held


def measure(name: str, fn, params, tokens: int, device: torch.device) -> dict:
    """The hook's count and, on GPU, the allocator's, each on its own: one failing leaves the other."""
    row = {"layer": name.split()[0], "impl": name.split(" ", 1)[1], "tokens": tokens}
    held, err = common.attempt(lambda: retained_bytes(fn, device))
    row["retained_bytes_per_token"] = common.ratio(held, tokens)
    if err:
        row["retained_error"] = err
    saved, err = common.attempt(lambda: saved_for_backward(fn, params))
    if saved:
        total, entries = saved
        row.update(
            saved_bytes=total, saved_bytes_per_token=total / tokens, saved_tensors=len(entries), top_saved=entries[:8]
        )
    else:
        row["error"] = err
    common.free_memory(device)
    return row


def moe_rows(cfg, tokens: int, dtype, device: torch.device) -> list[dict]:
    from transformers import GptOssConfig as HFConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

    from engine.moe.backends import experts_backend
    from engine.moe.layer import MoEBlock

    with torch.device(device):
        ours = MoEBlock(
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_local_experts,
            cfg.num_experts_per_tok,
            alpha=cfg.swiglu_alpha,
            limit=cfg.swiglu_limit,
        ).to(dtype)
        hf_cfg = HFConfig(**cfg.to_hf_dict())
        hf = GptOssMLP(hf_cfg).to(dtype)
    common.random_init_(ours, seed=0)
    hf.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(1, tokens, cfg.hidden_size, device=device, dtype=dtype, requires_grad=True)
    rows = []
    # triton first, the backend the model trains with on GPU: the summary's ratio is taken for it.
    for backend in ("triton", "grouped_mm", "loop"):
        ours.experts.backend = experts_backend(backend)
        n = tokens
        if backend == "triton" and device.type == "cpu":
            # The Triton interpreter needs ~10 s at 512 tokens, <1 s at 128. Every tensor this layer
            # saves is per token or per routed row, so bytes per token do not depend on the count
            # (measured: equal at 64 to 512 tokens).
            n = INTERPRETER_TOKENS
        xn = x[:, :n].detach().clone().requires_grad_()  # its own storage: a view would count all of x
        rows.append(measure(f"moe ours {backend}", lambda: ours(xn), list(ours.parameters()), n, device))
    for impl in ("eager", "grouped_mm"):
        hf_cfg._experts_implementation = impl
        rows.append(measure(f"moe hf {impl}", lambda: hf(x)[0], list(hf.parameters()), tokens, device))
    return rows


LORA_RANK = 16


def lora_moe_rows(cfg, tokens: int, dtype, device: torch.device) -> list[dict]:
    """The MoE layer with LoRA (rank 16) on both expert projections, base frozen: ours (the adapter
    product inside the expert GEMMs on the triton backend) vs transformers' GptOssMLP with peft's
    adapters on the same expert parameters. Only the adapters and the input train."""
    import peft
    from transformers import GptOssConfig as HFConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

    from engine.moe.backends import experts_backend
    from engine.moe.layer import MoEBlock
    from engine.peft import LoraConfig, apply_lora

    with torch.device(device):
        ours = MoEBlock(
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_local_experts,
            cfg.num_experts_per_tok,
            alpha=cfg.swiglu_alpha,
            limit=cfg.swiglu_limit,
        ).to(dtype)
        hf_cfg = HFConfig(**cfg.to_hf_dict())
        hf = GptOssMLP(hf_cfg).to(dtype)
    common.random_init_(ours, seed=0)
    hf.load_state_dict(ours.state_dict(), strict=True)
    apply_lora(ours, LoraConfig(rank=LORA_RANK, alpha=2.0 * LORA_RANK, target_modules=["gate_up_proj", "down_proj"]))
    hf = peft.inject_adapter_in_model(
        peft.LoraConfig(
            r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_parameters=["experts.gate_up_proj", "experts.down_proj"]
        ),
        hf,
    ).to(device=device, dtype=dtype)
    x = torch.randn(1, tokens, cfg.hidden_size, device=device, dtype=dtype, requires_grad=True)
    rows = []
    for backend in ("triton", "grouped_mm", "loop"):
        ours.experts.backend = experts_backend(backend)
        n = INTERPRETER_TOKENS if backend == "triton" and device.type == "cpu" else tokens
        xn = x[:, :n].detach().clone().requires_grad_()
        rows.append(measure(f"moe_lora ours {backend}", lambda: ours(xn), list(ours.parameters()), n, device))
    for impl in ("eager", "grouped_mm"):
        hf_cfg._experts_implementation = impl
        rows.append(measure(f"moe_lora hf+peft {impl}", lambda: hf(x)[0], list(hf.parameters()), tokens, device))
    return rows


def attention_rows(cfg, tokens: int, dtype, device: torch.device) -> list[dict]:
    from transformers import GptOssConfig as HFConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssAttention as HFAttention
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

    from engine.models.gpt_oss.attention import AttentionContext, GptOssAttention, dense_mask
    from engine.models.gpt_oss.rope import cos_sin

    hf_cfg = HFConfig(**cfg.to_hf_dict())
    hf_cfg._attn_implementation = "eager"
    rows = []
    for layer_idx in (0, 1):  # sliding window, full causal
        kind = cfg.layer_types[layer_idx].split("_")[0]
        with torch.device(device):
            ours = GptOssAttention(cfg, layer_idx).to(dtype)
            hf = HFAttention(hf_cfg, layer_idx).to(dtype)
            rotary = GptOssRotaryEmbedding(hf_cfg)
        common.random_init_(ours, seed=layer_idx)
        hf.load_state_dict(ours.state_dict(), strict=True)
        x = torch.randn(1, tokens, cfg.hidden_size, device=device, dtype=dtype, requires_grad=True)
        pos = torch.arange(tokens, device=device)[None]
        cos, sin = cos_sin(cfg, pos)
        window = cfg.sliding_window if kind == "sliding" else None
        allowed = dense_mask(1, tokens, window, None, device)
        additive = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
        hf_rope = rotary(x, pos)
        for backend in (["flex"] if device.type == "cuda" else []) + ["eager"]:
            ctx = AttentionContext(cos=cos, sin=sin, doc_ids=None, window=cfg.sliding_window, backend=backend)
            if backend == "flex":  # compile outside the measurement (its workspace is not activation memory)
                torch.autograd.grad(ours(x, ctx).sum(), x)
            rows.append(
                measure(f"attn_{kind} ours {backend}", lambda: ours(x, ctx), list(ours.parameters()), tokens, device)
            )
        rows.append(
            measure(f"attn_{kind} hf eager", lambda: hf(x, hf_rope, additive)[0], list(hf.parameters()), tokens, device)
        )
    return rows


def summarise(rows: list[dict]) -> dict:
    """Per layer: our first-listed implementation over each of transformers'. First-listed is what the
    model trains with on GPU where it can run here: triton experts (interpreted on CPU); flex
    attention on GPU, eager on CPU (no CPU FlexAttention backward, so nothing it would save)."""
    out = {}
    for layer in dict.fromkeys(r["layer"] for r in rows):
        group = [r for r in rows if r["layer"] == layer and r.get("saved_bytes_per_token")]
        ours = next((r for r in group if r["impl"].startswith("ours")), None)
        if ours is None:
            continue
        entry = {"ours": ours["impl"], "ours_bytes_per_token": ours["saved_bytes_per_token"]}
        for r in group:
            if r["impl"].startswith("hf"):
                ratio = ours["saved_bytes_per_token"] / r["saved_bytes_per_token"]
                entry[f"ratio_vs_{r['impl'].replace(' ', '_')}"] = ratio
        out[layer] = entry
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args = common.parse_args(parser, argv)
    if args.cpu:  # before triton is first imported: the Triton backend runs interpreted on CPU
        os.environ["TRITON_INTERPRET"] = "1"
    from engine.models.gpt_oss import GptOssConfig

    mode = MODES[args.mode]
    cfg = GptOssConfig.gpt_oss_20b(num_hidden_layers=2, **mode["arch"])
    torch.manual_seed(0)
    rows = common.LiveRows("memory", args)  # the JSON is rewritten after each layer's measurements
    rows += moe_rows(cfg, mode["tokens"], mode["dtype"], args.device)
    rows += lora_moe_rows(cfg, mode["tokens"], mode["dtype"], args.device)
    rows += attention_rows(cfg, mode["tokens"], mode["dtype"], args.device)
    summary = summarise(rows)
    common.print_table(
        rows,
        [
            ("layer", "layer", ""),
            ("impl", "impl", ""),
            ("tokens", "tokens", "d"),
            ("saved_bytes_per_token", "saved B/token", ",.0f"),
            ("saved_tensors", "tensors", "d"),
            ("retained_bytes_per_token", "allocator B/token", ",.0f"),
        ],
        title=f"bytes saved for backward, 1 x {mode['tokens']} tokens, hidden {cfg.hidden_size}, "
        f"{cfg.num_local_experts} experts top-{cfg.num_experts_per_tok}, {str(mode['dtype'])[6:]}",
    )
    for r in rows:
        for key in ("error", "retained_error"):
            if key in r:
                print(f"{r['layer']} {r['impl']} {key}: {r[key]}")
    for layer, entry in summary.items():
        ratios = ", ".join(f"{k[9:]} {v:.2f}" for k, v in entry.items() if k.startswith("ratio_vs_"))
        print(
            f"{layer}: {entry['ours']} saves {entry['ours_bytes_per_token']:,.0f} B/token; "
            f"ours / transformers: {ratios}"
        )
    headline = {(layer, entry["ours"]) for layer, entry in summary.items()}
    for r in rows:
        if r.get("top_saved") and ((r["layer"], r["impl"]) in headline or r["impl"].startswith("hf")):
            print(f"\nlargest saved tensors, {r['layer']} {r['impl']}:")
            for e in r["top_saved"][:5]:
                per_token = e["bytes"] / r["tokens"]
                print(f"  {per_token:>10,.0f} B/token  {e['dtype']:>8} {str(e['shape']):>16}  {e['site']}")
    common.write_json(
        "memory",
        args,
        {
            "shapes": {
                "tokens": mode["tokens"],
                "dtype": str(mode["dtype"]),
                **{
                    k: getattr(cfg, k)
                    for k in (
                        "hidden_size",
                        "intermediate_size",
                        "num_local_experts",
                        "num_experts_per_tok",
                        "num_attention_heads",
                        "num_key_value_heads",
                        "head_dim",
                        "sliding_window",
                    )
                },
            },
            "target": "moe: ours <= 0.5 x transformers' saved bytes per token; "
            "moe_lora: <= 0.4 x transformers + peft's",
            "summary": summary,
            "results": list(rows),
        },
    )


if __name__ == "__main__":
    main()
