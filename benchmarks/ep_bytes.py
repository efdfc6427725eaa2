"""Expert parallelism by the bytes: parameters per rank, and bytes the all-to-all moves per token.

    python benchmarks/ep_bytes.py [--preset gpt-oss-20b] [--ep 1 4 8] [--tokens 256]

1. Parameter bytes per rank in bf16, from the model built on the meta device (nothing allocated):
   dense weights are replicated, experts split over EP. Also the full-SFT footprint at 16 bytes
   per trainable parameter (bf16 weight + bf16 grad + fp32 master + two fp32 Adam moments).
2. Bytes moved per token per MoE layer, MEASURED by running the real AllToAllDispatcher on EP
   gloo processes (CPU) with the preset's hidden size, expert count and top-k, fp32 hidden states
   under bf16 autocast (the trainer's mixed precision: the rows travel in bf16), the router at its
   initialisation on random hidden states (close to uniform routing) and stub experts. Only rows
   sent to another rank count; rows for the rank's own experts never leave it.
   Compared with the minimum for per-(token, expert) rows, top_k * hidden * 2 B * (EP-1)/EP per
   direction, and with what sending each token once per destination RANK would move.
The timing model built on these numbers is in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from math import comb
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from engine.models.gpt_oss import GptOssConfig, GptOssForCausalLM
from engine.moe.alltoall import AllToAllDispatcher
from engine.moe.backends import experts_backend
from engine.moe.experts import shard_model_experts
from engine.moe.router import TopKRouter
from engine.parallel.placement import named_params

GB = 1e9


def param_bytes(cfg: GptOssConfig, ep: int) -> dict[str, float]:
    with torch.device("meta"):
        model = GptOssForCausalLM(cfg)
    shard_model_experts(model, ep, 0)  # what one rank holds
    dense = sum(p.numel() for _, p in named_params(model, experts=False))
    experts = sum(p.numel() for _, p in named_params(model, experts=True))
    return {
        "dense": dense * 2 / GB,
        "experts": experts * 2 / GB,
        "total": (dense + experts) * 2 / GB,
        "sft_state": (dense + experts) * 16 / GB,
    }


def _measure_rank(rank: int, ep: int, port: int, cfg: GptOssConfig, tokens: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=ep)
    gen = torch.Generator().manual_seed(rank)
    router = TopKRouter(cfg.hidden_size, cfg.num_local_experts, cfg.num_experts_per_tok)
    with torch.no_grad():  # the model's init: weight ~ N(0, initializer_range), same on every rank
        router.weight.copy_(
            torch.randn(router.weight.shape, generator=torch.Generator().manual_seed(0)) * cfg.initializer_range
        )
        router.bias.zero_()
    x = torch.randn(tokens, cfg.hidden_size, generator=gen)  # the fp32 residual stream of mixed precision
    disp = AllToAllDispatcher(dist.group.WORLD, ep, rank, cfg.num_local_experts)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as the trainer's bf16 autocast: bf16 rows travel
        weights, indices, _ = router(x)
        d = disp.dispatch(x, weights, indices)
        rows = d.x[d.gather_idx]  # the experts' input rows, returned unchanged: only the exchanges run
        disp.combine(rows, d, experts_backend("loop"))
    # Sending each token once per destination rank instead of once per (token, expert):
    owner = indices // (cfg.num_local_experts // ep)  # [T, k]
    hit = torch.zeros(tokens, ep, dtype=torch.bool).scatter_(1, owner, True)
    hit[:, rank] = False
    queue.put((rank, disp.last_traffic, int(hit.sum())))
    dist.destroy_process_group()


def measured_traffic(cfg: GptOssConfig, ep: int, tokens: int) -> dict[str, float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_measure_rank, args=(ep, port, cfg, tokens, queue), nprocs=ep, start_method="spawn")
    reports = [queue.get() for _ in range(ep)]
    per_token = 1 / (ep * tokens)  # the totals over all ranks, per token of the global batch
    return {
        "dispatch": sum(r[1]["dispatch_bytes_out"] for r in reports) * per_token,
        "combine": sum(r[1]["combine_bytes_out"] for r in reports) * per_token,
        "per_rank_dedup": sum(r[2] for r in reports) * per_token * cfg.hidden_size * 2,
        "counts": cfg.num_local_experts * 8 / tokens,
    }  # the int64 count exchange, amortised per token


def expected_dedup_rows(cfg: GptOssConfig, ep: int) -> float:
    """Expected remote ranks a token's top-k experts land on, for uniform routing without replacement."""
    e, k, local = cfg.num_local_experts, cfg.num_experts_per_tok, cfg.num_local_experts // ep
    return (ep - 1) * (1 - comb(e - local, k) / comb(e, k))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gpt-oss-20b")
    ap.add_argument("--ep", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--tokens", type=int, default=256, help="tokens per rank for the measured exchange")
    args = ap.parse_args()
    cfg = GptOssConfig.from_preset(args.preset)
    k, h = cfg.num_experts_per_tok, cfg.hidden_size

    print(f"## {args.preset}: parameter bytes per rank (bf16, GB = 1e9 B)\n")
    print("| EP | dense (replicated) | experts (this rank) | total | full-SFT state @16 B/param |")
    print("|---:|---:|---:|---:|---:|")
    for ep in args.ep:
        b = param_bytes(cfg, ep)
        print(f"| {ep} | {b['dense']:.2f} | {b['experts']:.2f} | {b['total']:.2f} | {b['sft_state']:.1f} |")

    print(
        f"\n## {args.preset}: bytes moved per token per MoE layer (bf16 rows of {h} x 2 B; "
        f"top-{k} of {cfg.num_local_experts}; measured on {args.tokens} tokens per rank)\n"
    )
    print(
        "| EP | dispatch | combine | minimum per direction k*H*2*(EP-1)/EP | once-per-rank (measured / expected) "
        "| count exchange |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for ep in args.ep:
        minimum = k * h * 2 * (ep - 1) / ep
        if ep == 1:
            print("| 1 | 0 | 0 | 0 | 0 | 0 |")
            continue
        m = measured_traffic(cfg, ep, args.tokens)
        dedup = expected_dedup_rows(cfg, ep) * h * 2
        print(
            f"| {ep} | {m['dispatch']:,.0f} B | {m['combine']:,.0f} B | {minimum:,.0f} B | "
            f"{m['per_rank_dedup']:,.0f} / {dedup:,.0f} B | {m['counts']:.1f} B |"
        )


if __name__ == "__main__":
    main()
