"""Cross-entropy over a large vocabulary without materialising full logits.

`linear_cross_entropy(hidden, weight, labels)` == cross_entropy(hidden @ weight.T, labels, reduction="sum")
but only `chunk_size` rows of fp32 logits exist at a time. The gradients are computed chunk by chunk
during the forward (three matmuls per chunk instead of the four a recompute-in-backward would need) and
only when autograd will want them (never under no_grad). Rows whose label is ignored are dropped
before any matmul. `token_cross_entropy` gives the per-token losses, for evaluation.
"""

from __future__ import annotations

import torch

from engine.data.batch import IGNORE_INDEX


def _chunked_ce(hidden, weight, labels, chunk_size, want_dh, want_dw):
    """hidden [N, H], weight [V, H], labels [N] (all valid) -> (summed loss, grad_h | None, grad_w | None)."""
    acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32 logits for bf16, fp64 kept as is
    loss = torch.zeros((), dtype=acc, device=hidden.device)
    grad_h = torch.empty_like(hidden) if want_dh else None
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_dw else None
    for start in range(0, hidden.shape[0], chunk_size):
        h = hidden[start : start + chunk_size]  # [n, H]
        y = labels[start : start + chunk_size]  # [n]
        logits = (h @ weight.t()).to(acc)  # [n, V]
        lse = torch.logsumexp(logits, dim=-1)  # [n]
        loss += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
        if want_dh or want_dw:
            g = torch.exp(logits.sub_(lse[:, None]))  # softmax, in place of the logits
            g[torch.arange(g.shape[0], device=g.device), y] -= 1.0
            g = g.to(hidden.dtype)
            if want_dh:
                grad_h[start : start + chunk_size] = g @ weight
            if want_dw:
                grad_w += (g.t() @ h).to(acc)
    return loss, grad_h, grad_w


class _ChunkedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size):
        want_dh, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, grad_h, grad_w = _chunked_ce(hidden, weight, labels, chunk_size, want_dh, want_dw)
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if want_dw else None)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        dh = grad_h * grad_loss.to(grad_h.dtype) if grad_h is not None else None
        dw = grad_w * grad_loss.to(grad_w.dtype) if grad_w is not None else None
        return dh, dw, None, None


@torch.no_grad()
def token_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int = 512
) -> torch.Tensor:
    """Per-token loss [...] (fp32 or wider; 0 where labels == IGNORE_INDEX) of logits = hidden @ weight.T, in
    chunks of `chunk_size` rows, no gradients: what evaluation needs to split the loss by token kind."""
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    acc = torch.promote_types(hidden.dtype, torch.float32)
    out = torch.zeros(y.shape, dtype=acc, device=h.device)
    keep = (y != IGNORE_INDEX).nonzero().squeeze(1)
    for start in range(0, keep.numel(), chunk_size):
        rows = keep[start : start + chunk_size]
        logits = (h.index_select(0, rows) @ weight.t()).to(acc)  # [n, V]
        out[rows] = torch.logsumexp(logits, dim=-1) - logits.gather(1, y[rows][:, None]).squeeze(1)
    return out.view(labels.shape)


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int = 512
) -> torch.Tensor:
    """Summed token cross-entropy of logits = hidden @ weight.T; hidden [..., H], labels [...] (IGNORE_INDEX
    ignored)."""
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    keep = (y != IGNORE_INDEX).nonzero().squeeze(1)  # one host sync per step, saves every masked row's matmul
    if keep.numel() == 0:
        return (h.sum() + weight.sum()) * 0.0  # keeps the graph connected
    if not torch.is_grad_enabled():
        # Under no_grad an autograd.Function still sees needs_input_grad from requires_grad, and would
        # build the [V, H] fp32 weight gradient (one more GEMM per chunk) that nobody reads.
        return _chunked_ce(h.index_select(0, keep), weight, y.index_select(0, keep), chunk_size, False, False)[0]
    return _ChunkedLinearCE.apply(h.index_select(0, keep), weight, y.index_select(0, keep), chunk_size)
