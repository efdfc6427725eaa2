"""GPT-OSS expert MLP on expert-sorted rows, as fused Triton grouped GEMMs with a fused backward.

Forward (2 launches after the tile map):
  act = swiglu(x_e @ w_gu[e] + b_gu[e])   grouped GEMM, rows gathered in its loads, SwiGLU epilogue;
                                          also writes h (pre-activation) when a backward will run
  y   = act @ w_d[e] + b_d[e]             grouped GEMM
Backward (up to 4 launches, each skipped when nothing needs it):
  dh, act = swiglu'(h) * (dy @ w_d[e]^T)  grouped GEMM with a SwiGLU-backward epilogue that also
                                          recomputes act, so act is never saved
  dw_d, db_d = act_e^T @ dy_e, sum dy_e   ragged per-expert reduction
  dw_gu, db_gu = x_e^T @ dh_e, sum dh_e   same, x rows gathered through gather_idx
  dx = dh @ w_gu[e]^T                     grouped GEMM; with gather_idx, summed back per token
w_gu and w_d may each be an Mxfp4Weight (gptoss_kernels.mxfp4): the GEMMs that read it (the forward and dX
products) dequantize its tiles in registers, and it gets no gradient (it is frozen; the dW launch is skipped).
The per-expert torch loop in reference.py is the slow reference these are tested against.
"""

import torch

from gptoss_kernels import _runtime
from gptoss_kernels.grouped_dw import grouped_weight_grad
from gptoss_kernels.grouped_gemm import grouped_matmul, grouped_matmul_swiglu, grouped_matmul_swiglu_bwd
from gptoss_kernels.grouped_linear import check_rows, check_weight
from gptoss_kernels.mxfp4 import join, split, tensors_of
from gptoss_kernels.scatter_combine import scatter_rows
from gptoss_kernels.tile_map import build_layout, choose_block_m


class _ExpertMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, counts, w_gu, b_gu, w_d, b_d, alpha, limit, gather_idx, keep_pre):
        m = gather_idx.shape[0] if gather_idx is not None else x.shape[0]
        layout = build_layout(counts, m, choose_block_m(m, counts.numel()))
        act, h = grouped_matmul_swiglu(
            x, layout, w_gu, b_gu, alpha=alpha, limit=limit, gather_idx=gather_idx, keep_pre=keep_pre
        )  # [M, I], [M, 2I]
        y = grouped_matmul(act, layout, w_d, b_d)  # [M, H]
        ctx.save_for_backward(x, *split(w_gu), *split(w_d), h, gather_idx)
        ctx.layout, ctx.alpha, ctx.limit = layout, alpha, limit
        ctx.b_gu_dtype = b_gu.dtype if b_gu is not None else None
        ctx.b_d_dtype = b_d.dtype if b_d is not None else None
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable  # the backward kernels have no backward
    def backward(ctx, dy):
        x, w_gu, w_gu_scales, w_d, w_d_scales, h, gather_idx = ctx.saved_tensors
        w_gu, w_d = join(w_gu, w_gu_scales), join(w_d, w_d_scales)
        # (an MXFP4 weight is not a tensor argument: it never needs a gradient)
        need_x, _, need_wgu, need_bgu, need_wd, need_bd = ctx.needs_input_grad[:6]
        layout = ctx.layout
        need_dh = need_x or need_wgu or need_bgu

        dh = act = None
        if need_dh or need_wd:
            dh, act = grouped_matmul_swiglu_bwd(
                dy,
                layout,
                w_d.transpose(1, 2),
                h,
                alpha=ctx.alpha,
                limit=ctx.limit,
                want_act=need_wd,
            )  # [M, 2I], [M, I] or None
        dw_d, db_d = grouped_weight_grad(
            act,
            dy,
            layout.offsets,
            w_dtype=w_d.dtype if need_wd else None,
            b_dtype=ctx.b_d_dtype if need_bd else None,
        )
        dw_gu = db_gu = dx = None
        if need_dh:
            dw_gu, db_gu = grouped_weight_grad(
                x,
                dh,
                layout.offsets,
                gather_idx=gather_idx,
                w_dtype=w_gu.dtype if need_wgu else None,
                b_dtype=ctx.b_gu_dtype if need_bgu else None,
            )
        if need_x:
            dx = grouped_matmul(dh, layout, w_gu.transpose(1, 2))  # [M, H]
            if gather_idx is not None:  # a token's top-k rows sum back into it
                dx = scatter_rows(dx, gather_idx, x.shape[0])  # [T, H]
        return dx, None, dw_gu, db_gu, dw_d, db_d, None, None, None, None


def expert_mlp(x, counts, w_gu, b_gu, w_d, b_d, *, alpha=1.702, limit=7.0, gather_idx=None) -> torch.Tensor:
    """GPT-OSS experts on rows grouped by expert: y = swiglu(x_e @ w_gu[e] + b_gu[e]) @ w_d[e] + b_d[e].

    x: [M, H] sorted by expert (group e is counts[e] contiguous rows), or the token tensor [T, H]
       when gather_idx [M] is given (sorted row r reads x[gather_idx[r]]; dx sums back per token).
    counts: [E] int32/int64 on x's device, summing to M (not checked: that needs a host sync).
    w_gu: [E, H, 2I] with interleaved gate/up columns; b_gu: [E, 2I] or None.
    w_d: [E, I, H]; b_d: [E, H] or None. Weights share x's dtype; any strides work.
    Either weight may be an Mxfp4Weight instead (blocks [E, out, in/32, 16] and scales [E, out, in/32] uint8,
    as the checkpoint stores gate_up_proj (out 2I, in H) and down_proj (out H, in I)): frozen, dequantized to
    x's dtype inside the GEMMs; its bias stays a tensor in any float dtype and may train.
    Returns y [M, H] in sorted order, not yet scaled by routing weights. Differentiable w.r.t. x and
    every weight and bias that requires grad; frozen ones cost no gradient work.
    """
    _runtime.check_tensors(x, counts, *tensors_of(w_gu), b_gu, *tensors_of(w_d), b_d, gather_idx)
    check_rows(x, counts, gather_idx)
    num_experts = counts.numel()
    check_weight("w_gu", w_gu, b_gu, x, num_experts, x.shape[1], as_stored=True)
    if w_gu.shape[2] % 2:
        raise ValueError(f"w_gu must have an even number of (interleaved gate/up) columns, got {w_gu.shape[2]}")
    check_weight("w_d", w_d, b_d, x, num_experts, w_gu.shape[2] // 2, as_stored=True)
    # h is saved only when a backward can follow (inside autograd.Function grad mode is off).
    keep_pre = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w_gu, b_gu, w_d, b_d))
    return _ExpertMLP.apply(x, counts, w_gu, b_gu, w_d, b_d, float(alpha), float(limit), gather_idx, keep_pre)
