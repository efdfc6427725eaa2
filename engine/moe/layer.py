"""The MoE block of a GPT-OSS layer (`mlp` in HF names): route -> dispatch -> experts -> combine."""

from __future__ import annotations

import torch
from torch import nn

from .dispatch import LocalDispatcher
from .experts import GroupedExperts
from .router import TopKRouter


class MoEBlock(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int, *, alpha: float,
                 limit: float, experts_backend: str = "auto"):
        super().__init__()
        self.router = TopKRouter(hidden_size, num_experts, top_k)
        self.experts = GroupedExperts(num_experts, hidden_size, intermediate_size, alpha=alpha, limit=limit,
                                      backend=experts_backend)
        # Replaced from outside (engine.moe.alltoall.apply_expert_parallel) when experts are spread over ranks.
        self.dispatcher = LocalDispatcher(num_experts)
        self.last_expert_counts: torch.Tensor | None = None  # tokens per local expert, for load metrics

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        flat = x.reshape(-1, h)
        weights, indices, _ = self.router(flat)  # phase: route; [N, k] each
        d = self.dispatcher.dispatch(flat, weights, indices)  # phase: dispatch
        y = self.experts(d.x, d.counts, gather_idx=d.gather_idx)  # phase: experts; [M, H] grouped order
        out = self.dispatcher.combine(y, d, self.experts.backend)  # phase: combine; [N, H]
        self.last_expert_counts = d.counts.detach()
        return out.reshape(b, t, h)
