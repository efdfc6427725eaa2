"""Token dispatch between the router and the experts.

The MoE forward in named phases (the same names are used by the expert-parallel dispatcher):
  route    -> (weights [N, k], indices [N, k]) from the router
  permute  -> order the N*k (token, expert) pairs by expert; counts per expert
  experts  -> grouped expert MLP on the permuted rows
  combine  -> scale each row by its routing weight and sum the k rows of each token (fp32)

`LocalDispatcher` is the single-rank (EP = 1) case: no communication and no host sync.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Permutation:
    order: torch.Tensor  # [N*k] index into the flattened (token, slot) pairs, grouped by expert
    token_of_row: torch.Tensor  # [N*k] the token each grouped row came from
    counts: torch.Tensor  # [E] rows per expert (int64)


def permute(indices: torch.Tensor, num_experts: int) -> Permutation:
    """Group the (token, slot) pairs of indices [N, k] by expert; stable, so ties keep token order."""
    flat = indices.reshape(-1)  # [N*k]
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # a histogram with no host sync
    return Permutation(order=order, token_of_row=order // indices.shape[1], counts=counts)


def uses_kernels(experts, device: torch.device) -> bool:
    """Whether this experts module runs the Triton backend (then the combine does too)."""
    from .experts import resolve_experts_backend

    return resolve_experts_backend(experts.backend, device) == "triton"


def combine(y_rows: torch.Tensor, weights_rows: torch.Tensor, token_of_row: torch.Tensor, num_tokens: int,
            use_kernel: bool = False):
    """out[t] = sum over rows r of token t of weights_rows[r] * y_rows[r]; accumulated in fp32.

    `use_kernel`: the Triton scatter-combine (each token sums its own rows in a fixed order:
    deterministic, unlike index_add_'s atomics on GPUs, which bit-exact resume needs)."""
    if use_kernel:
        from kernels.scatter_combine import scatter_combine

        return scatter_combine(y_rows, token_of_row, weights_rows, num_tokens)
    return _Combine.apply(y_rows, weights_rows, token_of_row, num_tokens)


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


class LocalDispatcher:
    """All experts live on this rank."""

    def __call__(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, experts) -> tuple:
        """x [N, H], weights/indices [N, k] -> (out [N, H], counts per expert [E])."""
        perm = permute(indices, experts.num_experts)
        y = experts(x, perm.counts, gather_idx=perm.token_of_row)  # [N*k, H] in grouped order
        w = weights.reshape(-1)[perm.order]  # [N*k]
        return combine(y, w, perm.token_of_row, x.shape[0], uses_kernels(experts, x.device)), perm.counts
