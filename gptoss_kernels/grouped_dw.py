"""Weight and bias gradients of a grouped GEMM: dW[e] = x_e^T @ dy_e and db[e] = sum_r dy_e[r].

The reduction runs over each expert's own ragged row segment: one program owns one
[BLOCK_K, BLOCK_N] tile of one expert's dW and loops over that expert's rows, so nothing is
reduced across programs (no atomics, deterministic). dBias rides along in the same loop: the
programs of the first k-block also sum their dy tiles. When W is frozen (LoRA) the kernel runs
in bias-only mode, which never loads x; when neither is wanted, nothing is launched at all.
Empty experts still get their (zero) tiles written. The torch reference is in reference.py.
When K is small (a LoRA rank: dW of B is [rank, N]) the product is computed transposed, dW^T = dy^T @ x,
so its M side is the wide one: Hopper's wgmma needs 64 rows, and a 16-row K tile would fall back to mma.sync.
"""

import torch
import triton
import triton.language as tl

from gptoss_kernels import _runtime


@triton.jit
def _grouped_dw_kernel(
    x_ptr, gather_ptr, dy_ptr, dw_ptr, db_ptr, offsets_ptr,
    K, N,
    stride_xm, stride_xk, stride_dym, stride_dyn,
    stride_dwe, stride_dwk, stride_dwn, stride_dbe, stride_dbn,
    HAS_GATHER: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr, SWAP_AB: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Axis 0 walks one expert's tiles first, so programs running together share its rows in L2.
    pid = tl.program_id(0)
    expert = tl.program_id(1)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_k = pid // num_pid_n
    pid_n = pid % num_pid_n
    row_start = tl.load(offsets_ptr + expert)
    row_end = tl.load(offsets_ptr + expert + 1)

    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_mask = ks < K
    col_mask = cols < N
    if SWAP_AB:  # dW^T tile [BLOCK_N, BLOCK_K]
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(row_start, row_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        dy = tl.load(dy_ptr + rows.to(tl.int64)[:, None] * stride_dym + cols[None, :] * stride_dyn,
                     mask=row_mask[:, None] & col_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_N]
        if COMPUTE_DW:
            if HAS_GATHER:
                src = tl.load(gather_ptr + rows, mask=row_mask, other=0).to(tl.int64)
            else:
                src = rows.to(tl.int64)
            x = tl.load(x_ptr + src[:, None] * stride_xm + ks[None, :] * stride_xk,
                        mask=row_mask[:, None] & k_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
            if SWAP_AB:
                acc = tl.dot(tl.trans(dy), x, acc, input_precision=DOT_PRECISION)
            else:
                acc = tl.dot(tl.trans(x), dy, acc, input_precision=DOT_PRECISION)
        if COMPUTE_DB:
            db += tl.sum(dy.to(tl.float32), axis=0)

    e64 = expert.to(tl.int64)
    if COMPUTE_DW:
        if SWAP_AB:
            dw_ptrs = dw_ptr + e64 * stride_dwe + ks[None, :] * stride_dwk + cols[:, None] * stride_dwn
            tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=k_mask[None, :] & col_mask[:, None])
        else:
            dw_ptrs = dw_ptr + e64 * stride_dwe + ks[:, None] * stride_dwk + cols[None, :] * stride_dwn
            tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=k_mask[:, None] & col_mask[None, :])
    if COMPUTE_DB:
        if pid_k == 0:  # every k-block summed the same dy tiles; the first one writes
            tl.store(db_ptr + e64 * stride_dbe + cols * stride_dbn, db.to(db_ptr.dtype.element_ty),
                     mask=col_mask)


def grouped_weight_grad(x, dy, offsets, *, gather_idx=None, w_dtype=None, b_dtype=None):
    """dW [E, K, N] (if `w_dtype` is given) and db [E, N] (if `b_dtype` is given); None otherwise.

    x: [M or T, K] (rows gathered through `gather_idx` [M] when given; may be None when only db
    is wanted); dy: [M, N] sorted by expert; offsets: [E+1] int32 row boundaries from the tile map.
    """
    compute_dw, compute_db = w_dtype is not None, b_dtype is not None
    if not (compute_dw or compute_db):
        return None, None
    if not compute_dw:  # bias-only mode never reads x, which may then be None
        x = dy
    num_experts, k, n = offsets.numel() - 1, x.shape[1], dy.shape[1]
    dw = _runtime.empty((num_experts, k, n), w_dtype, dy.device) if compute_dw else None
    db = _runtime.empty((num_experts, n), b_dtype, dy.device) if compute_db else None
    block_k = _runtime.block("block_k", min(128, max(16, _runtime.next_pow2(k))))
    block_n = _runtime.block("block_n", min(128, max(16, _runtime.next_pow2(n))))
    block_m = _runtime.block("block_m_dw", 64 if dy.dtype.itemsize == 2 else 32)
    big = block_k * block_n >= 128 * 128
    k_blocks = triton.cdiv(k, block_k) if compute_dw else 1  # bias-only: one program per n-block
    grid = (k_blocks * triton.cdiv(n, block_n), num_experts)
    _grouped_dw_kernel[grid](
        x, gather_idx if gather_idx is not None else offsets, dy,
        dw if compute_dw else dy, db if compute_db else dy, offsets,
        k, n,
        x.stride(0), x.stride(1), dy.stride(0), dy.stride(1),
        *(dw.stride() if compute_dw else (0, 0, 0)), *(db.stride() if compute_db else (0, 0)),
        HAS_GATHER=gather_idx is not None, COMPUTE_DW=compute_dw, COMPUTE_DB=compute_db,
        SWAP_AB=block_k < min(64, block_n),  # the wide side of the product first (wgmma wants 64 rows)
        DOT_PRECISION="ieee" if dy.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_N=block_n,
        num_warps=8 if big else 4, num_stages=3,
    )
    return dw, db
