"""MXFP4 tiles dequantized in registers: the helper the grouped GEMM calls inside its K loop, and a kernel that
reads whole weights back through that same helper (tests prove the helper bit for bit with it; it is also a
GPU dequantization of a few experts, e.g. for an export).

A tile is [ROWS outputs, COLS inputs] of one expert's (out, in) weight, COLS a multiple of 32 starting on a
32-boundary, so every scale group lies whole inside it. Per element: the nibble (low = even input, high = odd)
is placed into fp32 bits as sign | exponent-and-mantissa, read back as a float (the E2M1 value times 2**-127,
exact: code 1 lands on the fp32 subnormal 2**-127) and multiplied by 2**127, then by the group's factor
2**(scale - 128). Both factors are finite fp32 for every scale byte (2**-128 is subnormal, 2**127 the
largest), so the product is FP4 * 2**(scale - 127) rounded once: exact wherever fp32 holds it, inf past
fp32's range, and never NaN: scale 255 (E8M0's NaN) gives 0, 2**127 or inf by code, as transformers'
convert_moe_packed_tensors does. The fp32 value is then converted to the compute dtype (exact in bf16).
Sm_90 compiles these multiplies without flush-to-zero (mul.f32), so subnormal weights survive.
"""

import torch
import triton
import triton.language as tl

from gptoss_kernels import _runtime
from gptoss_kernels.mxfp4 import GROUP, Mxfp4Weight

_G = tl.constexpr(GROUP)  # (a jit function reads module globals only as constexprs)


@triton.jit
def mxfp4_values(q, s, ROWS: tl.constexpr, COLS: tl.constexpr):
    """q uint8 [ROWS, COLS/2] (two codes per byte), s uint8 [ROWS, COLS/32] -> fp32 values [ROWS, COLS]."""
    b = q.to(tl.uint32)
    # E2M1 sign -> bit 31; exponent (2 bits) and mantissa (1 bit) -> bits 24..22: fp32 bits of value * 2**-127.
    lo = ((b & 0x08) << 28) | ((b & 0x07) << 22)
    hi = ((b & 0x80) << 24) | ((b & 0x70) << 18)
    bits = tl.reshape(tl.join(lo, hi), (ROWS, COLS // 32, 32))  # input 2j is byte j's low nibble
    v = bits.to(tl.float32, bitcast=True) * 1.7014118346046923e38  # * 2**127: the E2M1 value times 2
    e = s.to(tl.uint32)
    # 2**(scale - 128) as fp32 bits: normal from scale 2 up, subnormal 2**-127 and 2**-128 for 1 and 0.
    factor = tl.where(e >= 2, (e - 1) << 23, 0x00200000 << (e & 1)).to(tl.float32, bitcast=True)
    return tl.reshape(v * factor[:, :, None], (ROWS, COLS))


@triton.jit
def mxfp4_scales(
    s_ptr,
    expert,
    row0,
    col0,
    num_rows,
    num_cols,
    stride_se,
    stride_so,
    stride_sg,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
    MASK_ROWS: tl.constexpr,
    MASK_COLS: tl.constexpr,
):
    """The uint8 scales [ROWS, COLS/32] of a tile (see mxfp4_tile); 0 outside num_rows x num_cols. Loaded apart
    from the codes so the K loop can fetch the next tile's scales one step ahead: a tile's scales are a byte
    per thread or less, too small for the software pipeliner to take them."""
    rows = row0 + tl.arange(0, ROWS)
    groups = col0 // _G + tl.arange(0, COLS // _G)
    ptrs = s_ptr + expert.to(tl.int64) * stride_se + rows[:, None] * stride_so + groups[None, :] * stride_sg
    if MASK_ROWS and MASK_COLS:
        return tl.load(ptrs, mask=(rows < num_rows)[:, None] & (groups < num_cols // _G)[None, :], other=0)
    elif MASK_ROWS:
        return tl.load(ptrs, mask=(rows < num_rows)[:, None], other=0)
    elif MASK_COLS:
        return tl.load(ptrs, mask=(groups < num_cols // _G)[None, :], other=0)
    else:
        return tl.load(ptrs)


@triton.jit
def mxfp4_tile(
    q_ptr,
    s,
    expert,
    row0,
    col0,
    num_rows,
    num_cols,
    stride_qe,
    stride_qo,
    stride_qg,
    stride_qb,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
    MASK_ROWS: tl.constexpr,
    MASK_COLS: tl.constexpr,
    DTYPE: tl.constexpr,
):
    """Rows row0.. (outputs) and columns col0.. (inputs; col0 % 32 == 0) of dequant(blocks[expert]) in DTYPE,
    [ROWS, COLS], with its scales s (mxfp4_scales); outside num_rows x num_cols the tile holds +0.0, so the
    product adds nothing there."""
    rows = row0 + tl.arange(0, ROWS)
    j = tl.arange(0, COLS // 2)  # byte of the tile: group j // 16, byte j % 16 within the group
    group = col0 // _G + j // 16
    ptrs = (
        q_ptr
        + expert.to(tl.int64) * stride_qe
        + rows[:, None] * stride_qo
        + group[None, :] * stride_qg
        + (j % 16)[None, :] * stride_qb
    )
    if MASK_ROWS and MASK_COLS:  # masked by whole groups, so 16-byte loads stay whole
        q = tl.load(ptrs, mask=(rows < num_rows)[:, None] & (group < num_cols // _G)[None, :], other=0)
    elif MASK_ROWS:
        q = tl.load(ptrs, mask=(rows < num_rows)[:, None], other=0)
    elif MASK_COLS:
        q = tl.load(ptrs, mask=(group < num_cols // _G)[None, :], other=0)
    else:
        q = tl.load(ptrs)
    return mxfp4_values(q, s, ROWS, COLS).to(DTYPE)


@triton.jit
def _dequantize_kernel(
    q_ptr,
    s_ptr,
    out_ptr,
    num_rows,
    num_cols,
    stride_qe,
    stride_qo,
    stride_qg,
    stride_qb,
    stride_se,
    stride_so,
    stride_sg,
    stride_oe,
    stride_oi,
    stride_oj,
    TRANSPOSED: tl.constexpr,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
):
    """out[e] = dequant(blocks[e]): [out, in] tile by tile, or [in, out] (TRANSPOSED: the forward GEMM's
    orientation, tl.trans of the tile exactly as the GEMM takes it)."""
    pid_r, pid_c, expert = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    row0, col0 = pid_r * ROWS, pid_c * COLS
    s = mxfp4_scales(
        s_ptr, expert, row0, col0, num_rows, num_cols, stride_se, stride_so, stride_sg, ROWS, COLS, True, True
    )
    tile = mxfp4_tile(
        q_ptr,
        s,
        expert,
        row0,
        col0,
        num_rows,
        num_cols,
        stride_qe,
        stride_qo,
        stride_qg,
        stride_qb,
        ROWS,
        COLS,
        True,
        True,
        out_ptr.dtype.element_ty,
    )
    rows = row0 + tl.arange(0, ROWS)
    cols = col0 + tl.arange(0, COLS)
    base = out_ptr + expert.to(tl.int64) * stride_oe
    mask = (rows < num_rows)[:, None] & (cols < num_cols)[None, :]
    if TRANSPOSED:
        tl.store(base + cols[:, None] * stride_oi + rows[None, :] * stride_oj, tl.trans(tile), mask=tl.trans(mask))
    else:
        tl.store(base + rows[:, None] * stride_oi + cols[None, :] * stride_oj, tile, mask=mask)


def mxfp4_strides(w: Mxfp4Weight) -> tuple[int, ...]:
    """The 7 strides the kernels take: blocks (expert, out, group, byte), then scales (expert, out, group)."""
    return (*w.blocks.stride(), *w.scales.stride())


def dequantize(w: Mxfp4Weight, dtype: torch.dtype, *, rows: int = 64, cols: int = 64) -> torch.Tensor:
    """The dense weight w stands for, through the GEMM's own dequantization helper: [E, in, out]
    (or [E, out, in] for a transposed view) in `dtype`. Whole tensors: use it on a few experts at a time."""
    _runtime.check_tensors(w.blocks, w.scales)
    if cols % GROUP or cols & (cols - 1) or rows & (rows - 1):
        raise ValueError(f"tile {rows}x{cols}: powers of two, columns a multiple of {GROUP}")
    e, n_out, n_in = w.num_experts, w.out_features, w.in_features
    shape = (e, n_out, n_in) if w.transposed else (e, n_in, n_out)
    out = _runtime.empty(shape, dtype, w.device)
    if out.numel() == 0:
        return out
    grid = (triton.cdiv(n_out, rows), triton.cdiv(n_in, cols), e)
    _dequantize_kernel[grid](
        w.blocks,
        w.scales,
        out,
        n_out,
        n_in,
        *mxfp4_strides(w),
        *out.stride(),
        TRANSPOSED=not w.transposed,
        ROWS=rows,
        COLS=cols,
    )
    return out
