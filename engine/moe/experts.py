"""GPT-OSS experts: one 3-D tensor per projection (experts first), several compute backends.

Weights use the HF layout, (in, out) per expert, so `x_e @ gate_up_proj[e]` is the projection:
    gate_up_proj [E, H, 2I] (gate/up columns interleaved), gate_up_proj_bias [E, 2I]
    down_proj    [E, I, H],                                  down_proj_bias    [E, H]
Under expert parallelism a rank holds experts [offset, offset + E_local) of the full model.

Backends (`experts_backend`), all with the signature of `kernels.moe_experts.expert_mlp`:
- `loop`: the reference, one matmul per expert (host sync for the group sizes).
- `grouped_mm`: torch._grouped_mm, no host sync; frozen weights get no weight gradient.
- `triton`: the project's fused Triton kernels (kernels/), GEMM + SwiGLU epilogue + fused gather.

With a LoRA adapter attached (`GroupedExperts.lora`, set by engine.peft), the two projections run as
separate grouped products of the same backend so the adapter's output can join each one before what
follows it (the SwiGLU needs the adapted pre-activation, so the fused epilogue cannot be used).
"""

from __future__ import annotations

import torch
from torch import nn

EXPERT_BACKENDS = ("loop", "grouped_mm", "triton")


def _swiglu_math(h: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    gate, up = h[..., 0::2], h[..., 1::2]
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(alpha * gate) * (up + 1)


class _SwiGLU(torch.autograd.Function):
    """Keeps only the pre-activation h for the backward and recomputes the rest there: plain autograd
    would keep four more [M, I] intermediates (clamps, sigmoid, products) per expert row."""

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


def swiglu(h: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """GPT-OSS clamped SwiGLU on interleaved columns: h [M, 2I] -> [M, I]."""
    if torch.is_grad_enabled() and h.requires_grad:
        return _SwiGLU.apply(h, alpha, limit)
    return _swiglu_math(h, alpha, limit)


def _row_bias(bias: torch.Tensor | None, counts: torch.Tensor, rows: int) -> torch.Tensor | int:
    if bias is None:
        return 0
    expert_of_row = torch.repeat_interleave(
        torch.arange(counts.numel(), device=counts.device), counts, output_size=rows
    )  # [M]; output_size avoids a host sync
    return bias[expert_of_row]


def loop_expert_mlp(x, counts, w_gu, b_gu, w_d, b_d, *, alpha=1.702, limit=7.0, gather_idx=None):
    if gather_idx is not None:
        x = x[gather_idx]
    outs = []
    start = 0
    for e, n in enumerate(counts.tolist()):
        xe = x[start : start + n]
        h = xe @ w_gu[e] + (b_gu[e] if b_gu is not None else 0)
        y = swiglu(h, alpha, limit) @ w_d[e] + (b_d[e] if b_d is not None else 0)
        outs.append(y)
        start += n
    return torch.cat(outs) if outs else x.new_zeros(0, w_d.shape[-1])


class _GroupedMM(torch.autograd.Function):
    """y = x_e @ w[e] per group through torch._grouped_mm, with an explicit backward so that a
    frozen weight costs no dW and the CPU build (whose own backward rejects fp32) works too."""

    @staticmethod
    def forward(ctx, x, w, offsets):
        ctx.save_for_backward(x, w, offsets)
        return torch._grouped_mm(x, w, offs=offsets)

    @staticmethod
    def backward(ctx, dy):
        x, w, offsets = ctx.saved_tensors
        dy = dy.contiguous()
        dx = torch._grouped_mm(dy, w.transpose(-2, -1), offs=offsets) if ctx.needs_input_grad[0] else None
        dw = torch._grouped_mm(x.t(), dy, offs=offsets) if ctx.needs_input_grad[1] else None  # [E, K, N]
        return dx, dw, None


def grouped_mm_expert_mlp(x, counts, w_gu, b_gu, w_d, b_d, *, alpha=1.702, limit=7.0, gather_idx=None):
    if gather_idx is not None:
        x = x[gather_idx]
    offsets = torch.cumsum(counts, 0).to(torch.int32)  # end row of each group
    rows = x.shape[0]
    h = _GroupedMM.apply(x, w_gu, offsets) + _row_bias(b_gu, counts, rows)
    a = swiglu(h, alpha, limit)
    return _GroupedMM.apply(a, w_d, offsets) + _row_bias(b_d, counts, rows)


def triton_expert_mlp(x, counts, w_gu, b_gu, w_d, b_d, *, alpha=1.702, limit=7.0, gather_idx=None):
    from kernels.moe_experts import expert_mlp

    return expert_mlp(x, counts, w_gu, b_gu, w_d, b_d, alpha=alpha, limit=limit, gather_idx=gather_idx)


_BACKEND_FNS = {"loop": loop_expert_mlp, "grouped_mm": grouped_mm_expert_mlp, "triton": triton_expert_mlp}


# Grouped linear products y = x_e @ w[e] (+ b[e]) per backend: the pieces of the adapted MLP below.
def loop_linear(x, counts, w, b=None, gather_idx=None):
    if gather_idx is not None:
        x = x[gather_idx]
    outs, start = [], 0
    for e, n in enumerate(counts.tolist()):
        y = x[start : start + n] @ w[e]
        outs.append(y if b is None else y + b[e])
        start += n
    return torch.cat(outs) if outs else x.new_zeros(0, w.shape[-1])


def grouped_mm_linear(x, counts, w, b=None, gather_idx=None):
    if gather_idx is not None:
        x = x[gather_idx]
    offsets = torch.cumsum(counts, 0).to(torch.int32)
    return _GroupedMM.apply(x, w, offsets) + _row_bias(b, counts, x.shape[0])


def triton_linear(x, counts, w, b=None, gather_idx=None):
    from kernels.grouped_linear import grouped_linear

    return grouped_linear(x, counts, w, b, gather_idx)


_LINEAR_FNS = {"loop": loop_linear, "grouped_mm": grouped_mm_linear, "triton": triton_linear}


def adapted_expert_mlp(backend, lora, x, counts, w_gu, b_gu, w_d, b_d, *, alpha=1.702, limit=7.0, gather_idx=None):
    """The expert MLP with `lora.delta(proj, x, counts, gather_idx, linear)` ([M, out] or 0) added to the
    output of each projection (proj = "gate_up_proj" | "down_proj"), computed by `backend`'s grouped products."""
    base_linear = _LINEAR_FNS[backend]

    def linear(x, counts, w, b=None, gather_idx=None):  # adapters may be fp32 masters of a bf16 compute
        return base_linear(x, counts, w.to(x.dtype), None if b is None else b.to(x.dtype), gather_idx)

    if gather_idx is not None and backend != "triton":
        x, gather_idx = x[gather_idx], None  # gather once for the base product and the adapter's
    h = linear(x, counts, w_gu, b_gu, gather_idx) + lora.delta("gate_up_proj", x, counts, gather_idx, linear)
    a = swiglu(h, alpha, limit)
    return linear(a, counts, w_d, b_d) + lora.delta("down_proj", a, counts, None, linear)


def resolve_experts_backend(name: str, device: torch.device) -> str:
    if name == "auto":
        return "triton" if device.type == "cuda" else "loop"
    if name not in EXPERT_BACKENDS:
        raise ValueError(f"model.experts_backend={name!r} is not one of {('auto',) + EXPERT_BACKENDS}")
    return name


class GroupedExperts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, *, alpha: float, limit: float,
                 expert_offset: int = 0, backend: str = "auto"):
        super().__init__()
        self.num_experts, self.expert_offset = num_experts, expert_offset
        self.alpha, self.limit, self.backend = alpha, limit, backend
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, hidden_size, 2 * intermediate_size))
        self.gate_up_proj_bias = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.down_proj_bias = nn.Parameter(torch.empty(num_experts, hidden_size))
        # A LoRA adapter (engine.peft.lora.ExpertLoRA) or None. An adapter shared by all experts is a
        # dense parameter registered on the MoE block and only referenced here; see engine/peft/lora.py.
        self.lora = None

    def forward(self, x: torch.Tensor, counts: torch.Tensor, gather_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Rows grouped by local expert (counts [E_local]) -> expert outputs [M, H], not yet routing-weighted.

        With `gather_idx` [M], x is the token tensor [T, H] and row r of the grouped order is x[gather_idx[r]]."""
        backend = resolve_experts_backend(self.backend, x.device)
        weights = (self.gate_up_proj, self.gate_up_proj_bias, self.down_proj, self.down_proj_bias)
        if torch.is_autocast_enabled(x.device.type):
            # Autocast does not reach grouped GEMMs: cast by hand (fp32 master weights, bf16 compute).
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weights = x.to(dtype), tuple(w.to(dtype) for w in weights)
        if self.lora is not None and not self.lora.merged:
            return adapted_expert_mlp(backend, self.lora, x, counts, *weights, alpha=self.alpha, limit=self.limit,
                                      gather_idx=gather_idx)
        return _BACKEND_FNS[backend](x, counts, *weights, alpha=self.alpha, limit=self.limit, gather_idx=gather_idx)

    def extra_repr(self) -> str:
        e, h, i2 = self.gate_up_proj.shape
        return f"experts={e} (offset {self.expert_offset}), hidden={h}, intermediate={i2 // 2}, backend={self.backend}"
