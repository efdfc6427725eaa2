"""Gradient synchronisation, global gradient norm and the global token count.

The loss convention that makes every layout give the single-process update:

    loss on rank r = (summed token loss of rank r's tokens) / (number of target tokens of the
                     WHOLE global batch, all ranks and micro-batches: `global_token_count`)

so the single-process loss is the SUM of the ranks' losses, and its gradient is the SUM of the
ranks' gradients. Hence gradients are summed, never averaged:

- dense parameters (everything but the experts, engine.parallel.placement: embeddings, attention, norms, router,
  lm_head) are replicated on every rank, and rank r's copy only saw rank r's tokens: sum over
  the data-parallel group (the world);
- expert parameters live on one rank of each EP group. The all-to-all backward already brought
  that rank the gradient from every token of its EP group routed to the expert; the other EP
  groups hold the same experts and saw other tokens: sum over the expert-data-parallel group
  (ranks with the same ep_rank). With ep = world that group is one rank and nothing moves.

Parameters with requires_grad=False are skipped (a frozen LoRA base costs no communication).
Gradients travel as flat buckets (one all-reduce per group, dtype and `bucket_mb`), not one per
parameter: the per-call latency of a collective dwarfs its bandwidth cost for small tensors.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from engine.parallel.mesh import Mesh
from engine.parallel.placement import named_params


def _trainable(model: nn.Module, experts: bool) -> list[torch.nn.Parameter]:
    """Expert parameters are split over the EP group (engine.parallel.placement); the rest is replicated."""
    return [p for _, p in named_params(model, experts=experts, trainable=True)]


def global_token_count(local_count: int | torch.Tensor, mesh: Mesh) -> torch.Tensor:
    """Sum over all ranks of `local_count` (this rank's target tokens in the whole optimizer step,
    all its micro-batches): the `loss_normalizer` every rank must use. An int64 tensor on
    mesh.device; no host sync unless the caller reads it."""
    n = torch.as_tensor(local_count, dtype=torch.int64, device=mesh.device).clone()
    if mesh.distributed:
        dist.all_reduce(n, op=dist.ReduceOp.SUM, group=mesh.dp_group)
    return n


def _all_reduce_sum(grads: list[torch.Tensor], group, bucket_bytes: int) -> None:
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for same_dtype in by_dtype.values():
        bucket: list[torch.Tensor] = []
        size = 0
        for g in same_dtype:
            bucket.append(g)
            size += g.numel() * g.element_size()
            if size >= bucket_bytes:
                _reduce_bucket(bucket, group)
                bucket, size = [], 0
        if bucket:
            _reduce_bucket(bucket, group)


def _reduce_bucket(bucket: list[torch.Tensor], group) -> None:
    # Summed in fp32 even for bf16 gradients (bf16 weights with fp32 masters): a bf16 sum over
    # dozens of ranks loses the small contributions; the result is rounded once when copied back.
    flat = torch.cat([g.reshape(-1) for g in bucket]).float()
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    for g, part in zip(bucket, flat.split([g.numel() for g in bucket])):
        g.copy_(part.view_as(g))


def _grads(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    # A parameter no token reached on this rank (an expert with no tokens, a rank without any) has
    # no .grad, but the other ranks' buckets include it: give it zeros so every rank's buckets line
    # up element for element.
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return [p.grad for p in params]


def sync_gradients(model: nn.Module, mesh: Mesh, bucket_mb: float = 256.0) -> None:
    """SUM the gradients: dense over the data-parallel group, experts over the expert-DP group.
    Call once per optimizer step, after the last micro-batch's backward, on every rank."""
    if not mesh.distributed:
        return
    bucket_bytes = max(1, int(bucket_mb * 2**20))
    _all_reduce_sum(_grads(_trainable(model, experts=False)), mesh.dp_group, bucket_bytes)
    if mesh.edp_size > 1:
        _all_reduce_sum(_grads(_trainable(model, experts=True)), mesh.edp_group, bucket_bytes)


def _sum_of_squares(params: list[torch.nn.Parameter], device: torch.device) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.float32, device=device)
    norms = torch._foreach_norm(grads, 2, dtype=torch.float32)  # fp32 without an fp32 copy of each grad
    return torch.stack(norms).square().sum()


def global_grad_norm(model: nn.Module, mesh: Mesh) -> torch.Tensor:
    """The L2 norm of the full model's gradient (as one process would compute it), identical on
    every rank. Call after `sync_gradients`. An fp32 scalar on mesh.device; no host sync.

    After the sync, dense gradients are identical on every rank: counted once, locally. Expert
    gradients are identical across the expert-DP group but each rank of an EP group holds a
    different slice: their squares are summed over the EP group."""
    dense = _sum_of_squares(_trainable(model, experts=False), mesh.device)
    expert = _sum_of_squares(_trainable(model, experts=True), mesh.device)
    if mesh.ep > 1:
        dist.all_reduce(expert, op=dist.ReduceOp.SUM, group=mesh.ep_group)
    return (dense + expert).sqrt()


def clip_grad_norm(model: nn.Module, mesh: Mesh, max_norm: float) -> torch.Tensor:
    """Scale every trainable gradient so the global norm is at most max_norm; returns the norm
    before clipping. Every rank applies the same factor, so replicas stay identical."""
    norm = global_grad_norm(model, mesh)
    params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm
