"""Flash attention for GPT-OSS in Triton: learned sinks, sliding window, document masks, GQA; fwd + bwd.

    out = flash_attention(q, k, v, sinks, window=None, doc_ids=None, scale=None)   # [B, H, T, D]

q [B, H, T, D], k/v [B, KV, T, D] (any strides, last dim contiguous is the fast case), sinks [H],
doc_ids [B, T] integer or None. Query i sees key j when j <= i, i - j < window (if given) and
doc_ids[i] == doc_ids[j]; softmax runs over those scores plus the sink logit, whose column has no
value row. The reference is `flash_attention_reference.attention_reference`; the kernels are in
flash_attention_kernels.py.

Forward, one program per (query block, batch x head): an online softmax over the key blocks the
block can see, its running max and sum starting at the sink (`m = sink`, `l = 1`), so the sink is
in the normaliser and every row's log-sum-exp is finite. Sliding layers visit only the key blocks
within `window` of the query block, so their cost is linear in T; with documents, only the key blocks
from the first position of the block's documents on (packed short documents cost their own rows).
The causal/window mask is applied only on the diagonal band and the window's edge. Kept for the
backward: the output and the log-sum-exp (fp32 [B, H, T]).

Backward, with `delta = rowsum(dout * out)` and `p = exp(s - lse)` recomputed per tile:
- a small kernel computes delta (fp32 [B, H, T], no [B, H, T, D] fp32 temporaries) and each block's
  share of dsink[h] = -sum_rows exp(sink[h] - lse) * delta (the sink column's value is zero);
- dK/dV: one program per (key block, batch x kv head) loops over the G query heads of its group
  and the query blocks that can see it (up to the last position of its documents), so GQA needs no
  atomics: dv += p^T dout, dk += (p * (dout v^T - delta))^T q * scale.
- dQ: one program per (query block, batch x head), the forward's loop: dq += ds k * scale.
"""

import torch
import triton

from gptoss_kernels import _runtime
from gptoss_kernels.flash_attention_kernels import (_bwd_dkdv_kernel, _bwd_dq_kernel, _bwd_preprocess_kernel,
                                                    _fwd_kernel)

LOG2E = 1.4426950408889634


def _blocks(t: int, block_m: int | None, block_n: int | None, backward: bool) -> tuple[int, int]:
    # Forward: 128 queries x 64 keys per tile; backward keeps two accumulators, so 64 x 64.
    # Small sequences get small tiles (and tests force them to get many tiles out of tiny shapes).
    cap = max(16, _runtime.next_pow2(t))
    bm = block_m or min(64 if backward else 128, cap)
    bn = block_n or min(64, cap)
    return bm, bn


def doc_bounds(doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """first, last [B, T] int32: the first and last position whose doc id equals position t's.

    Two positions share a document exactly when their `first` is equal, so the kernels compare those
    (int32) instead of the ids, and take their loop bounds from them. On the device, no host sync:
    a stable sort puts each id's positions in increasing order, so a run's ends are its first and last."""
    b, t = doc_ids.shape
    ids, order = torch.sort(doc_ids, dim=1, stable=True)
    pos = torch.arange(t, device=doc_ids.device).expand(b, t)
    change = ids[:, 1:] != ids[:, :-1]
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[:, 1:] = change
    ends = torch.ones_like(ids, dtype=torch.bool)
    ends[:, :-1] = change
    run_start = torch.where(starts, pos, 0).cummax(dim=1).values
    run_end = torch.where(ends, pos, t - 1).flip(1).cummin(dim=1).values.flip(1)
    first = torch.empty_like(order).scatter_(1, order, order.gather(1, run_start))
    last = torch.empty_like(order).scatter_(1, order, order.gather(1, run_end))
    return first.to(torch.int32), last.to(torch.int32)


INT32_OFFSETS = 2**31  # in-loop row offsets go int64 from here (tests lower it to run that path)


def _common(q, k, v, doc_bounds, window, count, *more):
    b, h, t, d = q.shape
    # The largest in-slice offset the loops form: (T - 1) x a row stride + D (outputs are [.., T, D]).
    span = (t - 1) * max(abs(x.stride(2)) for x in (q, k, v, *more)) + max(d, 16)
    return dict(GROUP=h // k.shape[1], WINDOW=window or 0, HAS_DOC=doc_bounds is not None, HEAD_DIM=d,
                BLOCK_D=max(16, _runtime.next_pow2(d)), ROWS64=span >= INT32_OFFSETS,
                DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", COUNT=count)


def _visit_counter(visits, name, rows, blocks, device):
    """[rows, blocks, 2] int32 (masked, unmasked blocks each program visited) when counting (tests)."""
    if visits is None:
        return None
    visits[name] = torch.full((rows, blocks, 2), -1, dtype=torch.int32, device=device)
    return visits[name]


def _forward(q, k, v, sinks, bounds, window, scale, block_m=None, block_n=None, visits=None):
    """(o, lse); `bounds`: doc_bounds(doc_ids) or None; `visits`: a dict that gets the block counts."""
    b, h, t, d = q.shape
    o = _runtime.empty((b, h, t, d), q.dtype, q.device)
    lse = _runtime.empty((b, h, t), torch.float32, q.device)
    bm, bn = _blocks(t, block_m, block_n, backward=False)
    first = bounds[0] if bounds is not None else q
    counter = _visit_counter(visits, "fwd", b * h, triton.cdiv(t, bm), q.device)
    _fwd_kernel[(triton.cdiv(t, bm), b * h)](
        q, k, v, sinks, first, o, lse, counter if counter is not None else lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        first.stride(0) if bounds is not None else 0,
        t, h, scale * LOG2E, **_common(q, k, v, bounds, window, counter is not None, o), BLOCK_M=bm, BLOCK_N=bn,
        num_warps=8 if bm >= 128 else 4, num_stages=3)
    return o, lse


def _delta_and_dsink(o, do, lse, sinks):
    """delta [B, H, T] fp32 and dsink [H], from one small kernel (plus a sum over its block partials)."""
    b, h, t, d = o.shape
    block = min(128, max(16, _runtime.next_pow2(t)))
    blocks = triton.cdiv(t, block)
    delta = _runtime.empty((b, h, t), torch.float32, o.device)
    parts = _runtime.empty((b * h, blocks), torch.float32, o.device)
    _bwd_preprocess_kernel[(blocks, b * h)](
        o, do, lse, sinks, delta, parts, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1),
        do.stride(2), t, h, HEAD_DIM=d, BLOCK_D=max(16, _runtime.next_pow2(d)), BLOCK_M=block, num_warps=4)
    return delta, parts.view(b, h, blocks).sum(dim=(0, 2))


def _backward(q, k, v, o, lse, sinks, bounds, window, scale, do, block_m=None, block_n=None, visits=None):
    b, h, t, d = q.shape
    kvh = k.shape[1]
    delta, dsink = _delta_and_dsink(o, do, lse, sinks)
    dq = _runtime.empty((b, h, t, d), q.dtype, q.device)
    dk = _runtime.empty((b, kvh, t, d), k.dtype, k.device)
    dv = _runtime.empty((b, kvh, t, d), v.dtype, v.device)
    bm, bn = _blocks(t, block_m, block_n, backward=True)
    first, last = bounds if bounds is not None else (q, q)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
               first.stride(0) if bounds is not None else 0)
    kv_counter = _visit_counter(visits, "dkdv", b * kvh, triton.cdiv(t, bn), q.device)
    q_counter = _visit_counter(visits, "dq", b * h, triton.cdiv(t, bm), q.device)
    common = dict(**_common(q, k, v, bounds, window, visits is not None, do), BLOCK_M=bm, BLOCK_N=bn,
                  num_warps=4, num_stages=2)
    _bwd_dkdv_kernel[(triton.cdiv(t, bn), b * kvh)](
        q, k, v, do, first, last, lse, delta, dk, dv, kv_counter if kv_counter is not None else lse, *strides,
        t, h, kvh, scale * LOG2E, scale, **common)
    _bwd_dq_kernel[(triton.cdiv(t, bm), b * h)](
        q, k, v, do, first, lse, delta, dq, q_counter if q_counter is not None else lse, *strides,
        t, h, scale * LOG2E, scale, **common)
    return dq, dk, dv, dsink.to(sinks.dtype)


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, first, last, window, scale, block_m, block_n):
        bounds = (first, last) if first is not None else None
        o, lse = _forward(q, k, v, sinks, bounds, window, scale, block_m, block_n)
        ctx.save_for_backward(q, k, v, o, lse, sinks, first, last)
        ctx.args = (window, scale, block_m, block_n)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, sinks, first, last = ctx.saved_tensors
        window, scale, block_m, block_n = ctx.args
        bounds = (first, last) if first is not None else None
        dq, dk, dv, dsink = _backward(q, k, v, o, lse, sinks, bounds, window, scale, do.contiguous(),
                                      block_m, block_n)
        return dq, dk, dv, dsink, None, None, None, None, None, None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, *,
                    window: int | None = None, doc_ids: torch.Tensor | None = None, scale: float | None = None,
                    block_m: int | None = None, block_n: int | None = None) -> torch.Tensor:
    """Attention with sinks; see the module docstring. Returns [B, H, T, D] in q's dtype.

    `block_m` / `block_n` override the tile sizes (powers of two >= 16), for tests and sweeps."""
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"flash_attention: q must be [B, H, T, D] and k, v [B, KV, T, D]; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    b, h, t, d = q.shape
    if k.shape[0] != b or k.shape[2] != t or k.shape[3] != d or h % k.shape[1]:
        raise ValueError(f"flash_attention: k/v {tuple(k.shape)} do not fit q {tuple(q.shape)} "
                         "(same B, T, D; query heads a multiple of kv heads)")
    if tuple(sinks.shape) != (h,):
        raise ValueError(f"flash_attention: sinks must be [{h}], got {tuple(sinks.shape)}")
    if doc_ids is not None and tuple(doc_ids.shape) != (b, t):
        raise ValueError(f"flash_attention: doc_ids must be [{b}, {t}], got {tuple(doc_ids.shape)}")
    if window is not None and window <= 0:
        raise ValueError(f"flash_attention: window={window} must be a positive number of keys or None")
    for name, size in (("block_m", block_m), ("block_n", block_n)):
        if size is not None and (size < 16 or size & (size - 1)):
            raise ValueError(f"flash_attention: {name}={size} must be a power of two >= 16")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"flash_attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.device.type == "cpu" and not _runtime.INTERPRETED:
        raise RuntimeError("flash_attention got CPU tensors but Triton is not in interpreter mode: use "
                           "model.attn_backend=blockwise on CPU, or set TRITON_INTERPRET=1 before importing kernels")
    _runtime.check_tensors(q, k, v, sinks, doc_ids)
    first, last = doc_bounds(doc_ids) if doc_ids is not None else (None, None)
    k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (k, v))
    q = q if q.stride(-1) == 1 else q.contiguous()
    scale = d**-0.5 if scale is None else scale
    return _FlashAttention.apply(q, k, v, sinks, first, last, window, scale, block_m, block_n)


__all__ = ["flash_attention"]
