"""GPT-OSS expert MLP with LoRA adapters fused into the expert GEMMs, forward and backward.

An adapted projection is x W + s (x A) B (A [E, in, r], B [E, r, out], scaling s). The product
z = s x_e A_e [M, r] is computed once per row (a grouped GEMM with N = r), and z_e B_e joins the
main GEMM's fp32 accumulator before the epilogue (grouped_gemm's low-rank term): the SwiGLU epilogue
stays fused, and no [M, 2I] / [M, H] adapter output is ever written.

Forward (after the tile map): z1 = s x A_gu; act = swiglu(x W_gu + b_gu + z1 B_gu) (h kept for the
backward); z2 = s act A_d; y = act W_d + b_d + z2 B_d.
Backward, with the frozen base weights getting no gradient work unless they require it:
  u = s dy B_d^T                      [M, r]
  dh, act = swiglu'(h) * (dy W_d^T + u A_d^T)      one GEMM, SwiGLU-backward epilogue, act recomputed
  dB_d = z2^T dy, dA_d = act^T u      ragged per-expert reductions
  v = s dh B_gu^T                     [M, r]
  dB_gu = z1^T dh, dA_gu = x^T v      (x rows gathered through gather_idx)
  dx = dh W_gu^T + v A_gu^T           one GEMM; with gather_idx, summed back per token
Saved for the backward: x (an input), h [M, 2I], z1 and z2 [M, r]. W_gu and W_d may be Mxfp4Weights (frozen,
dequantized in registers inside the same GEMMs; see moe_experts.py). The torch reference is
gptoss_kernels.reference.expert_mlp_lora_reference.
"""

import torch

from gptoss_kernels import _runtime
from gptoss_kernels.grouped_dw import grouped_weight_grad
from gptoss_kernels.grouped_gemm import grouped_matmul, grouped_matmul_swiglu, grouped_matmul_swiglu_bwd
from gptoss_kernels.grouped_linear import check_rows, check_weight
from gptoss_kernels.mxfp4 import join, split, tensors_of
from gptoss_kernels.scatter_combine import scatter_rows
from gptoss_kernels.tile_map import build_layout, choose_block_m


def _t(w):
    return None if w is None else w.transpose(1, 2)


def _low(z, b):
    return None if b is None else (z, b)


def _dw(x, dy, layout, w, need, gather_idx=None):
    if not need:
        return None
    return grouped_weight_grad(x, dy, layout.offsets, gather_idx=gather_idx, w_dtype=w.dtype)[0]


class _ExpertMLPLoRA(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x, counts, w_gu, b_gu, w_d, b_d, a_gu, bb_gu, a_d, bb_d, scaling, alpha, limit, gather_idx, keep_pre
    ):
        m = gather_idx.shape[0] if gather_idx is not None else x.shape[0]
        layout = build_layout(counts, m, choose_block_m(m, counts.numel()))
        z1 = grouped_matmul(x, layout, a_gu, gather_idx=gather_idx) * scaling if a_gu is not None else None
        act, h = grouped_matmul_swiglu(
            x,
            layout,
            w_gu,
            b_gu,
            alpha=alpha,
            limit=limit,
            gather_idx=gather_idx,
            keep_pre=keep_pre,
            low_rank=_low(z1, bb_gu),
        )  # [M, I], [M, 2I]
        z2 = grouped_matmul(act, layout, a_d) * scaling if a_d is not None else None
        y = grouped_matmul(act, layout, w_d, b_d, low_rank=_low(z2, bb_d))  # [M, H]
        ctx.save_for_backward(x, *split(w_gu), *split(w_d), h, gather_idx, a_gu, bb_gu, a_d, bb_d, z1, z2)
        ctx.layout, ctx.scaling, ctx.alpha, ctx.limit = layout, scaling, alpha, limit
        ctx.b_dtypes = (None if b_gu is None else b_gu.dtype, None if b_d is None else b_d.dtype)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable  # the backward kernels have no backward
    def backward(ctx, dy):
        x, w_gu, gu_scales, w_d, d_scales, h, gather_idx, a_gu, bb_gu, a_d, bb_d, z1, z2 = ctx.saved_tensors
        w_gu, w_d = join(w_gu, gu_scales), join(w_d, d_scales)  # need_wgu / need_wd are False for MXFP4
        (need_x, _, need_wgu, need_bgu, need_wd, need_bd, need_agu, need_bbgu, need_ad, need_bbd) = (
            ctx.needs_input_grad[:10]
        )
        layout, s = ctx.layout, ctx.scaling
        dy = dy.contiguous()
        need_dh = need_x or need_wgu or need_bgu or need_agu or need_bbgu

        u = grouped_matmul(dy, layout, _t(bb_d)) * s if a_d is not None and (need_dh or need_ad) else None
        dh = act = None
        if need_dh or need_wd or need_ad:
            dh, act = grouped_matmul_swiglu_bwd(
                dy,
                layout,
                _t(w_d),
                h,
                alpha=ctx.alpha,
                limit=ctx.limit,
                want_act=need_wd or need_ad,
                low_rank=_low(u, _t(a_d)) if u is not None else None,
            )  # [M, 2I], [M, I] or None
        dw_d, db_d = grouped_weight_grad(
            act,
            dy,
            layout.offsets,
            w_dtype=w_d.dtype if need_wd else None,
            b_dtype=ctx.b_dtypes[1] if need_bd else None,
        )
        d_bbd = _dw(z2, dy, layout, bb_d, need_bbd)  # [E, r, H]
        d_ad = _dw(act, u, layout, a_d, need_ad)  # [E, I, r]

        dw_gu = db_gu = dx = d_agu = d_bbgu = None
        if need_dh:
            v = grouped_matmul(dh, layout, _t(bb_gu)) * s if a_gu is not None and (need_x or need_agu) else None
            dw_gu, db_gu = grouped_weight_grad(
                x,
                dh,
                layout.offsets,
                gather_idx=gather_idx,
                w_dtype=w_gu.dtype if need_wgu else None,
                b_dtype=ctx.b_dtypes[0] if need_bgu else None,
            )
            d_bbgu = _dw(z1, dh, layout, bb_gu, need_bbgu)  # [E, r, 2I]
            d_agu = _dw(x, v, layout, a_gu, need_agu, gather_idx)  # [E, H, r]
            if need_x:
                dx = grouped_matmul(dh, layout, _t(w_gu), low_rank=_low(v, _t(a_gu)) if v is not None else None)
                if gather_idx is not None:  # a token's top-k rows sum back into it
                    dx = scatter_rows(dx, gather_idx, x.shape[0])  # [T, H]
        return (dx, None, dw_gu, db_gu, dw_d, db_d, d_agu, d_bbgu, d_ad, d_bbd, None, None, None, None, None)


def _check_adapter(name, factors, x, num_experts, fan_in, fan_out):
    if factors is None:
        return None, None
    a, b = factors
    check_weight(f"{name} A", a, None, x, num_experts, fan_in)
    check_weight(f"{name} B", b, None, x, num_experts, a.shape[2])
    if b.shape[2] != fan_out:
        raise ValueError(f"{name} B must have {fan_out} outputs, got shape {tuple(b.shape)}")
    return a, b


def expert_mlp_lora(
    x, counts, w_gu, b_gu, w_d, b_d, lora_gu, lora_d, scaling, *, alpha=1.702, limit=7.0, gather_idx=None
) -> torch.Tensor:
    """gptoss_kernels.moe_experts.expert_mlp with LoRA: lora_gu / lora_d are (A [E, in, r], B [E, r, out]) or None
    (a shared adapter can be passed as stride-0 expanded views). w_gu / w_d may be Mxfp4Weights (frozen, as in
    expert_mlp). Differentiable w.r.t. x, the adapters, the biases and any dense base weight that requires grad;
    y [M, H] in sorted order."""
    _runtime.check_tensors(
        x, counts, *tensors_of(w_gu), b_gu, *tensors_of(w_d), b_d, gather_idx, *(lora_gu or ()), *(lora_d or ())
    )
    check_rows(x, counts, gather_idx)
    e = counts.numel()
    check_weight("w_gu", w_gu, b_gu, x, e, x.shape[1], as_stored=True)
    if w_gu.shape[2] % 2:
        raise ValueError(f"w_gu must have an even number of (interleaved gate/up) columns, got {w_gu.shape[2]}")
    inter = w_gu.shape[2] // 2
    check_weight("w_d", w_d, b_d, x, e, inter, as_stored=True)
    a_gu, bb_gu = _check_adapter("gate_up", lora_gu, x, e, x.shape[1], 2 * inter)
    a_d, bb_d = _check_adapter("down", lora_d, x, e, inter, w_d.shape[2])
    tensors = (x, w_gu, b_gu, w_d, b_d, a_gu, bb_gu, a_d, bb_d)
    keep_pre = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    return _ExpertMLPLoRA.apply(
        x,
        counts,
        w_gu,
        b_gu,
        w_d,
        b_d,
        a_gu,
        bb_gu,
        a_d,
        bb_d,
        float(scaling),
        float(alpha),
        float(limit),
        gather_idx,
        keep_pre,
    )
