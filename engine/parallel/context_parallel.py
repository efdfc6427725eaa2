"""Context parallelism: one sequence split over the ranks of a group, balanced for the causal mask.

The row of T tokens is cut into 2N equal chunks; rank r holds chunks r and 2N-1-r, so every rank
gets one early (cheap) and one late (expensive) chunk of the causal attention. Embeddings, norms,
projections, the MoE layer and the loss see only the rank's T/N tokens. Attention needs every key:
k and v ([B, KV, T/N, D], small for GPT-OSS's 8 KV heads) are all-gathered into sequence order,
and the gradient of the gathered keys comes back summed over the ranks (all-reduce, then each
rank keeps its chunks). Each rank's loss is its own tokens' share of the global mean; the caller
sums the gradients over the group as for data parallelism.

Sliding-window layers need far less: a query at position i sees keys (i - window, i], so a chunk
starting at s needs only the `window - 1` positions before s besides its own keys: the tail of the
chunk before it. Each rank all-gathers just the tails of its two chunks ([B, KV, 2 x (window - 1), D]
per rank, whatever T is) and attends each chunk to [previous chunk's tail, own keys]; the tails'
gradients come back to their owners as for the full gather. When a chunk is shorter than the halo
(short rows, many ranks) the layer falls back to the full gather.

    cp = ContextParallel(group)                   # a torch.distributed group (gloo or nccl)
    with cp:                                      # the model's forwards inside run this rank's chunks
        loss = model(ids, labels=labels, position_ids=pos, doc_ids=docs)   # full rows in
    loss.backward(); all_reduce every grad over the group; all_reduce loss.detach() to log it

Context parallelism changes no weight and no module: it is a context, like autocast, that the model's
forward reads (`active()`); the backward needs no context (each exchange keeps its group).
"""

from __future__ import annotations

from contextvars import ContextVar

import torch
import torch.distributed as dist

_ACTIVE: ContextVar["ContextParallel | None"] = ContextVar("context_parallel", default=None)


def active() -> "ContextParallel | None":
    """The context parallelism the current forward runs under (`with cp:`), else None."""
    return _ACTIVE.get()


class ContextParallel:
    def __init__(self, group=None):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.last_sliding_exchange = ""  # "halo" or "full": what the last sliding layer gathered (for tests)
        self._tokens: list = []

    def __enter__(self) -> "ContextParallel":
        self._tokens.append(_ACTIVE.set(self))
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.reset(self._tokens.pop())

    def chunks(self, t: int, rank: int | None = None) -> list[tuple[int, int]]:
        """The [start, end) positions of `rank`'s two chunks of a T-token row."""
        if t % (2 * self.size):
            raise ValueError(
                f"context parallelism over {self.size} ranks cuts a row into {2 * self.size} equal "
                f"chunks: the sequence length {t} must be a multiple of {2 * self.size} "
                "(pad the rows, e.g. data.max_seq_len to a multiple)"
            )
        r = self.rank if rank is None else rank
        c = t // (2 * self.size)
        return [(r * c, (r + 1) * c), ((2 * self.size - 1 - r) * c, (2 * self.size - r) * c)]

    def local_index(self, t: int, device) -> torch.Tensor:
        """Positions [T/N] of this rank's tokens, in the order the rank holds them."""
        return torch.cat([torch.arange(s, e, device=device) for s, e in self.chunks(t)])

    def gather_seq(self, x: torch.Tensor) -> torch.Tensor:
        """[B, heads, T/N, D] local -> [B, heads, T, D] in sequence order, with its backward."""
        return _GatherSeq.apply(x, self)

    def halo(self, t: int, window: int | None) -> int | None:
        """Keys a chunk needs from before its start on a layer with `window` (window - 1), or None
        when the layer must gather every key (a full layer, or chunks shorter than the halo)."""
        if window is None:
            return None
        c = t // (2 * self.size)
        return window - 1 if c >= window - 1 else None

    def gather_tails(self, x: torch.Tensor, halo: int) -> list[torch.Tensor]:
        """x [B, heads, T/N, D] local -> per global chunk j of the row, its last `halo` positions
        [B, heads, halo, D] (a list of 2N), gathered from their owners; differentiable."""
        c = x.shape[2] // 2
        mine = torch.stack([x[:, :, c - halo : c], x[:, :, 2 * c - halo :]])  # [2, B, heads, halo, D]
        every = _GatherStack.apply(mine, self)  # [N, 2, B, heads, halo, D]
        tails: list[torch.Tensor] = [None] * (2 * self.size)  # type: ignore[list-item]
        for r in range(self.size):
            tails[r], tails[2 * self.size - 1 - r] = every[r, 0], every[r, 1]
        return tails


class _GatherStack(torch.autograd.Function):
    """x on every rank -> [N, *x.shape]; backward: the summed gradient of this rank's slot."""

    @staticmethod
    def forward(ctx, x, cp: ContextParallel):
        ctx.cp = cp
        parts = [torch.empty_like(x) for _ in range(cp.size)]
        dist.all_gather(parts, x.contiguous(), group=cp.group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.cp.group)  # every rank's queries may have read this rank's tails
        return grad[ctx.cp.rank], None


class _GatherSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cp: ContextParallel):
        ctx.cp = cp
        parts = [x.new_empty(x.shape) for _ in range(cp.size)]  # contiguous, as all_gather wants
        dist.all_gather(parts, x.contiguous(), group=cp.group)
        t = x.shape[2] * cp.size
        full = x.new_empty(x.shape[0], x.shape[1], t, x.shape[3])
        for r, part in enumerate(parts):
            offset = 0
            for s, e in cp.chunks(t, r):
                full[:, :, s:e] = part[:, :, offset : offset + e - s]
                offset += e - s
        return full

    @staticmethod
    def backward(ctx, grad):
        cp = ctx.cp
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=cp.group)  # every rank's queries contributed to every key
        mine = torch.cat([grad[:, :, s:e] for s, e in cp.chunks(grad.shape[2])], dim=2)
        return mine, None
