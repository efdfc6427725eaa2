"""Small differentiable collectives.

`all_to_all` moves rows between the ranks of a group with uneven split sizes. Its backward is the
same exchange with the splits swapped: the gradient of a received row goes back to the rank that
sent it. It uses `all_to_all_single` (one flat buffer), which NCCL and gloo both support with
uneven splits; the list form `all_to_all` is not implemented by gloo.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _exchange(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=out_splits, input_split_sizes=in_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _exchange(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad_out):
        out_splits, in_splits = ctx.splits
        return _exchange(grad_out, in_splits, out_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """x [sum(in_splits), ...] -> [sum(out_splits), ...]: rows in_splits[j] go to rank j of `group`,
    rows out_splits[j] arrive from rank j, in rank order. Differentiable.

    Every rank of the group must call this, and (in the backward) every rank must run its backward:
    that holds as long as `requires_grad` of x is the same on all ranks, which it is when the ranks
    run the same model with the same frozen/trainable parameters."""
    return _AllToAll.apply(x, list(out_splits), list(in_splits), group)


def any_rank(flag: bool, group, device: torch.device) -> bool:
    """True on every rank of `group` when `flag` is true on any of them (group None: this process alone),
    so that every rank takes the same branch: one small all-reduce."""
    if group is None:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())
