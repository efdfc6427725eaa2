"""Grouped GEMM over expert-sorted rows: y_e = a_e @ W[e] (+ b[e]) for every expert e.

One kernel, three epilogues:
- PLAIN:      out = acc + bias.
- SWIGLU:     acc + bias is the pre-activation h with interleaved gate/up columns; the tile holds
              matching gate and up columns, so the clamped SwiGLU runs in registers and the kernel
              writes the activation (half as wide) and, for the backward, optionally h itself.
- SWIGLU_BWD: acc is d(activation); the epilogue reads the saved h tile, writes dh with gate and
              up interleaved again, and optionally the recomputed activation (for the down-proj dW).
A rows can be gathered through an index (row r of the sorted order reads a[gather_idx[r]]), so
the permuted copy of the token tensor is never written. A low-rank term can join the accumulator
before any epilogue: acc += z_r @ L[e] with z [M, R] (R small, e.g. a LoRA rank; computed once per
row by the caller) and L [E, R, N], so an adapted projection costs no extra [M, N] buffer.
The torch references are in reference.py.
"""

import torch
import triton
import triton.language as tl

from kernels import _runtime
from kernels.tile_map import GroupLayout

PLAIN, SWIGLU, SWIGLU_BWD = 0, 1, 2
_GROUP_M = 8  # m-tiles that sweep the n-blocks together, so their weight tiles stay in L2


def _torch_clamp_grad_at_bounds() -> bool:
    """Whether torch.clamp passes the gradient at exactly its bounds: PyTorch 2.13 and earlier do
    (closed range), 2.14 does not (open range). The fused SwiGLU backward follows the installed torch,
    so its gradients equal the torch model's (and transformers') even on +-limit exactly."""
    x = torch.tensor([-1.0, 1.0], requires_grad=True)
    x.clamp(min=-1.0, max=1.0).sum().backward()
    return bool((x.grad == 1.0).all())


CLAMP_GRAD_AT_BOUNDS = tl.constexpr(_torch_clamp_grad_at_bounds())


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
def swiglu_bwd(d_act, gate_pre, up_pre, alpha, limit):
    """Gradients w.r.t. the unclamped gate and up, and the activation itself (recomputed).

    Clamps pass gradient inside their range, at the bounds exactly as the installed torch.clamp does.
    """
    gate = clamp_keep_nan(gate_pre, -float("inf"), limit)
    up = clamp_keep_nan(up_pre, -limit, limit)
    sig = tl.sigmoid(alpha * gate)
    glu = gate * sig
    d_gate = d_act * (up + 1.0) * (sig + alpha * glu * (1.0 - sig))
    if CLAMP_GRAD_AT_BOUNDS:
        gate_in = gate_pre <= limit
        up_in = (up_pre >= -limit) & (up_pre <= limit)
    else:
        gate_in = gate_pre < limit
        up_in = (up_pre > -limit) & (up_pre < limit)
    d_gate = tl.where(gate_in, d_gate, 0.0)
    d_up = tl.where(up_in, d_act * glu, 0.0)
    return d_gate, d_up, glu * (up + 1.0)


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, gather_ptr, w_ptr, bias_ptr, out_ptr, pre_ptr, act_ptr, z_ptr, l_ptr,
    offsets_ptr, tile_expert_ptr, tile_row_ptr,
    max_tiles, N, K, R, alpha, limit,
    stride_am, stride_ak, stride_we, stride_wk, stride_wn, stride_be, stride_bn,
    stride_om, stride_on, stride_pm, stride_pn, stride_actm, stride_actn,
    stride_zm, stride_zr, stride_le, stride_lr, stride_ln,
    EPILOGUE: tl.constexpr, HAS_GATHER: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LOW_RANK: tl.constexpr,
    BLOCK_R: tl.constexpr,
    STORE_PRE: tl.constexpr, STORE_ACT: tl.constexpr, EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Swizzle: GROUP_M consecutive m-tiles (mostly one expert) sweep the n-blocks together.
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_pid_n
    first_tile = (pid // group_size) * GROUP_M
    tiles_in_group = tl.minimum(max_tiles - first_tile, GROUP_M)
    tile = first_tile + (pid % group_size) % tiles_in_group
    pid_n = (pid % group_size) // tiles_in_group

    expert = tl.load(tile_expert_ptr + tile)
    if expert < 0:  # padding tile past the real tile count
        return
    row_end = tl.load(offsets_ptr + expert + 1)
    rows = tl.load(tile_row_ptr + tile) + tl.arange(0, BLOCK_M)  # [BLOCK_M] sorted-order rows
    row_mask = rows < row_end
    if HAS_GATHER:
        src = tl.load(gather_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    else:
        src = rows.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    ks = tl.arange(0, BLOCK_K)

    a_ptrs = a_ptr + src[:, None] * stride_am + ks[None, :] * stride_ak  # [BLOCK_M, BLOCK_K]
    w_ptrs = (w_ptr + expert.to(tl.int64) * stride_we
              + ks[:, None] * stride_wk + cols[None, :] * stride_wn)  # [BLOCK_K, BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_mask[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=col_mask[None, :], other=0.0)
        else:
            k_mask = ks < K - k0
            a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    rows64 = rows.to(tl.int64)
    if HAS_LOW_RANK:  # acc += z[rows] @ L[e][:, cols]: a rank-R update, no extra [M, N] buffer
        rs = tl.arange(0, BLOCK_R)
        r_mask = rs < R
        z = tl.load(z_ptr + rows64[:, None] * stride_zm + rs[None, :] * stride_zr,
                    mask=row_mask[:, None] & r_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_R]
        low = tl.load(l_ptr + expert.to(tl.int64) * stride_le + rs[:, None] * stride_lr + cols[None, :] * stride_ln,
                      mask=r_mask[:, None] & col_mask[None, :], other=0.0)  # [BLOCK_R, BLOCK_N]
        acc = tl.dot(z, low, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + expert.to(tl.int64) * stride_be + cols * stride_bn,
                       mask=col_mask, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    if EPILOGUE == 0:  # PLAIN
        out_ptrs = out_ptr + rows64[:, None] * stride_om + cols[None, :] * stride_on
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])
    elif EPILOGUE == 1:  # SWIGLU: acc is h [BLOCK_M, BLOCK_N], gate/up interleaved
        if STORE_PRE:
            pre_ptrs = pre_ptr + rows64[:, None] * stride_pm + cols[None, :] * stride_pn
            tl.store(pre_ptrs, acc.to(pre_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])
        gate, up = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N // 2, 2)))
        act = swiglu_fwd(gate, up, alpha, limit)  # [BLOCK_M, BLOCK_N // 2]
        act_cols = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        out_ptrs = out_ptr + rows64[:, None] * stride_om + act_cols[None, :] * stride_on
        tl.store(out_ptrs, act.to(out_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & (act_cols < N // 2)[None, :])
    else:  # SWIGLU_BWD: acc is d(act) [BLOCK_M, BLOCK_N]; h columns 2*cols, 2*cols + 1
        # Two stride-2 loads (same cache lines) use fewer registers than one wide load + split.
        mask = row_mask[:, None] & col_mask[None, :]
        g_ptrs = pre_ptr + rows64[:, None] * stride_pm + (2 * cols)[None, :] * stride_pn
        gate = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_N]
        up = tl.load(g_ptrs + stride_pn, mask=mask, other=0.0).to(tl.float32)
        d_gate, d_up, act = swiglu_bwd(acc, gate, up, alpha, limit)
        dh = tl.reshape(tl.join(d_gate, d_up), (BLOCK_M, 2 * BLOCK_N))  # interleave again
        h_cols = pid_n * (2 * BLOCK_N) + tl.arange(0, 2 * BLOCK_N)
        out_ptrs = out_ptr + rows64[:, None] * stride_om + h_cols[None, :] * stride_on
        tl.store(out_ptrs, dh.to(out_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & (h_cols < 2 * N)[None, :])
        if STORE_ACT:
            act_ptrs = act_ptr + rows64[:, None] * stride_actm + cols[None, :] * stride_actn
            tl.store(act_ptrs, act.to(act_ptr.dtype.element_ty), mask=mask)


def _config(layout: GroupLayout, n: int, k: int, dtype: torch.dtype, epilogue: int) -> dict:
    """Tile shape and launch knobs; BLOCK_M comes from the layout (rows per expert)."""
    wide = 128 if epilogue != SWIGLU_BWD else 64  # the bwd epilogue also holds gate and up tiles
    block_n = _runtime.block("block_n", min(wide, max(16, _runtime.next_pow2(n))))
    # fp32 tiles take twice the shared memory per stage; they only run in tests.
    block_k = _runtime.block("block_k", min(64 if dtype.itemsize == 2 else 32, max(16, _runtime.next_pow2(k))))
    big = layout.block_m * block_n >= 128 * 128
    # The bwd epilogue holds gate, up and d(act) tiles at once: 4 warps spill at BLOCK_M >= 64.
    heavy = epilogue == SWIGLU_BWD and layout.block_m >= 64
    return dict(
        BLOCK_M=layout.block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=_GROUP_M,
        EVEN_K=k % block_k == 0, DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
        num_warps=8 if big or heavy else 4, num_stages=3 if big else 4,
    )


def _launch(a, layout, w, bias, out, *, gather_idx=None, epilogue=PLAIN, pre=None, act=None,
            alpha=0.0, limit=0.0, low_rank=None):
    """Run the kernel; `w` is [E, K, N] (any strides, e.g. a transposed view); `low_rank`: (z [M, R],
    L [E, R, N]) added to the product before the epilogue, or None."""
    if layout.max_tiles == 0:  # no rows at all
        return
    z, low = low_rank if low_rank is not None else (out, None)
    r = low.shape[1] if low is not None else 0
    n, k = w.shape[2], w.shape[1]
    cfg = _config(layout, n, k, a.dtype, epilogue)
    grid = (layout.max_tiles * triton.cdiv(n, cfg["BLOCK_N"]),)
    # Unused pointers get `out`; constexpr flags keep the kernel from touching them.
    _grouped_gemm_kernel[grid](
        a, gather_idx if gather_idx is not None else out, w,
        bias if bias is not None else out, out,
        pre if pre is not None else out, act if act is not None else out,
        z, low if low is not None else out,
        layout.offsets, layout.tile_expert, layout.tile_row,
        layout.max_tiles, n, k, r, alpha, limit,
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), w.stride(2),
        *(bias.stride() if bias is not None else (0, 0)),
        out.stride(0), out.stride(1),
        *(pre.stride() if pre is not None else (0, 0)),
        *(act.stride() if act is not None else (0, 0)),
        *(z.stride() if low is not None else (0, 0)), *(low.stride() if low is not None else (0, 0, 0)),
        EPILOGUE=epilogue, HAS_GATHER=gather_idx is not None, HAS_BIAS=bias is not None,
        HAS_LOW_RANK=low is not None, BLOCK_R=max(16, _runtime.next_pow2(r)),
        STORE_PRE=epilogue == SWIGLU and pre is not None,
        STORE_ACT=epilogue == SWIGLU_BWD and act is not None,
        **cfg,
    )


def grouped_matmul(a, layout, w, bias=None, *, gather_idx=None, low_rank=None):
    """out[r] = a[src(r)] @ w[e(r)] + bias[e(r)] (+ z[r] @ L[e(r)]); a [M or T, K], w [E, K, N] -> out [M, N]."""
    out = _runtime.empty((layout.num_rows, w.shape[2]), a.dtype, a.device)
    _launch(a, layout, w, bias, out, gather_idx=gather_idx, low_rank=low_rank)
    return out


def grouped_matmul_swiglu(a, layout, w, bias, *, alpha, limit, gather_idx=None, keep_pre=False, low_rank=None):
    """act = swiglu(a @ w[e] + bias[e]); w [E, K, 2I] -> act [M, I], and h [M, 2I] if keep_pre."""
    m, two_i = layout.num_rows, w.shape[2]
    act = _runtime.empty((m, two_i // 2), a.dtype, a.device)
    pre = _runtime.empty((m, two_i), a.dtype, a.device) if keep_pre else None
    _launch(a, layout, w, bias, act, gather_idx=gather_idx, epilogue=SWIGLU, pre=pre,
            alpha=alpha, limit=limit, low_rank=low_rank)
    return act, pre


def grouped_matmul_swiglu_bwd(d_out, layout, w_t, pre, *, alpha, limit, want_act, low_rank=None):
    """dh = swiglu'(h) * (d_out @ w_t[e]); w_t [E, H, I] -> dh [M, 2I], and act [M, I] if want_act."""
    m, i = layout.num_rows, w_t.shape[2]
    dh = _runtime.empty((m, 2 * i), d_out.dtype, d_out.device)
    act = _runtime.empty((m, i), d_out.dtype, d_out.device) if want_act else None
    _launch(d_out, layout, w_t, None, dh, epilogue=SWIGLU_BWD, pre=pre, act=act,
            alpha=alpha, limit=limit, low_rank=low_rank)
    return dh, act
