"""Combine expert outputs back into token order: out[t] = sum_{r: token_idx[r] == t} w[r] * y[r].

Each token's rows are found through a CSR view of token_idx (a stable argsort plus per-token
start offsets, built on the device), and one program sums one token's rows in fp32 in a fixed
order: no atomics, so results are deterministic, and tokens with no rows get exact zeros.
The same kernel without weights scatters the gathered GEMM's dX back to token order.
The backward is a gather: dy[r] = w[r] * dout[t(r)], dw[r] = <dout[t(r)], y[r]>.
The torch reference is in reference.py.
"""

import torch
import triton
import triton.language as tl

from gptoss_kernels import _runtime

# Memory-bound kernels: wide enough for 16-byte loads in every thread and few, fat programs.
_BLOCK_H = 1024  # forward: hidden columns per program (one token per program)
_BLOCK_R, _BLOCK_H_BWD = 16, 256  # backward: rows per program, columns per step of its H loop


@triton.jit
def _segment_sum_kernel(
    y_ptr, w_ptr, order_ptr, starts_ptr, out_ptr, H,
    stride_ym, stride_yh, stride_om, stride_oh,
    HAS_WEIGHTS: tl.constexpr, BLOCK_H: tl.constexpr,
):
    token = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_mask = cols < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for i in range(tl.load(starts_ptr + token), tl.load(starts_ptr + token + 1)):
        row = tl.load(order_ptr + i).to(tl.int64)  # a row of y that belongs to this token (rows x H > 2**31)
        v = tl.load(y_ptr + row * stride_ym + cols * stride_yh, mask=col_mask, other=0.0).to(tl.float32)
        if HAS_WEIGHTS:
            v *= tl.load(w_ptr + row).to(tl.float32)
        acc += v
    tl.store(out_ptr + token.to(tl.int64) * stride_om + cols * stride_oh,
             acc.to(out_ptr.dtype.element_ty), mask=col_mask)


@triton.jit
def _combine_bwd_kernel(
    dout_ptr, y_ptr, w_ptr, tok_ptr, dy_ptr, dw_ptr, M, H,
    stride_gm, stride_gh, stride_ym, stride_yh, stride_dym, stride_dyh,
    COMPUTE_DY: tl.constexpr, COMPUTE_DW: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < M
    rows64 = rows.to(tl.int64)
    tok = tl.load(tok_ptr + rows, mask=row_mask, other=0).to(tl.int64)  # [BLOCK_R]
    w = tl.load(w_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        mask = row_mask[:, None] & (cols < H)[None, :]
        g = tl.load(dout_ptr + tok[:, None] * stride_gm + cols[None, :] * stride_gh,
                    mask=mask, other=0.0).to(tl.float32)  # [BLOCK_R, BLOCK_H]
        if COMPUTE_DY:
            tl.store(dy_ptr + rows64[:, None] * stride_dym + cols[None, :] * stride_dyh,
                     (g * w[:, None]).to(dy_ptr.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            y = tl.load(y_ptr + rows64[:, None] * stride_ym + cols[None, :] * stride_yh,
                        mask=mask, other=0.0).to(tl.float32)
            dw += tl.sum(g * y, axis=1)
    if COMPUTE_DW:
        tl.store(dw_ptr + rows, dw.to(dw_ptr.dtype.element_ty), mask=row_mask)


def _token_csr(token_idx, num_tokens):
    """order [M]: rows grouped by token (stable); starts [T+1]: token t owns order[starts[t]:starts[t+1]]."""
    token_idx = token_idx.long()
    order = torch.argsort(token_idx, stable=True)
    grid = torch.arange(num_tokens + 1, device=token_idx.device)
    return order, torch.searchsorted(token_idx[order], grid)


def scatter_rows(y, token_idx, num_tokens, weights=None, token_rows=None):
    """out [T, H] = sum over rows r of (weights[r] *) y[r] into row token_idx[r], fp32 accumulation.

    token_rows: (rows, starts) with token t's rows at rows[starts[t]:starts[t+1]], when the caller knows
    them already (a dispatcher's inverse permutation); else they are found by a stable sort."""
    _runtime.check_tensors(y, token_idx, weights)
    h = y.shape[1]
    out = _runtime.empty((num_tokens, h), y.dtype, y.device)
    if num_tokens == 0:
        return out
    order, starts = token_rows if token_rows is not None else _token_csr(token_idx, num_tokens)
    grid = (num_tokens, triton.cdiv(h, _BLOCK_H))
    _segment_sum_kernel[grid](
        y, weights if weights is not None else y, order, starts, out, h,
        y.stride(0), y.stride(1), out.stride(0), out.stride(1),
        HAS_WEIGHTS=weights is not None, BLOCK_H=_BLOCK_H,
    )
    return out


class _ScatterCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_sorted, token_idx, weights, num_tokens, token_rows):
        ctx.save_for_backward(y_sorted, token_idx, weights)
        return scatter_rows(y_sorted, token_idx, num_tokens, weights, token_rows)

    @staticmethod
    @torch.autograd.function.once_differentiable  # the backward kernels have no backward
    def backward(ctx, d_out):
        y, token_idx, weights = ctx.saved_tensors
        need_y, _, need_w = ctx.needs_input_grad[:3]
        dy = _runtime.empty(y.shape, y.dtype, y.device) if need_y else None
        dw = _runtime.empty(weights.shape, weights.dtype, y.device) if need_w else None
        m, h = y.shape
        if m > 0 and (need_y or need_w):
            _combine_bwd_kernel[(triton.cdiv(m, _BLOCK_R),)](
                d_out, y, weights, token_idx, dy if need_y else y, dw if need_w else weights, m, h,
                d_out.stride(0), d_out.stride(1), y.stride(0), y.stride(1),
                *(dy.stride() if need_y else (0, 0)),
                COMPUTE_DY=need_y, COMPUTE_DW=need_w, BLOCK_R=_BLOCK_R, BLOCK_H=_BLOCK_H_BWD,
            )
        return dy, None, dw, None, None


def scatter_combine(y_sorted, token_idx, weights, num_tokens, token_rows=None):
    """Weighted sum of expert rows back into token order.

    y_sorted [M, H], token_idx [M] (int, each in [0, num_tokens)), weights [M] -> out [T, H] in
    y's dtype, accumulated in fp32. Differentiable w.r.t. y_sorted and weights. token_rows: see
    scatter_rows (the rows of each token in a fixed order, sparing the sort).
    """
    if y_sorted.dim() != 2:
        raise ValueError(f"y_sorted must be [M, H], got shape {tuple(y_sorted.shape)}")
    m = y_sorted.shape[0]
    if token_idx.shape != (m,) or weights.shape != (m,):
        raise ValueError(f"token_idx and weights must be [{m}], got {tuple(token_idx.shape)} "
                         f"and {tuple(weights.shape)}")
    if token_idx.dtype.is_floating_point or token_idx.dtype == torch.bool:
        raise ValueError(f"token_idx must be an integer tensor, got {token_idx.dtype}")
    return _ScatterCombine.apply(y_sorted, token_idx, weights, num_tokens, token_rows)
