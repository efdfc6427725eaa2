"""Pure-torch references for the expert kernels: slow, obviously right, and autograd-differentiable.

Each function has the signature of its fast counterpart. They loop over experts in Python and
read `counts` on the host, so they sync; they are for tests and for running without Triton.
Expert weights may be dense tensors or `Mxfp4Weight`s (gptoss_kernels.mxfp4): an MXFP4 weight is dequantized
one expert at a time, in the forward and again in the backward, so no layer's dense weights ever exist
(autograd keeps the packed bytes, not a dense copy).
"""

import torch

from gptoss_kernels.mxfp4 import FP4_VALUES, GROUP, Mxfp4Weight


def dequantize_mxfp4(blocks, scales, dtype=torch.bfloat16):
    """blocks uint8 [..., G, 16] + scales uint8 [..., G] -> values [..., 32 G] in `dtype` ((out, in) as stored).

    value = FP4[code] * 2**(scale - 127), the low nibble being the even element: 2 * FP4 (exact in fp32)
    times 2**(scale - 128) (a power of two fp32 holds for every byte, 2**-128 as a subnormal), rounded once
    in fp32 (inf past its range: scale 255 gives 0, 2**127 or inf, never NaN), then converted to `dtype`.
    Bit-equal to transformers' convert_moe_packed_tensors on every byte and scale (tested). Peak memory
    ~13 bytes per value: pass one expert, or a few rows, at a time."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[-1:] != (GROUP // 2,) or blocks.shape[:-1] != scales.shape:
        raise ValueError(
            f"MXFP4 blocks [..., G, {GROUP // 2}] and scales [..., G] do not match: "
            f"{tuple(blocks.shape)} and {tuple(scales.shape)}"
        )
    doubled = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device) * 2
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).reshape(-1)  # even element first
    values = doubled.index_select(0, codes.int()).view(*scales.shape, GROUP)  # [..., G, 32] fp32
    factor = torch.exp2(scales.double() - 128).float()  # [..., G], exact powers of two
    values.mul_(factor.unsqueeze(-1))
    return values.view(*scales.shape[:-1], scales.shape[-1] * GROUP).to(dtype)


def _mxfp4_dense(blocks, scales, transposed, dtype):
    """One expert's dense weight as a matmul operand: [in, out], or [out, in] when transposed."""
    w = dequantize_mxfp4(blocks, scales, dtype)  # [out, in]
    return w if transposed else w.t()


class _Mxfp4Matmul(torch.autograd.Function):
    """x @ W for one expert's MXFP4 weight, dequantized here and again for dx: autograd keeps the packed
    bytes (views), never a dense copy. The weight is frozen (uint8): no weight gradient exists."""

    @staticmethod
    def forward(ctx, x, blocks, scales, transposed):
        ctx.save_for_backward(blocks, scales)
        ctx.transposed = transposed
        n_out = blocks.shape[1] * GROUP if transposed else blocks.shape[0]
        if x.shape[0] == 0:
            return x.new_zeros(0, n_out)
        return x @ _mxfp4_dense(blocks, scales, transposed, x.dtype)

    @staticmethod
    def backward(ctx, dy):
        blocks, scales = ctx.saved_tensors
        n_in = blocks.shape[0] if ctx.transposed else blocks.shape[1] * GROUP
        if dy.shape[0] == 0:
            return dy.new_zeros(0, n_in), None, None, None
        return dy @ _mxfp4_dense(blocks, scales, ctx.transposed, dy.dtype).t(), None, None, None


def expert_matmul(x, w, e):
    """x [rows, in] @ w[e] for a dense weight [E, in, out] or an Mxfp4Weight (dequantized for this call)."""
    if isinstance(w, Mxfp4Weight):
        return _Mxfp4Matmul.apply(x, w.blocks[e], w.scales[e], w.transposed)
    return x @ w[e]


def _swiglu_math(h, alpha, limit):
    gate, up = h[..., 0::2], h[..., 1::2]
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(alpha * gate) * (up + 1)


class _SwiGLU(torch.autograd.Function):
    """Keeps only h for the backward and differentiates the same math again there: plain autograd
    would keep four more [M, I] intermediates (clamps, sigmoid, products)."""

    @staticmethod
    def forward(ctx, h, alpha, limit):
        ctx.save_for_backward(h)
        ctx.alpha, ctx.limit = alpha, limit
        return _swiglu_math(h, alpha, limit)

    @staticmethod
    def backward(ctx, grad_out):
        (h,) = ctx.saved_tensors
        with torch.enable_grad():
            leaf = h.detach().requires_grad_()
            (dh,) = torch.autograd.grad(_swiglu_math(leaf, ctx.alpha, ctx.limit), leaf, grad_out)
        return dh, None, None


def swiglu_reference(h, alpha=1.702, limit=7.0):
    """GPT-OSS clamped SwiGLU: h [.., 2I] with interleaved gate/up columns -> [.., I]."""
    if torch.is_grad_enabled() and h.requires_grad:
        return _SwiGLU.apply(h, alpha, limit)
    return _swiglu_math(h, alpha, limit)


def _groups(counts):
    """(expert, start, end) row ranges of the non-empty groups."""
    start = 0
    for e, c in enumerate(counts.tolist()):
        if c:
            yield e, start, start + c
        start += c


def grouped_linear_reference(x, counts, w, b=None, gather_idx=None):
    """y [M, N] = x_e @ w[e] + b[e] per expert's contiguous row group (see grouped_linear)."""
    if gather_idx is not None:
        x = x[gather_idx]  # [M, K] in sorted order
    # An empty product, not new_zeros: the output stays connected to x, w and b when every group is
    # empty, so a backward still runs (expert parallelism's exchanges need it on every rank) and
    # gives every weight a (zero) gradient, as a layer whose experts got rows does.
    pieces = [x.new_zeros(0, w.shape[2])]
    if w.shape[0]:
        pieces = [expert_matmul(x[:0], w, 0) + (0 if b is None else b[0])]
    for e, s, t in _groups(counts):
        y = expert_matmul(x[s:t], w, e)
        pieces.append(y + b[e] if b is not None else y)
    return torch.cat(pieces)


def expert_mlp_reference(x, counts, w_gu, b_gu, w_d, b_d, *, alpha=1.702, limit=7.0, gather_idx=None):
    """swiglu(x_e @ w_gu[e] + b_gu[e]) @ w_d[e] + b_d[e] per expert group (see expert_mlp)."""
    if gather_idx is not None:
        x = x[gather_idx]  # [M, H] in sorted order
    # Connected to the inputs even when every group is empty (see grouped_linear_reference).
    pieces = [x.new_zeros(0, w_d.shape[2])]
    if w_gu.shape[0]:
        h0 = expert_matmul(x[:0], w_gu, 0) + (0 if b_gu is None else b_gu[0])  # [0, 2I]
        pieces = [expert_matmul(h0[:, 0::2], w_d, 0) + (0 if b_d is None else b_d[0])]
    for e, s, t in _groups(counts):
        h = expert_matmul(x[s:t], w_gu, e)  # [rows, 2I]
        if b_gu is not None:
            h = h + b_gu[e]
        y = expert_matmul(swiglu_reference(h, alpha, limit), w_d, e)  # [rows, H]
        pieces.append(y + b_d[e] if b_d is not None else y)
    return torch.cat(pieces)


def lora_delta_reference(x, counts, a, b, scaling):
    """scaling * (x_e @ a[e]) @ b[e] per expert group; a [E, in, r], b [E, r, out], or one shared
    a [in, r], b [r, out] for every expert."""
    if a.dim() == 2:
        return (x @ a) * scaling @ b
    z = grouped_linear_reference(x, counts, a) * scaling  # [M, r]
    return grouped_linear_reference(z, counts, b)


def expert_mlp_lora_reference(
    x, counts, w_gu, b_gu, w_d, b_d, lora_gu, lora_d, scaling, *, alpha=1.702, limit=7.0, gather_idx=None
):
    """The expert MLP with a low-rank adapter (a, b) or None on each projection:
    h = x W_gu + b_gu + s (x A_gu) B_gu;  y = swiglu(h) W_d + b_d + s (swiglu(h) A_d) B_d."""
    if gather_idx is not None:
        x = x[gather_idx]
    h = grouped_linear_reference(x, counts, w_gu, b_gu)
    if lora_gu is not None:
        h = h + lora_delta_reference(x, counts, *lora_gu, scaling)
    act = swiglu_reference(h, alpha, limit)
    y = grouped_linear_reference(act, counts, w_d, b_d)
    if lora_d is not None:
        y = y + lora_delta_reference(act, counts, *lora_d, scaling)
    return y


def scatter_combine_reference(y_sorted, token_idx, weights, num_tokens):
    """out [T, H] = sum over rows r with token_idx[r] == t of weights[r] * y_sorted[r], in fp32."""
    acc = torch.promote_types(y_sorted.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
    out = torch.zeros(num_tokens, y_sorted.shape[1], dtype=acc, device=y_sorted.device)
    rows = weights.to(acc)[:, None] * y_sorted.to(acc)  # [M, H]
    return out.index_add(0, token_idx.long(), rows).to(y_sorted.dtype)


def tile_map_reference(counts, num_rows, block_m):
    """(offsets [E+1], [(expert, first_row)] of every non-empty tile in order) from counts."""
    offsets, tiles, start = [0], [], 0
    for e, c in enumerate(counts.tolist()):
        end = min(start + c, num_rows)
        tiles += [(e, r) for r in range(start, end, block_m)]
        start = end
        offsets.append(end)
    return offsets, tiles
