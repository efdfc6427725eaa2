"""Differentiable grouped linear layer: y[r] = x[src(r)] @ w[e(r)] + b[e(r)] over expert-sorted rows.

The plain grouped GEMM with its backward, for any caller that needs one (LoRA adapters use it
with a small N = rank). Also holds the argument checks shared with moe_experts.py.
"""

import torch

from gptoss_kernels import _runtime
from gptoss_kernels.grouped_dw import grouped_weight_grad
from gptoss_kernels.grouped_gemm import grouped_matmul
from gptoss_kernels.mxfp4 import Mxfp4Weight, join, split, tensors_of
from gptoss_kernels.scatter_combine import scatter_rows
from gptoss_kernels.tile_map import build_layout, choose_block_m


def check_rows(x, counts, gather_idx) -> int:
    """Validate the row inputs; return M, the number of expert-sorted rows."""
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [rows, features], got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
    if counts.dim() != 1 or counts.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"counts must be a 1-D int32/int64 tensor, got {counts.dtype} {tuple(counts.shape)}")
    if gather_idx is None:
        return x.shape[0]
    if gather_idx.dim() != 1 or gather_idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"gather_idx must be a 1-D int32/int64 tensor, got {gather_idx.dtype} {tuple(gather_idx.shape)}"
        )
    return gather_idx.shape[0]


def check_weight(name: str, w, bias, x, num_experts: int, k: int, as_stored: bool = False):
    """Validate a 3-D expert weight [E, k, N] (or an Mxfp4Weight standing for one) and its optional bias [E, N]
    against x. as_stored: an MXFP4 weight must not be a transposed view (a square one would pass the shapes)."""
    if isinstance(w, Mxfp4Weight):
        if as_stored and w.transposed:
            raise ValueError(f"{name} is a transposed MXFP4 view; pass the weight as the checkpoint stores it")
        if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(
                f"{name} is MXFP4: x must be bf16, fp16 or fp32 (the weight dequantizes to x's dtype), got {x.dtype}"
            )
        if w.shape[0] != num_experts or w.shape[1] != k:
            raise ValueError(
                f"{name} (MXFP4, blocks {tuple(w.blocks.shape)}) stands for a "
                f"[{w.shape[0]}, {w.shape[1]}, {w.shape[2]}] weight; it must be [{num_experts} experts "
                f"(len(counts)), {k} inputs, N]"
            )
    elif w.dim() != 3 or w.shape[0] != num_experts or w.shape[1] != k:
        raise ValueError(
            f"{name} must be [{num_experts} experts (len(counts)), {k} inputs, N], got shape {tuple(w.shape)}"
        )
    elif w.dtype != x.dtype:
        raise ValueError(f"{name} dtype {w.dtype} differs from x dtype {x.dtype}; cast one of them")
    if bias is not None and tuple(bias.shape) != (num_experts, w.shape[2]):
        raise ValueError(f"the bias of {name} must be [{num_experts}, {w.shape[2]}], got {tuple(bias.shape)}")


class _GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, counts, w, b, gather_idx):
        m = gather_idx.shape[0] if gather_idx is not None else x.shape[0]
        layout = build_layout(counts, m, choose_block_m(m, counts.numel()))
        ctx.save_for_backward(x, *split(w), gather_idx)
        ctx.layout, ctx.w_transposed = layout, getattr(w, "transposed", False)
        ctx.b_dtype = b.dtype if b is not None else None
        return grouped_matmul(x, layout, w, b, gather_idx=gather_idx)

    @staticmethod
    @torch.autograd.function.once_differentiable  # the backward kernels have no backward
    def backward(ctx, dy):
        x, w, w_scales, gather_idx = ctx.saved_tensors
        w = join(w, w_scales, ctx.w_transposed)
        need_x, _, need_w, need_b, _ = ctx.needs_input_grad  # need_w: never for an MXFP4 weight (frozen)
        layout = ctx.layout
        dx = None
        if need_x:
            # dx = dy @ w[e]^T: the same kernel on a transposed view of w, no copy.
            dx = grouped_matmul(dy, layout, w.transpose(1, 2))
            if gather_idx is not None:  # rows of one token (top-k) sum back into that token
                dx = scatter_rows(dx, gather_idx, x.shape[0])
        dw, db = grouped_weight_grad(
            x,
            dy,
            layout.offsets,
            gather_idx=gather_idx,
            w_dtype=w.dtype if need_w else None,
            b_dtype=ctx.b_dtype if need_b else None,
        )
        return dx, None, dw, db, None


def grouped_linear(x, counts, w, b=None, gather_idx=None):
    """y [M, N] = x_e @ w[e] + b[e] for each expert's contiguous row group.

    x: [M, K] sorted by expert, or the token tensor [T, K] when gather_idx [M] is given (row r
    reads x[gather_idx[r]]); counts: [E] int32/int64 rows per expert on x's device, summing to M;
    w: [E, K, N], or an Mxfp4Weight standing for one (frozen: dequantized inside the GEMM, no gradient);
    b: [E, N] or None. Gradients flow to x, w and b; a frozen w costs no dW work.
    """
    _runtime.check_tensors(x, counts, *tensors_of(w), b, gather_idx)
    check_rows(x, counts, gather_idx)
    check_weight("w", w, b, x, counts.numel(), x.shape[1])
    return _GroupedLinear.apply(x, counts, w, b, gather_idx)
