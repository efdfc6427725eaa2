"""The MoE block of a GPT-OSS layer (`mlp` in HF names): route -> dispatch -> experts -> combine.

With `chunk_tokens` (model.moe_chunk_tokens) the block runs its tokens in chunks of at most that many,
each chunk under activation checkpointing: the routed buffers ([chunk x top_k, 2 x intermediate]
and their saved copies for the backward) exist for one chunk at a time, so the block's working memory
stops growing with the sequence length; the backward recomputes one chunk at a time. Every token is
routed and combined exactly as without chunks (same values, same gradients). Under expert parallelism
the all-to-all is collective, so every rank of the EP group runs the same number of chunks: the
largest any rank needs (one small all-reduce per layer), a rank with fewer tokens sending less.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.utils.checkpoint as activation_ckpt
from torch import nn

from engine.moe.dispatch import LocalDispatcher
from engine.moe.experts import GroupedExperts
from engine.moe.router import TopKRouter


class MoEBlock(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        *,
        alpha: float,
        limit: float,
        experts_backend: str = "auto",
        chunk_tokens: int = 0,
        expert_weights: str = "dense",
    ):
        super().__init__()
        self.router = TopKRouter(hidden_size, num_experts, top_k)
        self.experts = GroupedExperts(
            num_experts,
            hidden_size,
            intermediate_size,
            alpha=alpha,
            limit=limit,
            backend=experts_backend,
            expert_weights=expert_weights,
        )
        # Replaced from outside (engine.parallel.parallelize.apply_expert_parallel) when experts are spread over ranks.
        self.dispatcher = LocalDispatcher(num_experts)
        self.chunk_tokens = chunk_tokens or 0  # 0: all tokens at once
        self.last_expert_counts: torch.Tensor | None = None  # tokens per local expert, for load metrics
        self.last_num_chunks = 1

    def _run(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights, indices, _ = self.router(flat)  # phase: route; [N, k] each
        d = self.dispatcher.dispatch(flat, weights, indices)  # phase: dispatch
        y = self.experts(d.x, d.counts, gather_idx=d.gather_idx)  # phase: experts; [M, H] grouped order
        out = self.dispatcher.combine(y, d, self.experts.backend)  # phase: combine; [N, H]
        return out, d.counts.detach()

    def num_chunks(self, n: int, device: torch.device) -> int:
        """Chunks for n local tokens: ceil(n / chunk_tokens), the maximum over the EP group."""
        if not self.chunk_tokens:
            return 1
        chunks = max(1, -(-n // self.chunk_tokens))
        group = getattr(self.dispatcher, "group", None)  # the all-to-all dispatcher's EP group
        if group is not None:
            t = torch.tensor([chunks], dtype=torch.int64, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
            chunks = int(t)
        return chunks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        flat = x.reshape(-1, h)
        n = flat.shape[0]
        chunks = self.num_chunks(n, flat.device)
        self.last_num_chunks = chunks
        if chunks == 1:
            out, counts = self._run(flat)
        else:
            outs, counts = [], 0
            bounds = [n * i // chunks for i in range(chunks + 1)]  # sizes differ by at most one token
            for start, end in zip(bounds[:-1], bounds[1:]):
                if torch.is_grad_enabled():
                    o, c = activation_ckpt.checkpoint(self._run, flat[start:end], use_reentrant=False)
                else:
                    o, c = self._run(flat[start:end])
                outs.append(o)
                counts = counts + c
            out = torch.cat(outs)
        self.last_expert_counts = counts
        return out.reshape(b, t, h)
