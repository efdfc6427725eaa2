"""GPT-OSS attention: GQA with q/k/v/o biases, learned sinks, sliding window on some layers.

Backends (`attn_backend`):
- `eager`: the reference. Materialises the [T, T] scores, appends the sink column, softmaxes, drops it.
- `flex`: FlexAttention with block masks (causal / sliding window / documents, built tile by tile in
  `flex_mask.py`: no T x T tensor); the sink enters as a rescale of the sink-free output by
  sigmoid(lse - sink), with the gradient flowing through lse.
- `blockwise`: plain-torch flash-attention schedule with its own backward (`blockwise_attention.py`);
  memory linear in T on any device; the CPU default.
- `triton`: our fused flash-attention kernel, forward and backward (`gptoss_kernels/flash_attention.py`);
  CUDA, or CPU under TRITON_INTERPRET=1.

Which keys a query sees (`allowed(i, j)` for row positions i, j of one sequence row):
    j <= i  and  (full layer or i - j < window)  and  doc[i] == doc[j]
so a sliding-window query sees exactly `window` keys, itself included.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from engine.config.choices import ATTN_BACKENDS
from engine.models.gpt_oss.blockwise_attention import blockwise_attention
from engine.models.gpt_oss.config import GptOssConfig
from engine.models.gpt_oss.flex_mask import flex_block_mask
from engine.models.gpt_oss.rope import apply_rotary


@dataclass
class AttentionContext:
    """Per-forward inputs shared by all layers: rotary tables and the mask of each layer type."""

    cos: torch.Tensor  # [B, T, D/2] fp32
    sin: torch.Tensor  # [B, T, D/2] fp32
    doc_ids: torch.Tensor | None  # [B, T] or None (one document per row)
    window: int
    backend: str
    cp: Any = None  # engine.parallel.context_parallel.ContextParallel: this rank holds T/N of the tokens
    _masks: dict[str, Any] = field(default_factory=dict)

    def window_of(self, layer_type: str) -> int | None:
        return self.window if layer_type == "sliding_attention" else None

    def mask(self, layer_type: str) -> Any:
        if layer_type not in self._masks:
            window = self.window if layer_type == "sliding_attention" else None
            b, t = self.cos.shape[:2]
            build = dense_mask if self.backend == "eager" else flex_block_mask
            self._masks[layer_type] = build(b, t, window, self.doc_ids, self.cos.device)
        return self._masks[layer_type]


def dense_mask(b: int, t: int, window: int | None, doc_ids: torch.Tensor | None, device) -> torch.Tensor:
    """Boolean [B or 1, 1, T, T]: True where query i may attend key j."""
    i = torch.arange(t, device=device)[:, None]
    j = torch.arange(t, device=device)[None, :]
    allowed = j <= i
    if window is not None:
        allowed = allowed & (i - j < window)
    allowed = allowed[None, None]  # [1, 1, T, T]
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])  # [B, 1, T, T]
    return allowed


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # Uncompiled FlexAttention materialises the scores; compiled, it is a fused kernel.
    return torch.compile(flex_attention, dynamic=False)


def eager_attention(q, k, v, sinks, mask, scale):
    """q [B, H, T, D], k/v [B, KV, T, D], sinks [H], mask bool [B|1, 1, T, T] -> [B, H, T, D]."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # [B, H, T, T]
    scores = scores.masked_fill(~mask, float("-inf"))
    sink = sinks.float().view(1, -1, 1, 1).expand(scores.shape[0], -1, scores.shape[2], 1)
    logits = torch.cat([scores, sink], dim=-1)
    # Subtracting the row max changes no softmax value, so no gradient flows through it; detached,
    # autograd does not keep the [T, T+1] logits a second time for amax's backward.
    logits = logits - logits.detach().amax(dim=-1, keepdim=True)
    probs = torch.softmax(logits, dim=-1)[..., :-1]  # the sink column has no value row
    return torch.matmul(probs.to(v.dtype), v)


def flex_attention_with_sinks(q, k, v, sinks, block_mask, scale):
    from torch.nn.attention import flex_attention as fa

    if q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad:
        raise RuntimeError(
            "attn_backend='flex' has no backward on CPU in PyTorch; train on CPU with model.attn_backend=blockwise"
        )
    fn = _compiled_flex() if q.device.type == "cuda" else fa.flex_attention
    if hasattr(fa, "AuxRequest"):
        out, aux = fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True, return_aux=fa.AuxRequest(lse=True))
        lse = aux.lse
    else:  # PyTorch releases before return_aux
        out, lse = fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True, return_lse=True)
    # softmax over [scores, sink] == softmax over scores, times sum(exp s) / (sum(exp s) + exp(sink)).
    rescale = torch.sigmoid(lse.float() - sinks.float().view(1, -1, 1))  # [B, H, T]
    return (out.float() * rescale[..., None]).to(q.dtype)


class GptOssAttention(nn.Module):
    def __init__(self, cfg: GptOssConfig, layer_idx: int):
        super().__init__()
        self.layer_type = cfg.layer_types[layer_idx]
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        self.scale = cfg.head_dim**-0.5
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.q_width, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.kv_width, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.kv_width, bias=True)
        self.o_proj = nn.Linear(cfg.q_width, cfg.hidden_size, bias=True)
        self.sinks = nn.Parameter(torch.empty(cfg.num_attention_heads))

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        b, t, _ = x.shape
        q = apply_rotary(self.q_proj(x).view(b, t, self.num_heads, self.head_dim), ctx.cos, ctx.sin)
        k = apply_rotary(self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim), ctx.cos, ctx.sin)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, D]
        out = self._context_parallel(q, k, v, ctx) if ctx.cp is not None else self.attend(q, k, v, ctx)
        out = out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)
        return self.o_proj(out)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """q [B, H, T, D], k/v [B, KV, T, D] of the same T positions -> [B, H, T, D], by `ctx.backend`
        (also the KV cache's prefill of a prompt)."""
        if ctx.backend == "eager":
            return eager_attention(q, k, v, self.sinks, ctx.mask(self.layer_type), self.scale)
        if ctx.backend == "flex":
            return flex_attention_with_sinks(q, k, v, self.sinks, ctx.mask(self.layer_type), self.scale)
        if ctx.backend == "blockwise":
            return blockwise_attention(q, k, v, self.sinks, ctx.window_of(self.layer_type), ctx.doc_ids, self.scale)
        from gptoss_kernels.flash_attention import flash_attention

        return flash_attention(
            q, k, v, self.sinks, window=ctx.window_of(self.layer_type), doc_ids=ctx.doc_ids, scale=self.scale
        )

    def _context_parallel(self, q, k, v, ctx: AttentionContext) -> torch.Tensor:
        """This rank's queries (two chunks of the row) against the keys they can see: all of them,
        gathered from the group, on full layers; on sliding layers the chunk's own keys and the halo
        (the `window - 1` keys before the chunk, from the rank holding them)."""
        if ctx.backend != "blockwise":
            raise ValueError(
                f"context parallelism runs the blockwise attention, not {ctx.backend!r}: "
                "set model.attn_backend=blockwise"
            )
        cp, window = ctx.cp, ctx.window_of(self.layer_type)
        t = q.shape[2] * cp.size
        halo = cp.halo(t, window)
        if window is not None:
            cp.last_sliding_exchange = "full" if halo is None else "halo"
        if halo is None:
            k_all, v_all = cp.gather_seq(k), cp.gather_seq(v)  # [B, KV, T, D]
        elif halo:
            k_tails, v_tails = cp.gather_tails(k, halo), cp.gather_tails(v, halo)
        outs, offset, c = [], 0, t // (2 * cp.size)
        for start, end in cp.chunks(t):
            n = end - start
            qc = q[:, :, offset : offset + n]
            if halo is None:
                kc, vc, lo = k_all, v_all, 0
            else:
                kc, vc, lo = k[:, :, offset : offset + n], v[:, :, offset : offset + n], start
                if halo and start:
                    j = start // c  # the chunk before this one is j - 1
                    kc, vc, lo = torch.cat([k_tails[j - 1], kc], 2), torch.cat([v_tails[j - 1], vc], 2), start - halo
            docs = None if ctx.doc_ids is None else ctx.doc_ids[:, lo : lo + kc.shape[2]]
            outs.append(blockwise_attention(qc, kc, vc, self.sinks, window, docs, self.scale, q_offset=start - lo))
            offset += n
        return torch.cat(outs, dim=2)


def resolve_attn_backend(name: str, device: torch.device) -> str:
    if name == "auto":  # memory linear in T everywhere; eager stays the reference
        return "flex" if device.type == "cuda" else "blockwise"
    if name not in ATTN_BACKENDS:
        raise ValueError(f"model.attn_backend={name!r} is not one of {('auto',) + ATTN_BACKENDS}")
    return name


__all__ = ["GptOssAttention", "AttentionContext", "ATTN_BACKENDS", "resolve_attn_backend"]
