"""Blockwise attention in plain PyTorch with its own backward: memory linear in sequence length.

The flash-attention schedule written with torch ops, for devices without a fused kernel (the CPU
default) and as a readable statement of what the Triton kernel computes:

- forward: for each block of queries, walk the key blocks it can see (causal, and for sliding
  layers only the last `window` positions) with an online softmax whose running max and sum start
  at the sink logit (`m = sink`, `l = 1`), so the sink is in the normaliser and a row never meets
  an all `-inf` block with nothing before it. Kept for the backward: q, k, v, the output and the
  log-sum-exp per row (fp32 [B, H, T]); never a [T, T] tensor.
- backward: recompute each block's probabilities from the saved log-sum-exp,
  `p = exp(s - lse)`, and with `delta = rowsum(dout * out)`:
      ds = p * (dout @ v^T - delta),  dq = ds @ k * scale,  dk = ds^T @ q * scale,  dv = p^T @ dout
      dsink[h] = -sum_rows exp(sink[h] - lse) * delta   (the sink column has no value row)

GQA without copies: q is viewed as [B, KV, G, T, D] (G = heads per kv head, heads h = kv * G + g,
as `repeat_interleave` orders them), so each k/v block is read once for its G query heads.
Everything computes in fp32 (fp64 for fp64 inputs); the output is returned in v's dtype, as the eager reference does.
Which keys a query sees is exactly the eager mask: j <= i, i - j < window (sliding layers) and
doc[i] == doc[j] (packed documents).
"""

from __future__ import annotations

import torch

BLOCK_Q = 256
BLOCK_K = 512


def _blocks(t: int, size: int):
    return [(s, min(s + size, t)) for s in range(0, t, size)]


def _key_blocks(qs: int, qe: int, window: int | None, block_k: int):
    """Key blocks [ks, ke) that hold at least one key some query at positions [qs, qe) may see."""
    lo = 0 if window is None else max(0, qs - window + 1)
    return [(ks, min(ks + block_k, qe)) for ks in range(lo, qe, block_k)]


def _block_mask(qs, qe, ks, ke, window, doc_ids, device):
    """Bool [B|1, 1, 1, Bq, Bk] where query i may see key j, or None when every pair may."""
    full = ke - 1 <= qs and (window is None or (qe - 1) - ks < window)
    if full and doc_ids is None:
        return None
    i = torch.arange(qs, qe, device=device)[:, None]
    j = torch.arange(ks, ke, device=device)[None, :]
    allowed = j <= i
    if window is not None:
        allowed = allowed & (i - j < window)
    allowed = allowed[None, None, None]
    if doc_ids is not None:
        same = doc_ids[:, qs:qe, None] == doc_ids[:, None, ks:ke]  # [B, Bq, Bk]
        allowed = allowed & same[:, None, None]
    return allowed


def _scores(qb, kb, scale, mask):
    """qb [B, KV, G, Bq, D] fp32, kb [B, KV, Bk, D] fp32 -> masked scores [B, KV, G, Bq, Bk]."""
    s = torch.matmul(qb, kb[:, :, None].transpose(-1, -2)) * scale
    return s if mask is None else s.masked_fill(~mask, float("-inf"))


def _forward(q5, k, v, sink, scale, window, doc_ids, block_q, block_k, q_offset):
    """q5 [B, KV, G, Tq, D], k/v [B, KV, Tk, D], sink [1, KV, G, 1] (all fp32) -> out, lse [B, KV, G, Tq(, D)].
    Query row r sits at position q_offset + r of the keys' sequence."""
    b, kv, g, t, d = q5.shape
    out = torch.empty_like(q5)
    lse = torch.empty(b, kv, g, t, dtype=q5.dtype, device=q5.device)
    for qs, qe in _blocks(t, block_q):
        pqs, pqe = qs + q_offset, qe + q_offset  # positions of the block's queries
        qb = q5[:, :, :, qs:qe]
        m = sink.expand(b, kv, g, qe - qs).clone()  # running max, starting at the sink logit
        l = torch.ones_like(m)  # running sum of exp(logit - m): the sink's exp(0)
        acc = torch.zeros(b, kv, g, qe - qs, d, dtype=q5.dtype, device=q5.device)
        for ks, ke in _key_blocks(pqs, pqe, window, block_k):
            s = _scores(qb, k[:, :, ks:ke], scale, _block_mask(pqs, pqe, ks, ke, window, doc_ids, q5.device))
            m_new = torch.maximum(m, s.amax(-1))
            p = torch.exp(s - m_new[..., None])
            alpha = torch.exp(m - m_new)
            l = l * alpha + p.sum(-1)
            acc = acc * alpha[..., None] + torch.matmul(p, v[:, :, None, ks:ke])
            m = m_new
        out[:, :, :, qs:qe] = acc / l[..., None]
        lse[:, :, :, qs:qe] = m + torch.log(l)
    return out, lse


def _backward(q5, k, v, out, dout, lse, sink, scale, window, doc_ids, block_q, block_k, q_offset):
    b, kv, g, t, d = q5.shape
    delta = (dout * out).sum(-1)  # [B, KV, G, T]
    dq = torch.zeros_like(q5)
    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    for qs, qe in _blocks(t, block_q):
        pqs, pqe = qs + q_offset, qe + q_offset
        qb, dob = q5[:, :, :, qs:qe], dout[:, :, :, qs:qe]
        lse_b, delta_b = lse[:, :, :, qs:qe, None], delta[:, :, :, qs:qe, None]
        for ks, ke in _key_blocks(pqs, pqe, window, block_k):
            kb, vb = k[:, :, ks:ke], v[:, :, ks:ke]
            s = _scores(qb, kb, scale, _block_mask(pqs, pqe, ks, ke, window, doc_ids, q5.device))
            p = torch.exp(s - lse_b)  # [B, KV, G, Bq, Bk]
            dv[:, :, ks:ke] += torch.matmul(p.transpose(-1, -2), dob).sum(2)
            ds = p * (torch.matmul(dob, vb[:, :, None].transpose(-1, -2)) - delta_b)
            dq[:, :, :, qs:qe] += torch.matmul(ds, kb[:, :, None]) * scale
            dk[:, :, ks:ke] += torch.matmul(ds.transpose(-1, -2), qb).sum(2) * scale
    dsink = -(torch.exp(sink - lse) * delta).sum(dim=(0, 3))  # [KV, G]
    return dq, dk, dv, dsink


class _BlockwiseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, doc_ids, window, scale, block_q, block_k, q_offset):
        b, h, t, d = q.shape
        kv = k.shape[1]
        acc = torch.promote_types(q.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
        q5 = q.to(acc).view(b, kv, h // kv, t, d)
        sink = sinks.to(acc).view(1, kv, h // kv, 1)
        out, lse = _forward(q5, k.to(acc), v.to(acc), sink, scale, window, doc_ids, block_q, block_k, q_offset)
        result = out.view(b, h, t, d).to(v.dtype)
        ctx.save_for_backward(q, k, v, sinks, result, lse, doc_ids)
        ctx.args = (window, scale, block_q, block_k, q_offset)
        return result

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, sinks, out, lse, doc_ids = ctx.saved_tensors
        window, scale, block_q, block_k, q_offset = ctx.args
        b, h, t, d = q.shape
        kv = k.shape[1]
        view = (b, kv, h // kv, t, d)
        acc = lse.dtype
        dq, dk, dv, dsink = _backward(
            q.to(acc).view(view),
            k.to(acc),
            v.to(acc),
            out.to(acc).view(view),
            grad_out.to(acc).reshape(view),
            lse,
            sinks.to(acc).view(1, kv, h // kv, 1),
            scale,
            window,
            doc_ids,
            block_q,
            block_k,
            q_offset,
        )
        return (
            dq.view(b, h, t, d).to(q.dtype),
            dk.to(k.dtype),
            dv.to(v.dtype),
            dsink.reshape(h).to(sinks.dtype),
            None,
            None,
            None,
            None,
            None,
            None,
        )


def blockwise_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sinks: torch.Tensor,
    window: int | None,
    doc_ids: torch.Tensor | None,
    scale: float,
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
    q_offset: int = 0,
) -> torch.Tensor:
    """q [B, H, Tq, D], k/v [B, KV, Tk, D], sinks [H], doc_ids [B, Tk] or None -> [B, H, Tq, D] (v's dtype).

    `window` None = full causal; else a query sees itself and the `window - 1` keys before it.
    Query row r sits at key position `q_offset + r` (0 and Tq == Tk: plain self-attention; a
    context-parallel rank passes its slice of the queries against all keys)."""
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"blockwise_attention: {q.shape[1]} query heads is not a multiple of {k.shape[1]} kv heads")
    if q_offset < 0 or q_offset + q.shape[2] > k.shape[2]:
        raise ValueError(
            f"blockwise_attention: queries at positions [{q_offset}, {q_offset + q.shape[2]}) "
            f"lie outside the {k.shape[2]} keys"
        )
    return _BlockwiseAttention.apply(q, k, v, sinks, doc_ids, window, scale, block_q, block_k, q_offset)
