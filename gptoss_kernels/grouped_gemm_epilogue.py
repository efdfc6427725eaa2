"""The grouped GEMM's epilogues (grouped_gemm.py runs them on each output tile): the GPT-OSS clamped SwiGLU
and its gradient on fp32 tiles, the plain / SwiGLU / SwiGLU-backward stores, and the column slicing.

The SwiGLU backward reads the saved h slice as one contiguous [BLOCK_M, 2 x width] tile (16-byte loads)
and splits gate and up (its even and odd columns) in registers. SUBTILES > 1 runs the epilogue on column
slices of the accumulator one after the other; a slice boundary is a register bit of the wgmma layout,
so slicing moves no data and only bounds how many fp32 tiles are live at once.
"""

import triton
import triton.language as tl


@triton.jit
def clamp_keep_nan(x, lo, hi):
    """torch.clamp: a NaN stays NaN (tl.minimum/tl.maximum would turn it into a bound, hiding it)."""
    return tl.where(x > hi, hi, tl.where(x < lo, lo, x))


@triton.jit
def swiglu_fwd(gate, up, alpha, limit):
    """GPT-OSS clamped SwiGLU of fp32 pre-activations; NaN passes through the clamps as in torch.clamp."""
    gate = clamp_keep_nan(gate, -float("inf"), limit)
    up = clamp_keep_nan(up, -limit, limit)
    return gate * tl.sigmoid(alpha * gate) * (up + 1.0)


@triton.jit
def swiglu_bwd(d_act, gate_pre, up_pre, alpha, limit, CLAMP_CLOSED: tl.constexpr):
    """Gradients w.r.t. the unclamped gate and up, and the activation itself (recomputed).

    Clamps pass gradient inside their range, and at the bounds exactly when CLAMP_CLOSED (as the installed
    torch.clamp does: `_runtime.clamp_grad_at_bounds()`).
    """
    gate = clamp_keep_nan(gate_pre, -float("inf"), limit)
    up = clamp_keep_nan(up_pre, -limit, limit)
    sig = tl.sigmoid(alpha * gate)
    glu = gate * sig
    d_gate = d_act * (up + 1.0) * (sig + alpha * glu * (1.0 - sig))
    if CLAMP_CLOSED:
        gate_in = gate_pre <= limit
        up_in = (up_pre >= -limit) & (up_pre <= limit)
    else:
        gate_in = gate_pre < limit
        up_in = (up_pre > -limit) & (up_pre < limit)
    d_gate = tl.where(gate_in, d_gate, 0.0)
    d_up = tl.where(up_in, d_act * glu, 0.0)
    return d_gate, d_up, glu * (up + 1.0)


@triton.jit
def _epilogue_piece(
    acc, rows64, row_mask, col0, N, alpha, limit, out_ptr, pre_ptr, act_ptr,
    stride_om, stride_on, stride_pm, stride_pn, stride_actm, stride_actn,
    EPILOGUE: tl.constexpr, STORE_PRE: tl.constexpr, STORE_ACT: tl.constexpr, CLAMP_CLOSED: tl.constexpr,
    BLOCK_M: tl.constexpr, WIDTH: tl.constexpr,
):
    """The epilogue of acc's columns col0 .. col0 + WIDTH (all of the tile, or one of its subtiles)."""
    cols = col0 + tl.arange(0, WIDTH)
    col_mask = cols < N
    if EPILOGUE == 0:  # PLAIN
        out_ptrs = out_ptr + rows64[:, None] * stride_om + cols[None, :] * stride_on
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])
    elif EPILOGUE == 1:  # SWIGLU: acc is h, gate/up interleaved
        if STORE_PRE:
            pre_ptrs = pre_ptr + rows64[:, None] * stride_pm + cols[None, :] * stride_pn
            tl.store(pre_ptrs, acc.to(pre_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])
        gate, up = tl.split(tl.reshape(acc, (BLOCK_M, WIDTH // 2, 2)))
        act = swiglu_fwd(gate, up, alpha, limit)  # [BLOCK_M, WIDTH // 2]
        act_cols = col0 // 2 + tl.arange(0, WIDTH // 2)
        out_ptrs = out_ptr + rows64[:, None] * stride_om + act_cols[None, :] * stride_on
        tl.store(out_ptrs, act.to(out_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & (act_cols < N // 2)[None, :])
    else:  # SWIGLU_BWD: acc is d(act); h columns 2*cols and 2*cols + 1, read as one contiguous tile
        h_cols = 2 * col0 + tl.arange(0, 2 * WIDTH)
        h_mask = row_mask[:, None] & (h_cols < 2 * N)[None, :]
        h = tl.load(pre_ptr + rows64[:, None] * stride_pm + h_cols[None, :] * stride_pn, mask=h_mask, other=0.0)
        gate, up = tl.split(tl.reshape(h.to(tl.float32), (BLOCK_M, WIDTH, 2)))
        d_gate, d_up, act = swiglu_bwd(acc, gate, up, alpha, limit, CLAMP_CLOSED)
        dh = tl.reshape(tl.join(d_gate, d_up), (BLOCK_M, 2 * WIDTH))  # interleave again
        tl.store(out_ptr + rows64[:, None] * stride_om + h_cols[None, :] * stride_on,
                 dh.to(out_ptr.dtype.element_ty), mask=h_mask)
        if STORE_ACT:
            act_ptrs = act_ptr + rows64[:, None] * stride_actm + cols[None, :] * stride_actn
            tl.store(act_ptrs, act.to(act_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def tile_epilogue(
    acc, rows, row_mask, pid_n, expert, N, R, alpha, limit,
    bias_ptr, out_ptr, pre_ptr, act_ptr, z_ptr, l_ptr,
    stride_be, stride_bn, stride_om, stride_on, stride_pm, stride_pn, stride_actm, stride_actn,
    stride_zm, stride_zr, stride_le, stride_lr, stride_ln,
    EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LOW_RANK: tl.constexpr, BLOCK_R: tl.constexpr,
    STORE_PRE: tl.constexpr, STORE_ACT: tl.constexpr, DOT_PRECISION: tl.constexpr, CLAMP_CLOSED: tl.constexpr,
    SUBTILES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The low-rank term and the bias join acc, then the epilogue runs on the whole tile or, with
    SUBTILES == 2, on its two column halves one after the other (fewer live registers)."""
    rows64 = rows.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    if HAS_LOW_RANK:  # acc += z[rows] @ L[e][:, cols]: a rank-R update, no extra [M, N] buffer
        rs = tl.arange(0, BLOCK_R)
        r_mask = rs < R
        z = tl.load(z_ptr + rows64[:, None] * stride_zm + rs[None, :] * stride_zr,
                    mask=row_mask[:, None] & r_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_R]
        low = tl.load(l_ptr + expert.to(tl.int64) * stride_le + rs[:, None] * stride_lr + cols[None, :] * stride_ln,
                      mask=r_mask[:, None] & col_mask[None, :], other=0.0)  # [BLOCK_R, BLOCK_N]
        acc = tl.dot(z, low, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + expert.to(tl.int64) * stride_be + cols * stride_bn, mask=col_mask, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    col0 = pid_n * BLOCK_N
    if SUBTILES == 1:
        _epilogue_piece(acc, rows64, row_mask, col0, N, alpha, limit, out_ptr, pre_ptr, act_ptr,
                        stride_om, stride_on, stride_pm, stride_pn, stride_actm, stride_actn,
                        EPILOGUE, STORE_PRE, STORE_ACT, CLAMP_CLOSED, BLOCK_M, BLOCK_N)
    else:
        left, right = _halves(acc, BLOCK_M, BLOCK_N)
        if SUBTILES == 2:
            _epilogue_piece(left, rows64, row_mask, col0, N, alpha, limit, out_ptr, pre_ptr, act_ptr,
                            stride_om, stride_on, stride_pm, stride_pn, stride_actm, stride_actn,
                            EPILOGUE, STORE_PRE, STORE_ACT, CLAMP_CLOSED, BLOCK_M, BLOCK_N // 2)
            _epilogue_piece(right, rows64, row_mask, col0 + BLOCK_N // 2, N, alpha, limit, out_ptr, pre_ptr,
                            act_ptr, stride_om, stride_on, stride_pm, stride_pn, stride_actm, stride_actn,
                            EPILOGUE, STORE_PRE, STORE_ACT, CLAMP_CLOSED, BLOCK_M, BLOCK_N // 2)
        else:
            q0, q1 = _halves(left, BLOCK_M, BLOCK_N // 2)
            q2, q3 = _halves(right, BLOCK_M, BLOCK_N // 2)
            W: tl.constexpr = BLOCK_N // 4
            _epilogue_piece(q0, rows64, row_mask, col0, N, alpha, limit, out_ptr, pre_ptr, act_ptr,
                            stride_om, stride_on, stride_pm, stride_pn, stride_actm, stride_actn,
                            EPILOGUE, STORE_PRE, STORE_ACT, CLAMP_CLOSED, BLOCK_M, W)
            _epilogue_piece(q1, rows64, row_mask, col0 + W, N, alpha, limit, out_ptr, pre_ptr, act_ptr,
                            stride_om, stride_on, stride_pm, stride_pn, stride_actm, stride_actn,
                            EPILOGUE, STORE_PRE, STORE_ACT, CLAMP_CLOSED, BLOCK_M, W)
            _epilogue_piece(q2, rows64, row_mask, col0 + 2 * W, N, alpha, limit, out_ptr, pre_ptr, act_ptr,
                            stride_om, stride_on, stride_pm, stride_pn, stride_actm, stride_actn,
                            EPILOGUE, STORE_PRE, STORE_ACT, CLAMP_CLOSED, BLOCK_M, W)
            _epilogue_piece(q3, rows64, row_mask, col0 + 3 * W, N, alpha, limit, out_ptr, pre_ptr, act_ptr,
                            stride_om, stride_on, stride_pm, stride_pn, stride_actm, stride_actn,
                            EPILOGUE, STORE_PRE, STORE_ACT, CLAMP_CLOSED, BLOCK_M, W)


@triton.jit
def _halves(x, BLOCK_M: tl.constexpr, WIDTH: tl.constexpr):
    """x [BLOCK_M, WIDTH] -> its left and right column halves (free in the wgmma layout: a register bit)."""
    return tl.split(tl.permute(tl.reshape(x, (BLOCK_M, 2, WIDTH // 2)), (0, 2, 1)))
