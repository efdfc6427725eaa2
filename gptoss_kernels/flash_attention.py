"""Flash attention for GPT-OSS in Triton: learned sinks, sliding window, document masks, GQA; fwd + bwd.

    out = flash_attention(q, k, v, sinks, window=None, doc_ids=None, scale=None)   # [B, H, T, D]

q [B, H, T, D], k/v [B, KV, T, D] (any strides, last dim contiguous is the fast case), sinks [H],
doc_ids [B, T] integer or None. Query i sees key j when j <= i, i - j < window (if given) and
doc_ids[i] == doc_ids[j]; softmax runs over those scores plus the sink logit, whose column has no
value row. The reference is `flash_attention_reference.attention_reference`.

Forward, one program per (query block, batch x head): an online softmax over the key blocks the
block can see, its running max and sum starting at the sink (`m = sink`, `l = 1`), so the sink is
in the normaliser and every row's log-sum-exp is finite. Sliding layers visit only the key blocks
within `window` of the query block, so their cost is linear in T. Kept for the backward: the output
and the log-sum-exp (fp32 [B, H, T]).

Backward, with `delta = rowsum(dout * out)` (torch) and `p = exp(s - lse)` recomputed per tile:
- dK/dV: one program per (key block, batch x kv head) loops over the G query heads of its group
  and the query blocks that can see it, so GQA needs no atomics: dv += p^T dout,
  dk += (p * (dout v^T - delta))^T q * scale.
- dQ: one program per (query block, batch x head), the forward's loop: dq += ds k * scale.
- dsink[h] = -sum_rows exp(sink[h] - lse) * delta (torch; the sink column's value is zero).
"""

import torch
import triton
import triton.language as tl

from gptoss_kernels import _runtime

LOG2E = 1.4426950408889634


@triton.jit
def _mask(s, offs_m, offs_n, T, doc_q, DOC_K, WINDOW: tl.constexpr, HAS_DOC: tl.constexpr):
    """Scores of pairs query i may not see become -inf (causal, window, documents, padding)."""
    allowed = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] < T)
    if WINDOW > 0:
        allowed = allowed & (offs_m[:, None] - offs_n[None, :] < WINDOW)
    if HAS_DOC:
        doc_k = tl.load(DOC_K + offs_n, mask=offs_n < T, other=-1)
        allowed = allowed & (doc_q[:, None] == doc_k[None, :])
    return tl.where(allowed, s, float("-inf"))


@triton.jit
def _key_range(start_m, T, WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    hi = tl.minimum(start_m + BLOCK_M, T)
    lo = 0
    if WINDOW > 0:
        lo = tl.maximum(start_m - WINDOW + 1, 0) // BLOCK_N * BLOCK_N
    return lo, hi


@triton.jit
def _fwd_kernel(
    Q,
    K,
    V,
    SINKS,
    DOC,
    O,
    LSE,
    sqb,
    sqh,
    sqt,
    skb,
    skh,
    skt,
    svb,
    svh,
    svt,
    sob,
    soh,
    sot,
    sdb,
    T,
    H,
    qk_scale,
    GROUP: tl.constexpr,
    WINDOW: tl.constexpr,
    HAS_DOC: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    kvh = h // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(
        Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :],
        mask=(offs_m[:, None] < T) & d_ok[None, :],
        other=0.0,
    )
    doc_q = tl.load(DOC + b * sdb + offs_m, mask=offs_m < T, other=-1) if HAS_DOC else offs_m
    # log2 domain: scores are scaled by scale * log2(e), the sink by log2(e)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.load(SINKS + h).to(tl.float32) * 1.4426950408889634
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32) + 1.0
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = K + b * skb + kvh * skh
    v_base = V + b * svb + kvh * svh
    lo, hi = _key_range(start_m, T, WINDOW, BLOCK_M, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < T
        kt = tl.load(k_base + offs_n[None, :] * skt + offs_d[:, None], mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        s = _mask(s, offs_m, offs_n, T, doc_q, DOC + b * sdb, WINDOW, HAS_DOC)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * svt + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    acc = acc / l_i[:, None]
    m_ok = offs_m < T
    tl.store(
        O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :],
        acc.to(O.dtype.element_ty),
        mask=m_ok[:, None] & d_ok[None, :],
    )
    tl.store(LSE + bh * T + offs_m, (m_i + tl.math.log2(l_i)) * 0.6931471805599453, mask=m_ok)


@triton.jit
def _bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    DOC,
    LSE,
    DELTA,
    DK,
    DV,
    sqb,
    sqh,
    sqt,
    skb,
    skh,
    skt,
    svb,
    svh,
    svt,
    sdob,
    sdoh,
    sdot,
    sdb,
    T,
    H,
    KVH,
    qk_scale,
    scale,
    GROUP: tl.constexpr,
    WINDOW: tl.constexpr,
    HAS_DOC: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_n, bkv = tl.program_id(0), tl.program_id(1)
    b, kvh = bkv // KVH, bkv % KVH
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    n_ok = offs_n < T
    kd_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * skb + kvh * skh + offs_n[:, None] * skt + offs_d[None, :], mask=kd_mask, other=0.0)
    v = tl.load(V + b * svb + kvh * svh + offs_n[:, None] * svt + offs_d[None, :], mask=kd_mask, other=0.0)
    doc_k = tl.load(DOC + b * sdb + offs_n, mask=n_ok, other=-2) if HAS_DOC else offs_n
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo = start_n // BLOCK_M * BLOCK_M  # queries before the key block cannot see it
    hi = T
    if WINDOW > 0:
        hi = tl.minimum(start_n + BLOCK_N + WINDOW - 1, T)
    for g in range(GROUP):
        h = kvh * GROUP + g
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdob + h * sdoh
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_ok = offs_m < T
            md_mask = m_ok[:, None] & d_ok[None, :]
            q = tl.load(q_base + offs_m[:, None] * sqt + offs_d[None, :], mask=md_mask, other=0.0)
            do = tl.load(do_base + offs_m[:, None] * sdot + offs_d[None, :], mask=md_mask, other=0.0)
            lse = tl.load(LSE + (b * H + h) * T + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
            delta = tl.load(DELTA + (b * H + h) * T + offs_m, mask=m_ok, other=0.0)
            st = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_N, BLOCK_M]
            allowed = (offs_n[:, None] <= offs_m[None, :]) & n_ok[:, None] & m_ok[None, :]
            if WINDOW > 0:
                allowed = allowed & (offs_m[None, :] - offs_n[:, None] < WINDOW)
            if HAS_DOC:
                doc_q = tl.load(DOC + b * sdb + offs_m, mask=m_ok, other=-1)
                allowed = allowed & (doc_k[:, None] == doc_q[None, :])
            pt = tl.where(allowed, tl.math.exp2(st - lse[None, :]), 0.0)
            dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PRECISION)
            dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            dst = pt * (dpt - delta[None, :])
            dk += tl.dot(dst.to(q.dtype), q, input_precision=DOT_PRECISION)
    out = b * KVH * T * HEAD_DIM + kvh * T * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=kd_mask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=kd_mask)


@triton.jit
def _bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    DOC,
    LSE,
    DELTA,
    DQ,
    sqb,
    sqh,
    sqt,
    skb,
    skh,
    skt,
    svb,
    svh,
    svt,
    sdob,
    sdoh,
    sdot,
    sdb,
    T,
    H,
    qk_scale,
    scale,
    GROUP: tl.constexpr,
    WINDOW: tl.constexpr,
    HAS_DOC: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    kvh = h // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < T
    md_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], mask=md_mask, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdot + offs_d[None, :], mask=md_mask, other=0.0)
    lse = tl.load(LSE + bh * T + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + bh * T + offs_m, mask=m_ok, other=0.0)
    doc_q = tl.load(DOC + b * sdb + offs_m, mask=m_ok, other=-1) if HAS_DOC else offs_m
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = K + b * skb + kvh * skh
    v_base = V + b * svb + kvh * svh
    lo, hi = _key_range(start_m, T, WINDOW, BLOCK_M, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < T
        k = tl.load(k_base + offs_n[:, None] * skt + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * svt + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = _mask(s, offs_m, offs_n, T, doc_q, DOC + b * sdb, WINDOW, HAS_DOC)
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    tl.store(
        DQ + bh * T * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
        (dq * scale).to(DQ.dtype.element_ty),
        mask=md_mask,
    )


def _blocks(t: int, block_m: int | None, block_n: int | None, backward: bool) -> tuple[int, int]:
    # Forward: 128 queries x 64 keys per tile; backward keeps two accumulators, so 64 x 64.
    # Small sequences get small tiles (and tests force them to get many tiles out of tiny shapes).
    cap = max(16, _runtime.next_pow2(t))
    bm = block_m or min(64 if backward else 128, cap)
    bn = block_n or min(64, cap)
    return bm, bn


def _doc_arg(doc_ids, q):
    return (doc_ids, doc_ids.stride(0)) if doc_ids is not None else (q, 0)


def _common(q, k, v, doc_ids, window):
    b, h, t, d = q.shape
    return dict(
        GROUP=h // k.shape[1],
        WINDOW=window or 0,
        HAS_DOC=doc_ids is not None,
        HEAD_DIM=d,
        BLOCK_D=max(16, _runtime.next_pow2(d)),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )


def _forward(q, k, v, sinks, doc_ids, window, scale, block_m=None, block_n=None):
    b, h, t, d = q.shape
    o = _runtime.empty((b, h, t, d), q.dtype, q.device)
    lse = _runtime.empty((b, h, t), torch.float32, q.device)
    bm, bn = _blocks(t, block_m, block_n, backward=False)
    doc, sdb = _doc_arg(doc_ids, q)
    _fwd_kernel[(triton.cdiv(t, bm), b * h)](
        q,
        k,
        v,
        sinks,
        doc,
        o,
        lse,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        o.stride(0),
        o.stride(1),
        o.stride(2),
        sdb,
        t,
        h,
        scale * LOG2E,
        **_common(q, k, v, doc_ids, window),
        BLOCK_M=bm,
        BLOCK_N=bn,
        num_warps=8 if bm >= 128 else 4,
        num_stages=3,
    )
    return o, lse


def _backward(q, k, v, o, lse, sinks, doc_ids, window, scale, do, block_m=None, block_n=None):
    b, h, t, d = q.shape
    kvh = k.shape[1]
    delta = (o.float() * do.float()).sum(-1)  # [B, H, T]
    dq = _runtime.empty((b, h, t, d), q.dtype, q.device)
    dk = _runtime.empty((b, kvh, t, d), k.dtype, k.device)
    dv = _runtime.empty((b, kvh, t, d), v.dtype, v.device)
    bm, bn = _blocks(t, block_m, block_n, backward=True)
    doc, sdb = _doc_arg(doc_ids, q)
    strides = (
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        do.stride(0),
        do.stride(1),
        do.stride(2),
        sdb,
    )
    common = dict(**_common(q, k, v, doc_ids, window), BLOCK_M=bm, BLOCK_N=bn, num_warps=4, num_stages=2)
    _bwd_dkdv_kernel[(triton.cdiv(t, bn), b * kvh)](
        q, k, v, do, doc, lse, delta, dk, dv, *strides, t, h, kvh, scale * LOG2E, scale, **common
    )
    _bwd_dq_kernel[(triton.cdiv(t, bm), b * h)](
        q, k, v, do, doc, lse, delta, dq, *strides, t, h, scale * LOG2E, scale, **common
    )
    dsink = -(torch.exp(sinks.float()[None, :, None] - lse) * delta).sum(dim=(0, 2))  # [H]
    return dq, dk, dv, dsink.to(sinks.dtype)


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, doc_ids, window, scale, block_m, block_n):
        o, lse = _forward(q, k, v, sinks, doc_ids, window, scale, block_m, block_n)
        ctx.save_for_backward(q, k, v, o, lse, sinks, doc_ids)
        ctx.args = (window, scale, block_m, block_n)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, sinks, doc_ids = ctx.saved_tensors
        window, scale, block_m, block_n = ctx.args
        dq, dk, dv, dsink = _backward(q, k, v, o, lse, sinks, doc_ids, window, scale, do.contiguous(), block_m, block_n)
        return dq, dk, dv, dsink, None, None, None, None, None


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sinks: torch.Tensor,
    *,
    window: int | None = None,
    doc_ids: torch.Tensor | None = None,
    scale: float | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Attention with sinks; see the module docstring. Returns [B, H, T, D] in q's dtype.

    `block_m` / `block_n` override the tile sizes (powers of two >= 16), for tests and sweeps."""
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(
            f"flash_attention: q must be [B, H, T, D] and k, v [B, KV, T, D]; got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    b, h, t, d = q.shape
    if k.shape[0] != b or k.shape[2] != t or k.shape[3] != d or h % k.shape[1]:
        raise ValueError(
            f"flash_attention: k/v {tuple(k.shape)} do not fit q {tuple(q.shape)} "
            "(same B, T, D; query heads a multiple of kv heads)"
        )
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
        raise RuntimeError(
            "flash_attention got CPU tensors but Triton is not in interpreter mode: use "
            "model.attn_backend=blockwise on CPU, or set TRITON_INTERPRET=1 before importing kernels"
        )
    _runtime.check_tensors(q, k, v, sinks, doc_ids)
    doc_ids = doc_ids.contiguous() if doc_ids is not None else None
    k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (k, v))
    q = q if q.stride(-1) == 1 else q.contiguous()
    scale = d**-0.5 if scale is None else scale
    return _FlashAttention.apply(q, k, v, sinks, doc_ids, window, scale, block_m, block_n)


__all__ = ["flash_attention"]
