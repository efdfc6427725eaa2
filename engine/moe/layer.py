"""The MoE block of a GPT-OSS layer (`mlp` in HF names): router -> dispatch -> experts -> combine."""

from __future__ import annotations

import torch
from torch import nn

from .dispatch import LocalDispatcher
from .experts import GroupedExperts
from .router import TopKRouter


class MoEBlock(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int, *, alpha: float,
                 limit: float, experts_backend: str = "auto", ep_size: int = 1, ep_rank: int = 0):
        super().__init__()
        if num_experts % ep_size:
            raise ValueError(f"parallel.ep={ep_size} must divide the number of experts ({num_experts})")
        local = num_experts // ep_size
        self.router = TopKRouter(hidden_size, num_experts, top_k)
        self.experts = GroupedExperts(local, hidden_size, intermediate_size, alpha=alpha, limit=limit,
                                      expert_offset=ep_rank * local, backend=experts_backend)
        # Replaced by the all-to-all dispatcher when experts are spread over ranks.
        self.dispatcher = LocalDispatcher()
        self.last_expert_counts: torch.Tensor | None = None  # tokens per local expert, for load metrics

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        flat = x.reshape(-1, h)
        weights, indices, _ = self.router(flat)
        out, counts = self.dispatcher(flat, weights, indices, self.experts)
        self.last_expert_counts = counts.detach()
        return out.reshape(b, t, h)
