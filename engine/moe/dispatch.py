"""Token dispatch between the router and the experts, and the combine after them.

The MoE forward in named phases (engine.moe.layer.MoEBlock; the expert-parallel dispatcher uses the same):
  route    -> (weights [N, k], indices [N, k]) from the router
  dispatch -> order the N*k (token, expert) pairs by expert (permute); counts per expert; the rows
              the experts read and the metadata combine needs (`Dispatched`)
  experts  -> grouped expert MLP on the grouped rows (the experts module; the dispatcher never calls it)
  combine  -> scale each row by its routing weight and sum the k rows of each token (fp32)

The dispatcher knows which rows belong to which token from the permutation itself (its inverse), so
the combine never sorts again. `LocalDispatcher` is the single-rank (EP = 1) case: no communication
and no host sync.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Permutation:
    order: torch.Tensor  # [N*k] index into the flattened (token, slot) pairs, grouped by expert
    token_of_row: torch.Tensor  # [N*k] the token each grouped row came from
    counts: torch.Tensor  # [E] rows per expert (int64)
    top_k: int

    def token_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows [N*k], starts [N+1]): token t's grouped rows are rows[starts[t]:starts[t+1]], in slot
        order. The inverse permutation: a scatter, no sort."""
        n = self.order.numel()
        rows = torch.empty_like(self.order)
        rows[self.order] = torch.arange(n, device=self.order.device)
        starts = torch.arange(0, n + 1, self.top_k, device=self.order.device)
        return rows, starts


def permute(indices: torch.Tensor, num_experts: int) -> Permutation:
    """Group the (token, slot) pairs of indices [N, k] by expert; stable, so ties keep token order."""
    flat = indices.reshape(-1)  # [N*k]
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # a histogram with no host sync
    return Permutation(order=order, token_of_row=order // indices.shape[1], counts=counts, top_k=indices.shape[1])


@dataclass
class Dispatched:
    """What the experts read, and what combine needs afterwards."""

    x: torch.Tensor  # the experts' input: the token tensor [N, H] (read through gather_idx) or received rows
    counts: torch.Tensor  # [E_local] rows per local expert (for the EP dispatcher: from the whole group)
    gather_idx: torch.Tensor | None  # [M] row r of the grouped order reads x[gather_idx[r]]
    perm: Permutation  # this rank's rows grouped by (global) expert
    weights: torch.Tensor  # [N*k] routing weight of each grouped row
    num_tokens: int
    plan: Any = None  # the expert-parallel exchange plan (engine.moe.alltoall.ExchangePlan)


def combine_rows(y_rows: torch.Tensor, d: Dispatched, backend) -> torch.Tensor:
    """phase: combine. y_rows [N*k, H] in this rank's grouped order -> out [N, H]."""
    token_rows = d.perm.token_rows() if backend.for_device(y_rows.device).name == "triton" else None
    return backend.combine(y_rows, d.weights, d.perm.token_of_row, d.num_tokens, token_rows=token_rows)


class LocalDispatcher:
    """All experts live on this rank."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def dispatch(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> Dispatched:
        """x [N, H], weights/indices [N, k] -> the experts' input: x itself, read through the permutation."""
        perm = permute(indices, self.num_experts)
        w = weights.reshape(-1)[perm.order]  # [N*k]
        return Dispatched(x, perm.counts, perm.token_of_row, perm, w, x.shape[0])

    def combine(self, y: torch.Tensor, d: Dispatched, backend) -> torch.Tensor:
        """y [N*k, H] expert outputs in grouped order -> out [N, H]."""
        return combine_rows(y, d, backend)
