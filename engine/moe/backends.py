"""Expert compute backends: one object, chosen when the model is built, does all of the experts' math.

Each backend offers the same four operations on rows grouped by expert (counts [E] rows per expert,
optionally gathered from the token tensor through gather_idx [M]):
  mlp       y = swiglu(x_e W_gu[e] + b_gu[e]) W_d[e] + b_d[e]                   -> [M, H]
  lora_mlp  the same with a low-rank adapter added to each adapted projection  -> [M, H]
  linear    y = x_e W[e] + b[e]                                                   -> [M, N]
  combine   out[t] = sum of w_r * y_r over the rows r of token t, in fp32        -> [T, H]

- `loop`: gptoss_kernels.reference itself (one matmul per expert, a host sync for the group sizes): the
  reference the other backends are tested against, not a second copy of it.
- `grouped_mm`: torch._grouped_mm; no host sync; frozen weights get no weight gradient. MXFP4 weights
  (gptoss_kernels.mxfp4.Mxfp4Weight) go through the reference's per-expert products (one expert dequantized
  at a time), since torch._grouped_mm takes dense operands only.
- `triton`: the project's Triton kernels (gptoss_kernels/): gather fused into the first GEMM, SwiGLU in its
  epilogue, LoRA accumulated inside the same GEMMs, deterministic scatter-combine.
- `auto`: triton for CUDA tensors, loop elsewhere (decided per call from the tensors' device, since a
  model is often built on the meta device and moved later).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gptoss_kernels import reference
from gptoss_kernels.mxfp4 import Mxfp4Weight


@dataclass
class ExpertAdapters:
    """Low-rank adapters of the expert projections: (a, b) or None per projection. Per expert a [E, in, r],
    b [E, r, out]; shared by all experts a [in, r], b [r, out]. Output = x W + scaling * (dropout(x) a) b."""

    gate_up: tuple[torch.Tensor, torch.Tensor] | None
    down: tuple[torch.Tensor, torch.Tensor] | None
    scaling: float
    dropout: torch.nn.Module | None = None  # None or an identity: the adapter sees the base input


class _Combine(torch.autograd.Function):
    """The index_add combine, keeping y in its own dtype for the backward (autograd would keep the
    fp32 product rows instead: twice the bytes in bf16)."""

    @staticmethod
    def forward(ctx, y, w, token_of_row, num_tokens):
        ctx.save_for_backward(y, w, token_of_row)
        out = torch.zeros(num_tokens, y.shape[-1], dtype=torch.float32, device=y.device)
        out.index_add_(0, token_of_row, y.float() * w[:, None].float())
        return out.to(y.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        y, w, token_of_row = ctx.saved_tensors
        g = grad_out[token_of_row].float()  # [rows, H]: each row's token's gradient
        dy = (g * w[:, None].float()).to(y.dtype) if ctx.needs_input_grad[0] else None
        dw = (g * y.float()).sum(-1).to(w.dtype) if ctx.needs_input_grad[1] else None
        return dy, dw, None, None


class ExpertsBackend:
    """The torch operations every backend shares; subclasses replace the grouped products."""

    name = ""

    def mlp(self, x, counts, w_gu, b_gu, w_d, b_d, *, alpha, limit, gather_idx=None):
        if gather_idx is not None:
            x = x[gather_idx]
        act = reference.swiglu_reference(self.linear(x, counts, w_gu, b_gu), alpha, limit)
        return self.linear(act, counts, w_d, b_d)

    def linear(self, x, counts, w, b=None, gather_idx=None):
        raise NotImplementedError

    def lora_mlp(self, x, counts, w_gu, b_gu, w_d, b_d, adapters: ExpertAdapters, *, alpha, limit, gather_idx=None):
        """The adapted MLP as separate grouped products: the adapter's output joins each projection's."""
        if gather_idx is not None:
            x = x[gather_idx]  # gathered once, for the base product and the adapter's
        h = self.linear(x, counts, w_gu, b_gu) + self._delta(x, counts, adapters.gate_up, adapters)
        act = reference.swiglu_reference(h, alpha, limit)
        return self.linear(act, counts, w_d, b_d) + self._delta(act, counts, adapters.down, adapters)

    def _delta(self, x, counts, factors, adapters: ExpertAdapters):
        if factors is None:
            return 0
        a, b = (f.to(x.dtype) for f in factors)  # adapters may be fp32 masters of a bf16 compute
        if adapters.dropout is not None:
            x = adapters.dropout(x)
        if a.dim() == 2:  # shared by every expert: plain matmuls
            return (x @ a) * adapters.scaling @ b
        return self.linear(self.linear(x, counts, a) * adapters.scaling, counts, b)

    def combine(self, y_rows, w_rows, token_of_row, num_tokens, token_rows=None):
        """out [T, H] = sum over rows r of token t of w_rows[r] * y_rows[r] (fp32 sums). token_rows:
        (rows of each token [T*k], starts [T+1]) when the caller already knows them (unused here)."""
        return _Combine.apply(y_rows, w_rows, token_of_row, num_tokens)

    def for_device(self, device: torch.device) -> "ExpertsBackend":
        return self

    def __repr__(self) -> str:
        return self.name


class LoopBackend(ExpertsBackend):
    name = "loop"

    def mlp(self, x, counts, w_gu, b_gu, w_d, b_d, *, alpha, limit, gather_idx=None):
        return reference.expert_mlp_reference(
            x, counts, w_gu, b_gu, w_d, b_d, alpha=alpha, limit=limit, gather_idx=gather_idx
        )

    def linear(self, x, counts, w, b=None, gather_idx=None):
        return reference.grouped_linear_reference(x, counts, w, b, gather_idx)


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


def _row_bias(bias, counts, rows):
    if bias is None:
        return 0
    expert_of_row = torch.repeat_interleave(
        torch.arange(counts.numel(), device=counts.device), counts, output_size=rows
    )  # [M]; output_size avoids a host sync
    return bias[expert_of_row]


class GroupedMMBackend(ExpertsBackend):
    name = "grouped_mm"

    def linear(self, x, counts, w, b=None, gather_idx=None):
        if isinstance(w, Mxfp4Weight):
            return reference.grouped_linear_reference(x, counts, w, b, gather_idx)
        if gather_idx is not None:
            x = x[gather_idx]
        offsets = torch.cumsum(counts, 0).to(torch.int32)  # end row of each group
        return _GroupedMM.apply(x, w, offsets) + _row_bias(b, counts, x.shape[0])


class TritonBackend(ExpertsBackend):
    name = "triton"

    def mlp(self, x, counts, w_gu, b_gu, w_d, b_d, *, alpha, limit, gather_idx=None):
        from gptoss_kernels.moe_experts import expert_mlp

        return expert_mlp(x, counts, w_gu, b_gu, w_d, b_d, alpha=alpha, limit=limit, gather_idx=gather_idx)

    def linear(self, x, counts, w, b=None, gather_idx=None):
        from gptoss_kernels.grouped_linear import grouped_linear

        return grouped_linear(x, counts, w, b, gather_idx)

    def lora_mlp(self, x, counts, w_gu, b_gu, w_d, b_d, adapters: ExpertAdapters, *, alpha, limit, gather_idx=None):
        if adapters.dropout is not None and not isinstance(adapters.dropout, torch.nn.Identity):
            # One dropout mask on the adapter's input, another for the base: not one fused product.
            return super().lora_mlp(
                x, counts, w_gu, b_gu, w_d, b_d, adapters, alpha=alpha, limit=limit, gather_idx=gather_idx
            )
        from gptoss_kernels.moe_lora import expert_mlp_lora

        e = counts.numel()

        def per_expert(factors):  # a shared adapter as stride-0 per-expert views: no copy
            if factors is None:
                return None
            a, b = (f.to(x.dtype) for f in factors)
            return (a.expand(e, *a.shape), b.expand(e, *b.shape)) if a.dim() == 2 else (a, b)

        return expert_mlp_lora(
            x,
            counts,
            w_gu,
            b_gu,
            w_d,
            b_d,
            per_expert(adapters.gate_up),
            per_expert(adapters.down),
            adapters.scaling,
            alpha=alpha,
            limit=limit,
            gather_idx=gather_idx,
        )

    def combine(self, y_rows, w_rows, token_of_row, num_tokens, token_rows=None):
        from gptoss_kernels.scatter_combine import scatter_combine

        return scatter_combine(y_rows, token_of_row, w_rows, num_tokens, token_rows=token_rows)


class AutoBackend(ExpertsBackend):
    """triton on CUDA, loop elsewhere; each operation goes to the backend of its tensors' device."""

    name = "auto"
    _by_type = {"cuda": TritonBackend()}
    _other = LoopBackend()

    def for_device(self, device: torch.device) -> ExpertsBackend:
        return self._by_type.get(device.type, self._other)

    def mlp(self, x, *args, **kw):
        return self.for_device(x.device).mlp(x, *args, **kw)

    def lora_mlp(self, x, *args, **kw):
        return self.for_device(x.device).lora_mlp(x, *args, **kw)

    def linear(self, x, *args, **kw):
        return self.for_device(x.device).linear(x, *args, **kw)

    def combine(self, y_rows, *args, **kw):
        return self.for_device(y_rows.device).combine(y_rows, *args, **kw)


_BACKENDS = {"auto": AutoBackend, "loop": LoopBackend, "grouped_mm": GroupedMMBackend, "triton": TritonBackend}


def experts_backend(choice: str | ExpertsBackend) -> ExpertsBackend:
    """The backend object for a config value (`model.experts_backend`), or the object itself."""
    if isinstance(choice, ExpertsBackend):
        return choice
    if choice not in _BACKENDS:
        raise ValueError(f"model.experts_backend={choice!r} is not one of {tuple(_BACKENDS)}")
    return _BACKENDS[choice]()
