"""The Triton kernels of `flash_attention` (launchers, shapes and autograd: flash_attention.py).

Every loop over key blocks (forward, dQ) or query blocks (dK/dV) knows the range of blocks where
every pair is causal and inside the window: those apply only the document mask (none without
documents); the blocks outside it (the diagonal band and the window's edge) apply the full mask
(causal, window, padding, documents). One loop with a per-block branch, not three loops: three
pipelined loops cost registers (the dK/dV kernel spilled). With documents, the loops start (end) at
the first (last) position of the block's documents, so packed short documents cost what their own
rows cost.

Documents enter as `FIRST` [B, T] int32: the first position of each token's document (equal for two
tokens exactly when they share a document id), and `LAST`: the last one.
Pointer offsets that can pass 2**31 are int64: batch and head offsets always, rows inside the
loops when T x a row stride can (ROWS64).
COUNT (tests only) makes each program write how many masked and unmasked blocks it visited
(one int32 counts both, below and above bit 16).
"""

import triton
import triton.language as tl


@triton.jit
def _rows(offs, ROWS64: tl.constexpr):
    """Row indices for in-loop pointer offsets: int64 only where T x a row stride can pass 2**31 (the
    launcher decides; int32 keeps the loops' registers down, and the dK/dV kernel from spilling)."""
    if ROWS64:
        return offs.to(tl.int64)
    return offs


@triton.jit
def _scores_mask(s, offs_m, offs_n, T, doc_q, doc_k, band, WINDOW: tl.constexpr, HAS_DOC: tl.constexpr):
    """s [M, N] with the pairs query i may not see at -inf: documents always (when given); causal,
    window and key padding only when `band` (a block on the diagonal or the window's edge)."""
    if HAS_DOC:
        s = tl.where(doc_q[:, None] == doc_k[None, :], s, float("-inf"))
    if band:
        allowed = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] < T)
        if WINDOW > 0:
            allowed = allowed & (offs_m[:, None] - offs_n[None, :] < WINDOW)
        s = tl.where(allowed, s, float("-inf"))
    return s


@triton.jit
def _key_phases(start_m, T, first_q, m_ok, WINDOW: tl.constexpr, HAS_DOC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key-block bounds for a query block: masked [lo, a), unmasked [a, b), masked [b, hi)."""
    hi = tl.minimum(start_m + BLOCK_M, T)
    lo = 0
    if WINDOW > 0:
        lo = tl.maximum(start_m - WINDOW + 1, 0) // BLOCK_N * BLOCK_N
    if HAS_DOC:  # nothing before the earliest document start of the block's queries
        lo = tl.maximum(lo, tl.min(tl.where(m_ok, first_q, T)) // BLOCK_N * BLOCK_N)
    full_hi = (start_m + 1) // BLOCK_N * BLOCK_N  # key blocks wholly at or before the first query
    full_lo = 0
    if WINDOW > 0:  # key blocks every query of the block still sees through the window
        full_lo = tl.cdiv(start_m + BLOCK_M - WINDOW, BLOCK_N) * BLOCK_N
    b = tl.maximum(full_hi, lo)  # (full_hi <= start_m + 1 <= hi)
    a = tl.maximum(tl.minimum(full_lo, b), lo)
    return lo, a, b, hi


@triton.jit
def _fwd_blocks(acc, l_i, m_i, visits, q, k_base, v_base, first_base, offs_m, doc_q, offs_d, d_ok,
                lo, a, b, hi, T, qk_scale, skt, svt,
                WINDOW: tl.constexpr, HAS_DOC: tl.constexpr, ROWS64: tl.constexpr, COUNT: tl.constexpr,
                BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Key blocks [lo, hi); the causal/window mask only outside [a, b)."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < T
        rows_n = _rows(offs_n, ROWS64)
        kt = tl.load(k_base + rows_n[None, :] * skt + offs_d[:, None], mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        doc_k = tl.load(first_base + offs_n, mask=n_ok, other=-1) if HAS_DOC else offs_n
        band = (start_n < a) | (start_n >= b)
        s = _scores_mask(s, offs_m, offs_n, T, doc_q, doc_k, band, WINDOW, HAS_DOC)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + rows_n[:, None] * svt + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
        if COUNT:
            visits += tl.where(band, 1, 1 << 16)  # masked blocks in the low half, unmasked in the high
    return acc, l_i, m_i, visits


@triton.jit
def _fwd_kernel(Q, K, V, SINKS, FIRST, O, LSE, CNT,
                sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot, sfb,
                T, H, qk_scale,
                GROUP: tl.constexpr, WINDOW: tl.constexpr, HAS_DOC: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
                ROWS64: tl.constexpr, COUNT: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    kvh = h // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    m_ok = offs_m < T
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b * sqb + h * sqh + offs_m.to(tl.int64)[:, None] * sqt + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    first_base = FIRST + b * sfb
    doc_q = tl.load(first_base + offs_m, mask=m_ok, other=-2) if HAS_DOC else offs_m
    # log2 domain: scores are scaled by scale * log2(e), the sink by log2(e)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.load(SINKS + h).to(tl.float32) * 1.4426950408889634
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32) + 1.0
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = K + b * skb + kvh * skh
    v_base = V + b * svb + kvh * svh
    lo, a, c, hi = _key_phases(start_m, T, doc_q, m_ok, WINDOW, HAS_DOC, BLOCK_M, BLOCK_N)
    acc, l_i, m_i, visits = _fwd_blocks(acc, l_i, m_i, 0, q, k_base, v_base, first_base, offs_m, doc_q, offs_d, d_ok,
                                        lo, a, c, hi, T, qk_scale, skt, svt,
                                        WINDOW, HAS_DOC, ROWS64, COUNT, BLOCK_N, DOT_PRECISION)
    acc = acc / l_i[:, None]
    tl.store(O + b * sob + h * soh + offs_m.to(tl.int64)[:, None] * sot + offs_d[None, :],
             acc.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + bh * T + offs_m, (m_i + tl.math.log2(l_i)) * 0.6931471805599453, mask=m_ok)
    if COUNT:
        cnt = CNT + (bh * tl.num_programs(0) + pid_m) * 2
        tl.store(cnt, visits & 0xFFFF)
        tl.store(cnt + 1, visits >> 16)


@triton.jit
def _bwd_preprocess_kernel(O, DO, LSE, SINKS, DELTA, DSINK_PART,
                           sob, soh, sot, sdob, sdoh, sdot, T, H,
                           HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dout * out) (fp32 [B, H, T]), and this block's share of dsink[h] =
    -sum_rows exp(sink[h] - lse) * delta, so no [B, H, T, D] fp32 temporary is ever made."""
    pid_m, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < T
    offs_d = tl.arange(0, BLOCK_D)
    mask = m_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows = offs_m.to(tl.int64)[:, None]
    o = tl.load(O + b * sob + h * soh + rows * sot + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * sdob + h * sdoh + rows * sdot + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    tl.store(DELTA + bh * T + offs_m, delta, mask=m_ok)
    lse = tl.load(LSE + bh * T + offs_m, mask=m_ok, other=0.0)
    p_sink = tl.exp(tl.load(SINKS + h).to(tl.float32) - lse)
    tl.store(DSINK_PART + bh * tl.num_programs(0) + pid_m, -tl.sum(tl.where(m_ok, p_sink * delta, 0.0), 0))


@triton.jit
def _dq_blocks(dq, visits, q, do, lse, delta, k_base, v_base, first_base, offs_m, doc_q, offs_d, d_ok,
               lo, a, b, hi, T, qk_scale, skt, svt,
               WINDOW: tl.constexpr, HAS_DOC: tl.constexpr, ROWS64: tl.constexpr, COUNT: tl.constexpr,
               BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Key blocks [lo, hi); the causal/window mask only outside [a, b)."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < T
        rows_n = _rows(offs_n, ROWS64)
        k = tl.load(k_base + rows_n[:, None] * skt + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(v_base + rows_n[:, None] * svt + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        doc_k = tl.load(first_base + offs_n, mask=n_ok, other=-1) if HAS_DOC else offs_n
        band = (start_n < a) | (start_n >= b)
        s = _scores_mask(s, offs_m, offs_n, T, doc_q, doc_k, band, WINDOW, HAS_DOC)
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
        if COUNT:
            visits += tl.where(band, 1, 1 << 16)
    return dq, visits


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, FIRST, LSE, DELTA, DQ, CNT,
                   sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdob, sdoh, sdot, sfb,
                   T, H, qk_scale, scale,
                   GROUP: tl.constexpr, WINDOW: tl.constexpr, HAS_DOC: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   ROWS64: tl.constexpr, COUNT: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    kvh = h // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    rows_m = offs_m.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < T
    md_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sqb + h * sqh + rows_m[:, None] * sqt + offs_d[None, :], mask=md_mask, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + rows_m[:, None] * sdot + offs_d[None, :], mask=md_mask, other=0.0)
    lse = tl.load(LSE + bh * T + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + bh * T + offs_m, mask=m_ok, other=0.0)
    first_base = FIRST + b * sfb
    doc_q = tl.load(first_base + offs_m, mask=m_ok, other=-2) if HAS_DOC else offs_m
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = K + b * skb + kvh * skh
    v_base = V + b * svb + kvh * svh
    lo, a, c, hi = _key_phases(start_m, T, doc_q, m_ok, WINDOW, HAS_DOC, BLOCK_M, BLOCK_N)
    dq, visits = _dq_blocks(dq, 0, q, do, lse, delta, k_base, v_base, first_base, offs_m, doc_q, offs_d, d_ok,
                            lo, a, c, hi, T, qk_scale, skt, svt, WINDOW, HAS_DOC, ROWS64, COUNT, BLOCK_N, DOT_PRECISION)
    tl.store(DQ + bh * T * HEAD_DIM + rows_m[:, None] * HEAD_DIM + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=md_mask)
    if COUNT:
        cnt = CNT + (bh * tl.num_programs(0) + pid_m) * 2
        tl.store(cnt, visits & 0xFFFF)
        tl.store(cnt + 1, visits >> 16)


@triton.jit
def _query_phases(start_n, T, last_k, n_ok, WINDOW: tl.constexpr, HAS_DOC: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query-block bounds for a key block: masked [lo, a), unmasked [a, b), masked [b, hi)."""
    lo = start_n // BLOCK_M * BLOCK_M  # queries before the key block cannot see it
    hi = T
    full_hi = T // BLOCK_M * BLOCK_M  # whole query blocks only: no padding rows
    if WINDOW > 0:
        hi = tl.minimum(start_n + BLOCK_N + WINDOW - 1, T)
        full_hi = tl.minimum(full_hi, (start_n + WINDOW) // BLOCK_M * BLOCK_M)
    if HAS_DOC:  # nothing after the latest document end of the block's keys (the document mask does
        # the rest of that query block, so the bound rounds up and the unmasked phase may reach it)
        doc_hi = tl.cdiv(tl.max(tl.where(n_ok, last_k, -1)) + 1, BLOCK_M) * BLOCK_M
        hi = tl.minimum(hi, doc_hi)
        full_hi = tl.minimum(full_hi, doc_hi)
    full_lo = tl.cdiv(start_n + BLOCK_N - 1, BLOCK_M) * BLOCK_M  # every query at or after every key
    b = tl.maximum(full_hi, lo)  # (full_hi <= hi: every bound of full_hi is one of hi's, rounded down)
    a = tl.maximum(tl.minimum(full_lo, b), lo)
    return lo, a, b, hi


@triton.jit
def _dkdv_blocks(dk, dv, visits, k, v, q_base, do_base, lse_base, delta_base, first_base, offs_n, doc_k,
                 offs_d, d_ok, lo, a, b, hi, T, qk_scale, sqt, sdot,
                 WINDOW: tl.constexpr, HAS_DOC: tl.constexpr, ROWS64: tl.constexpr, COUNT: tl.constexpr,
                 BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Query blocks [lo, hi) of one head; the causal/window mask only outside [a, b)."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < T
        rows_m = _rows(offs_m, ROWS64)
        md_mask = m_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + rows_m[:, None] * sqt + offs_d[None, :], mask=md_mask, other=0.0)
        do = tl.load(do_base + rows_m[:, None] * sdot + offs_d[None, :], mask=md_mask, other=0.0)
        lse = tl.load(lse_base + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
        st = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_N, BLOCK_M]
        if HAS_DOC:
            doc_q = tl.load(first_base + offs_m, mask=m_ok, other=-2)
            st = tl.where(doc_k[:, None] == doc_q[None, :], st, float("-inf"))
        band = (start_m < a) | (start_m >= b)
        if band:  # query padding rows must not count here: they would add to dk and dv
            allowed = (offs_n[:, None] <= offs_m[None, :]) & m_ok[None, :]
            if WINDOW > 0:
                allowed = allowed & (offs_m[None, :] - offs_n[:, None] < WINDOW)
            st = tl.where(allowed, st, float("-inf"))
        pt = tl.math.exp2(st - lse[None, :])
        dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=DOT_PRECISION)
        if COUNT:
            visits += tl.where(band, 1, 1 << 16)  # masked blocks in the low half, unmasked in the high
    return dk, dv, visits


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, FIRST, LAST, LSE, DELTA, DK, DV, CNT,
                     sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdob, sdoh, sdot, sfb,
                     T, H, KVH, qk_scale, scale,
                     GROUP: tl.constexpr, WINDOW: tl.constexpr, HAS_DOC: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, ROWS64: tl.constexpr, COUNT: tl.constexpr):
    """dK/dV of one key block: its kv head's G query heads, over the query blocks that can see it."""
    pid_n, bkv = tl.program_id(0), tl.program_id(1).to(tl.int64)
    b, kvh = bkv // KVH, bkv % KVH
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    rows_n = offs_n.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    n_ok = offs_n < T
    kd_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * skb + kvh * skh + rows_n[:, None] * skt + offs_d[None, :], mask=kd_mask, other=0.0)
    v = tl.load(V + b * svb + kvh * svh + rows_n[:, None] * svt + offs_d[None, :], mask=kd_mask, other=0.0)
    first_base = FIRST + b * sfb
    doc_k = tl.load(first_base + offs_n, mask=n_ok, other=-1) if HAS_DOC else offs_n
    last_k = tl.load(LAST + b * sfb + offs_n, mask=n_ok, other=-1) if HAS_DOC else offs_n
    lo, a, c, hi = _query_phases(start_n, T, last_k, n_ok, WINDOW, HAS_DOC, BLOCK_M, BLOCK_N)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    visits = 0
    for g in range(GROUP):
        h = kvh * GROUP + g
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdob + h * sdoh
        lse_base = LSE + (b * H + h) * T
        delta_base = DELTA + (b * H + h) * T
        dk, dv, visits = _dkdv_blocks(dk, dv, visits, k, v, q_base, do_base, lse_base, delta_base, first_base,
                                      offs_n, doc_k, offs_d, d_ok, lo, a, c, hi, T, qk_scale, sqt, sdot,
                                      WINDOW, HAS_DOC, ROWS64, COUNT, BLOCK_M, DOT_PRECISION)
    out = bkv * T * HEAD_DIM + rows_n[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=kd_mask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=kd_mask)
    if COUNT:
        cnt = CNT + (bkv * tl.num_programs(0) + pid_n) * 2
        tl.store(cnt, visits & 0xFFFF)
        tl.store(cnt + 1, visits >> 16)
