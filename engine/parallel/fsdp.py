"""`apply_fsdp(model, mesh, shard, ...)`: FSDP2 (torch `fully_shard`) over the data-parallel ranks.

`parallel.shard` chooses what is split across the ranks that hold copies of the same weights:

- `none`      nothing: every rank keeps whole weights, gradients and AdamW state; gradients are summed
              by engine.parallel.grad_sync (one all-reduce per group and dtype).
- `optimizer` gradients and optimizer state (and fp32 master weights) sharded; the weights are gathered
              once per step and kept through the backward (FSDP2 `reshard_after_forward=False`, ZeRO-2).
- `full`      weights too: each decoder block's weights are gathered for its forward and again for its
              backward, then freed (ZeRO-3). The least memory, the most traffic.

The layout: each decoder block and the model root (embedding, final norm, head) are sharded over the
whole world (the dense weights' data-parallel group). The experts of a block are replicated only across
their expert-data-parallel group (ranks with the same `ep_rank`), so they are a unit of their own sharded
over that group; with ep = world they are not replicated at all and FSDP leaves them out.

Gradients are SUMMED, never averaged (the loss is already divided by the global token count, see
engine.parallel.grad_sync): every unit's divide factor is 1. Reductions run in fp32 (`reduce_dtype`),
the forward and backward in `compute_dtype` (FSDP2's mixed precision: the sharded weights are the fp32
masters, cast when gathered).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from engine.config.choices import SHARD_MODES
from engine.parallel.mesh import Mesh
from engine.parallel.placement import expert_param_ids


def is_sharded(model: nn.Module) -> bool:
    # FSDP2 (and DTensor under it) is imported only where a model gets sharded: a module can be an
    # FSDPModule only once torch.distributed.fsdp is loaded, so generation, chat and evaluation in one
    # process never pay its import (~0.6 s).
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


def apply_fsdp(model: nn.Module, mesh: Mesh, shard: str, compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Apply FSDP2 to `model` (in place) for `shard` in SHARD_MODES; a no-op for `none` or one rank."""
    if shard not in SHARD_MODES:
        raise ValueError(f"parallel.shard={shard!r} is not allowed; choose one of {list(SHARD_MODES)}")
    if shard == "none" or not mesh.distributed:
        return model
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    world = mesh.world_mesh
    keep = shard == "optimizer"  # keep the gathered weights from forward to backward
    params_dtype = {p.dtype for p in model.parameters() if p.requires_grad}
    mp = MixedPrecisionPolicy(
        param_dtype=compute_dtype if params_dtype != {compute_dtype} else None, reduce_dtype=torch.float32
    )
    units: list[FSDPModule] = []
    for layer in model.model.layers:
        experts = layer.mlp.experts
        expert_params = set(experts.parameters())
        if mesh.edp_size > 1:
            units.append(
                fully_shard(experts, mesh=mesh.device_mesh["edp"], reshard_after_forward=not keep, mp_policy=mp)
            )
            ignored = None
        else:  # each rank's experts are its own: nothing to shard or reduce
            ignored = expert_params
        units.append(
            fully_shard(layer, mesh=world, reshard_after_forward=not keep, mp_policy=mp, ignored_params=ignored)
        )
    experts = expert_param_ids(model)
    root_ignored = None if mesh.edp_size > 1 else {p for p in model.parameters() if id(p) in experts}
    units.append(fully_shard(model, mesh=world, reshard_after_forward=False, mp_policy=mp, ignored_params=root_ignored))
    for unit in units:
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no pre-multiplied sum)
    return model


@contextmanager
def gathered(module: nn.Module) -> Iterator[nn.Module]:
    """The whole weights of one FSDP2 unit (its own parameters, not its sub-units') for code that uses
    them outside the unit's forward: evaluation and generation read the root's embedding, norm and head
    directly, and generation's cached path calls a block's submodules, not the block. A no-op on a module
    that is not sharded. Sub-units called as modules inside still gather themselves, one at a time, so
    `parallel.shard=full` never holds more than the training step does."""
    if not is_sharded(module):
        yield module
        return
    module.unshard()
    try:
        yield module
    finally:
        module.reshard()


def _local_grads(model: nn.Module) -> list[torch.Tensor]:
    """Each trainable parameter's gradient on this rank: the local shard of a DTensor one."""
    from torch.distributed.tensor import DTensor

    grads = (p.grad for p in model.parameters() if p.requires_grad and p.grad is not None)
    return [g.to_local() if isinstance(g, DTensor) else g for g in grads]


def sharded_grad_norm(model: nn.Module, mesh: Mesh) -> torch.Tensor:
    """Global L2 gradient norm under FSDP2: every rank's gradient shards are disjoint pieces of the
    model's gradient (dense shards over the world, expert shards over the (ep, edp) grid, unsharded
    experts at ep = world distinct per rank), so the squares add up over the world."""
    grads = _local_grads(model)
    sq = torch.zeros((), dtype=torch.float32, device=mesh.device)
    if grads:
        sq = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)).square().sum()
    dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=mesh.dp_group)
    return sq.sqrt()


def clip_sharded(model: nn.Module, mesh: Mesh, max_norm: float) -> torch.Tensor:
    norm = sharded_grad_norm(model, mesh)
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    grads = _local_grads(model)
    if grads:
        torch._foreach_mul_(grads, coef.to(grads[0].device))
    return norm
