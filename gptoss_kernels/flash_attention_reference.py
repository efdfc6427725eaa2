"""Torch reference for `flash_attention`: the dense softmax over [scores, sink], the sink column dropped.

Materialises [B, H, T, T]; for tests at small T. Computes in fp32, or fp64 for fp64 inputs.
"""

import torch


def allowed_pairs(t: int, window: int | None, doc_ids: torch.Tensor | None, device) -> torch.Tensor:
    """Bool [B|1, 1, T, T]: query i may see key j (j <= i, i - j < window, same document)."""
    i = torch.arange(t, device=device)[:, None]
    j = torch.arange(t, device=device)[None, :]
    allowed = j <= i
    if window is not None:
        allowed = allowed & (i - j < window)
    allowed = allowed[None, None]
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    return allowed


def attention_reference(q, k, v, sinks, window=None, doc_ids=None, scale=None):
    """q [B, H, T, D], k/v [B, KV, T, D], sinks [H] -> (out [B, H, T, D] in q's dtype, lse [B, H, T])."""
    acc = torch.promote_types(q.dtype, torch.float32)
    b, h, t, d = q.shape
    scale = d**-0.5 if scale is None else scale
    groups = h // k.shape[1]
    k = k.to(acc).repeat_interleave(groups, dim=1)
    v = v.to(acc).repeat_interleave(groups, dim=1)
    scores = torch.matmul(q.to(acc), k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed_pairs(t, window, doc_ids, q.device), float("-inf"))
    sink = sinks.to(acc).view(1, h, 1, 1).expand(b, h, t, 1)
    logits = torch.cat([scores, sink], dim=-1)
    probs = torch.softmax(logits, dim=-1)[..., :-1]
    return torch.matmul(probs, v).to(q.dtype), torch.logsumexp(logits, dim=-1)
