"""GPT-OSS router: fp32 logits with bias, top-k of the raw logits, softmax over only those k."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TopKRouter(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int, top_k: int):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))  # [E, H]
        self.bias = nn.Parameter(torch.empty(num_experts))  # [E]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, H] -> (weights [N, k] fp32 summing to 1, indices [N, k] int64, logits [N, E] fp32)."""
        # Routing decisions are made in fp32 (also under bf16 autocast): bf16 logits flip near-ties.
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float(), self.bias.float())
        top_logits, indices = torch.topk(logits, self.top_k, dim=-1)
        weights = torch.softmax(top_logits, dim=-1)
        return weights, indices, logits
