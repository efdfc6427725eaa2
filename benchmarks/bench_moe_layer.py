"""One GPT-OSS MoE layer (router -> dispatch -> experts -> combine): ours vs transformers' GptOssMLP.

    python benchmarks/bench_moe_layer.py          # GPU: GPT-OSS-20B shapes, bf16
    python benchmarks/bench_moe_layer.py --cpu    # tiny fp32 shapes, seconds

Training mode, every weight trainable, the input requiring grad (as inside a model). For each
routing (random; skewed: a router bias makes a few experts hot and a quarter of them empty) and
each of our experts backends (loop, grouped_mm, triton; triton not on CPU, where only its slow
interpreter runs it), the whole layer forward and forward+backward, then the experts call alone
on the same routed rows, and the other phases alone (route, dispatch, combine around experts that
only gather their rows): `experts share` = experts / (experts + other phases), the part of the layer
spent in the expert GEMMs (target >= 75 %); both parts are timed on their own, so the share stays a
share even where timings are noisy (CPU). Before any timing, each of our backends' layer output is
checked against transformers' on the same input (`check_max_err`, relative to max |ref|). transformers'
GptOssMLP gets the same weights and runs each experts implementation it offers for training at these
shapes: `eager` (a loop over experts) and
`grouped_mm` (its default in transformers 5); `batched_mm` gathers one weight matrix per routed
row (65536 x 33 MB here) and is left out. `x hf` = transformers' time / ours (> 1: ours faster;
target >= 4 for forward+backward). Prints a table; JSON to $OUT or benchmarks/results/.
"""

from __future__ import annotations

import argparse

import common
import torch

from engine.moe.backends import experts_backend
from engine.moe.dispatch import permute
from engine.moe.layer import MoEBlock

CHECK_TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}  # max |ours - hf| / max |hf|

FULL = dict(tokens=4 * 4096, hidden=2880, width=2880, experts=32, top_k=4, dtype=torch.bfloat16, warmup=3, iters=10)
SMALL = dict(tokens=2 * 128, hidden=128, width=128, experts=8, top_k=4, dtype=torch.float32, warmup=1, iters=5)
HF_IMPLS = ("eager", "grouped_mm")


def skewed_router_bias(num_experts: int) -> torch.Tensor:
    """Zipf-like popularity (expert e ~ 1/(e+1)^1.2) as a logit bias; the last quarter can never win
    a top-k slot. The router logits have a std of about 1, so this makes the first experts hot."""
    popularity = 1.0 / torch.arange(1, num_experts + 1, dtype=torch.float32) ** 1.2
    bias = 2.0 * torch.log(popularity / popularity.max())
    bias[num_experts - num_experts // 4 :] = -1e4
    return bias


def build(shape: dict, device: torch.device, routing: str):
    """Our MoEBlock and transformers' GptOssMLP with identical weights, in training mode."""
    from transformers import GptOssConfig as HFConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

    h, i, e, k = shape["hidden"], shape["width"], shape["experts"], shape["top_k"]
    with torch.device(device):
        ours = MoEBlock(h, i, e, k, alpha=1.702, limit=7.0).to(shape["dtype"])
    # std 1/sqrt(H) for the router keeps its logits at std ~1 whatever the hidden size.
    common.random_init_(ours, seed=0)
    with torch.no_grad():
        ours.router.weight.normal_(0.0, h**-0.5)
        ours.router.bias.copy_(skewed_router_bias(e) if routing == "skewed" else torch.zeros(e))
        for p in (ours.experts.gate_up_proj_bias, ours.experts.down_proj_bias):
            p.normal_(0.0, 0.02)  # non-zero biases: their gradients are part of the work
    cfg = HFConfig(hidden_size=h, intermediate_size=i, num_local_experts=e, num_experts_per_tok=k, num_hidden_layers=1)
    with torch.device(device):
        hf = GptOssMLP(cfg).to(shape["dtype"])
    hf.load_state_dict(ours.state_dict(), strict=True)
    return ours.train(), hf.train(), cfg


def routing_stats(block: MoEBlock, x: torch.Tensor) -> dict:
    with torch.no_grad():
        _, indices, _ = block.router(x.reshape(-1, x.shape[-1]))
        counts = permute(indices, block.router.num_experts).counts.float()
    return {
        "max_over_mean": float(counts.max() / counts.mean()),
        "empty_experts": int((counts == 0).sum()),
        "rows_per_expert": counts.long().tolist(),
    }


def other_phases(block: MoEBlock, x: torch.Tensor) -> torch.Tensor:
    """The layer with experts that only gather their rows: route, dispatch and combine alone."""
    flat = x.reshape(-1, x.shape[-1])
    weights, indices, _ = block.router(flat)
    d = block.dispatcher.dispatch(flat, weights, indices)
    return block.dispatcher.combine(d.x[d.gather_idx], d, block.experts.backend)


def check_against_hf(ours: MoEBlock, hf, x: torch.Tensor, dtype) -> float:
    """max |ours - hf| / max |hf| of the layer outputs; raises when over the dtype's tolerance."""
    with torch.no_grad():
        want = hf(x)[0].float()
        err = float((ours(x).float() - want).abs().max() / want.abs().max().clamp(min=1e-12))
    if not err <= CHECK_TOL[dtype]:
        raise AssertionError(
            f"ours ({ours.experts.backend}) differs from transformers by {err:.2e} of max |ref| "
            f"(tolerance {CHECK_TOL[dtype]:.0e}): not timing a wrong result"
        )
    return err


def fwd_and_bwd(fwd, inputs: list[torch.Tensor]):
    """(forward, forward+backward) closures; the backward takes grads w.r.t. `inputs` without
    accumulating into .grad, so every call does the same work."""
    grad_out = {}

    def backward():
        y = fwd()
        g = grad_out.setdefault("g", torch.randn_like(y))
        torch.autograd.grad(y, inputs, g)

    return fwd, backward


def measure(fwd, inputs, shape, device) -> dict:
    f, fb = fwd_and_bwd(fwd, inputs)
    out = {}
    for key, fn in (("fwd_ms", f), ("fwd_bwd_ms", fb)):
        out[key], err = common.attempt(lambda: common.time_ms(fn, device, warmup=shape["warmup"], iters=shape["iters"]))
        if err:
            out[key.replace("_ms", "_error")] = err
    return out


def run_routing(shape: dict, device: torch.device, routing: str, backends: list[str], rows: list) -> dict:
    """Appends one row per implementation to `rows` as it is measured; returns the routing's stats."""
    ours, hf, hf_cfg = build(shape, device, routing)
    torch.manual_seed(1)
    x = torch.randn(1, shape["tokens"], shape["hidden"], device=device, dtype=shape["dtype"], requires_grad=True)
    stats = routing_stats(ours, x)
    print(
        f"{routing} routing: max/mean rows per expert {stats['max_over_mean']:.2f}, "
        f"{stats['empty_experts']} empty experts"
    )
    first = len(rows)
    for impl in HF_IMPLS:
        hf_cfg._experts_implementation = impl  # read by GptOssExperts at every call
        timings = measure(lambda: hf(x)[0], [x, *hf.parameters()], shape, device)
        rows.append(dict(routing=routing, impl=f"hf {impl}", **timings))
    hf_rows = rows[first:]
    hf_best = {key: min((r[key] for r in hf_rows if r.get(key)), default=None) for key in ("fwd_ms", "fwd_bwd_ms")}
    hf_eager = hf_rows[0]
    with torch.no_grad():
        _, indices, _ = ours.router(x.reshape(-1, shape["hidden"]))
        perm = permute(indices, shape["experts"])
    x_flat = x.detach().reshape(-1, shape["hidden"]).requires_grad_()
    for backend in backends:
        ours.experts.backend = experts_backend(backend)
        hf_cfg._experts_implementation = "eager"
        err, check_error = common.attempt(lambda: check_against_hf(ours, hf, x, shape["dtype"]))
        row = dict(routing=routing, impl=f"ours {backend}", check_max_err=err)
        if check_error:
            row["check_error"] = check_error
            rows.append(row)
            continue
        row.update(measure(lambda: ours(x), [x, *ours.parameters()], shape, device))
        alone = measure(
            lambda: ours.experts(x_flat, perm.counts, gather_idx=perm.token_of_row),
            [x_flat, *ours.experts.parameters()],
            shape,
            device,
        )
        rest = measure(lambda: other_phases(ours, x), [x, *ours.router.parameters()], shape, device)
        row["experts_fwd_ms"], row["experts_fwd_bwd_ms"] = alone.get("fwd_ms"), alone.get("fwd_bwd_ms")
        row["other_fwd_ms"], row["other_fwd_bwd_ms"] = rest.get("fwd_ms"), rest.get("fwd_bwd_ms")
        for key in ("fwd", "fwd_bwd"):
            e_ms, o_ms = row[f"experts_{key}_ms"], row[f"other_{key}_ms"]
            row[f"experts_share_{key}"] = common.ratio(e_ms, e_ms + o_ms) if e_ms and o_ms else None
            row[f"x_hf_eager_{key}"] = common.ratio(hf_eager.get(f"{key}_ms"), row.get(f"{key}_ms"))
            row[f"x_hf_best_{key}"] = common.ratio(hf_best[f"{key}_ms"], row.get(f"{key}_ms"))
        # Expert GEMM FLOPs (2 per multiply-add; backward twice the forward) over the layer's time.
        fwd_flops = 6 * shape["tokens"] * shape["top_k"] * shape["hidden"] * shape["width"]
        row["tflops_fwd_bwd"] = common.ratio(3 * fwd_flops / 1e9, row.get("fwd_bwd_ms"))
        rows.append(row)
    return stats


def summarise(rows: list[dict]) -> dict:
    """Per routing, our fastest backend for forward+backward and how it stands against the targets."""
    out = {}
    for routing in sorted({r["routing"] for r in rows}):
        ours = [r for r in rows if r["routing"] == routing and r["impl"].startswith("ours") and r.get("fwd_bwd_ms")]
        if not ours:
            continue
        best = min(ours, key=lambda r: r["fwd_bwd_ms"])
        keys = ("fwd_bwd_ms", "x_hf_eager_fwd_bwd", "x_hf_best_fwd_bwd", "experts_share_fwd_bwd")
        out[routing] = {"best_backend": best["impl"].split()[1], **{k: best[k] for k in keys}}
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args = common.parse_args(parser, argv)
    shape = SMALL if args.cpu else FULL
    backends = ["loop", "grouped_mm"] + ([] if args.cpu else ["triton"])
    rows, stats = common.LiveRows("moe_layer", args), {}
    for routing in ("random", "skewed"):
        stats[routing] = run_routing(shape, args.device, routing, backends, rows)
        common.free_memory(args.device)  # the routing's two layers, now out of scope
    common.print_table(
        rows,
        [
            ("routing", "routing", ""),
            ("impl", "impl", ""),
            ("fwd_ms", "fwd ms", ".3f"),
            ("fwd_bwd_ms", "fwd+bwd ms", ".3f"),
            ("experts_share_fwd", "experts share fwd", ".0%"),
            ("experts_share_fwd_bwd", "experts share f+b", ".0%"),
            ("x_hf_eager_fwd_bwd", "x hf eager f+b", ".2f"),
            ("x_hf_best_fwd_bwd", "x hf best f+b", ".2f"),
            ("tflops_fwd_bwd", "TFLOP/s f+b", ".3g"),
        ],
        title=f"MoE layer, {shape['tokens']} tokens, hidden {shape['hidden']}, {shape['experts']} experts "
        f"top-{shape['top_k']}, {str(shape['dtype']).replace('torch.', '')}",
    )
    for r in rows:
        for key in [k for k in r if k.endswith("_error")]:
            print(f"{r['routing']} {r['impl']} {key}: {r[key]}")
    summary = summarise(rows)
    print("summary (our fastest backend, forward+backward):", summary)
    common.write_json(
        "moe_layer",
        args,
        {
            "shapes": {k: str(v) if k == "dtype" else v for k, v in shape.items()},
            "targets": {"x_hf_fwd_bwd": ">= 4", "experts_share_fwd_bwd": ">= 0.75"},
            "routing_stats": stats,
            "summary": summary,
            "results": list(rows),
        },
    )


if __name__ == "__main__":
    main()
