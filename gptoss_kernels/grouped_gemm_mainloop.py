"""The grouped GEMM's K loop and tile bookkeeping (grouped_gemm.py's two kernels run them for each output tile):
which m-tile and n-block a program computes (the grouped-M swizzle), the tile's rows, and the accumulation of
A (gathered rows) times the expert's weight tile over K: pointer loads, TMA descriptor loads (the forward
[E, K, N] layout, or a transposed view walking the stored [E, N, K]), or MXFP4 codes dequantized in
registers (mxfp4_tile.py) in either orientation, each K step fetching the next step's scales.
"""

import triton
import triton.language as tl

from gptoss_kernels.mxfp4_tile import mxfp4_scales, mxfp4_tile


@triton.jit
def tile_coords(pid, num_tiles, N, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped-M swizzle: GROUP_M consecutive m-tiles (mostly one expert) sweep the n-blocks together,
    so their weight tiles stay in L2. pid -> (tile, n-block) over num_tiles m-tiles."""
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_pid_n
    first_tile = (pid // group_size) * GROUP_M
    tiles_in_group = tl.minimum(num_tiles - first_tile, GROUP_M)
    tile = first_tile + (pid % group_size) % tiles_in_group
    pid_n = (pid % group_size) // tiles_in_group
    return tile, pid_n


@triton.jit
def tile_rows(tile_row_ptr, offsets_ptr, tile, expert, BLOCK_M: tl.constexpr):
    """The tile's sorted-order rows [BLOCK_M] and which of them belong to its expert."""
    row_end = tl.load(offsets_ptr + expert + 1)
    rows = tl.load(tile_row_ptr + tile) + tl.arange(0, BLOCK_M)
    return rows, rows < row_end


@triton.jit
def mainloop(
    a_ptr,
    gather_ptr,
    w_ptr,
    w_desc,
    s_ptr,
    rows,
    row_mask,
    pid_n,
    expert,
    N,
    K,
    stride_am,
    stride_ak,
    stride_we,
    stride_wk,
    stride_wn,
    stride_qe,
    stride_qo,
    stride_qg,
    stride_qb,
    stride_se,
    stride_so,
    stride_sg,
    HAS_GATHER: tl.constexpr,
    EVEN_K: tl.constexpr,
    W_TMA: tl.constexpr,
    W_MXFP4: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """acc [BLOCK_M, BLOCK_N] = a[src(rows)] @ w[expert][:, n-block pid_n], in fp32. W_MXFP4: w_ptr holds MXFP4
    blocks and s_ptr their scales (strides q*, s*), dequantized tile by tile (1: forward, 2: dX orientation)."""
    if HAS_GATHER:
        src = tl.load(gather_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    else:
        src = rows.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + src[:, None] * stride_am + ks[None, :] * stride_ak  # [BLOCK_M, BLOCK_K]
    w_ptrs = (
        w_ptr + expert.to(tl.int64) * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wn
    )  # [BLOCK_K, BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if W_MXFP4 == 1:  # the first tile's scales; each step fetches the next step's (masked past K)
        s = mxfp4_scales(
            s_ptr, expert, pid_n * BLOCK_N, 0, N, K, stride_se, stride_so, stride_sg, BLOCK_N, BLOCK_K, True, True
        )
    elif W_MXFP4 == 2:
        s = mxfp4_scales(
            s_ptr, expert, 0, pid_n * BLOCK_N, K, N, stride_se, stride_so, stride_sg, BLOCK_K, BLOCK_N, True, True
        )
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_mask[:, None], other=0.0)
        else:
            k_mask = ks < K - k0
            a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        # TMA zero-fills past the expert's own K and N (3-D descriptor), so it needs no mask.
        if W_MXFP4 == 1:  # w[e] = dequant(blocks[e])^T: the [BLOCK_N outputs, BLOCK_K inputs] tile, transposed
            s_next = mxfp4_scales(
                s_ptr,
                expert,
                pid_n * BLOCK_N,
                k0 + BLOCK_K,
                N,
                K,
                stride_se,
                stride_so,
                stride_sg,
                BLOCK_N,
                BLOCK_K,
                True,
                True,
            )
            w = tl.trans(
                mxfp4_tile(
                    w_ptr,
                    s,
                    expert,
                    pid_n * BLOCK_N,
                    k0,
                    N,
                    K,
                    stride_qe,
                    stride_qo,
                    stride_qg,
                    stride_qb,
                    BLOCK_N,
                    BLOCK_K,
                    True,
                    not EVEN_K,
                    a_ptr.dtype.element_ty,
                )
            )
            s = s_next
        elif W_MXFP4 == 2:  # dX: w[e] = dequant(blocks[e]), K = outputs, N = inputs (the groups run along N)
            s_next = mxfp4_scales(
                s_ptr,
                expert,
                k0 + BLOCK_K,
                pid_n * BLOCK_N,
                K,
                N,
                stride_se,
                stride_so,
                stride_sg,
                BLOCK_K,
                BLOCK_N,
                True,
                True,
            )
            w = mxfp4_tile(
                w_ptr,
                s,
                expert,
                k0,
                pid_n * BLOCK_N,
                K,
                N,
                stride_qe,
                stride_qo,
                stride_qg,
                stride_qb,
                BLOCK_K,
                BLOCK_N,
                not EVEN_K,
                True,
                a_ptr.dtype.element_ty,
            )
            s = s_next
        elif W_TMA == 1:  # w[e] is [K, N] with N contiguous
            w = tl.reshape(w_desc.load([expert, k0, pid_n * BLOCK_N]), (BLOCK_K, BLOCK_N))
        elif W_TMA == 2:  # a transposed view: the descriptor walks the stored [E, N, K]
            w = tl.trans(tl.reshape(w_desc.load([expert, pid_n * BLOCK_N, k0]), (BLOCK_N, BLOCK_K)))
        elif EVEN_K:
            w = tl.load(w_ptrs, mask=col_mask[None, :], other=0.0)
        else:
            w = tl.load(w_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
    return acc
